"""Scoring helpers shared by the methods: which window rows are queries, H2O's all-rows column sums,
pooling. The attention statistics themselves come from `pallas_kernels.window_scores` (compiled
kernel on TPU, its jnp reference elsewhere), so every method reads one definition of them.

Conventions of `window_scores`: post-RoPE q [B, Hq, W, D] (W query rows) and k [B, Hkv, S, D],
float32 inside, logits scaled by 1/sqrt(D), query head h on kv head h // G (HF `repeat_kv`). A query
row is named by its slot along S (causal rule key_slot <= q_slot) or disabled with -1, so left-padded
batches work: padding keys and disabled rows contribute exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vkv_jax.pallas_kernels import window_scores


def row_slots(S: int, W: int) -> jax.Array:
    """int32 [W]: slot indices of the last W rows of a length-S (left-padded) prompt."""
    return jnp.arange(S - W, S, dtype=jnp.int32)


def query_slots(valid: jax.Array, W: int, rows: jax.Array | None = None) -> jax.Array:
    """int32 [B, W]: `window_scores`' q_slot for the last W slots; -1 where the slot is padding or
    (given rows [B, W] bool) not a query row of the method."""
    slots = row_slots(valid.shape[-1], W)
    on = valid[:, slots] if rows is None else valid[:, slots] & rows
    return jnp.where(on, slots[None], -1)


def visible_keys(valid: jax.Array, q_slot: jax.Array) -> jax.Array:
    """int32 [B, W]: number of real keys a query row sees (slots <= q_slot); 0 for disabled rows."""
    upto = jnp.cumsum(valid.astype(jnp.int32), axis=-1)  # [B, S]: real keys in slots [0, j]
    n = jnp.take_along_axis(upto, jnp.maximum(q_slot, 0), axis=-1)
    return jnp.where(q_slot >= 0, n, 0)


def full_softmax_colsum(q: jax.Array, k: jax.Array, valid: jax.Array, block: int = 256,
                        impl: str = "auto") -> jax.Array:
    """H2O accumulated attention: sum over all prompt query rows of causal softmax, per kv head.

    q [B, Hq, S, D]; k [B, Hkv, S, D]; valid [B, S]. Query rows go through `window_scores` in blocks
    of `block` (lax.scan), so neither the reference nor the kernel ever holds [S, S]. Returns float32
    [B, Hkv, S].
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    blk = min(block, S)
    nb = -(-S // blk)
    pad = nb * blk - S
    qp = jnp.pad(q, ((0, 0), (0, 0), (pad, 0), (0, 0)))  # pad at the front: rows stay right-aligned
    vq = jnp.pad(valid, ((0, 0), (pad, 0)))
    qb = qp.reshape(B, Hq, nb, blk, D).transpose(2, 0, 1, 3, 4)  # [nb, B, Hq, blk, D]
    vb = vq.reshape(B, nb, blk).transpose(1, 0, 2)  # [nb, B, blk]
    slots = (jnp.arange(nb * blk, dtype=jnp.int32) - pad).reshape(nb, blk)
    # The kernel's score tile is [G * blk, block_k] f32; with all-row blocks (blk = 256, not SnapKV's
    # 32) keep it near 1 MiB so a few live copies fit TPU scoped VMEM (16 MiB on v5e).
    block_k = max(128, min(512, (1 << 18) // ((Hq // Hkv) * blk) // 128 * 128))

    def step(acc, xs):
        qi, vi, si = xs
        q_slot = jnp.where(vi, si[None], -1)  # front padding and left padding rows are off
        return acc + window_scores(qi, k, q_slot, valid, block_k=block_k, impl=impl).colsum, None

    acc, _ = jax.lax.scan(step, jnp.zeros((B, Hkv, S), jnp.float32), (qb, vb, slots))
    return acc


def colsum_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array, valid: jax.Array,
                    block: int = 128) -> jax.Array:
    """H2O accumulated attention from the prefill's saved log-sum-exp, in one pass over query blocks.

    q [B, Hq, T, D]: the query rows of the last T of the C key slots (T = C for a whole prompt; a
    prefill chunk after earlier ones has T < C); k [B, Hkv, C, D]; lse [B, Hq, T] float32 = log sum_j
    exp(q_i . k_j / sqrt(D)) over row i's visible keys (`attention.prefill_attention` /
    `blocked_attention`); valid [B, C]. Returns float32 [B, Hkv, C]: sum over the real query rows i >= j
    and the group's query heads of p = exp(q_i . k_j / sqrt(D) - lse_i), i.e. `full_softmax_colsum`
    without its row max / row sum pass. A row's softmax is complete once its own keys are in, so the
    column sums of a chunked prefill are the sum of its chunks' calls. Rows and keys are cut into
    blocks of `block` slots (front-padded, so the causal diagonal stays on block boundaries); row block
    i reads key blocks up to its diagonal only, so only [block, block] tiles of scores exist and the
    blocks above the diagonal are never computed.
    """
    B, Hq, T, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    if T > C:
        raise ValueError(f"colsum_from_lse needs at most as many query rows as keys, got {T} and {C}")
    G = Hq // Hkv
    bs = min(block, C)  # a short chunk pads its rows to one block rather than looping over tiny key blocks
    nq, nk = -(-T // bs), -(-C // bs)
    pad_q, pad_k = nq * bs - T, nk * bs - C
    off = nk - nq  # key block on row block i's diagonal: i + off
    front = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(n, 0), (0, 0)])  # noqa: E731
    qb = front(q, pad_q).reshape(B, Hkv, G, nq, bs, D)
    kb = front(k, pad_k).reshape(B, Hkv, nk, bs, D)
    ok_k = jnp.pad(valid.astype(bool), ((0, 0), (pad_k, 0))).reshape(B, nk, bs)  # pad slots: neither
    ok_q = jnp.pad(valid.astype(bool)[:, C - T:], ((0, 0), (pad_q, 0))).reshape(B, nq, bs)
    lb = jnp.pad(lse, ((0, 0), (0, 0), (pad_q, 0))).reshape(B, Hkv, G, nq, bs)
    diag = jnp.arange(bs)[None, :] <= jnp.arange(bs)[:, None]  # [row, key]
    scale = D ** -0.5

    def tile(i, j, qi, li, causal):  # [B, Hkv, bs] column sums of row block i over key block j
        s = jnp.einsum("bkgqd,bkcd->bkgqc", qi, kb[:, :, j], preferred_element_type=jnp.float32) * scale
        vis = ok_q[:, i][:, None, None, :, None] & ok_k[:, j][:, None, None, None, :]
        if causal:
            vis = vis & diag
        return jnp.where(vis, jnp.exp(s - li[..., None]), 0.0).sum((2, 3))

    def row_block(acc, i):
        qi = qb[:, :, :, i].astype(jnp.float32)
        li = lb[:, :, :, i]

        def key_block(j, acc):
            return acc.at[:, :, j].add(tile(i, j, qi, li, causal=False))

        acc = jax.lax.fori_loop(0, i + off, key_block, acc)  # strictly below the diagonal
        return acc.at[:, :, i + off].add(tile(i, i + off, qi, li, causal=True)), None

    acc, _ = jax.lax.scan(row_block, jnp.zeros((B, Hkv, nk, bs), jnp.float32), jnp.arange(nq))
    return acc.reshape(B, Hkv, nk * bs)[:, :, pad_k:]


def pool1d(scores: jax.Array, kernel: int, mode: str = "max") -> jax.Array:
    """1-D pooling over the last axis, stride 1, padding kernel // 2 (torch semantics).

    avg: zero padding, divide by `kernel` (count_include_pad=True); max: -inf padding. Our scores
    are >= 0 and exactly 0 on padding, so left-padded rows pool exactly like unpadded ones.
    """
    if kernel <= 1:
        return scores
    pad = kernel // 2
    if mode == "avg":
        x = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)])
        out = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1,) * (scores.ndim - 1) + (kernel,),
                                    (1,) * scores.ndim, "VALID")
        return out[..., :scores.shape[-1]] / kernel
    if mode == "max":
        x = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)], constant_values=-jnp.inf)
        out = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (scores.ndim - 1) + (kernel,),
                                    (1,) * scores.ndim, "VALID")
        return out[..., :scores.shape[-1]]
    raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")


def last_visual_end(ctx_is_visual: jax.Array) -> jax.Array:
    """int32 [B]: slot after the last visual token (v_end), 0 if the row has none."""
    S = ctx_is_visual.shape[-1]
    j = jnp.arange(1, S + 1, dtype=jnp.int32)
    return jnp.where(ctx_is_visual, j, 0).max(-1)
