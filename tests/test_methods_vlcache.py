import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import kept_positions, make_ctx, np_softmax, random_qk, row_slice, run_method

from vkv_jax import budgets
from vkv_jax.methods import Compression, build
from vkv_jax.methods.vlcache import vlcache_layer_stats


def _designed_qk(logits):
    """q [1,1,S,S], k [1,1,S,S] whose q.k/sqrt(D) equals `logits` [S,S] exactly (D = S)."""
    S = logits.shape[0]
    k = np.sqrt(S) * np.eye(S, dtype=np.float32)
    return jnp.asarray(logits[None, None].astype(np.float32)), jnp.asarray(k[None, None])


def test_vlcache_threshold_filter_sparsity_on_hand_built_attention():
    S = 8  # slots 2..4 visual, post-vision rows 5, 6, 7
    lg = np.zeros((S, S), np.float32)
    lg[5, :6] = [0, 0, 0, -10, 0, 0]  # one entry below 1% of the row max
    lg[6, :7] = [5, -10, -10, -10, -10, -10, -10]  # six entries below
    lg[7, :8] = 0  # none below
    lg[5, 6:] = 20.0  # future keys: huge logits that must not count anywhere
    lg[6, 7] = 20.0
    q, k = _designed_qk(lg)
    valid = jnp.ones((1, S), bool)
    rows = jnp.asarray(np.array([[False] * 5 + [True] * 3]))
    density, scores = vlcache_layer_stats(q, k, valid, rows, p=0.01)
    assert float(density[0]) == pytest.approx(1 - 7 / 21, abs=1e-6)  # sparsity = 7 / (6 + 7 + 8)
    a = np.zeros((3, S))
    for r, i in enumerate([5, 6, 7]):
        a[r, :i + 1] = np_softmax(lg[i, :i + 1])
    np.testing.assert_allclose(np.asarray(scores[0, 0]), a.sum(0), rtol=1e-5, atol=1e-7)


def _np_vlcache(q, k, tags, alpha, p=0.01, recent=0.1):
    """VL-Cache Eq. 1-2 and Algorithm 1 (arXiv 2410.23317) in numpy, one unpadded row.
    q [L,Hq,S,D], k [L,Hkv,S,D] -> density [L], sets."""
    Lq, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    v_end = int(np.flatnonzero(tags == 1).max()) + 1
    gam, sc = [], []
    for l in range(Lq):
        qp = q[l, :, v_end:].reshape(Hkv, G, S - v_end, D)
        lg = np.einsum("kgtd,ksd->kgts", qp, k[l]) / np.sqrt(D)
        qpos = v_end + np.arange(S - v_end)
        vis = np.arange(S)[None, :] <= qpos[:, None]
        A = np_softmax(np.where(vis, lg, -np.inf))
        kept = (A >= p * A.max(-1, keepdims=True)) & vis
        sp = 1.0 - kept.sum((-2, -1)) / vis.sum()
        gam.append(sp.reshape(Hq).mean())
        sc.append(A.sum(-2).sum(1))
    d = 1 - np.array(gam)
    beta = np.clip(d / d.sum() * alpha * Lq, 0.01, 1.0)
    kk = np.maximum(1, np.floor(beta * S + 1e-4)).astype(int)
    sets = []
    for l in range(Lq):
        w = int(np.floor(recent * kk[l] + 1e-6))
        per_h = []
        for h in range(Hkv):
            s = sc[l][h].copy()
            s[S - w:] = -np.inf
            top = sorted(np.argsort(-s, kind="stable")[: kk[l] - w])
            per_h.append(sorted(top + list(range(S - w, S))))
        sets.append(per_h)
    return d, np.array(sc), kk, sets


def test_vlcache_matches_spec_pseudocode_on_left_padded_gqa_batch():
    L, B, Hq, H, S, D = 3, 2, 4, 2, 30, 8
    pads = [0, 5]
    ctx = make_ctx(S, pads, [(2, 18), (2, 16)], num_visual=16)
    q, k = random_qk(L, B, Hq, H, S, D, seed=7, scale=1.5)
    stats, plan = run_method(build(Compression("vlcache", budget=0.3)), q, k, ctx)
    for b in range(B):
        qr, kr, tags = row_slice(q, k, ctx, b)
        d, sc, kk, sets = _np_vlcache(qr, kr, tags, 0.3)
        np.testing.assert_allclose(np.asarray(stats["density"][:, b]), d, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats["scores"][:, b])[..., pads[b]:], sc, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(plan.count[:, b, 0]), kk)
        for l in range(L):
            for h in range(H):
                assert kept_positions(plan, ctx, l, b, h) == sets[l][h]


def test_vlcache_denser_layer_gets_larger_budget_and_recent_window_kept():
    S = 16
    lg = np.zeros((S, S), np.float32)
    q0, k0 = _designed_qk(lg)  # layer 0: flat attention = dense
    lg1 = np.full((S, S), -20.0, np.float32)
    lg1[:, 0] = 0.0  # layer 1: everything on the sink = sparse
    q1, k1 = _designed_qk(lg1)
    q = jnp.stack([q0, q1])
    k = jnp.stack([k0, k1])
    ctx = make_ctx(S, [0], [(1, 9)])
    stats, plan = run_method(build(Compression("vlcache", budget=0.5)), q, k, ctx)
    d = np.asarray(stats["density"][:, 0])
    assert d[0] == pytest.approx(1.0) and d[1] < 0.5
    c = np.asarray(plan.count[:, 0, 0])
    assert c[0] > c[1]
    w = int(0.1 * c[0])
    assert set(range(S - w, S)) <= set(kept_positions(plan, ctx, 0, 0, 0))


def test_vlcache_head_shared_flag_and_fallback_rows_when_image_is_last():
    L, B, Hq, H, S, D = 2, 1, 4, 2, 20, 8
    q, k = random_qk(L, B, Hq, H, S, D, seed=8, scale=2.0)
    ctx = make_ctx(S, [0], [(2, 20)])  # nothing after the image: rows = last 50 (all) prompt tokens
    stats, plan = run_method(build(Compression("vlcache", budget=0.4, head_shared=True)), q, k, ctx)
    for l in range(L):
        assert kept_positions(plan, ctx, l, 0, 0) == kept_positions(plan, ctx, l, 0, 1)
    # fallback: every row is a query row, so density follows all S rows.
    G = Hq // H
    lg = np.einsum("kgtd,ksd->kgts", np.asarray(q[0, 0]).reshape(H, G, S, D), np.asarray(k[0, 0])) / np.sqrt(D)
    vis = np.tril(np.ones((S, S), bool))
    A = np_softmax(np.where(vis, lg, -np.inf))
    kept = (A >= 0.01 * A.max(-1, keepdims=True)) & vis
    assert float(stats["density"][0, 0]) == pytest.approx(kept.sum((-2, -1)).mean() / vis.sum(), rel=1e-5)


def test_vlcache_budget_one_keeps_everything():
    L, B, Hq, H, S, D = 2, 2, 2, 1, 16, 4
    ctx = make_ctx(S, [0, 3], [(1, 8), (1, 8)])
    q, k = random_qk(L, B, Hq, H, S, D, seed=9)
    m = build(Compression("vlcache", budget=1.0))  # no renormalize needed: alpha=1 is the identity
    _, plan = run_method(m, q, k, ctx)
    np.testing.assert_array_equal(plan.count[:, :, 0], [[16, 13], [16, 13]])
    assert m.capacity(S, 7) == S and budgets.static_count(1.0, S) == S
