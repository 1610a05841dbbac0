"""Observation scores without S x S: every scorer's stats and keep-sets with its windows run in row
blocks (`window_scores_row_blocked`) and H2O's column sums from the prefill's log-sum-exp
(`scoring.colsum_from_lse`) equal those of the dense observers (one [W, S] reference call, H2O's
two-pass `full_softmax_colsum`)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import make_ctx, random_qk

from vkv_jax import prefill
from vkv_jax.methods import Compression, build, scoring
from vkv_jax.models import attention
from vkv_jax.models.loading import random_params
from vkv_jax.testbed.tiny import tiny_config

ws_module = importlib.import_module("vkv_jax.pallas_kernels.window_scores")  # the package re-exports the function

L, B, HQ, HKV, S, D = 2, 2, 4, 2, 40, 8  # row 1 left-padded by 5 slots

CASES = {
    "snapkv": dict(budget=0.5, window=12, kernel=3),
    "pyramidkv": dict(budget=0.5, window=12, kernel=3, pooling="avg"),
    "h2o": dict(budget=0.4),
    "vlcache": dict(budget=0.4),  # num_visual unknown below: every row is a window row (W = S)
    "aircache": dict(budget=0.3),
    "csp": dict(budget=0.5, recent_ratio=0.3),
    "adakv": dict(budget=0.4, base="snapkv", base_options={"window": 12}),
}


def _observe_all(method, q, k, ctx, with_lse):
    """The prefill's per-layer observe (H2O gets the blocked attention's lse when `with_lse`), then plan."""

    @jax.jit
    def go(q, k):
        def layer(qk):
            ql, kl = qk
            if with_lse and getattr(method, "observe_lse", False):
                _, lse = attention.blocked_attention(ql, kl, kl, ctx.valid, block=8)
                return method.observe(ql, kl, ctx, lse=lse)
            return method.observe(ql, kl, ctx)

        stats = jax.lax.map(layer, (q, k))
        return stats, method.plan(stats, ctx)

    return go(jnp.asarray(q), jnp.asarray(k))


@pytest.mark.parametrize("name,num_visual", [(n, None) for n in sorted(CASES)]
                         + [("vlcache", 16), ("aircache", 16)])
def test_blocked_observers_equal_dense(name, num_visual, monkeypatch):
    ctx = make_ctx(S, [0, 5], [(3, 19), (3, 19)], num_visual=num_visual)
    q, k = random_qk(L, B, HQ, HKV, S, D, seed=3, scale=1.5)
    method = build(Compression(name, **CASES[name]))
    monkeypatch.setattr(ws_module, "ROW_BLOCK", 10 ** 6)  # dense: one [W, S] reference call
    s_ref, p_ref = _observe_all(method, q, k, ctx, with_lse=False)
    monkeypatch.setattr(ws_module, "ROW_BLOCK", 8)  # blocked: windows of > 8 rows in blocks of 8
    s_blk, p_blk = _observe_all(method, q, k, ctx, with_lse=True)
    for a, r in zip(jax.tree.leaves(s_blk), jax.tree.leaves(s_ref)):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        assert a.shape == r.shape
        assert np.abs(a - r).max() <= 1e-6 * max(1.0, np.abs(r).max())
    assert np.abs(np.asarray(jax.tree.leaves(s_ref)[0], np.float64)).sum() > 0.0
    np.testing.assert_array_equal(p_blk.count, p_ref.count)
    np.testing.assert_array_equal(p_blk.indices, p_ref.indices)


def test_row_blocked_window_scores_every_output():
    """All optional outputs at once (per-row key_allowed, groups, threshold counts, n-softmax, per
    head), W = 21 rows in blocks of 4 with a ragged last block."""
    rng = np.random.default_rng(0)
    W = 21
    q = jnp.asarray(rng.normal(size=(2, 4, W, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 30, 8)), jnp.float32)
    slot = jnp.asarray(np.where(rng.random((2, W)) < 0.2, -1, np.arange(30 - W, 30)), jnp.int32)
    valid = jnp.asarray(np.arange(30)[None] >= np.array([[0], [4]]))
    allowed = jnp.asarray(rng.random((2, W, 30)) < 0.7)
    grp = jnp.asarray(rng.integers(0, 2, (2, 30)), jnp.int32)
    for kw in (dict(key_allowed=allowed, threshold_p=0.05, per_head=True),
               dict(q_group=grp[:, 30 - W:], key_group=grp, n_softmax=1.0)):
        ref = ws_module.window_scores_reference(q, k, slot, valid, **kw)
        blk = ws_module.window_scores_row_blocked(q, k, slot, valid, row_block=4, **kw)
        for a, r in zip(blk, ref):
            if r is None:
                assert a is None
                continue
            a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(r))
            f = np.isfinite(r)
            assert np.abs(a[f] - r[f]).max() <= 1e-6 * max(1.0, np.abs(r[f]).max())


def test_colsum_from_lse_equals_two_pass_colsum():
    q, k = random_qk(1, 2, 4, 2, 45, 8, seed=5, scale=2.0)
    q, k = jnp.asarray(q[0]), jnp.asarray(k[0])
    valid = jnp.asarray(np.arange(45)[None] >= np.array([[0], [7]]))
    _, lse = attention.dense_attention(q, k, k, valid)
    got = scoring.colsum_from_lse(q, k, lse, valid, block=16)  # 3 row blocks, front-padded
    ref = scoring.full_softmax_colsum(q, k, valid, block=8, impl="reference")
    assert float(jnp.abs(got - ref).max()) <= 1e-6 * float(jnp.abs(ref).max())
    assert float(jnp.abs(got[1, :, :7]).max()) == 0.0  # padding keys score exactly 0


def test_prefill_hands_h2o_the_attention_lse():
    """`prefill.run_prompt` with H2O: stats from the lse path (auto) equal the two-pass Pallas kernel's
    (impl='kernel' takes no lse), on a tiny random LLaVA with a left-padded batch."""
    cfg = tiny_config(64, 63, image_size=32)
    params = random_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    row = np.concatenate([[1, 2, 3], [63] * n, rng.integers(4, 60, 9)]).astype(np.int32)
    ids = jnp.asarray(np.stack([row, np.concatenate([[0, 0], row[2:]])]))
    valid = jnp.asarray(np.stack([np.ones(len(row), bool), np.arange(len(row)) >= 2]))
    pix = jnp.asarray(rng.normal(size=(2, 3, 32, 32)), jnp.float32)
    auto, kernel = build(Compression("h2o", budget=0.5)), build(Compression("h2o", budget=0.5, impl="kernel"))
    assert auto.observe_lse and not kernel.observe_lse
    got = prefill.run_prompt(params, cfg, auto, ids, valid, pix).stats
    ref = prefill.run_prompt(params, cfg, kernel, ids, valid, pix).stats
    assert float(jnp.abs(got - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
