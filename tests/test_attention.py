"""Prefill attention without S x S (`models/attention.py`): every implementation against the dense
reference, and the whole prefill (LM and vision tower) blocked vs dense on an HF-parity checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import make_llava
from test_hf_parity import left_pad, prompt_ids

import vkv_jax
from vkv_jax.models import attention, clip, llama, llava


def _qkv(B, Hq, Hkv, S, D, pads, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, h, S, D)) * 2.0, jnp.float32) for h in (Hq, Hkv, Hkv))
    valid = jnp.asarray(np.arange(S)[None] >= np.asarray(pads)[:, None])
    return q, k, v, valid


def _max_err(a, b, valid, Hq):
    """Max |a - b| over the real query rows, relative to the reference's scale (max |b|, at least 1)."""
    rows = np.broadcast_to(np.asarray(valid)[:, None, :], (valid.shape[0], Hq, valid.shape[1]))
    a, b = np.asarray(a, np.float64)[rows], np.asarray(b, np.float64)[rows]
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S,block", [(200, 64), (256, 128), (37, 16), (5, 128)])
def test_blocked_equals_dense(S, block, causal):
    """Left-padded GQA batch, S a multiple of the block or not (front padding), one block or many."""
    q, k, v, valid = _qkv(3, 6, 2, S, 16, [0, 3, S // 2])
    out_d, lse_d = attention.dense_attention(q, k, v, valid, causal=causal)
    out_b, lse_b = attention.blocked_attention(q, k, v, valid, causal=causal, block=block)
    assert _max_err(out_b, out_d, valid, 6) <= 1e-5
    assert _max_err(lse_b, lse_d, valid, 6) <= 1e-5
    assert np.isfinite(np.asarray(out_b)).all() and np.isfinite(np.asarray(lse_b)).all()


@pytest.mark.parametrize("T,C,block", [(11, 40, 4), (16, 40, 8), (40, 40, 16), (3, 5, 128)])
def test_blocked_equals_dense_for_a_chunk_of_queries(T, C, block):
    """Queries at the last T of C key slots (a prefill chunk after earlier ones), blocks misaligned
    with T and C (front padding of both)."""
    q, k, v, valid = _qkv(2, 4, 2, C, 16, [0, 9 % C], seed=2)
    q = q[:, :, C - T:]
    out_d, lse_d = attention.dense_attention(q, k, v, valid)
    out_b, lse_b = attention.blocked_attention(q, k, v, valid, block=block)
    rows = valid[:, C - T:]
    assert _max_err(out_b, out_d, rows, 4) <= 1e-5
    assert _max_err(lse_b, lse_d, rows, 4) <= 1e-5


def test_dense_matches_the_explicit_mask_definition():
    """The reference itself: softmax over visible keys (numpy, float64), lse = log sum exp."""
    q, k, v, valid = _qkv(2, 4, 2, 9, 8, [0, 4])
    out, lse = attention.dense_attention(q, k, v, valid)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for b in range(2):
        for h in range(4):
            for t in range(9):
                if not valid[b, t]:
                    continue
                keys = [j for j in range(t + 1) if valid[b, j]]
                s = qn[b, h, t] @ kn[b, h // 2, keys].T / np.sqrt(8)
                ref_lse = np.log(np.exp(s - s.max()).sum()) + s.max()
                assert abs(lse[b, h, t] - ref_lse) <= 1e-5
                np.testing.assert_allclose(out[b, h, t], np.exp(s - ref_lse) @ vn[b, h // 2, keys], atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_equals_dense_in_interpret_mode(causal):
    """jax's TPU splash kernel as wrapped here (MQA per kv head, padding as segment ids, S padded to
    the block), in Pallas interpret mode."""
    q, k, v, valid = _qkv(2, 4, 2, 200, 64, [0, 37], seed=1)
    out_d, lse_d = attention.dense_attention(q, k, v, valid, causal=causal)
    out_s, lse_s = attention.splash_attention(q, k, v, valid, causal=causal, interpret=True)
    assert _max_err(out_s, out_d, valid, 4) <= 1e-5
    assert _max_err(lse_s, lse_d, valid, 4) <= 1e-5


def test_dispatch_rule():
    assert attention.choose_impl(4096, jnp.bfloat16, "tpu") == "splash"
    assert attention.choose_impl(4096, jnp.bfloat16, "gpu") == "cudnn"
    assert attention.choose_impl(4096, jnp.float32, "gpu") == "blocked"
    assert attention.choose_impl(attention.DENSE_MAX_LEN_CAUSAL - 1, jnp.float32, "cpu") == "dense"
    assert attention.choose_impl(attention.DENSE_MAX_LEN_CAUSAL, jnp.float32, "cpu") == "blocked"
    assert attention.choose_impl(577, jnp.float32, "cpu", causal=False) == "dense"
    assert attention.block_size(600) == 128 and attention.block_size(2904) == 256
    with pytest.raises(ValueError, match="impl='flash'"):
        attention.prefill_attention(*_qkv(1, 2, 1, 4, 8, [0]), impl="flash")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    make_llava(path, num_heads=4, num_kv_heads=2, image_size=64, patch_size=8)  # 64 visual tokens
    return vkv_jax.load(path)


def test_blocked_prefill_logits_equal_dense_on_hf_checkpoint(tiny_llava, monkeypatch):
    """The whole LM prefill (left-padded batch of two, 86 slots in blocks of 16) and the vision tower
    (65 tokens, bidirectional), blocked vs dense: logits within 1e-5 of the logit scale."""
    monkeypatch.setattr(attention, "block_size", lambda seq_len: 16)
    params, cfg = tiny_llava.params, tiny_llava.config
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    ids, mask = left_pad([prompt_ids(rng, n, 3, 19), prompt_ids(rng, n, 2, 4)])
    pix = jnp.asarray(rng.normal(size=(2, 3, 64, 64)), jnp.float32)
    ids, valid = jnp.asarray(ids), jnp.asarray(mask)

    vis = cfg.vision
    layers = llava.vision_layers_needed(cfg)
    hv_d = clip.hidden_states(params["vision"], vis, pix, layers, attn_impl="dense")
    hv_b = clip.hidden_states(params["vision"], vis, pix, layers, attn_impl="blocked")
    assert float(jnp.abs(hv_b - hv_d).max() / jnp.abs(hv_d).max()) <= 1e-5

    x, _ = llava.merge_embeddings(params, cfg, ids, pix)
    pos = llava.positions_from_mask(valid)
    out = {}
    for impl in ("dense", "blocked"):
        hidden, k, _, _ = llama.prefill_layers(params["lm"], cfg.text, x, pos, valid, attn_impl=impl)
        out[impl] = (np.asarray(llama.unembed(params["lm"], hidden)), np.asarray(k))
    (ld, kd), (lb, kb) = out["dense"], out["blocked"]
    m = np.asarray(valid)
    assert np.abs(lb - ld)[m].max() / np.abs(ld[m]).max() <= 1e-5
    kv_rows = np.broadcast_to(m[None, :, None, :], kd.shape[:4])
    assert np.abs(kb - kd)[kv_rows].max() <= 1e-5 * np.abs(kd).max()


def test_blocked_is_reverse_differentiable():
    """The testbed trains through the prefill: gradients of the blocked path equal the dense path's."""
    import jax

    q, k, v, valid = _qkv(2, 4, 2, 24, 8, [0, 5])
    rows = valid[:, None, :, None]

    def grads(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v, valid)
            return (jnp.where(rows, out, 0.0) ** 2).sum() + jnp.where(valid[:, None], lse, 0.0).sum()
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    blocked = lambda *a: attention.blocked_attention(*a, block=8)  # noqa: E731  3 blocks
    for gb, gd in zip(grads(blocked), grads(attention.dense_attention)):
        assert float(jnp.abs(gb - gd).max()) <= 1e-4 * max(1.0, float(jnp.abs(gd).max()))
