"""decode_attention: the Pallas kernel (interpret mode) against the jnp reference, dead-block skipping,
and a hand-checkable case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax import cache as kvcache
from vkv_jax.pallas_kernels import decode_attention
from vkv_jax.pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_reference, live_mask

B, HKV, C, D = 2, 2, 29, 16  # C is not a multiple of the 16-slot block: grid B*Hkv*2 = 8 steps
BLOCK_C = 16


def _inputs(G, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, HKV * G, D), jnp.float32).astype(dtype)
    k = (1.5 * jax.random.normal(ks[1], (B, HKV, C, D), jnp.float32)).astype(dtype)
    v = jax.random.normal(ks[2], (B, HKV, C, D), jnp.float32).astype(dtype)
    # Lengths differ per (row, kv head), as after compaction; one head is empty, one full.
    length = jnp.array([[29, 10], [17, 0]], jnp.int32)
    # Row 1 was left-padded by 3 slots (pos = -1), row 0 by none.
    pos = jnp.where(jnp.arange(C)[None, :] >= jnp.array([[0], [3]]), jnp.arange(C)[None, :], -1)
    pos = jnp.broadcast_to(pos[:, None, :], (B, HKV, C)).astype(jnp.int32)
    return q, k, v, length, pos


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_decode_attention_kernel_matches_reference(G, dtype):
    q, k, v, length, pos = _inputs(G, dtype)
    out, lse = decode_attention_kernel(q, k, v, (length, pos), block_c=BLOCK_C, return_lse=True,
                                       interpret=True)
    ref, ref_lse = decode_attention_reference(q, k, v, (length, pos), return_lse=True)
    assert out.shape == (B, HKV * G, D) and out.dtype == dtype
    # bf16 outputs may round the same f32 value one ulp apart; lse is f32 in both.
    atol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol)
    fin = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=1e-5)
    # The empty head (row 1, kv head 1) gives zeros and lse = -inf; the others carry signal.
    assert not fin.reshape(B, HKV, G)[1, 1].any()
    assert float(jnp.abs(out.reshape(B, HKV, G, D)[1, 1]).max()) == 0.0
    assert float(jnp.abs(out.astype(jnp.float32)).sum()) > 1.0


def test_decode_attention_skips_dead_blocks():
    """NaN in every block past a head's live extent must not reach the output: those blocks are
    neither computed nor (with the clamped index map) fetched. The clamped map hands a dead step the
    last live block again, so a missing `pl.when` would count it twice: lse would be off by log 2."""
    G = 4
    q, k, v, _, _ = _inputs(G, jnp.float32, seed=1)
    length = jnp.array([[5, 16], [12, 29]], jnp.int32)
    live = live_mask(length, jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, HKV, C)))
    dead_block = (jnp.arange(C) >= 16)[None, None, :] & (length[..., None] <= 16)
    k_nan = jnp.where(dead_block[..., None], jnp.nan, k)
    v_nan = jnp.where(dead_block[..., None], jnp.nan, v)
    out, lse = decode_attention_kernel(q, k_nan, v_nan, live, block_c=BLOCK_C, return_lse=True,
                                       interpret=True)
    ref, ref_lse = decode_attention_reference(q, k, v, live, return_lse=True)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def test_decode_attention_uniform_logits_hand_checked():
    """q = 0: equal logits, so the output is the plain mean of the live value rows."""
    q, k, v, length, pos = _inputs(4, jnp.float32, seed=2)
    q = jnp.zeros_like(q)
    live = np.asarray(live_mask(length, pos))
    vn = np.asarray(v)
    for impl in ("kernel", "reference"):
        out = np.asarray(decode_attention(q, k, v, (length, pos), block_c=BLOCK_C, impl=impl,
                                          interpret=True)).reshape(B, HKV, 4, D)
        for b in range(B):
            for h in range(HKV):
                want = vn[b, h][live[b, h]].mean(0) if live[b, h].any() else np.zeros(D)
                np.testing.assert_allclose(out[b, h], np.broadcast_to(want, (4, D)), atol=1e-5)


def test_live_mask_agrees_with_cache_layout():
    _, _, _, length, pos = _inputs(1, jnp.float32)
    c = kvcache.DenseCache(k=jnp.zeros((1, B, HKV, C, 1)), v=jnp.zeros((1, B, HKV, C, 1)), pos=pos[None],
                        tag=jnp.zeros((1, B, HKV, C), jnp.int8), length=length[None])
    np.testing.assert_array_equal(live_mask(length, pos), c.live_mask()[0])


def test_decode_attention_kernel_under_jit_cache_capacity():
    """A 128-aligned capacity (as cache.py allocates) takes the no-padding path; the kernel jits."""
    G, Cx = 4, 128
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(ks[0], (B, HKV * G, D))
    k = jax.random.normal(ks[1], (B, HKV, Cx, D))
    v = jax.random.normal(ks[2], (B, HKV, Cx, D))
    length = jnp.array([[128, 40], [70, 3]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(Cx, dtype=jnp.int32), (B, HKV, Cx))
    f = jax.jit(lambda *a: decode_attention(*a, block_c=64, impl="kernel", interpret=True))
    np.testing.assert_allclose(f(q, k, v, (length, pos)),
                               decode_attention_reference(q, k, v, (length, pos)), atol=1e-5)
