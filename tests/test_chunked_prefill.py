"""Chunked prefill (`decode.chunked_prompt`, `llama.prefill_layers_chunked`) equals the one-shot prefill."""

import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax import decode
from vkv_jax.methods import Compression, build
from vkv_jax.models import attention
from vkv_jax.models.loading import random_params
from vkv_jax.testbed.tiny import tiny_config


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = tiny_config(64, 63, image_size=32)  # 16 visual tokens
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    row = np.concatenate([[1, 2, 3], [63] * n, rng.integers(4, 60, 11)]).astype(np.int32)  # 30 slots
    pad = 7
    ids = jnp.asarray(np.stack([row, np.concatenate([np.zeros(pad, np.int32), row[pad:]])]))
    ids = ids.at[1, pad:pad + 2].set(jnp.asarray([1, 2]))  # row 1: shorter text before the image
    valid = jnp.asarray(np.stack([np.ones(len(row), bool), np.arange(len(row)) >= pad]))
    pix = jnp.asarray(rng.normal(size=(2, 3, 32, 32)), jnp.float32)
    return cfg, params, ids, valid, pix


@pytest.mark.parametrize("chunk,blocked", [(7, False), (11, False), (64, False), (11, True)])
def test_chunked_prefill_equals_one_shot(model_and_batch, chunk, blocked, monkeypatch):
    """A first chunk of padding only (row 1), a ragged last chunk, one chunk; and the blocked attention path
    (forced below its usual 256 slots, blocks of 4 misaligned with the chunks)."""
    if blocked:
        monkeypatch.setattr(attention, "DENSE_MAX_LEN_CAUSAL", 0)
        monkeypatch.setattr(attention, "block_size", lambda seq_len: 4)
    cfg, params, ids, valid, pix = model_and_batch
    full = build(Compression("full"))
    one = decode.run_prompt(params, cfg, full, ids, valid, pix)
    chunked = decode.chunked_prompt(params, cfg, full, ids, valid, pix, chunk)
    ref = np.asarray(one.logits)
    assert np.abs(np.asarray(chunked.logits) - ref).max() <= 1e-5 * np.abs(ref).max()
    live = np.broadcast_to(np.asarray(valid)[None, :, None, :], one.k.shape[:4])
    for a, r in ((chunked.k, one.k), (chunked.v, one.v)):
        a, r = np.asarray(a), np.asarray(r)
        assert a.shape == r.shape
        assert np.abs(a - r)[live].max() <= 1e-5 * np.abs(r).max()
    c_one, c_chunked = decode.compress(one, full), decode.compress(chunked, full)
    np.testing.assert_array_equal(c_chunked.pos, c_one.pos)
    np.testing.assert_array_equal(c_chunked.tag, c_one.tag)


def test_chunked_prefill_rejects_scoring_methods_and_bad_chunks(model_and_batch):
    cfg, params, ids, valid, pix = model_and_batch
    with pytest.raises(ValueError, match="SnapKV"):
        decode.chunked_prompt(params, cfg, build(Compression("snapkv")), ids, valid, pix, 8)
    with pytest.raises(ValueError, match="FastV"):
        decode.chunked_prompt(params, cfg, build(Compression("fastv", k=1)), ids, valid, pix, 8)
    with pytest.raises(ValueError, match="chunk"):
        decode.chunked_prompt(params, cfg, build(Compression("full")), ids, valid, pix, 0)
