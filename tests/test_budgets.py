import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vkv_jax import budgets
from vkv_jax.methods import Compression, build


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, 1.5, 2.0, float("nan"), float("inf"), np.float32(1.5),
                                 np.int64(0), np.array(-0.5)])
def test_out_of_range_budgets_raise_value_error(bad):
    with pytest.raises(ValueError):
        budgets.check_budget(bad)


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), "0.1", None, [0.1], np.array([0.1]), 1 + 0j,
                                 np.complex64(0.1), object()])
def test_budgets_that_are_not_real_numbers_raise_type_error_naming_them(bad):
    with pytest.raises(TypeError, match=re.escape(f"got {bad!r}")):
        budgets.check_budget(bad)


@pytest.mark.parametrize("name", ["random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv",
                                  "vlcache", "aircache", "csp"])
def test_bad_budget_raises_at_compression_construction(name):
    with pytest.raises(ValueError, match="budget"):
        Compression(name, budget=1.5)
    with pytest.raises(ValueError):
        Compression(name, budget=0)
    with pytest.raises(ValueError):
        Compression(name, budget=0.2, no_such_option=3)
    build(Compression(name, budget=0.25))  # a good budget builds


def test_budget_count_ratio_floor_min1_and_absolute_clipped_to_row():
    tot = jnp.array([8, 20, 0, 3])
    np.testing.assert_array_equal(budgets.budget_count(0.25, tot), [2, 5, 0, 1])
    np.testing.assert_array_equal(budgets.budget_count(0.1, jnp.array([30])), [3])  # no 2.999 flooring
    np.testing.assert_array_equal(budgets.budget_count(1, tot), [8, 20, 0, 3])  # 1 == ratio 1.0: keep all
    np.testing.assert_array_equal(budgets.budget_count(1.0, tot), [8, 20, 0, 3])
    np.testing.assert_array_equal(budgets.budget_count(10, tot), [8, 10, 0, 3])  # above the prompt: all
    np.testing.assert_array_equal(budgets.budget_count(1e-9, tot), [1, 1, 0, 1])
    assert budgets.static_count(0.25, 20) == 5 and budgets.static_count(500, 20) == 20


def test_largest_remainder_known_values_and_ties_to_lower_index():
    np.testing.assert_array_equal(budgets.largest_remainder(jnp.array([0.5, 0.3, 0.2]), 7), [4, 2, 1])
    np.testing.assert_array_equal(budgets.largest_remainder(jnp.ones(3), 10), [4, 3, 3])
    np.testing.assert_array_equal(budgets.largest_remainder(jnp.zeros(4), 6), [2, 2, 1, 1])


def test_largest_remainder_sums_exactly():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.gamma(0.5, size=(200, 7)).astype(np.float32))
    tot = jnp.asarray(rng.integers(0, 5000, size=200))
    out = np.asarray(budgets.largest_remainder(w, tot))
    np.testing.assert_array_equal(out.sum(-1), np.asarray(tot))
    q = np.asarray(w) / np.asarray(w).sum(-1, keepdims=True) * np.asarray(tot)[:, None]
    assert np.all(np.abs(out - q) < 1.0 + 1e-3)


def test_waterfill_hits_target_within_bounds():
    w = jnp.array([[10.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    x = budgets.waterfill(w, jnp.array([2.0, 1.0]), 0.01, 1.0)
    np.testing.assert_allclose(x.sum(-1), [2.0, 1.0], rtol=1e-5)
    assert float(x.max()) <= 1.0 + 1e-6 and float(x.min()) >= 0.01 - 1e-6
    np.testing.assert_allclose(x[0], [1.0, 1 / 3, 1 / 3, 1 / 3], rtol=1e-4)
    np.testing.assert_allclose(x[1], np.array([1, 2, 3, 4]) / 10.0, rtol=1e-4)


# ------------------------------------------------------------------ VL-Cache


def test_vlcache_budgets_mean_beta_equals_alpha_when_unclipped():
    d = jnp.array([[0.4], [0.3], [0.2], [0.1]])  # [L, B]
    beta = budgets.vlcache_ratios(d, 0.2)
    np.testing.assert_allclose(beta[:, 0], [0.32, 0.24, 0.16, 0.08], rtol=1e-6)
    np.testing.assert_allclose(beta.mean(0), [0.2], rtol=1e-6)
    k = budgets.vlcache(d, 0.2, jnp.array([100]), num_kv_heads=2)
    assert k.shape == (4, 1, 2)
    np.testing.assert_array_equal(k[:, 0, 0], [32, 24, 16, 8])  # floor(beta * m); denser -> larger


def test_vlcache_budgets_clip_no_renormalisation_by_default_and_renormalize_flag():
    d = jnp.array([[0.97], [0.01], [0.01], [0.01]])
    beta = budgets.vlcache_ratios(d, 0.5)
    np.testing.assert_allclose(beta[:, 0], [1.0, 0.02, 0.02, 0.02], rtol=1e-5)  # total < alpha L (paper)
    beta_r = budgets.vlcache_ratios(d, 0.5, renormalize=True)
    np.testing.assert_allclose(beta_r.sum(0), [2.0], rtol=1e-5)
    np.testing.assert_allclose(beta_r[:, 0], [1.0, 1 / 3, 1 / 3, 1 / 3], rtol=1e-4)
    tiny = budgets.vlcache_ratios(jnp.array([[1.0], [1e-6]]), 0.01)
    assert float(tiny[1, 0]) == pytest.approx(0.01)  # lower clip 0.01


def test_vlcache_exact_sum_hits_alpha_L_m():
    rng = np.random.default_rng(1)
    d = jnp.asarray(rng.uniform(0.01, 0.3, size=(6, 3)).astype(np.float32))
    m = jnp.array([97, 131, 64])
    k = budgets.vlcache(d, 0.15, m, 1, renormalize=True, exact_sum=True)[..., 0]
    np.testing.assert_array_equal(k.sum(0), np.round(0.15 * 6 * np.asarray(m)).astype(int))
    k_floor = budgets.vlcache(d, 0.15, m, 1)[..., 0]
    beta = np.asarray(budgets.vlcache_ratios(d, 0.15))
    np.testing.assert_array_equal(k_floor, np.maximum(1, np.floor(beta * np.asarray(m) + 1e-4)).astype(int))


# ------------------------------------------------------------------ AirCache


def _np_aircache(st, sk, r, nv, eps=1e-6):
    sk = np.maximum(sk, eps)
    rh = np.clip(0.5 * (st / st.mean(0) + sk / sk.mean(0)) * r, 0, 1)
    return rh, np.clip(np.round(rh * nv), 1, nv)


def test_aircache_budgets_match_formula_and_mean_equals_r():
    rng = np.random.default_rng(2)
    st = rng.uniform(0.1, 0.9, size=(5, 2)).astype(np.float32)
    sk = rng.uniform(1.0, 6.0, size=(5, 2)).astype(np.float32)
    sk[3, 1] = -0.5  # negative skewness is clipped to eps
    rh = np.asarray(budgets.aircache_ratios(jnp.asarray(st), jnp.asarray(sk), 0.1))
    rh_ref, n_ref = _np_aircache(st, sk, 0.1, 576)
    np.testing.assert_allclose(rh, rh_ref, rtol=1e-5)
    np.testing.assert_allclose(rh.mean(0), [0.1, 0.1], rtol=1e-5)  # nothing clipped -> mean == r
    n = budgets.aircache(jnp.asarray(st), jnp.asarray(sk), 0.1, jnp.array([576, 576]), 3)
    assert n.shape == (5, 2, 3)
    np.testing.assert_array_equal(n[..., 0], n_ref)
    ne = budgets.aircache(jnp.asarray(st), jnp.asarray(sk), 0.1, jnp.array([576, 100]), 1, exact_sum=True)
    np.testing.assert_array_equal(ne[..., 0].sum(0), [round(0.1 * 576 * 5), round(0.1 * 100 * 5)])


def test_aircache_budgets_clip_to_one_and_at_least_one_token():
    st = jnp.array([[1.0], [0.001], [0.001]])
    sk = jnp.array([[10.0], [0.001], [0.001]])
    n = budgets.aircache(st, sk, 0.9, jnp.array([50]), 1)[..., 0]
    assert int(n[0, 0]) == 50 and int(n[1, 0]) >= 1
    ne = budgets.aircache(st, sk, 0.5, jnp.array([50]), 1, exact_sum=True)[..., 0]
    assert int(ne.sum()) == 75 and int(ne.max()) <= 50


# ------------------------------------------------------------------ PyramidKV


def _np_pyramid(S, C, w, L, beta):
    if S <= C:
        return [S] * L
    B = C - w
    if S < 2 * B:
        return [C] * L
    min_b = B // beta
    max_b = 2 * B - min_b
    if max_b >= S - w:
        max_b = S - w
        min_b = 2 * B - max_b
    steps = (max_b - min_b) // (L - 1)
    return [max_b - l * steps + w for l in range(L)]


@pytest.mark.parametrize("S,C", [(1000, 200), (300, 200), (150, 200), (420, 200), (4000, 100)])
def test_pyramid_budgets_match_kvcache_factory(S, C):
    got = budgets.pyramid(C, jnp.array([S]), 4, 2, window=32, beta=20)
    assert got.shape == (4, 1, 2)
    np.testing.assert_array_equal(got[:, 0, 0], _np_pyramid(S, C, 32, 4, 20))
    assert budgets.pyramid_capacity(C, S, 32, 20) >= int(got.max())


def test_pyramid_known_example_and_decreasing():
    got = np.asarray(budgets.pyramid(200, jnp.array([1000]), 4, 1, window=32))[:, 0, 0]
    np.testing.assert_array_equal(got, [360, 254, 148, 42])
    assert abs(got.mean() - 200) <= 2


def test_budgets_are_jittable():
    f = jax.jit(lambda d, m: budgets.vlcache(d, 0.1, m, 2, renormalize=True, exact_sum=True))
    assert f(jnp.ones((3, 2)) * 0.2, jnp.array([50, 60])).dtype == jnp.int32
    assert math.isfinite(float(jax.jit(budgets.aircache_ratios, static_argnums=2)(
        jnp.ones((2, 1)), jnp.ones((2, 1)), 0.1).sum()))
