"""compact_kv: the Pallas kernel (interpret mode, scalar-prefetched indices) against the jnp reference
and against a plain numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax.pallas_kernels import compact_kv
from vkv_jax.pallas_kernels.compaction import compact_kv_kernel, compact_kv_reference

L, B, H, C, D = 2, 2, 2, 24, 8  # grid L*B*H = 8 steps


def _cache(dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    k = jax.random.normal(ks[0], (L, B, H, C, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[1], (L, B, H, C, D), jnp.float32).astype(dtype)
    return k, v


def _keep_set(seed, K):
    """Per-row keep sets as a method would give them: sorted slots, row 1 left-padded by 5 slots."""
    rng = np.random.default_rng(seed)
    idx = np.zeros((L, B, H, K), np.int32)
    cnt = np.zeros((L, B, H), np.int32)
    for l in range(L):
        for b in range(B):
            for h in range(H):
                live = np.arange(5 if b == 1 else 0, C)
                n = int(rng.integers(0, K + 1))
                chosen = np.sort(rng.choice(live, size=n, replace=False))
                idx[l, b, h, :n] = chosen
                idx[l, b, h, n:] = rng.integers(0, C, K - n)  # junk past count must be ignored
                cnt[l, b, h] = n
    cnt[0, 0, 0] = 0  # an empty row
    return jnp.asarray(idx), jnp.asarray(cnt)


def _numpy_compact(x, idx, cnt, cap):
    x, idx, cnt = np.asarray(x), np.asarray(idx), np.asarray(cnt)
    out = np.zeros(x.shape[:3] + (cap,) + x.shape[4:], x.dtype)
    for r in np.ndindex(*x.shape[:3]):
        n = min(cnt[r], cap, idx.shape[3])
        out[r][:n] = x[r][idx[r][:n]]
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("K,cap", [(10, 16), (12, 8)], ids=["pad", "truncate"])
def test_compact_kv_kernel_matches_reference_exactly(dtype, K, cap):
    k, v = _cache(dtype)
    idx, cnt = _keep_set(1, K)
    got = compact_kv_kernel(k, v, idx, cnt, cap, interpret=True)
    ref = compact_kv_reference(k, v, idx, cnt, cap)
    for g, r, x in zip(got, ref, (k, v)):
        assert g.shape == (L, B, H, cap, D) and g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
        np.testing.assert_array_equal(np.asarray(g, np.float32),
                                      _numpy_compact(x, idx, cnt, cap).astype(np.float32))
    assert float(jnp.abs(got[0][0, 0, 0]).max()) == 0.0  # count 0 -> all zero
    assert float(jnp.abs(got[0]).sum()) > 0.0


def test_compact_kv_hand_checked_and_dispatch():
    k = jnp.arange(1 * 1 * 1 * 6 * 2, dtype=jnp.float32).reshape(1, 1, 1, 6, 2)  # slot s holds [2s, 2s+1]
    v = -k
    idx = jnp.array([[[[1, 4, 5, 0]]]], jnp.int32)
    cnt = jnp.array([[[2]]], jnp.int32)
    for impl in ("kernel", "reference", "auto"):
        kn, vn = compact_kv(k, v, idx, cnt, 3, impl=impl, interpret=True)
        np.testing.assert_array_equal(kn[0, 0, 0], [[2, 3], [8, 9], [0, 0]])
        np.testing.assert_array_equal(vn[0, 0, 0], [[-2, -3], [-8, -9], [0, 0]])


def test_compact_kv_kernel_under_jit():
    k, v = _cache(jnp.float32, seed=2)
    idx, cnt = _keep_set(3, 10)
    f = jax.jit(lambda *a: compact_kv(*a, 16, impl="kernel", interpret=True))
    for g, r in zip(f(k, v, idx, cnt), compact_kv_reference(k, v, idx, cnt, 16)):
        np.testing.assert_array_equal(g, r)
