"""Every method on a tiny LLaVA-NeXT and a tiny LLaVA-OneVision whose rows hold different numbers of visual
tokens (anyres tiles, newline tokens, a row with two images): the compaction invariant of
tests/test_equivalence.py for the post-prefill methods, the in-prefill ones on rows of equal counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import make_llava_next, make_llava_onevision
from PIL import Image
from test_equivalence import METHODS

import vkv_jax
from vkv_jax import cache as cache_lib
from vkv_jax import decode
from vkv_jax.api import device_images
from vkv_jax.methods import Compression, build
from vkv_jax.selection import keep_mask

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
    params, cfg = model.params, model.config
    ids, valid = jnp.asarray(batch.input_ids), jnp.asarray(batch.valid)
    pix = device_images(batch.pixel_values, jnp.float32)

    @jax.jit
    def both(params, ids, valid, pix):
        S = ids.shape[1]
        p = decode.run_prompt(params, cfg, method, ids, valid, pix)
        plan = method.plan(p.stats, p.ctx)
        full = cache_lib.from_prefill(p.k, p.v, p.ctx.positions, p.ctx.tags, S)
        compact = cache_lib.compact(full, plan, decode.decode_capacity(method.capacity(S, p.ctx.num_visual), STEPS))
        keep = keep_mask(plan.indices, plan.count, S)
        masked = cache_lib.from_prefill(p.k, p.v, p.ctx.positions, p.ctx.tags, decode.decode_capacity(S, STEPS))
        masked = masked.replace(pos=jnp.where(jnp.pad(keep, [(0, 0)] * 3 + [(0, masked.capacity - S)]),
                                              masked.pos, -1))
        tokens = jnp.argmax(p.logits, -1).astype(jnp.int32)
        positions = valid.sum(1).astype(jnp.int32)
        out = []
        for _ in range(STEPS):
            lc, compact = decode.decode_step(params, cfg, compact, tokens, positions)
            lm, masked = decode.decode_step(params, cfg, masked, tokens, positions)
            out.append((lc, lm))
            tokens, positions = jnp.argmax(lm, -1).astype(jnp.int32), positions + 1
        return out, compact, keep

    out, compact, keep = both(params, ids, valid, pix)
    live_prompt = np.asarray(keep) & np.asarray(valid)[None, :, None, :]
    assert live_prompt.sum() < np.asarray(valid).sum() * keep.shape[0] * keep.shape[2]
    for lc, lm in out:
        np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(compact.length) - STEPS, live_prompt.sum(-1))
    if name == "aircache":  # AirCache keeps every text token and a share of each row's own visual tokens
        text = np.asarray(valid) & (batch.input_ids != cfg.image_token_id)
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
