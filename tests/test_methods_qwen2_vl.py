"""Every method on tiny Qwen2-VL and Qwen2.5-VL checkpoints: rows with different visual-token counts (native
resolutions, a row with two images), M-RoPE positions and decoding from the rope deltas. The compaction
invariant of tests/test_equivalence.py for the post-prefill methods; LightKV and FastV (in-prefill) on rows
of equal counts, LightKV windowing over each image's own merged-patch grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_compaction_invariant
from hf_fixtures import make_qwen2_vl
from PIL import Image
from test_equivalence import METHODS

import vkv_jax
from vkv_jax import request
from vkv_jax.inputs import bind_visual_layout, device_images
from vkv_jax.methods import Compression, build
from vkv_jax.methods.base import Full

STEPS = 2


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"qwen{request.param}")
    make_qwen2_vl(path, version=request.param, num_heads=8, num_kv_heads=2, head_scale=10.0,
                  mrope_section=(1, 1, 2))
    return vkv_jax.load(path)


@pytest.fixture(scope="module")
def batch(model):
    inputs = model.prepare([[image(37, 53, 1), image(20, 60, 2)], [image(61, 29, 3)]],
                           ["is there a red square?", "what colour is the circle?"])
    assert len(set(inputs.visual_tokens)) == 2
    return inputs


def test_tags_mark_every_visual_token(model, batch):
    from vkv_jax.models import family

    pix = device_images(batch.pixel_values, jnp.float32)
    _, tags, rope = jax.jit(lambda p, i, v, x: family.prompt_embeddings(p, model.config, i, v, x))(
        model.params, jnp.asarray(batch.input_ids), jnp.asarray(batch.valid), pix)
    np.testing.assert_array_equal(np.asarray(tags) == 1, batch.input_ids == model.config.image_token_id)
    assert list(np.asarray(tags).sum(1)) == batch.visual_tokens
    assert rope.shape == (3,) + batch.input_ids.shape


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compacted_decode_equals_masked_full_decode(model, batch, name):
    method = build(Compression(name.split("_")[0], **METHODS[name]))
    cfg = model.config
    live_prompt = assert_compaction_invariant(model, batch, method, STEPS)
    if name == "aircache":  # every text token, and a share of each row's own visual tokens
        text = batch.valid & (batch.input_ids != cfg.image_token_id)
        assert (live_prompt & text[None, :, None, :]).sum(-1).min() == text.sum(-1).min()
        vis = live_prompt & (batch.input_ids == cfg.image_token_id)[None, :, None, :]
        assert (vis.sum(-1).max(axis=(0, 2)) < np.asarray(batch.visual_tokens)).all()


def equal_count_rows(model):
    inputs = model.prepare([image(37, 53, 1), image(37, 53, 2)], ["is there a red square?", "what colour?"])
    assert len(set(inputs.visual_tokens)) == 1
    return inputs


def test_lightkv_without_merging_equals_the_full_model_exactly(model):
    """The segmented prefill carries the M-RoPE positions of the surviving slots: with merge ratio 0
    it is the full model, bit for bit, first token and decode cache."""
    inputs = equal_count_rows(model)
    method = bind_visual_layout(build(Compression("lightkv", merge_layers=0, merge_windows=1, merge_ratios=0.0)),
                                model.config, inputs)
    args = (model.params, model.config)
    ids, valid = jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid)
    pix = device_images(inputs.pixel_values, jnp.float32)
    got = request.prefill_jit(*args, method, ids, valid, pix)
    want = request.prefill_jit(*args, Full(), ids, valid, pix)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lightkv_windows_over_each_images_merged_patch_grid(model, batch):
    method = bind_visual_layout(build(Compression("lightkv")), model.config, batch)
    grids = []
    for lays in batch.layouts:
        at, row = 0, []
        for lay in lays:
            (_, rows, cols, _), = lay.regions
            row.append((at, rows, cols, cols))
            at += rows * cols
        grids.append(tuple(row))
    assert method.grids == tuple(grids)
    assert len(method.grids[0]) == 2 and method.grids[0][0][1:3] != method.grids[0][1][1:3]


@pytest.mark.parametrize("compression", [Compression("fastv", budget=0.5, k=1),
                                         Compression("lightkv", merge_layers=0, merge_windows=1)],
                         ids=["fastv", "lightkv"])
def test_in_prefill_methods_on_qwen_rows(model, compression):
    inputs = equal_count_rows(model)
    full = vkv_jax.generate(model, inputs, max_new_tokens=3)
    out = vkv_jax.generate(model, inputs, max_new_tokens=3, compression=compression)
    assert out.stats["visual_tokens"] == inputs.visual_tokens
    vis = out.stats["kept_vision_per_layer"]
    assert vis[0] == inputs.visual_tokens[0] and vis[-1] < vis[0]
    assert full.tokens.shape == out.tokens.shape


def test_in_prefill_methods_without_ragged_support_refuse_rows_of_different_counts(model, batch):
    from vkv_jax.inputs import visual_token_bound

    with pytest.raises(ValueError, match="same number of visual tokens"):
        visual_token_bound(model.config, batch, build(Compression("lightkv")))


def test_chunked_prefill_carries_mrope_positions(model, batch):
    """`generate(prefill_chunk=16)` slices the M-RoPE positions [3, B, S] chunk by chunk: VL-Cache's
    post-vision scores, its keep-sets and the greedy tokens equal the one-shot prefill's on rows with
    different visual-token counts (one of two images)."""
    assert batch.input_ids.shape[1] > 32  # several chunks
    compression = Compression("vlcache", budget=0.3)
    one = vkv_jax.generate(model, batch, 4, compression, return_layout=True)
    chunked = vkv_jax.generate(model, batch, 4, compression, return_layout=True, prefill_chunk=16)
    np.testing.assert_array_equal(chunked.tokens, one.tokens)
    for field in ("length", "pos", "tag"):
        np.testing.assert_array_equal(chunked.layout[field], one.layout[field])
