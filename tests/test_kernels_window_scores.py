"""window_scores: the Pallas kernel (interpret mode) against the jnp reference, and both against
hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax.pallas_kernels import window_scores
from vkv_jax.pallas_kernels.window_scores import window_scores_kernel, window_scores_reference

S, W, D, HKV, B = 37, 5, 16, 2, 2  # S is not a multiple of the 16-key block used below
BLOCK_K = 16


def _inputs(G, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    Hq = G * HKV
    q = jax.random.normal(ks[0], (B, Hq, W, D), jnp.float32).astype(dtype)
    k = (1.5 * jax.random.normal(ks[1], (B, HKV, S, D), jnp.float32)).astype(dtype)
    pad = jnp.array([0, 4])  # row 1 is left-padded by 4 slots
    key_valid = jnp.arange(S)[None, :] >= pad[:, None]
    q_slot = jnp.broadcast_to(jnp.arange(S - W, S, dtype=jnp.int32), (B, W))
    q_slot = q_slot.at[1, 2].set(-1)  # one disabled query row
    key_group = (jax.random.uniform(ks[2], (B, S)) > 0.5).astype(jnp.int8)
    q_group = key_group[:, S - W:]
    allowed = jax.random.uniform(ks[3], (B, W, S)) > 0.3
    return q, k, q_slot, key_valid, q_group, key_group, allowed


def _max_err(a, r):
    errs = {}
    for f in r._fields:
        x, y = getattr(a, f), getattr(r, f)
        assert (x is None) == (y is None), f
        if y is None:
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (f, x.shape, y.shape, x.dtype, y.dtype)
        fin = np.isfinite(y)
        np.testing.assert_array_equal(np.isfinite(x), fin, err_msg=f)
        np.testing.assert_array_equal(x[~fin], y[~fin], err_msg=f)
        d = np.where(fin, x, 0).astype(np.float64) - np.where(fin, y, 0)
        errs[f] = float(np.max(np.abs(d), initial=0.0))
    return errs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_window_scores_kernel_matches_reference(G, dtype):
    q, k, q_slot, key_valid, q_group, key_group, allowed = _inputs(G, dtype)
    cases = [
        # VL-Cache / SnapKV / CSP extras all at once.
        dict(threshold_p=0.01, per_head=True, q_group=q_group, key_group=key_group),
        # CSP n-softmax, and AirCache's restricted softmax with a per-row allowed set.
        dict(n_softmax=1.0, key_allowed=allowed, per_head=True, q_group=q_group, key_group=key_group),
    ]
    for kw in cases:
        got = window_scores_kernel(q, k, q_slot, key_valid, block_k=BLOCK_K, interpret=True, **kw)
        ref = window_scores_reference(q, k, q_slot, key_valid, **kw)
        errs = _max_err(got, ref)
        for f, e in errs.items():
            assert e <= (0 if f == "count_above" else 2e-5), (f, e, kw.keys())
        # The kernel did something: scores are not trivially zero, padding keys get nothing.
        assert float(jnp.abs(ref.colsum).sum()) > 1.0
        assert float(jnp.abs(got.colsum[1, :, :4]).max()) == 0.0


def test_window_scores_uniform_logits_hand_checked():
    """q = 0 gives equal logits, so every visible key gets 1 / (#visible) in its row."""
    G, Sx = 2, 6
    q = jnp.zeros((1, G, 2, 4), jnp.float32)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, Sx, 4))
    q_slot = jnp.array([[3, 5]], jnp.int32)  # row 0 sees keys 0..3, row 1 sees 0..5
    key_valid = jnp.ones((1, Sx), bool)
    want_row = np.array([1 / 4 + 1 / 6] * 4 + [1 / 6] * 2)
    for impl in ("kernel", "reference"):
        r = window_scores(q, k, q_slot, key_valid, threshold_p=1.0, per_head=True, block_k=4,
                          impl=impl, interpret=True)
        np.testing.assert_allclose(r.colsum[0, 0], G * want_row, rtol=1e-6)
        np.testing.assert_allclose(r.colsum_heads[0, 0], want_row, rtol=1e-6)
        np.testing.assert_allclose(r.lse[0, 0], np.log([4.0, 6.0]), rtol=1e-6)
        np.testing.assert_array_equal(r.count_above[0, :], [[4, 6]] * G)  # all tie with the max
        # CSP n-softmax, n = 1: each visible key gets exp(0) / (1 + #visible).
        rn = window_scores(q, k, q_slot, key_valid, n_softmax=1.0, block_k=4, impl=impl, interpret=True)
        want_n = np.array([1 / 5 + 1 / 7] * 4 + [1 / 7] * 2)
        np.testing.assert_allclose(rn.colsum[0, 0], G * want_n, rtol=1e-6)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_window_scores_semantics(impl):
    """Facts from the papers' definitions, checked on both implementations."""
    G = 4
    q, k, q_slot, key_valid, q_group, key_group, allowed = _inputs(G, jnp.float32, seed=3)
    run = lambda qs=q_slot, **kw: window_scores(q, k, qs, key_valid, block_k=BLOCK_K, impl=impl,
                                                interpret=True, **kw)
    base = run(per_head=True, q_group=q_group, key_group=key_group)
    # Each enabled row's probabilities sum to 1, so colsum totals G * (#enabled rows).
    n_rows = np.asarray((q_slot >= 0).sum(-1))
    np.testing.assert_allclose(base.colsum.sum((1, 2)), HKV * G * n_rows, rtol=1e-5)
    # Per-head sums reduce to the KV-head sums; same + cross split the total (CSP's self / cross split).
    np.testing.assert_allclose(base.colsum_heads.reshape(B, HKV, G, S).sum(2), base.colsum, atol=1e-5)
    np.testing.assert_allclose(base.colsum_same + base.colsum_cross, base.colsum, atol=1e-5)
    # Causality: no mass beyond the last enabled query's slot; a disabled row adds nothing.
    first = run(qs=jnp.where(jnp.arange(W)[None] == 0, q_slot, -1))
    assert float(first.colsum[:, :, S - W + 1:].sum()) == 0.0 and float(first.colsum.sum()) > 0.0
    assert np.isneginf(np.asarray(base.lse[1, :, 2])).all()
    only = run(qs=jnp.where(jnp.arange(W)[None] == 2, q_slot, -1), per_head=True)
    np.testing.assert_allclose(only.colsum[1], 0.0, atol=0)
    # n-softmax = softmax * Z / (n + Z) with Z = exp(lse), row by row (CSP's n-softmax).
    one = jnp.where(jnp.arange(W)[None] == 4, q_slot, -1)  # a single row, so the factor is exact
    sm, nsm = run(qs=one), run(qs=one, n_softmax=1.0)
    z = np.exp(np.asarray(sm.lse[:, :, 4], np.float64)).reshape(B, HKV, G)
    fac = (z / (1.0 + z))[..., None]
    np.testing.assert_allclose(np.asarray(nsm.colsum), (np.asarray(run(qs=one, per_head=True).colsum_heads)
                                                        .reshape(B, HKV, G, S) * fac).sum(2), rtol=1e-5)
    # AirCache restricted softmax = the full attention row renormalised over the allowed columns.
    row = jnp.where(jnp.arange(W)[None] == 3, q_slot, -1)
    full = run(qs=row, per_head=True).colsum_heads
    restricted = run(qs=row, per_head=True, key_allowed=allowed[:, 3]).colsum_heads
    renorm = jnp.where(allowed[:, None, 3], full, 0.0)
    renorm = renorm / renorm.sum(-1, keepdims=True)
    np.testing.assert_allclose(restricted, renorm, atol=1e-6)


def test_window_scores_auto_on_cpu_is_reference():
    q, k, q_slot, key_valid, *_ = _inputs(1, jnp.float32)
    a = window_scores(q, k, q_slot, key_valid)
    r = window_scores_reference(q, k, q_slot, key_valid)
    np.testing.assert_array_equal(a.colsum, r.colsum)
    with pytest.raises(ValueError, match="impl"):
        window_scores(q, k, q_slot, key_valid, impl="fast")


def test_window_scores_kernel_under_jit_unpadded_keys():
    """128-aligned S takes the no-padding path (block 64 divides 128); the kernel jits."""
    G, Sx = 4, 128
    ks = jax.random.split(jax.random.PRNGKey(5), 2)
    q = jax.random.normal(ks[0], (B, G * HKV, W, D))
    k = jax.random.normal(ks[1], (B, HKV, Sx, D))
    q_slot = jnp.broadcast_to(jnp.arange(100 - W, 100, dtype=jnp.int32), (B, W))
    key_valid = (jnp.arange(Sx) < 100)[None].repeat(B, 0)
    f = jax.jit(lambda *a: window_scores(*a, threshold_p=0.01, block_k=64, impl="kernel", interpret=True))
    got = f(q, k, q_slot, key_valid)
    ref = window_scores_reference(q, k, q_slot, key_valid, threshold_p=0.01)
    for f_, e in _max_err(got, ref).items():
        assert e <= (0 if f_ == "count_above" else 2e-5), (f_, e)
