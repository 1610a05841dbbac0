"""Test helpers: tiny left-padded batches and a driver that runs a method like the prefill scan does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.methods import PrefillContext


def make_ctx(S: int, pads, vis_spans, num_visual: int | None = None) -> PrefillContext:
    """Left-padded context. pads[b] padding slots; vis_spans[b] = (start, end) in *real positions*."""
    B = len(pads)
    tags = np.zeros((B, S), np.int8)
    valid = np.ones((B, S), bool)
    pos = np.full((B, S), -1, np.int32)
    for b in range(B):
        p = pads[b]
        valid[b, :p] = False
        pos[b, p:] = np.arange(S - p)
        s, e = vis_spans[b]
        tags[b, p + s:p + e] = 1
    return PrefillContext(jnp.asarray(tags), jnp.asarray(pos), jnp.asarray(valid), num_visual=num_visual)


def random_qk(L, B, Hq, Hkv, S, D, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(L, B, Hq, S, D)).astype(np.float32) * scale
    k = rng.normal(size=(L, B, Hkv, S, D)).astype(np.float32) * scale
    return q, k


def run_method(method, q, k, ctx):
    """stats per layer stacked on L (as the prefill scan does), then plan; all under one jit."""

    @jax.jit
    def go(q, k, ctx):
        stats = jax.lax.map(lambda qk: method.observe(qk[0], qk[1], ctx), (q, k))
        return stats, method.plan(stats, ctx)

    return go(jnp.asarray(q), jnp.asarray(k), ctx)


def kept_positions(plan, ctx, l, b, h):
    """Original positions kept by (layer, row, head), as a sorted list (duplicates preserved)."""
    idx = np.asarray(plan.indices[l, b, h])[: int(plan.count[l, b, h])]
    pos = np.asarray(ctx.positions[b])[idx]
    return list(pos)


def np_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def row_slice(q, k, ctx, b):
    """Row b without its padding: q [L,Hq,Sb,D], k [L,Hkv,Sb,D], tags [Sb]."""
    p = int((~np.asarray(ctx.valid[b])).sum())
    return q[:, b, :, p:], k[:, b, :, p:], np.asarray(ctx.tags[b, p:])
