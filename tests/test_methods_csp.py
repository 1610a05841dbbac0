import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import kept_positions, make_ctx, random_qk, row_slice, run_method

from vkv_jax.methods import Compression, build
from vkv_jax.pallas_kernels import window_scores


def _nsoftmax(x, n, impl):
    """n-softmax of each row of x [R, S] as CSP computes it: through `window_scores`, with one query
    row per batch row and q.k designed to equal x (k = identity, scale 1)."""
    x = jnp.atleast_2d(jnp.asarray(x, jnp.float32))
    R, S = x.shape
    k = jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32), (R, 1, S, S))
    ws = window_scores(x[:, None, None, :], k, jnp.full((R, 1), S - 1, jnp.int32), jnp.ones((R, S), bool),
                       scale=1.0, per_head=True, n_softmax=n or None, impl=impl)
    return np.asarray(ws.colsum_heads[:, 0])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_nsoftmax_reduces_to_softmax_and_scales_by_S_over_n_plus_S(impl):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32))
    sm = np.exp(np.asarray(x)) / np.exp(np.asarray(x)).sum(-1, keepdims=True)
    np.testing.assert_allclose(_nsoftmax(x, 0.0, impl), sm, rtol=1e-6)
    Ssum = np.exp(np.asarray(x)).sum(-1, keepdims=True)
    np.testing.assert_allclose(_nsoftmax(x, 1.0, impl), sm * Ssum / (1 + Ssum), rtol=1e-5)
    big = _nsoftmax(jnp.array([[1000.0, 999.0], [-30.0, -31.0]]), 1.0, impl)
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big[0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], rtol=1e-6)
    np.testing.assert_allclose(big[1], np.exp([-30.0, -31.0]), rtol=1e-4)  # ~ exp(x) when sum << n


def _np_csp(q, k, is_img, budget=0.2, recent_ratio=0.1, cross_ratio=0.5, bias=1.0, n=1.0):
    """CSP as its official code computes it, one unpadded row (concat, duplicates kept). q [H,L,Dh], k [Hkv,L,Dh]."""
    H, L, Dh = q.shape
    G = H // k.shape[0]
    hh, O = int(np.floor(L * (budget - recent_ratio) + 1e-6)), int(np.floor(L * recent_ratio + 1e-6))
    bud = hh + O
    R = O if bias == 1 else int(O * bias)
    Kp = bud - R
    k_cross, k_self = (1, Kp - 1) if cross_ratio <= 0 else (int(Kp * cross_ratio), int(Kp * (1 - cross_ratio)))
    krep = np.repeat(k, G, axis=0)
    lg = np.einsum("hqd,hkd->hqk", q[:, L - O:], krep) / np.sqrt(Dh)
    qpos = np.arange(L - O, L)[:, None]
    lg = np.where(np.arange(L)[None, :] <= qpos, lg, -np.inf)
    m = lg.max(-1, keepdims=True)
    e = np.exp(lg - m)
    A = (e / (n * np.exp(-m) + e.sum(-1, keepdims=True)))[..., :L - R]
    same = is_img[L - O:, None] == is_img[None, :L - R]
    s_self = (A * same).sum(1).reshape(-1, G, L - R).sum(1)
    s_cross = (A * ~same).sum(1).reshape(-1, G, L - R).sum(1)
    out = []
    for h in range(s_self.shape[0]):
        i_s = list(np.argsort(-s_self[h], kind="stable")[:k_self])
        i_c = list(np.argsort(-s_cross[h], kind="stable")[:k_cross])
        out.append(sorted(i_s + i_c + list(range(L - R, L))))
    return out, s_self, s_cross, (k_self, k_cross, R)


@pytest.mark.parametrize("cross_ratio,bias", [(0.5, 1.0), (0.1, 1.0), (0.0, 1.0), (0.9, 0.5), (0.5, 1.5)])
def test_csp_matches_code_pseudocode_on_left_padded_gqa_batch(cross_ratio, bias):
    L, B, Hq, H, S, D = 2, 2, 4, 2, 60, 8
    pads = [0, 10]
    # images inside the window on row 1 (mixed self/cross rows), text-only window on row 0
    ctx = make_ctx(S, pads, [(2, 40), (20, 47)])
    q, k = random_qk(L, B, Hq, H, S, D, seed=13, scale=1.5)
    m = build(Compression("csp", budget=0.3, cross_ratio=cross_ratio, kv_recent_bias=bias))
    stats, plan = run_method(m, q, k, ctx)
    for b in range(B):
        qr, kr, tags = row_slice(q, k, ctx, b)
        for l in range(L):
            want, s_self, s_cross, (ks, kc_, R) = _np_csp(qr[l], kr[l], tags == 1, 0.3, 0.1, cross_ratio, bias)
            np.testing.assert_allclose(np.asarray(stats["self"][l, b])[:, pads[b]:S - R], s_self, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(np.asarray(stats["cross"][l, b])[:, pads[b]:S - R], s_cross,
                                       rtol=1e-4, atol=1e-7)
            for h in range(H):
                got = kept_positions(plan, ctx, l, b, h)
                assert got == want[h]
                assert len(got) == ks + kc_ + R  # cache length = k_self + k_cross + R
    assert m.capacity(S, 30) >= int(np.asarray(plan.count).max())


def test_csp_all_text_window_splits_self_to_text_and_cross_to_image():
    L, B, Hq, H, S, D = 1, 1, 2, 1, 50, 4
    ctx = make_ctx(S, [0], [(3, 40)])  # window (last 5 rows) is all text
    q, k = random_qk(L, B, Hq, H, S, D, seed=14)
    stats, _ = run_method(build(Compression("csp")), q, k, ctx)
    img = np.asarray(ctx.tags[0]) == 1
    s_self, s_cross = np.asarray(stats["self"][0, 0, 0]), np.asarray(stats["cross"][0, 0, 0])
    assert np.all(s_self[img] == 0) and np.all(s_self[~img][:40] > 0)
    assert np.all(s_cross[~img] == 0) and np.all(s_cross[img] > 0)


def test_csp_combine_variants_and_text_only_rows():
    L, B, Hq, H, S, D = 1, 2, 2, 1, 50, 4
    ctx = make_ctx(S, [0, 0], [(3, 40), (3, 40)])
    q, k = random_qk(L, B, Hq, H, S, D, seed=15, scale=3.0)
    _, pc = run_method(build(Compression("csp", budget=0.4)), q, k, ctx)
    _, pu = run_method(build(Compression("csp", budget=0.4, combine="union_dedup")), q, k, ctx)
    _, pa = run_method(build(Compression("csp", budget=0.4, combine="and")), q, k, ctx)
    c, u, a = (kept_positions(p, ctx, 0, 0, 0) for p in (pc, pu, pa))
    assert len(u) == len(c) and len(set(u)) == len(u)  # dedup refills: same size, no duplicates
    assert set(a) <= set(c) and len(a) <= len(c)
    text_only = make_ctx(S, [0, 7], [(0, 0), (0, 0)], num_visual=0)  # no image: never pruned
    m = build(Compression("csp", budget=0.4))
    _, pt = run_method(m, q, k, text_only)
    assert m.capacity(S, 0) == S
    assert kept_positions(pt, text_only, 0, 0, 0) == list(range(S))
    assert kept_positions(pt, text_only, 0, 1, 0) == list(range(S - 7))
