"""The request path: prompt -> compressed, paged cache -> the first decode state. Nothing else glues
prefill to decode.

Inside one jit (a user's own loop, the evaluation protocols): `prefill` runs the prompt pass
(`vkv_jax.prefill`), the method's compaction and paging into a pool bounded at trace time
(`paging.static_pool`), pure; `prefill_jit` is its jitted form.

On the host (`vkv_jax.generate`, the bench, `python -m vkv_jax.generate`): `prefill_request` runs the
same pieces as two executables from the AOT cache (`vkv_jax.compile_cache`): `prefill_compact_jit`
(prefill, scoring, compaction into a dense cache), then `paging.page_prompt_jit` with a pool fitted on the
host to the compacted lengths (`paging.fitted_pool`): what is reserved follows what is live for every
method, at the price of one small device-to-host read between the two (or, with kv_pool="static", the
one-executable `prefill_jit`). `start_request` adds the first sampled token and the decode segment: the
`DecodeState` every decode loop of `vkv_jax.decode` starts from.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import numpy as np

from vkv_jax import accounting, decode, decode_trim, kv_quant, paging
from vkv_jax import cache as cache_lib
from vkv_jax.compile_cache import compiled
from vkv_jax.methods import Method, bind_budget
from vkv_jax.models import family
from vkv_jax.models.config import LlavaConfig
from vkv_jax.pallas_kernels.mesh import split_counts
from vkv_jax.prefill import PromptPass, compact_prompt, prompt_pass
from vkv_jax.sampling import Sampling


@flax.struct.dataclass
class PrefillStats:
    full_kv_bytes: jax.Array  # live bytes of the uncompressed prompt cache
    kept_per_layer: jax.Array  # [L, 2] live prompt slots per row and kv head, averaged: (text, vision)


def compress(prompt: PromptPass, method: Method, max_new_tokens: int = 0,
             pool: tuple[int, int] | None = None, kv_dtype: str | None = None) -> cache_lib.KVCache:
    """`prefill.compact_prompt` then `paging.page_prompt`, pure and jit-able (`method`, `max_new_tokens`,
    `pool`, `kv_dtype` static). The pool defaults to `paging.static_pool`, the bound for any prompt of this
    shape; `prefill_request` fits it to what compaction kept instead (`paging.fitted_pool`, between two
    executables). kv_dtype: the kept slots paged quantized (`kv_quant`), after scoring read them in full."""
    return paging.page_prompt(compact_prompt(prompt, method), pool or paging.static_pool(prompt, method),
                              max_new_tokens, kv_dtype)


def prefill(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
            valid: jax.Array, pixel_values: jax.Array | None, max_new_tokens: int = 0,
            budget: jax.Array | None = None, pool: tuple[int, int] | None = None, chunk: int | None = None,
            kv_dtype: str | None = None):
    """Full-attention prefill, then the method's compression (`compress`: the cache holds
    `max_new_tokens` free slots, none by default; `paging.grow` adds them later; the pool `paging.static_pool` unless
    given). With `budget` (a traced scalar), `method` is the static half of `methods.split_budget` and
    the budget's value is this. chunk: prefill `chunk` slots at a time (`prefill.chunked_prompt`), None: at once.
    kv_dtype: page the kept slots quantized (`kv_quant`: "int8", "float8_e4m3fn"), None: in the model's dtype.

    Returns (last-position logits [B, V] f32, decode cache, next positions [B], PrefillStats).
    """
    method = bind_budget(method, budget)
    p = prompt_pass(params, cfg, method, input_ids, valid, pixel_values, chunk)
    cache = compress(p, method, max_new_tokens, pool, kv_dtype)
    stats = PrefillStats(full_kv_bytes=accounting.prompt_kv_bytes(p.k, p.ctx.valid),
                         kept_per_layer=paging.kept_by_modality(cache))
    return p.logits, cache, family.next_positions(cfg, valid, pixel_values), stats


def prefill_compact(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                    valid: jax.Array, pixel_values: jax.Array | None, budget: jax.Array | None = None,
                    chunk: int | None = None):
    """`prefill` up to the compacted dense cache, for a pool fitted to it on the host (`paging.fitted_pool`,
    then `paging.page_prompt`): (logits [B, V] f32, kept DenseCache, next positions [B], full KV bytes)."""
    method = bind_budget(method, budget)
    p = prompt_pass(params, cfg, method, input_ids, valid, pixel_values, chunk)
    full_bytes = accounting.prompt_kv_bytes(p.k, p.ctx.valid)
    return p.logits, compact_prompt(p, method), family.next_positions(cfg, valid, pixel_values), full_bytes

@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "pool", "chunk", "kv_dtype"))
def prefill_jit(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens=0, budget=None, pool=None,
                chunk=None, kv_dtype=None):
    return prefill(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens, budget, pool, chunk,
                   kv_dtype)


prefill_compact_jit = jax.jit(prefill_compact, static_argnames=("cfg", "method", "chunk"))


@dataclasses.dataclass
class Prefilled:
    """A prefilled, compressed and paged batch, with its timings (compile time apart)."""

    logits: jax.Array  # [B, V] f32 at each row's last prompt token
    cache: cache_lib.KVCache  # paged, with `max_new_tokens`' decode segment
    next_positions: jax.Array  # [B] int32
    full_kv_bytes: float  # live bytes the uncompressed prompt cache would hold
    seconds: float  # prefill + compaction + paging, on the device
    compile_seconds: float


def prefill_request(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                    valid: jax.Array, pixel_values: jax.Array | None, budget: jax.Array | None = None,
                    max_new_tokens: int = 0, kv_pool: str = "fitted", prefill_chunk: int | None = None,
                    kv_dtype: str | None = None) -> Prefilled:
    """Prefill `method` (static; `budget` its traced value, `methods.split_budget`) on input_ids, valid
    [B, S] and pixel_values, compact, and page with `paging.decode_capacity(max_new_tokens)` decode slots
    (0: none; `paging.grow` adds them).

    kv_pool "fitted": the pool fitted to the kept slots (`paging.fitted_pool`; <= ~1.13x the live bytes),
    whose size keys the paging and decode executables: a process serving many different budgets or prompt
    lengths compiles one of each per pool size it reaches. "static": one executable, the pool bounded from
    the method's total budget (`paging.static_pool`; the whole prompt for a traced VL-Cache / AirCache
    budget): compiles stay per prompt bucket and budget bucket, memory is what the bound reserves.

    prefill_chunk: prefill that many slots at a time (`prefill.chunked_prompt`: activations bounded by the
    chunk, the same logits, scores and keep-sets up to float rounding), None: the whole prompt at once.

    kv_dtype: "int8" / "float8_e4m3fn" pages and decode slots, one float32 scale per slot (`kv_quant`;
    scoring and compaction read the prefill's keys and values in full precision), None: the model's dtype."""
    kv_dtype = kv_quant.check_platform(kv_dtype)
    args = dict(params=params, input_ids=input_ids, valid=valid, pixel_values=pixel_values, budget=budget)
    if paging.check_kv_pool(kv_pool) == "static":
        run, compile_s = compiled(prefill_jit, dict(cfg=cfg, method=method, max_new_tokens=max_new_tokens,
                                                    chunk=prefill_chunk, kv_dtype=kv_dtype), **args)
        start = time.perf_counter()
        logits, cache, next_pos, stats = jax.block_until_ready(run(**args))
        return Prefilled(logits, cache, next_pos, float(stats.full_kv_bytes), time.perf_counter() - start, compile_s)
    run, prefill_compile = compiled(prefill_compact_jit, dict(cfg=cfg, method=method, chunk=prefill_chunk), **args)
    start = time.perf_counter()
    logits, kept, next_pos, full_kv_bytes = jax.block_until_ready(run(**args))
    seconds = time.perf_counter() - start
    _, B, H = kept.length.shape  # under a mesh: one block per device, fitted to the fullest
    pool = paging.fitted_pool(np.asarray(kept.length), splits=split_counts(cache_lib.pool_axes(B, H)))
    page, paging_compile = compiled(paging.page_prompt_jit, dict(pool=pool, max_new_tokens=max_new_tokens,
                                                                 kv_dtype=kv_dtype), kept=kept)
    start = time.perf_counter()
    cache = jax.block_until_ready(page(kept=kept))
    seconds += time.perf_counter() - start
    return Prefilled(logits, cache, next_pos, float(full_kv_bytes), seconds, prefill_compile + paging_compile)


@dataclasses.dataclass
class Started:
    """A request ready to decode: its first `DecodeState` (first token sampled, `decode_slots` decode slots
    when asked for) and the prefill it came from."""

    state: decode.DecodeState
    prefilled: Prefilled
    decode_slots: int  # the decode segment `generate`'s loop runs with (`paging.decode_capacity`)


def start_request(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array, valid: jax.Array,
                  pixel_values: jax.Array | None, *, budget: jax.Array | None, key: jax.Array, sampling: Sampling,
                  eos_ids: tuple[int, ...], max_new_tokens: int, kv_pool: str = "fitted",
                  prefill_chunk: int | None = None, grow: bool = False, kv_dtype: str | None = None,
                  trim: decode_trim.DecodeTrim | None = None) -> Started:
    """`prefill_request` (no decode slots in the prefill's executable), then the first token sampled from
    its logits (`decode.first_tokens_jit`, key folded with 0). The decode segment for `max_new_tokens`
    (its power-of-two bucket, `paging.decode_capacity`) is added by the decode loop's executable
    (`decode.bucket_decode_jit`), or here with `grow` (the streaming loop and the bench, which run
    `decode.step_jit` step by step). trim: decode-phase compression (`decode_trim`): the decode segment is then
    a ring of `trim.budget` slots whatever `max_new_tokens`."""
    done = prefill_request(params, cfg, method, input_ids, valid, pixel_values, budget, kv_pool=kv_pool,
                           prefill_chunk=prefill_chunk, kv_dtype=kv_dtype)
    first, ended = decode.first_tokens_jit(done.logits, key, sampling, eos_ids)
    cache = decode_trim.attach(done.cache, trim)
    slots = trim.budget if trim else max(paging.decode_capacity(max_new_tokens), cache.decode_capacity)
    cache = paging.grow_jit(cache, slots) if grow else cache
    state = decode.DecodeState(cache=cache, tokens=first, positions=done.next_positions, done=ended)
    return Started(state, done, slots)
