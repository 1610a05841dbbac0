"""Every method that scores with `window_scores` gives the same stats (and plan) with the Pallas kernel
forced (`impl="kernel"`, interpret mode on CPU) as with the default path (the jnp reference on CPU)."""

import jax
import numpy as np
import pytest
from _helpers import make_ctx, random_qk, run_method

from vkv_jax.methods import Compression, build

L, B, HQ, HKV, S, D = 1, 2, 4, 2, 24, 8  # GQA group 2; row 1 left-padded by 3 slots

CASES = {
    "snapkv": dict(budget=0.5, window=4, kernel=3),
    "pyramidkv": dict(budget=0.5, window=4, kernel=3, pooling="avg"),
    "h2o": dict(budget=0.5, block=8),  # 3 query-row blocks
    "vlcache": dict(budget=0.5),
    "aircache": dict(budget=0.3),
    "csp": dict(budget=0.5, recent_ratio=0.25),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_stats_equal_with_window_kernel_forced(name):
    ctx = make_ctx(S, [0, 3], [(2, 14), (2, 14)], num_visual=12)
    q, k = random_qk(L, B, HQ, HKV, S, D, seed=7)
    default = build(Compression(name, **CASES[name]))
    forced = build(Compression(name, impl="kernel", **CASES[name]))
    assert default.impl == "auto" and forced.impl == "kernel"
    s_ref, p_ref = run_method(default, q, k, ctx)
    s_ker, p_ker = run_method(forced, q, k, ctx)
    for a, r in zip(jax.tree.leaves(s_ker), jax.tree.leaves(s_ref)):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5)
    assert float(np.abs(np.asarray(jax.tree.leaves(s_ref)[0], np.float64)).sum()) > 0.0
    np.testing.assert_array_equal(p_ker.count, p_ref.count)
    np.testing.assert_array_equal(p_ker.indices, p_ref.indices)


def test_method_impl_option_is_checked():
    with pytest.raises(ValueError, match="impl"):
        build(Compression("snapkv", impl="fast"))


def test_observe_rejects_mismatched_q_k_shapes():
    ctx = make_ctx(S, [0, 3], [(2, 14), (2, 14)], num_visual=12)
    q, k = random_qk(1, B, HQ, HKV, S, D, seed=1)
    method = build(Compression("snapkv", budget=0.5))
    with pytest.raises(AssertionError):
        method.observe(q[0], k[0, :, :, :, :4], ctx)  # head dims differ
    with pytest.raises(AssertionError):
        method.observe(q[0, :, :3], k[0, :, :3], ctx)  # Hkv = 3 does not divide Hq = 4
    with pytest.raises(AssertionError):
        method.observe(q[0, :, :, :-1], k[0, :, :, :-1], ctx)  # S differs from the context's
