"""Sharded inference (`vkv_jax.load(..., mesh=...)`): weights tensor-parallel over `model`, rows and the paged KV
pool over `data` and kv heads. The multi-device checks run `tests/sharded_run.py` in a subprocess with 8 host
CPU devices, so this process keeps its one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_fixtures import IMAGE_TOKEN_ID, TOKENIZER, make_llava
from jax.sharding import PartitionSpec as P

import vkv_jax
from vkv_jax import paging
from vkv_jax.models import family, sharding

HERE = os.path.dirname(__file__)
METHODS = "full,snapkv:0.1,aircache:0.1,vlcache:0.1,adakv:0.1,keynorm:0.1,lightkv"  # keynorm: tests/one_file_method.py
MESHES = ("1x8", "2x4", "8x1")


def run_sharded(*args: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # the suite's persistent compilation cache (conftest.py)
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_run.py"), *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """16 query heads over 8 kv heads: the kv heads divide every mesh's `model` axis (8, 4, 1)."""
    path = tmp_path_factory.mktemp("gqa16x8")
    make_llava(path, num_heads=16, num_kv_heads=8, hidden=128, image_size=64, head_scale=30.0)
    return str(path)


def _check_same_as_one_device(result: dict, pool_axes: dict[str, list]) -> None:
    assert result["devices"] == 8
    one = result["one_device"]
    for spec in MESHES:
        got = result["meshes"][spec]
        for name, ref in one.items():
            assert got["generate"][name]["tokens"] == ref["tokens"], (spec, name)
            assert got["generate"][name]["kv_bytes"] == ref["kv_bytes"], (spec, name)
            np.testing.assert_allclose(got["generate"][name]["kept_vision"], ref["kept_vision"], atol=1e-6)
        assert got["pool_axes"] == pool_axes[spec], spec
        data, model = map(int, spec.split("x"))
        rows, heads = pool_axes[spec]
        blocks = (data if rows else 1) * (model if heads else 1)
        # each device holds its own block of the pool, no more
        assert got["pool_bytes_per_device"] == [got["pool_bytes"] // blocks] * 8, spec


def test_gqa_fixture_sharded_generation_equals_one_device(gqa_dir):
    """Meshes (1, 8), (2, 4), (8, 1): the same greedy tokens, live KV and kept tokens per layer as one device
    for full, SnapKV, AirCache, VL-Cache, AdaKV and LightKV; the pool splits over rows and kv heads."""
    result = run_sharded("generate", gqa_dir, "--methods", METHODS)
    _check_same_as_one_device(result, {"1x8": [None, "model"], "2x4": ["data", "model"], "8x1": ["data", None]})
    # the testbed vocabulary (51) divides no model axis; everything else splits (vision: 4 heads over 4 too)
    assert set(result["meshes"]["2x4"]["replicated"]) == {"lm/embed", "lm/lm_head"}
    assert result["meshes"]["8x1"]["param_bytes_per_device"][0] > 4 * result["meshes"]["1x8"][
        "param_bytes_per_device"][-1]


def test_shipped_model_sharded_generation_equals_one_device():
    """The shipped model's 2 kv heads divide no `model` axis above 2: its K/V weights and the pool stay whole
    over `model` (the documented fallback, listed in `model.replicated`), and the results are unchanged."""
    # the layout, not the methods; int8 pages (and their scales) split like float ones, and a decode segment
    # trimmed to 6 slots (`~6`: DecodeTrim(6, 2, 2); 12 new tokens, so it trims) keeps its scores and settings
    result = run_sharded("generate", "default", "--methods", "full,snapkv:0.1@int8~6", "--new-tokens", "12")
    _check_same_as_one_device(result, {"1x8": [None, None], "2x4": ["data", None], "8x1": ["data", None]})
    replicated = result["meshes"]["2x4"]["replicated"]
    assert "lm/layers/0/k" in replicated and "lm/layers/0/q" not in replicated  # 4 query heads split 4 ways


def test_7b_shaped_checkpoint_is_split_eight_ways(tmp_path):
    """A LLaVA-1.5-7B-shaped checkpoint (Llama-2-7B and CLIP ViT-L/14-336 widths, one LM and two vision
    layers) saved by transformers in bfloat16 loads on a (1, 8) mesh with about 1/8 of the weights on each
    device, reading no block larger than one shard of the largest tensor."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vkv_jax.testbed import tiny

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=2, num_attention_heads=16, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(cfg)
    hf = hf.to_empty(device="cpu").to(torch.bfloat16)
    for p in hf.parameters():  # values do not matter here, only finite ones of the right shapes
        torch.nn.init.normal_(p, std=0.02)
    hf.save_pretrained(tmp_path)
    del hf
    tiny.write_tokenizer_files(tmp_path, TOKENIZER, 336)

    result = run_sharded("load", str(tmp_path), "--mesh", "1x8", "--dtype", "bfloat16")
    per_device = list(result["bytes_per_device"].values())
    total = result["total_bytes"]
    assert total > 0.9e9  # ~500M parameters in bfloat16
    assert result["replicated"] == []
    # replicated: norm scales, row-parallel biases, the vision embeddings (patch, positions): ~2 MB here
    assert max(per_device) <= total / 8 * 1.03, (per_device, total)
    assert result["largest_block_read"] <= result["largest_tensor"] / 8
    print(f"7B-shaped (1 LM layer): {total / 2**20:.0f} MiB of weights, {max(per_device) / 2**20:.1f} MiB on each "
          f"of 8 devices; largest host block {result['largest_block_read'] / 2**20:.1f} MiB; per device by part "
          + ", ".join(f"{k} {b / 2**20:.1f} MiB" for k, b in result["max_bytes_per_device_by_part"].items()))


def test_pallas_kernels_run_per_device_under_a_mesh():
    """Under a (2, 4) mesh every Pallas kernel (decode attention, compaction, window scores, splash prefill
    attention; interpret mode) runs inside shard_map on its own rows and kv heads (its output split over
    both axes) and equals its jnp reference on one device."""
    result = run_sharded("kernels", "-", "--mesh", "2x4")
    assert result["devices"] == 8
    for name in ("decode_attention", "compact_kv", "window_scores", "splash_attention"):
        assert result[name]["max_abs_diff"] <= 2e-6, (name, result[name])
        assert result[name]["devices"] == [8], name
        assert "'data', 'model'" in result[name]["spec"], (name, result[name]["spec"])


# ----------------------------------------------------------------------------------------- one device


def _llava_cfg(heads: int, kv_heads: int, vocab: int = 64, hidden: int = 64, inter: int = 96):
    return family.config_from_hf({
        "model_type": "llava", "image_token_index": 3, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
                        "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": heads,
                        "num_key_value_heads": kv_heads},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
    })


def test_param_spec_splits_whole_heads_and_dividing_axes_only():
    cfg = _llava_cfg(heads=8, kv_heads=2)  # head_dim 8
    spec = lambda path, shape, m: sharding.param_spec(path, shape, cfg, m)  # noqa: E731
    assert spec(("lm", "layers", "q"), (2, 64, 64), 4) == P(None, None, "model")
    assert spec(("lm", "layers", "o"), (2, 64, 64), 4) == P(None, "model", None)
    # 2 kv heads over 4 devices: k's 16 columns divide 4, but that would split heads: kept whole
    assert spec(("lm", "layers", "k"), (2, 64, 16), 4) == P(None, None, None)
    assert spec(("lm", "layers", "k"), (2, 64, 16), 2) == P(None, None, "model")
    assert spec(("lm", "layers", "gate"), (2, 64, 96), 4) == P(None, None, "model")
    assert spec(("lm", "layers", "down"), (2, 96, 64), 4) == P(None, "model", None)
    assert spec(("lm", "layers", "gate"), (2, 64, 96), 5) == P(None, None, None)  # 96 % 5: whole
    assert spec(("lm", "embed"), (64, 64), 4) == P("model", None)
    assert spec(("lm", "lm_head"), (64, 64), 4) == P(None, "model")
    assert spec(("lm", "layers", "attn_norm"), (2, 64), 4) == P()
    assert spec(("vision", "layers", "q"), (1, 32, 32), 4) == P(None, None, "model")
    assert spec(("lm", "layers", "q"), (2, 64, 64), 1) == P(None, None, None)


def test_make_mesh_and_load_reject_bad_meshes():
    mesh = vkv_jax.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        vkv_jax.make_mesh(4, 4)
    with pytest.raises(ValueError, match="positive int"):
        vkv_jax.make_mesh(0)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        vkv_jax.load(mesh="1x8")
    with pytest.raises(ValueError, match="must be named"):
        vkv_jax.load(mesh=jax.make_mesh((1, 1), ("x", "y")))


def test_fitted_pool_splits_fit_the_fullest_device():
    """A split pool's pages are one device's block: enough for the device whose rows and kv heads need the
    most pages (a brute-force count over blocks), rounded as the unsplit pool is."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 200, size=(3, 4, 8))
    lengths[:, :2, :4] += 300  # one block much fuller than the rest
    ps, pages = paging.fitted_pool(lengths, splits=(2, 4))
    need = max(int(np.ceil(lengths[:, b * 2:(b + 1) * 2, h * 2:(h + 1) * 2] / ps).sum())
               for b in range(2) for h in range(4))
    assert need <= pages <= need * (1 + 1 / 8)
    assert paging.fitted_pool(lengths, splits=(1, 1)) == paging.fitted_pool(lengths)


def test_one_device_model_has_no_mesh_and_nothing_replicated():
    model = vkv_jax.load()
    assert model.mesh is None and model.replicated == []
