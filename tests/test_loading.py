"""Checkpoint loading: every key layout, sharding, bad files, and our writer read back by transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import IMAGE_TOKEN_ID, make_llava

from vkv_jax.models import loading, safetensors_io, saving


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    hf = make_llava(path)
    _, cfg = loading.read_config(path)
    return path, hf, cfg, loading.load_params(path, cfg)


def rewrite(src, dst, rename=lambda k: k, shards=1, drop=(), extra=None):
    """Copy a checkpoint dir with renamed keys, split into `shards` files with an index."""
    import shutil

    shutil.copytree(src, dst)
    st = safetensors_io.SafetensorsFile(dst / "model.safetensors")
    tensors = {rename(k): np.array(st.get(k)) for k in st.keys() if k not in drop}
    tensors.update(extra or {})
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    if shards == 1:
        safetensors_io.save(dst / "model.safetensors", tensors)
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        safetensors_io.save(dst / name, {k: tensors[k] for k in part})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_same_params(a, b):
    la, lb = jax_leaves(a), jax_leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def jax_leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(jax_leaves(v, prefix + k + "/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def hub_layout(k):  # llava-hf on the hub: vision_tower.vision_model.*
    return k.replace("vision_tower.", "vision_tower.vision_model.")


def v4_layout(k):  # transformers 4.52-4.x: model.language_model.* / model.vision_tower.vision_model.* / lm_head
    if k.startswith("language_model.lm_head"):
        return k.replace("language_model.", "")
    return "model." + hub_layout(k).replace("language_model.model.", "language_model.")


@pytest.mark.parametrize("layout", [hub_layout, v4_layout])
def test_all_key_layouts_load_to_identical_params(reference, tmp_path, layout):
    path, _, cfg, params = reference
    rewrite(path, tmp_path / "m", rename=layout)
    assert_same_params(params, loading.load_params(tmp_path / "m", cfg))


def test_sharded_checkpoint(reference, tmp_path):
    path, _, cfg, params = reference
    rewrite(path, tmp_path / "m", shards=3)
    assert_same_params(params, loading.load_params(tmp_path / "m", cfg))


def test_missing_shard_is_named(reference, tmp_path):
    path, _, cfg, _ = reference
    rewrite(path, tmp_path / "m", shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        loading.load_params(tmp_path / "m", cfg)


def test_missing_keys_are_listed(reference, tmp_path):
    path, _, cfg, _ = reference
    rewrite(path, tmp_path / "m", drop=("language_model.model.layers.1.mlp.up_proj.weight",
                                       "multi_modal_projector.linear_2.bias"))
    with pytest.raises(ValueError, match="missing tensors") as err:
        loading.load_params(tmp_path / "m", cfg)
    assert "lm/layers/up (layers [1])" in str(err.value) and "projector/b2" in str(err.value)


def test_unknown_keys_are_listed(reference, tmp_path):
    path, _, cfg, _ = reference
    rewrite(path, tmp_path / "m", extra={"image_newline": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="unknown checkpoint keys.*image_newline"):
        loading.load_params(tmp_path / "m", cfg)


def test_bfloat16_load_keeps_weights_in_bfloat16(reference):
    path, _, cfg, params = reference
    bf = loading.load_params(path, cfg, jnp.bfloat16)
    assert bf["lm"]["layers"]["q"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf["lm"]["embed"], np.float32), np.asarray(params["lm"]["embed"]),
                               rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_written_checkpoint_loads_in_transformers_with_same_logits(reference, tmp_path, dtype):
    from transformers import LlavaForConditionalGeneration

    _, _, cfg, params = reference
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    saving.save_checkpoint(tmp_path / "w", params, cfg)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    ours = loading.load_params(tmp_path / "w", cfg, jnp.float32)
    assert_same_params(ours, jax.tree.map(lambda a: a.astype(jnp.float32), params))
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1, 5], [IMAGE_TOKEN_ID] * cfg.num_image_tokens, [7, 8, 9]])[None]
    pix = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    from vkv_jax.models import llava

    got = np.asarray(llava.logits(ours, cfg, jnp.asarray(ids), jnp.asarray(pix)))
    np.testing.assert_allclose(got, ref, atol=1e-4)
