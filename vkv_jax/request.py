"""The request path on the host: prefill + compaction, a page pool fitted to what was kept, paging.

One function, `prefill_request`, serves `vkv_jax.generate` and `python -m vkv_jax.bench`, so the cache
they decode from (and the bytes they report) are the same. It runs two executables from the AOT cache
(`vkv_jax.compile_cache`): `decode.prefill_compact_jit` (prefill, scoring, compaction into a dense
cache) and `decode.page_prompt_jit`, whose pool (`decode.fitted_pool`) is sized on the host from the
compacted lengths: what is reserved follows what is live for every method, whatever its budget split
over layers and heads, at the price of one small device-to-host read between the two.

Code that must stay inside one `jit` (a user's own loop, the evaluation harness) calls `decode.prefill`,
whose pool is the static bound `decode.static_pool` instead.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from vkv_jax import cache as cache_lib
from vkv_jax import decode
from vkv_jax.compile_cache import compiled
from vkv_jax.methods import Method
from vkv_jax.models.config import LlavaConfig
from vkv_jax.pallas_kernels.mesh import split_counts


@dataclasses.dataclass
class Prefilled:
    """A prefilled, compressed and paged batch, with its timings (compile time apart)."""

    logits: jax.Array  # [B, V] f32 at each row's last prompt token
    cache: cache_lib.KVCache  # paged, with `max_new_tokens`' decode segment
    next_positions: jax.Array  # [B] int32
    full_kv_bytes: float  # live bytes the uncompressed prompt cache would hold
    seconds: float  # prefill + compaction + paging, on the device
    compile_seconds: float


KV_POOLS = ("fitted", "static")


def check_kv_pool(kv_pool: str) -> str:
    if kv_pool not in KV_POOLS:
        raise ValueError(f"kv_pool must be one of {', '.join(map(repr, KV_POOLS))}, got {kv_pool!r}")
    return kv_pool


def prefill_request(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                    valid: jax.Array, pixel_values: jax.Array | None, budget: jax.Array | None = None,
                    max_new_tokens: int = 0, kv_pool: str = "fitted", prefill_chunk: int | None = None) -> Prefilled:
    """Prefill `method` (static; `budget` its traced value, `methods.split_budget`) on input_ids, valid
    [B, S] and pixel_values, compact, and page with `decode_capacity(max_new_tokens)` decode slots (0: none;
    `decode.grow` adds them).

    kv_pool "fitted": the pool fitted to the kept slots (`decode.fitted_pool`; <= ~1.13x the live bytes),
    whose size keys the paging and decode executables: a process serving many different budgets or prompt
    lengths compiles one of each per pool size it reaches. "static": one executable, the pool bounded from
    the method's total budget (`decode.static_pool`; the whole prompt for a traced VL-Cache / AirCache
    budget): compiles stay per prompt bucket and budget bucket, memory is what the bound reserves.

    prefill_chunk: prefill that many slots at a time (`decode.chunked_prompt`: activations bounded by the
    chunk, the same logits, scores and keep-sets up to float rounding), None: the whole prompt at once."""
    args = dict(params=params, input_ids=input_ids, valid=valid, pixel_values=pixel_values, budget=budget)
    if check_kv_pool(kv_pool) == "static":
        prefill, compile_s = compiled(decode.prefill_jit, dict(cfg=cfg, method=method, max_new_tokens=max_new_tokens,
                                                               chunk=prefill_chunk), **args)
        start = time.perf_counter()
        logits, cache, next_pos, stats = jax.block_until_ready(prefill(**args))
        return Prefilled(logits, cache, next_pos, float(stats.full_kv_bytes), time.perf_counter() - start, compile_s)
    prefill, prefill_compile = compiled(decode.prefill_compact_jit, dict(cfg=cfg, method=method, chunk=prefill_chunk),
                                        **args)
    start = time.perf_counter()
    logits, kept, next_pos, full_kv_bytes = jax.block_until_ready(prefill(**args))
    seconds = time.perf_counter() - start
    _, B, H = kept.length.shape  # under a mesh: one block per device, fitted to the fullest
    pool = decode.fitted_pool(np.asarray(kept.length), splits=split_counts(cache_lib.pool_axes(B, H)))
    paging, paging_compile = compiled(decode.page_prompt_jit, dict(pool=pool, max_new_tokens=max_new_tokens),
                                      kept=kept)
    start = time.perf_counter()
    cache = jax.block_until_ready(paging(kept=kept))
    seconds += time.perf_counter() - start
    return Prefilled(logits, cache, next_pos, float(full_kv_bytes), seconds, prefill_compile + paging_compile)
