import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import kept_positions, make_ctx, np_softmax, random_qk, row_slice, run_method

from vkv_jax.methods import Compression, build
from vkv_jax.methods.scoring import pool1d

L, B, Hq, H, S, D = 2, 2, 4, 2, 32, 8
PADS = [0, 6]


def _ctx(num_visual=None):
    return make_ctx(S, PADS, [(3, 15), (3, 13)], num_visual=num_visual)


def _np_attn_rows(qr, kr, rows):
    """qr [Hq, Sb, D], kr [H, Sb, D]: causal softmax probs for query rows -> [Hq, len(rows), Sb]."""
    G = qr.shape[0] // kr.shape[0]
    kk = np.repeat(kr, G, axis=0)
    Sb = kr.shape[1]
    lg = np.einsum("hrd,hsd->hrs", qr[:, rows], kk) / np.sqrt(qr.shape[-1])
    lg = np.where(np.arange(Sb)[None, None, :] <= np.asarray(rows)[None, :, None], lg, -np.inf)
    return np_softmax(lg)


def _np_topk_keep(scores, count, protected):
    """positions kept: protected + best of the rest (ties lower), sorted."""
    n = count - int(protected.sum())
    rest = [j for j in np.argsort(-scores, kind="stable") if not protected[j]]
    return sorted(list(np.flatnonzero(protected)) + rest[:max(n, 0)])


def test_streamingllm_keeps_sinks_and_recent_window():
    ctx = _ctx()
    q, k = random_qk(L, B, Hq, H, S, D)
    _, plan = run_method(build(Compression("streamingllm", budget=10)), q, k, ctx)
    for b in range(B):
        Sb = S - PADS[b]
        for l in range(L):
            for h in range(H):
                assert kept_positions(plan, ctx, l, b, h) == [0, 1, 2, 3] + list(range(Sb - 6, Sb))
    _, plan = run_method(build(Compression("streamingllm", budget=3)), q, k, ctx)
    assert kept_positions(plan, ctx, 0, 1, 0) == [0, 1, 2]  # C < n_sink: first C tokens


def test_h2o_accumulated_attention_over_all_prompt_rows():
    ctx = _ctx()
    q, k = random_qk(L, B, Hq, H, S, D, seed=1)
    m = build(Compression("h2o", budget=0.4, recent_fraction=0.25, block=8))  # blocks exercise the scan
    stats, plan = run_method(m, q, k, ctx)
    for b in range(B):
        qr, kr, _ = row_slice(q, k, ctx, b)
        Sb = kr.shape[2]
        C = int(np.floor(0.4 * Sb + 1e-6))
        w = int(np.floor(0.25 * C + 1e-6))
        for l in range(L):
            a = _np_attn_rows(qr[l], kr[l], np.arange(Sb))  # [Hq, Sb, Sb]
            s = a.sum(1).reshape(H, -1, Sb).sum(1)
            np.testing.assert_allclose(np.asarray(stats[l, b])[:, PADS[b]:], s, rtol=1e-4, atol=1e-5)
            assert np.allclose(np.asarray(stats[l, b])[:, :PADS[b]], 0)
            for h in range(H):
                prot = np.arange(Sb) >= Sb - w
                assert kept_positions(plan, ctx, l, b, h) == _np_topk_keep(s[h], C, prot)


def _np_pool(x, kernel, mode):
    pad = kernel // 2
    n = x.shape[-1]
    out = np.zeros_like(x)
    for j in range(n):
        lo, hi = j - pad, j - pad + kernel
        win = [x[..., t] if 0 <= t < n else (np.zeros_like(x[..., 0]) if mode == "avg" else
                                              np.full_like(x[..., 0], -np.inf)) for t in range(lo, hi)]
        win = np.stack(win, -1)
        out[..., j] = win.sum(-1) / kernel if mode == "avg" else win.max(-1)
    return out


@pytest.mark.parametrize("mode,kernel", [("avg", 5), ("max", 7), ("max", 4)])
def test_pool1d_matches_torch_semantics(mode, kernel):
    x = np.random.default_rng(0).random((3, 17)).astype(np.float32)
    np.testing.assert_allclose(pool1d(jnp.asarray(x), kernel, mode), _np_pool(x, kernel, mode), rtol=1e-6)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_window_scores_pooling_and_keep_set(pooling):
    ctx = _ctx()
    W, ker = 6, 5
    q, k = random_qk(L, B, Hq, H, S, D, seed=2, scale=1.5)
    m = build(Compression("snapkv", budget=12, window=W, kernel=ker, pooling=pooling))
    stats, plan = run_method(m, q, k, ctx)
    for b in range(B):
        qr, kr, _ = row_slice(q, k, ctx, b)
        Sb = kr.shape[2]
        for l in range(L):
            a = _np_attn_rows(qr[l], kr[l], np.arange(Sb - W, Sb))  # [Hq, W, Sb]
            s = a.sum(1)[:, :Sb - W]  # prefix only, then pool (zero / -inf padding beyond)
            s = _np_pool(s, ker, pooling).reshape(H, -1, Sb - W).sum(1)
            np.testing.assert_allclose(np.asarray(stats[l, b])[:, PADS[b]:S - W], s, rtol=1e-4, atol=1e-6)
            for h in range(H):
                full = np.concatenate([s[h], np.zeros(W)])
                prot = np.arange(Sb) >= Sb - W
                assert kept_positions(plan, ctx, l, b, h) == _np_topk_keep(full, 12, prot)


def test_pyramidkv_layer_counts_decrease_and_keep_window():
    Lp = 4
    ctx = make_ctx(64, [0, 4], [(2, 40), (2, 40)])
    q, k = random_qk(Lp, 2, 2, 1, 64, 4, seed=3)
    m = build(Compression("pyramidkv", budget=20, window=4, kernel=3))
    _, plan = run_method(m, q, k, ctx)
    c = np.asarray(plan.count)[:, 0, 0]
    assert list(c) == [36, 26, 16, 6] and m.capacity(64, 0) >= c.max()  # B=16, min=0, max=32, steps=10
    assert set(range(60, 64)) <= set(kept_positions(plan, ctx, 3, 0, 0))


def test_adakv_flattened_topk_with_safeguard_redistributes_heads():
    from vkv_jax.methods._common import Selection
    from vkv_jax.methods.adakv import adaptive_head_counts
    from vkv_jax.selection import select_topk

    scores = np.zeros((1, 1, 2, 10), np.float32)
    scores[0, 0, 0] = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5]  # concentrated head
    scores[0, 0, 1] = [0.1] * 10  # diffuse head
    counts = np.full((1, 1, 2), 5, np.int32)
    prot = np.zeros((1, 1, 2, 10), bool)
    prot[..., 9] = True  # a one-slot window
    allowed = np.ones((1, 1, 2, 10), bool)
    sel = adaptive_head_counts(Selection(jnp.asarray(scores), jnp.asarray(counts), jnp.asarray(prot),
                                         jnp.asarray(allowed)), 0.2)
    # per head: window (1) + safeguard floor(0.2*5)=1; remaining 10-4=6 slots go to head 0's best.
    np.testing.assert_array_equal(sel.counts[0, 0], [8, 2])
    idx, cnt = select_topk(sel.scores, sel.counts, 10, sel.protected, sel.allowed)
    assert list(np.asarray(idx[0, 0, 0, :8])) == [0, 1, 2, 3, 4, 5, 6, 9]
    assert list(np.asarray(idx[0, 0, 1, :2])) == [0, 9]


def test_adakv_preserves_layer_total_over_snapkv():
    ctx = _ctx()
    q, k = random_qk(L, B, Hq, H, S, D, seed=4, scale=2.0)
    base = build(Compression("snapkv", budget=10, window=3))
    _, pb = run_method(base, q, k, ctx)
    _, pa = run_method(build(Compression("adakv", budget=10, base_options={"window": 3})), q, k, ctx)
    np.testing.assert_array_equal(np.asarray(pa.count).sum(-1), np.asarray(pb.count).sum(-1))


def test_adakv_takes_a_base_method_object_as_it_takes_a_name():
    from vkv_jax.methods.adakv import AdaKV
    from vkv_jax.methods.snapkv import SnapKV

    ctx = _ctx()
    q, k = random_qk(L, B, Hq, H, S, D, seed=5, scale=2.0)
    _, by_name = run_method(build(Compression("adakv", budget=10, base_options={"window": 3})), q, k, ctx)
    _, by_object = run_method(AdaKV(budget=10, base=SnapKV(budget=0.5, window=3)), q, k, ctx)  # AdaKV's budget wins
    np.testing.assert_array_equal(by_object.indices, by_name.indices)
    np.testing.assert_array_equal(by_object.count, by_name.count)
    with pytest.raises(ValueError, match="base_options"):
        AdaKV(base=SnapKV(), base_options={"window": 3})
    with pytest.raises(ValueError, match="not a scorer"):
        AdaKV(base=AdaKV())


def test_random_is_seeded_and_never_keeps_padding():
    ctx = _ctx()
    q, k = random_qk(L, B, Hq, H, S, D)
    _, p1 = run_method(build(Compression("random", budget=0.5, seed=3)), q, k, ctx)
    _, p2 = run_method(build(Compression("random", budget=0.5, seed=3)), q, k, ctx)
    _, p3 = run_method(build(Compression("random", budget=0.5, seed=4)), q, k, ctx)
    np.testing.assert_array_equal(p1.indices, p2.indices)
    assert not np.array_equal(p1.indices, p3.indices)
    np.testing.assert_array_equal(p1.count[:, 1], np.full((L, H), (S - PADS[1]) // 2))
    for l in range(L):
        for h in range(H):
            assert min(np.asarray(p1.indices[l, 1, h, :int(p1.count[l, 1, h])])) >= PADS[1]


@pytest.mark.parametrize("name,opts", [
    ("streamingllm", {}), ("h2o", {"block": 8}), ("snapkv", {"window": 4, "kernel": 3}),
    ("pyramidkv", {"window": 4}), ("adakv", {}), ("vlcache", {}), ("aircache", {}), ("csp", {})])
def test_batched_left_padded_plan_equals_each_row_alone(name, opts):
    """Batch independence: padding is never scored or kept, budgets use each row's real length."""
    ctx = _ctx(num_visual=12)
    q, k = random_qk(L, B, Hq, H, S, D, seed=5, scale=1.5)
    m = build(Compression(name, budget=0.3 if name != "csp" else 0.25, **opts))
    _, plan = run_method(m, q, k, ctx)
    for b in range(B):
        qr, kr, tags = row_slice(q, k, ctx, b)
        Sb = kr.shape[2]
        span = (3, 15) if b == 0 else (3, 13)
        c1 = make_ctx(Sb, [0], [span], num_visual=None)
        _, p1 = run_method(m, qr[:, None], kr[:, None], c1)
        for l in range(L):
            for h in range(H):
                assert kept_positions(plan, ctx, l, b, h) == kept_positions(p1, c1, l, 0, h), (b, l, h)
