import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import make_ctx, random_qk, run_method

from vkv_jax import cache as kc
from vkv_jax.methods import Compression, KeepPlan, build
from vkv_jax.selection import keep_mask, select_topk


def _np_select(scores, count, k_max, protected, allowed):
    """Reference: stable order by (protected first, score desc, slot asc); first `count` kept."""
    S = scores.shape[-1]
    prot = protected & allowed
    cnt = min(max(count, int(prot.sum())), k_max, int(allowed.sum()))
    key = np.where(prot, np.inf, np.where(allowed, scores, -np.inf))
    order = sorted(range(S), key=lambda j: (-key[j], j))
    return sorted(order[:cnt])


def test_select_topk_matches_reference_with_protected_and_allowed():
    rng = np.random.default_rng(0)
    S, N = 20, 50
    scores = rng.integers(0, 5, size=(N, S)).astype(np.float32)  # many ties
    prot = rng.random((N, S)) < 0.15
    allowed = rng.random((N, S)) < 0.8
    count = rng.integers(0, S + 3, size=N)
    idx, cnt = select_topk(jnp.asarray(scores), jnp.asarray(count), 12, jnp.asarray(prot), jnp.asarray(allowed))
    for n in range(N):
        ref = _np_select(scores[n], count[n], 12, prot[n], allowed[n])
        assert int(cnt[n]) == len(ref)
        assert list(np.asarray(idx[n, :len(ref)])) == ref


def test_select_topk_ties_go_to_lower_slot_and_padding_never_kept():
    scores = jnp.array([[1.0, 5.0, 5.0, 5.0, 0.0, 5.0]])
    allowed = jnp.array([[True, False, True, True, True, True]])
    idx, cnt = select_topk(scores, jnp.array([2]), 4, allowed=allowed)
    assert int(cnt[0]) == 2 and list(np.asarray(idx[0, :2])) == [2, 3]
    idx, cnt = select_topk(scores, jnp.array([10]), 6, allowed=allowed)
    assert int(cnt[0]) == 5 and 1 not in list(np.asarray(idx[0, :5]))


def test_keep_mask_roundtrip():
    idx = jnp.array([[1, 3, 4, 0]])
    m = keep_mask(idx, jnp.array([3]), 6)
    np.testing.assert_array_equal(m[0], [False, True, False, True, True, False])


def _prefill_cache(L, B, H, S, D, ctx, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.normal(size=(L, B, H, S, D)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(L, B, H, S, D)).astype(np.float32))
    return kc.from_prefill(k, v, ctx.positions, ctx.tags, S), k, v


def test_compact_then_append_live_set_is_kept_set_in_order():
    L, B, H, S, D = 2, 2, 2, 10, 4
    ctx = make_ctx(S, [0, 3], [(1, 4), (1, 4)])
    cache, k, v = _prefill_cache(L, B, H, S, D, ctx)
    rng = np.random.default_rng(1)
    K = 6
    idx = np.zeros((L, B, H, K), np.int32)
    cnt = np.zeros((L, B, H), np.int32)
    want = {}
    for l in range(L):
        for b in range(B):
            for h in range(H):
                c = int(rng.integers(1, K + 1))  # per-head different counts
                pool = np.arange(S) if b == 0 else np.arange(S)  # may include padding slots on row 1
                sel = np.sort(rng.choice(pool, size=c, replace=False))
                idx[l, b, h, :c] = sel
                cnt[l, b, h] = c
                want[l, b, h] = [s for s in sel if np.asarray(ctx.valid)[b, s]]  # padding dropped
    new = kc.compact(cache, KeepPlan(jnp.asarray(idx), jnp.asarray(cnt)), 8)
    assert new.capacity == 8
    new_k = jnp.full((B, H, D), 7.0)
    appended = new
    for l in range(L):
        appended = kc.append(appended, jnp.int32(l), new_k, new_k, jnp.array([S, S - 3]))
    appended = kc.advance(appended)
    for l in range(L):
        nk, nv, npos, ntag, nlen = [np.asarray(x[l]) for x in (appended.k, appended.v, appended.pos,
                                                               appended.tag, appended.length)]
        for b in range(B):
            for h in range(H):
                w = want[l, b, h]
                n = int(nlen[b, h])
                assert n == len(w) + 1
                live = np.asarray(new.live_mask()[l, b, h])
                assert live.sum() == len(w) and live[:len(w)].all()
                np.testing.assert_array_equal(npos[b, h, :n - 1], np.asarray(ctx.positions)[b, w])
                np.testing.assert_array_equal(nk[b, h, :n - 1], np.asarray(k)[l, b, h, w])
                np.testing.assert_array_equal(nv[b, h, :n - 1], np.asarray(cache.v)[l, b, h, w])
                np.testing.assert_array_equal(ntag[b, h, :n - 1], np.asarray(ctx.tags)[b, w])
                assert npos[b, h, n - 1] == [S, S - 3][b] and ntag[b, h, n - 1] == kc.GENERATED
                assert (npos[b, h, n:] == -1).all()


def test_compact_rejects_small_capacity_and_full_plan_none_keeps_everything():
    ctx = make_ctx(6, [0, 2], [(0, 2), (0, 2)])
    cache, _, _ = _prefill_cache(1, 2, 1, 6, 2, ctx)
    with pytest.raises(ValueError):
        kc.compact(cache, KeepPlan(jnp.zeros((1, 2, 1, 4), jnp.int32), jnp.ones((1, 2, 1), jnp.int32)), 3)
    full = kc.compact(cache, None, 8)
    np.testing.assert_array_equal(full.length[0, :, 0], [6, 4])  # padding dropped
    np.testing.assert_array_equal(full.pos[0, 1, 0, :4], [0, 1, 2, 3])


def _attend(q, k, v, mask):
    """q [D]; k, v [N, D]; mask [N] -> softmax(q.k/sqrt(D)) v in float32."""
    logits = jnp.where(mask, k @ q / jnp.sqrt(jnp.float32(q.shape[-1])), -jnp.inf)
    return jax.nn.softmax(logits) @ v


@pytest.mark.parametrize("spec", [("adakv", 0.4, {}), ("pyramidkv", 0.5, {"window": 3, "kernel": 3}),
                                  ("vlcache", 0.3, {}), ("csp", 0.4, {"combine": "union_dedup"})])
def test_compacted_attention_equals_full_attention_with_evicted_slots_masked(spec):
    name, budget, opts = spec
    L, B, Hq, H, S, D = 3, 2, 4, 2, 24, 8
    ctx = make_ctx(S, [0, 5], [(2, 12), (2, 10)], num_visual=None)
    q, k = random_qk(L, B, Hq, H, S, D, seed=3, scale=1.5)
    method = build(Compression(name, budget=budget, **opts))
    _, plan = run_method(method, q, k, ctx)
    counts = np.asarray(plan.count)
    cache, kk, vv = _prefill_cache(L, B, H, S, D, ctx, seed=4)
    K = method.capacity(S, 10)
    new = kc.compact(cache, plan, kc.round_capacity(K + 4, 8))
    keep = np.asarray(keep_mask(plan.indices, plan.count, S)) & np.asarray(ctx.valid)[None, :, None, :]
    qd = jnp.asarray(np.random.default_rng(5).normal(size=(B, H, D)).astype(np.float32))
    live = np.asarray(new.live_mask())
    for l in range(L):
        for b in range(B):
            for h in range(H):
                a = _attend(qd[b, h], new.k[l, b, h], new.v[l, b, h], live[l, b, h])
                ref = _attend(qd[b, h], kk[l, b, h], vv[l, b, h], keep[l, b, h])
                np.testing.assert_allclose(a, ref, atol=1e-5, rtol=1e-5)
    if name == "adakv":
        assert len(np.unique(counts)) > 1  # per-head budgets really differ
