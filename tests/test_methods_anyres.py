"""Every method on a tiny LLaVA-NeXT and a tiny LLaVA-OneVision whose rows hold different numbers of visual
tokens (anyres tiles, newline tokens, a row with two images): the compaction invariant of
tests/test_equivalence.py for the post-prefill methods, the in-prefill ones on rows of equal counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_compaction_invariant
from hf_fixtures import make_llava_next, make_llava_onevision
from PIL import Image
from test_equivalence import METHODS

import vkv_jax
from vkv_jax.inputs import device_images
from vkv_jax.methods import Compression, build

STEPS = 2  # decode steps compared (compile time grows with them; tests/test_equivalence.py runs 4)


def image(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make = make_llava_next if request.param == "llava_next" else make_llava_onevision
    make(path, num_heads=8, num_kv_heads=2, head_scale=10.0, text_layers=2)
    return vkv_jax.load(path)


@pytest.fixture(scope="module")
def batch(model):
    inputs = model.prepare([[image(37, 53, 1), image(20, 100, 2)], [image(61, 29, 3)]],
                           ["is there a red square?", "what colour is the circle?"])
    assert len(set(inputs.visual_tokens)) == 2
    return inputs


def test_tags_mark_every_visual_token(model, batch):
    """Base crop, tiles and newline tokens are all tagged vision; text and padding are not."""
    pix = device_images(batch.pixel_values, jnp.float32)
    _, tags = jax.jit(lambda p, i, v: __import__("vkv_jax").models.llava.merge_embeddings(p, model.config, i, v))(
        model.params, jnp.asarray(batch.input_ids), pix)
    np.testing.assert_array_equal(np.asarray(tags) == 1, batch.input_ids == model.config.image_token_id)
    assert list(np.asarray(tags).sum(1)) == batch.visual_tokens


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compacted_decode_equals_masked_full_decode(model, batch, name):
    method = build(Compression(name.split("_")[0], **METHODS[name]))
    live_prompt = assert_compaction_invariant(model, batch, method, STEPS)
    if name == "aircache":  # AirCache keeps every text token and a share of each row's own visual tokens
        text = batch.valid & (batch.input_ids != model.config.image_token_id)
        assert (live_prompt & text[None, :, None, :]).sum(-1).min() == text.sum(-1).min()


@pytest.mark.parametrize("compression", [Compression("fastv", budget=0.5, k=1),
                                         Compression("lightkv", merge_layers=0, merge_windows=1)],
                         ids=["fastv", "lightkv"])
def test_in_prefill_methods_on_anyres_rows(model, compression):
    inputs = model.prepare([image(37, 53, 1), image(40, 55, 2)], ["is there a red square?", "what colour?"])
    assert len(set(inputs.visual_tokens)) == 1  # same best-fit grid and unpadding: equal counts
    full = vkv_jax.generate(model, inputs, max_new_tokens=3)
    out = vkv_jax.generate(model, inputs, max_new_tokens=3, compression=compression)
    assert out.stats["visual_tokens"] == inputs.visual_tokens
    vis = out.stats["kept_vision_per_layer"]
    assert vis[0] == inputs.visual_tokens[0] and vis[-1] < vis[0]
    assert full.tokens.shape == out.tokens.shape


def test_lightkv_grid_plan_of_one_square_is_the_released_codes():
    from vkv_jax.methods.lightkv import _grid_windows, grid_stages, window_plan

    for s, w in [(24, 4), (12, 2), (9, 1)]:
        n = s * s
        gs = grid_stages(((0, s, s, s),), n, ((w, 0.5),))[0]
        ref = window_plan(n, w, 0.5)
        np.testing.assert_array_equal(gs.cnt, ref.cnt)
        np.testing.assert_array_equal(gs.r, ref.r)
        assert gs.n_out == ref.n_out
        # the traced windows of a row: 3 text tokens, the image, 2 text tokens, left padding of 2
        S = n + 7
        valid = np.arange(S) >= 2
        is_vis = (np.arange(S) >= 5) & (np.arange(S) < 5 + n)
        pos = np.where(valid, np.cumsum(valid) - 1, -1)
        idx = np.asarray(_grid_windows(gs, (jnp.asarray(pos), jnp.asarray(valid), jnp.asarray(is_vis)),
                                       jnp.arange(5, 5 + n)))
        live = np.arange(idx.shape[1]) < ref.cnt[:, None]
        np.testing.assert_array_equal(idx[live], ref.idx[live])


def test_lightkv_windows_stay_inside_each_grid():
    from vkv_jax.methods.lightkv import _grid_windows, grid_stages

    # a 4x4 base crop, then a 6x8 tile grid whose rows end in a newline token (stride 9): 16 + 54 tokens
    grids = ((0, 4, 4, 4), (16, 6, 8, 9))
    n = 16 + 6 * 9
    gs = grid_stages(grids, n, ((1, 0.5),))[0]
    assert gs.n_out == n - 8 - 24  # half of each grid (one window each) merged; the 6 newlines untouched
    valid = np.ones(n + 3, bool)
    is_vis = np.arange(n + 3) >= 3
    idx = np.asarray(_grid_windows(gs, (jnp.arange(n + 3), jnp.asarray(valid), jnp.asarray(is_vis)),
                                   jnp.arange(3, n + 3)))
    region = gs.region[idx]
    for wdw, c in enumerate(gs.cnt):
        assert len(set(region[wdw, :c])) == 1 and region[wdw, 0] >= 0
    newline = 16 + np.arange(6) * 9 + 8
    assert not np.isin(newline, idx[np.arange(idx.shape[1]) < gs.cnt[:, None]]).any()


def test_lightkv_keeps_every_newline_token_of_an_anyres_image(model):
    inputs = model.prepare([image(37, 53, 1)], ["is there a red square?"])
    out = vkv_jax.generate(model, inputs, max_new_tokens=2, return_layout=True,
                           compression=Compression("lightkv", merge_layers=0, merge_windows=1))
    lay = inputs.layouts[0][0]
    slots = np.nonzero(inputs.input_ids[0] == model.config.image_token_id)[0]
    first = inputs.input_ids.shape[1] - inputs.prompt_lengths[0]
    newline_pos = slots[lay.source[:, 0] == -1] - first
    kept = out.layout["pos"][-1, 0, 0]
    assert np.isin(newline_pos, kept).all()
    assert out.stats["kept_vision_per_layer"][-1] < lay.num_tokens
