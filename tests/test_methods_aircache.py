import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from _helpers import kept_positions, make_ctx, np_softmax, random_qk, row_slice, run_method

from vkv_jax.methods import Compression, build
from vkv_jax.methods.aircache import elite_window, strength_skewness


def _np_aircache_layer(q, k, tags, a_rel=0.9):
    """AirCache (arXiv 2503.23956) elite window, visual importance and layer statistics in numpy, one layer,
    one unpadded row. q [Hq,S,D], k [Hkv,S,D]."""
    Hq, S, D = q.shape
    G = Hq // k.shape[0]
    kr = np.repeat(k, G, axis=0)
    vis_idx = np.flatnonzero(tags == 1)
    v_end = vis_idx.max() + 1
    txt_idx = np.array([j for j in range(v_end, S) if tags[j] == 0])
    qT, kT, kV = q[:, txt_idx], kr[:, txt_idx], kr[:, vis_idx]
    Nv = len(vis_idx)
    att_last = np_softmax(np.einsum("hd,hnd->hn", qT[:, -1], kT) / np.sqrt(D)).mean(0)
    elite = att_last >= a_rel * att_last.max()
    lv = np.einsum("htd,hvd->htv", qT, kV) / np.sqrt(D)
    lt = np.einsum("htd,hud->htu", qT, kT) / np.sqrt(D)
    causal = txt_idx[None, :] <= txt_idx[:, None]
    lt = np.where(causal[None] & elite[None, None, :], lt, -np.inf)
    A = np_softmax(np.concatenate([lv, lt], -1)).mean(0)
    w = elite / elite.sum()
    I_v = np.einsum("t,tv->v", w, A[:, :Nv])
    s_t = I_v.sum()
    mu, sd = I_v.mean(), I_v.std(ddof=1)
    s_k = Nv / ((Nv - 1) * (Nv - 2)) * (((I_v - mu) / sd) ** 3).sum()
    return I_v, s_t, s_k, txt_idx[elite], vis_idx


def test_aircache_matches_spec_pseudocode_on_left_padded_gqa_batch():
    L, B, Hq, H, S, D = 3, 2, 4, 2, 32, 8
    pads = [0, 4]
    spans = [(3, 19), (3, 19)]
    ctx = make_ctx(S, pads, spans, num_visual=16)
    q, k = random_qk(L, B, Hq, H, S, D, seed=11, scale=1.5)
    m = build(Compression("aircache", budget=0.25))
    stats, plan = run_method(m, q, k, ctx)
    for b in range(B):
        qr, kr, tags = row_slice(q, k, ctx, b)
        st, sk = [], []
        ivs = []
        for l in range(L):
            I_v, s_t, s_k, _, vis_idx = _np_aircache_layer(qr[l], kr[l], tags)
            np.testing.assert_allclose(np.asarray(stats["importance"][l, b])[pads[b] + vis_idx], I_v,
                                       rtol=1e-4, atol=1e-7)
            assert np.allclose(np.asarray(stats["importance"][l, b])[pads[b]:][tags == 0], 0)
            st.append(s_t)
            sk.append(s_k)
            ivs.append(I_v)
        np.testing.assert_allclose(np.asarray(stats["strength"][:, b]), st, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(stats["skewness"][:, b]), sk, rtol=1e-3, atol=1e-4)
        # the paper's layer budgets and selection: all non-visual kept + top n_v visual by I_v.
        st, sk = np.array(st), np.maximum(np.array(sk), 1e-6)
        rh = np.clip(0.5 * (st / st.mean() + sk / sk.mean()) * 0.25, 0, 1)
        nv = np.clip(np.round(rh * 16), 1, 16).astype(int)
        Sb = S - pads[b]
        for l in range(L):
            top = vis_idx[np.argsort(-ivs[l], kind="stable")[: nv[l]]]
            want = sorted(list(np.flatnonzero(tags == 0)) + list(top))
            for h in range(H):  # one index set shared by every kv head
                assert kept_positions(plan, ctx, l, b, h) == want
            assert int(plan.count[l, b, 0]) == Sb - 16 + nv[l]
    assert m.capacity(S, 16) == S  # paper's clip at 1: capacity cannot shrink
    assert build(Compression("aircache", budget=0.25, max_ratio=0.5)).capacity(S, 16) == S - 8


def test_aircache_skewness_equals_scipy_unbiased():
    rng = np.random.default_rng(0)
    imp = rng.gamma(0.3, size=(3, 20)).astype(np.float32)
    vis = np.zeros((3, 20), bool)
    vis[0, 2:18] = True
    vis[1, :] = True
    vis[2, 5:9] = True
    st, sk = strength_skewness(jnp.asarray(imp), jnp.asarray(vis))
    for b in range(3):
        x = imp[b, vis[b]]
        assert float(sk[b]) == pytest.approx(scipy.stats.skew(x, bias=False), rel=1e-4)
        assert float(st[b]) == pytest.approx(x.sum(), rel=1e-5)


def test_aircache_elite_window_threshold_on_hand_built_logits():
    S = 6  # text keys at slots 2..5; the reference row is slot 5
    logits = np.array([9.0, 9.0, 3.0, 3.0 + np.log(0.95), 0.0, 3.0 + np.log(0.85)], np.float32)
    q_ref = jnp.asarray(logits[None, None])  # [B=1, Hq=1, D=S]
    k = jnp.asarray(np.sqrt(S) * np.eye(S, dtype=np.float32))[None, None]
    text = jnp.asarray(np.array([[False, False, True, True, True, True]]))
    elite, att = elite_window(q_ref, k, text, 0.9)
    assert list(np.asarray(elite[0])) == [False, False, True, True, False, False]
    assert bool(elite[0, int(np.argmax(np.asarray(att[0])))])  # contains the argmax, never empty


def test_aircache_never_drops_text_and_budget_one_keeps_everything():
    L, B, Hq, H, S, D = 2, 2, 2, 1, 24, 4
    ctx = make_ctx(S, [0, 3], [(2, 14), (2, 14)], num_visual=12)
    q, k = random_qk(L, B, Hq, H, S, D, seed=12)
    _, plan = run_method(build(Compression("aircache", budget=0.05)), q, k, ctx)
    for b in range(B):
        tags = np.asarray(ctx.tags[b])[[0, 3][b]:]
        for l in range(L):
            kept = kept_positions(plan, ctx, l, b, 0)
            assert set(np.flatnonzero(tags == 0)) <= set(kept)
            assert len(kept) - int((tags == 0).sum()) >= 1
    _, plan = run_method(build(Compression("aircache", budget=1.0)), q, k, ctx)
    np.testing.assert_array_equal(plan.count[..., 0], [[24, 21], [24, 21]])


def test_aircache_plan_width_without_static_visual_count_is_safe():
    L, B, Hq, H, S, D = 1, 1, 2, 1, 24, 4
    q, k = random_qk(L, B, Hq, H, S, D, seed=16)
    m = build(Compression("aircache", budget=0.5, max_ratio=0.5))
    _, p_none = run_method(m, q, k, make_ctx(S, [0], [(2, 14)]))
    _, p_nv = run_method(m, q, k, make_ctx(S, [0], [(2, 14)], num_visual=12))
    assert p_nv.indices.shape[-1] == m.capacity(S, 12) == 18 and p_none.indices.shape[-1] == S
    assert kept_positions(p_none, make_ctx(S, [0], [(2, 14)]), 0, 0, 0) == kept_positions(
        p_nv, make_ctx(S, [0], [(2, 14)], num_visual=12), 0, 0, 0)
