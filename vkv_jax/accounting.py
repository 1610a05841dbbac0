"""Byte and FLOP accounting: what a model and a cache hold, and what prefill and decode must compute and read.

Every count the library reports (`generate`'s stats, `python -m vkv_jax.bench`'s tables and roofline,
`bench_prefill`) comes from here; the cache pytree only knows its own slots (`KVCache.live_bytes`,
`allocated_bytes`, `decode_segment_bytes`, per layer too), which these build on.

- parameters: `param_bytes` (groups, and `decode_read`: the weights one decode step streams), `count_params`;
- KV cache: `prompt_kv_bytes` (the uncompressed prompt cache), `kv_read_bytes` (what a decode step reads
  from the cache), `visual_live_bytes`; `decode_step_read_bytes` adds the weights: the roofline's numerator;
- prefill FLOPs: `layer_lengths` (per-layer sequence lengths under an in-prefill reduction),
  `prefill_flops` (2 per multiply-add), `prefill_flop_counts` (whole n x n attention and its causal half).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax import cache as cache_lib
from vkv_jax.methods import Method, reduction_schedule
from vkv_jax.models.config import LlavaConfig


def _tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- parameters

def param_bytes(params: dict[str, Any]) -> dict[str, int]:
    """Bytes of the parameter groups; `decode_read` is what one decode step must stream: every LM
    weight except the embedding table (one row of it is read), i.e. the layers, final norm, lm_head."""
    lm = params["lm"]
    embed = _tree_bytes(lm["embed"])
    row = embed // lm["embed"].shape[0]
    head = _tree_bytes(lm["lm_head"]) if "lm_head" in lm else embed  # tied: unembed reads the whole table
    total = _tree_bytes(params)
    return {"total": total, "lm": _tree_bytes(lm), "vision_and_projector": total - _tree_bytes(lm),
            "decode_read": _tree_bytes(lm["layers"]) + _tree_bytes(lm["final_norm"]) + head + row}


def count_params(params: dict[str, Any]) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------- KV cache

def prompt_kv_bytes(k: jax.Array, valid: jax.Array) -> jax.Array:
    """Live bytes of the uncompressed prompt cache (f32 scalar): every real token in every layer and kv
    head. k [L, B, Hkv, S, D] (its shape and dtype only), valid [B, S] bool."""
    L, _, H, _, D = k.shape
    return valid.sum().astype(jnp.float32) * (L * H * 2 * D * k.dtype.itemsize)


def kv_read_bytes(cache: cache_lib.KVCache) -> dict[str, float]:
    """Bytes one decode step reads from the cache: `live` = K/V of live slots only (the ideal a ragged
    kernel reaches); `dense` = the whole paged pytree (pool, tables, decode segment), what a reader that
    ignores lengths touches."""
    return {"live": float(cache.live_bytes()), "dense": float(_tree_bytes(cache))}


def visual_live_bytes(cache: cache_lib.KVCache) -> float:
    """K/V bytes of the live prompt slots that hold visual tokens."""
    live = (cache.page_pos >= 0) & (cache.page_tag == cache_lib.VISION)
    return float(live.sum()) * cache.slot_bytes


def decode_step_read_bytes(weights_bytes: int, kv_bytes: float) -> float:
    """Bytes one decode step must read: the weights it streams (`param_bytes(...)["decode_read"]`) plus
    the KV it attends over. Divided by a read bandwidth, this is the step's memory-read bound."""
    return float(weights_bytes) + float(kv_bytes)


# ---------------------------------------------------------------- prefill FLOPs

def layer_lengths(method: Method, cfg: LlavaConfig, prompt_len: int, num_visual: int,
                  any_visual: bool = False) -> tuple[int, ...]:
    """Static sequence length entering each decoder layer (the padded prompt length `prompt_len` for
    every layer unless an in-prefill method shortens later ones; `reduction_schedule`'s arguments).
    Raises ValueError on a bad schedule."""
    L = cfg.text.num_layers
    reduction = reduction_schedule(method, L, num_visual, any_visual)
    stages = {s.layer: s for s in (reduction.stages if reduction else ())}
    lengths, n = [], num_visual
    for layer in range(L):  # the segment widths of `prefill.reduced_prompt`
        lengths.append(prompt_len)
        if layer in stages:
            prompt_len -= stages[layer].min_dropped(n)
            n = stages[layer].num_visual
    return tuple(lengths)


def prefill_flops(cfg: LlavaConfig, lengths: tuple[int, ...], batch: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of the decoder layers for rows of the given per-layer lengths n:
    q/k/v/o projections 2n·D·(2Hq + 2Hkv)·Dh, SwiGLU MLP 6n·D·F, attention 4n²·Hq·Dh (QKᵀ and PV over
    the whole n×n tile, as computed). Vision tower, unembedding and the methods' own scoring left out."""
    t = cfg.text
    D, F, Hq, Hkv, Dh = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    per_layer = [2 * n * D * (2 * Hq + 2 * Hkv) * Dh + 6 * n * D * F + 4 * n * n * Hq * Dh for n in lengths]
    return batch * int(sum(per_layer))


def prefill_flop_counts(cfg: LlavaConfig, lengths: tuple[int, ...], batch: int) -> dict[str, int]:
    """The decoder's prefill matmul FLOPs for the per-layer lengths (`layer_lengths`): "dense" with each
    layer's attention over its whole n x n, "causal" with its lower triangle only (the work a causal
    prefill needs; the blocked path skips the blocks above the diagonal)."""
    t = cfg.text
    dense = prefill_flops(cfg, lengths, batch)
    return {"dense": dense, "causal": dense - batch * sum(2 * n * n * t.num_heads * t.head_dim for n in lengths)}
