"""Prefill, compression, decode step, and the decode loops (`lax.scan` and streaming).

Data flow (docs/architecture.md): prefill with full attention, collecting each layer's post-RoPE K/V and the
method's per-layer statistics -> the method's keep-plan -> a compacted cache -> decode steps that
append to each (layer, row, kv head)'s own length. Positions continue from each row's original
prompt length (plus Qwen2-VL's rope delta: `models.family.next_positions`), never from the compressed length.

In-prefill methods (LightKV, FastV) instead shorten the sequence between layers: the layers are scanned
in segments between the method's stages, each later segment on the shorter sequence, and every layer's
K/V is written into one common capacity with its own length (`run_prompt`).

The decode cache is paged (vkv_jax/cache.py): compaction (`compact_prompt`) gathers the kept prompt slots,
`page_prompt` writes them into a page pool, and decode steps append to a dense decode segment; each
layer's attention runs over the layer's pages (`prompt_attention`) and the decode segment, merged by
log-sum-exp. The pool is sized inside a jit from the method's total budget (`static_pool`), or on the
host from the kept lengths (`fitted_pool`, as `vkv_jax.request.prefill_request` does for `generate`).

Bounded compilation (`vkv_jax.generate`): the prefill's executable holds the compressed prompt only
(`compress` with max_new_tokens=0); `bucket_decode_jit` grows the decode segment to `decode_capacity`
slots (the power-of-two bucket of max_new_tokens) and runs exactly max_new_tokens - 1 steps of a
`lax.while_loop` compiled per bucket (`decode_bucket`); sampling settings are traced (`sampling.Sampling`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from vkv_jax import accounting
from vkv_jax import cache as cache_lib
from vkv_jax.methods import (
    Method,
    PrefillContext,
    Reduction,
    bind_budget,
    chunk_observer,
    reduction_schedule,
)
from vkv_jax.models import family, llama, llava
from vkv_jax.models.config import LlavaConfig
from vkv_jax.pallas_kernels import decode_attention, merge_by_lse, packed_attention, paged_attention
from vkv_jax.pallas_kernels._dispatch import use_kernel
from vkv_jax.pallas_kernels.mesh import per_device, split_counts
from vkv_jax.sampling import Sampling, sample


@flax.struct.dataclass
class DecodeState:
    """What one decode step carries. tokens/positions/done: [B]."""

    cache: cache_lib.KVCache
    tokens: jax.Array  # last sampled token, the next step's input
    positions: jax.Array  # original position of `tokens`
    done: jax.Array  # row ended before `tokens` (an earlier token was EOS): `tokens` is padding


@flax.struct.dataclass
class PrefillStats:
    full_kv_bytes: jax.Array  # live bytes of the uncompressed prompt cache
    kept_per_layer: jax.Array  # [L, 2] live prompt slots per row and kv head, averaged: (text, vision)


DECODE_BUCKET_MIN = 16


def decode_capacity(max_new_tokens: int) -> int:
    """Static decode-segment slots for `max_new_tokens` appended tokens: 0 for none, else its
    power-of-two bucket (`decode_bucket`), so one decode executable serves the whole bucket."""
    return 0 if max_new_tokens <= 0 else decode_bucket(max_new_tokens)


def prompt_capacity(method: Method, prompt_len: int, num_visual: int) -> int:
    """Static prompt slots one (layer, row, kv head) of the compressed cache may hold: `method.capacity`,
    which is `prompt_len` for methods that keep the prefill cache (their plan is None)."""
    return method.capacity(prompt_len, num_visual)


def prompt_slots_per_row(method: Method, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int,
                         layer_len: tuple[int, ...] | None = None) -> int:
    """Static bound on the prompt slots one row keeps over all layers and kv heads: the method's
    `total_capacity` hook (adaptive methods: a fixed total moved between layers / heads), else every
    (layer, head) at `capacity`; after an in-prefill reduction, the layers' own lengths."""
    if layer_len is not None:
        return num_kv_heads * int(sum(layer_len))
    hook = getattr(method, "total_capacity", None)
    if hook is not None:
        return int(hook(prompt_len, num_visual, num_layers, num_kv_heads))
    return num_layers * num_kv_heads * method.capacity(prompt_len, num_visual)


def prompt_pool(method: Method, prompt_len: int, num_visual: int, num_layers: int, batch: int, num_kv_heads: int,
                layer_len: tuple[int, ...] | None = None, splits: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Static (page_size, num_pages) of the compressed prompt's page pool for `batch` rows. `splits` (row
    blocks, kv-head blocks): a pool split over a mesh (`cache.pool_axes`), whose pages are one device's
    block: its rows' share of the bound, or every slot of its kv heads, whichever is less (a budget moved
    between heads may all land on one device)."""
    per_row = prompt_slots_per_row(method, prompt_len, num_visual, num_layers, num_kv_heads, layer_len)
    page_size = cache_lib.page_size_for(per_row / (num_layers * num_kv_heads))
    rows, heads = batch // splits[0], num_kv_heads // splits[1]
    slots = per_row
    if tuple(splits) != (1, 1):
        widest = max(layer_len) if layer_len else prompt_capacity(method, prompt_len, num_visual)
        slots = min(per_row, num_layers * heads * widest)
    return page_size, cache_lib.pool_pages(rows * slots, num_layers * rows * heads, page_size)


def decode_bucket(max_new_tokens: int) -> int:
    """Static length of the decode loop compiled for `max_new_tokens`: the next power of two, at least
    `DECODE_BUCKET_MIN` (16). One executable serves every length in (bucket / 2, bucket]."""
    return max(DECODE_BUCKET_MIN, 1 << (int(max_new_tokens) - 1).bit_length())


def grow(cache: cache_lib.KVCache, capacity: int) -> cache_lib.KVCache:
    """The same cache with `capacity` decode slots (static, >= cache.decode_capacity; `cache.grow`): the
    new slots are empty as paging leaves them, so a grown cache is bit-identical to one made that size."""
    return cache_lib.grow(cache, capacity)


@flax.struct.dataclass
class PromptPass:
    """Everything a full-attention prefill produces, before compression.

    logits [B, V] f32 at the last slot; k, v [L, B, Hkv, S, Dh]; ctx: the prompt's tags / positions /
    validity [B, S]; stats: the method's per-layer statistics stacked on L.
    After an in-prefill reduction, layer l's rows hold only its `layer_len[l]` slots (the rest of S is
    zero padding) and `layer_pos` / `layer_tags` [L, B, S] give each layer's slots (-1 / 0 when dead).
    """

    logits: jax.Array
    k: jax.Array
    v: jax.Array
    ctx: PrefillContext
    stats: Any
    layer_pos: jax.Array | None = None
    layer_tags: jax.Array | None = None
    layer_len: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)


def run_prompt(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
               valid: jax.Array, pixel_values: jax.Array | None) -> PromptPass:
    """Full-attention prefill of a left-padded batch, calling `method.observe` in every layer (or, for a
    method with an in-prefill reduction schedule, the segmented prefill of `reduced_prompt`).

    input_ids, valid: [B, S]; pixel_values [B * n_img, C, H, W] or None.
    """
    B = input_ids.shape[0]
    positions = llava.positions_from_mask(valid)
    x, tags, rope = family.prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    num_visual = family.static_num_visual(cfg, pixel_values, B)
    ctx = PrefillContext(tags=tags, positions=positions, valid=valid, num_visual=num_visual)
    reduction = reduction_schedule(method, cfg.text.num_layers, num_visual)
    if reduction is not None:
        return reduced_prompt(params, cfg, method, reduction, x, ctx, rope)
    # a method with `observe_lse` (H2O) also gets each layer's attention log-sum-exp [B, Hq, S]
    observe_lse = bool(getattr(method, "observe_lse", False))
    observe = ((lambda q, kk, lse: method.observe(q, kk, ctx, lse=lse)) if observe_lse
               else (lambda q, kk: method.observe(q, kk, ctx)))
    hidden, k, v, stats = llama.prefill_layers(params["lm"], cfg.text, x, rope, valid, observe=observe,
                                               observe_lse=observe_lse)
    return PromptPass(llama.unembed(params["lm"], hidden[:, -1]), k, v, ctx, stats)


def reduced_prompt(params: dict[str, Any], cfg: LlavaConfig, method: Method, reduction: Reduction,
                   x: jax.Array, ctx: PrefillContext, rope: jax.Array | None = None) -> PromptPass:
    """Prefill with an in-prefill reduction: the layers run in segments (`llama.run_layers` over slices
    of the layer weights, either layout); after each stage's layer `method.reduce` merges / selects the
    visual span, and the next segment runs on the kept slots (in order). Each slot keeps its original
    position and tag; RoPE uses the original positions or the re-indexed row
    (`reduction.reindex_positions`; M-RoPE positions [3, B, S] are always the original ones, gathered
    with their slots: re-indexing has no 3-D counterpart). The method is not observed (stats are empty).
    rope: the prompt's RoPE positions (default: ctx.positions).
    """
    lm, tcfg = params["lm"], cfg.text
    B, S = x.shape[:2]
    seq = ctx
    rope = jnp.maximum(ctx.positions if rope is None else rope, 0)
    ks, vs, pos, tags, lens = [], [], [], [], []
    start = 0
    for stage in reduction.stages + (None,):
        stop = tcfg.num_layers if stage is None else stage.layer + 1
        layers = llama.slice_layers(lm["layers"], start, stop)
        h, k, v, _, q = llama.run_layers(layers, tcfg, x, rope, seq.valid, return_last_q=True)
        n, S_seg = stop - start, k.shape[3]
        # every layer is written at full width S: this segment's slots first, dead ones after
        right = [(0, 0)] * 3 + [(0, S - S_seg), (0, 0)]
        ks.append(jnp.pad(k, right))
        vs.append(jnp.pad(v, right))
        pos.append(jnp.broadcast_to(jnp.pad(seq.positions, [(0, 0), (0, S - S_seg)], constant_values=-1), (n, B, S)))
        tags.append(jnp.broadcast_to(jnp.pad(seq.tags, [(0, 0), (0, S - S_seg)]), (n, B, S)))
        lens += [S_seg] * n
        if stage is not None:
            h, keep = method.reduce(stage, h, q, k[-1], seq)
            # the next segment: each row's kept slots right-aligned in order (the last slot stays the last
            # prompt token); a row that dropped more than the fewest any row dropped keeps some dropped
            # slots on its left as dead filler (invalid, position -1), like left padding
            width = S_seg - stage.min_dropped(seq.num_visual)
            src = jnp.argsort(keep.astype(jnp.int8), axis=1, stable=True)[:, S_seg - width:]
            take = functools.partial(jnp.take_along_axis, indices=src, axis=1)
            alive = take(keep)
            seq = PrefillContext(tags=jnp.where(alive, take(seq.tags), 0),
                                 positions=jnp.where(alive, take(seq.positions), -1),
                                 valid=take(seq.valid) & alive, num_visual=stage.num_visual)
            x = jnp.take_along_axis(h, src[..., None], axis=1)
            if rope.ndim == 3:
                rope = jnp.take_along_axis(rope, jnp.broadcast_to(src, (3,) + src.shape), axis=2)
            else:
                rope = llava.positions_from_mask(seq.valid) if reduction.reindex_positions else seq.positions
                rope = jnp.maximum(rope, 0)
        start = stop
    hidden = llama.rms_norm(h, lm["final_norm"], tcfg.rms_norm_eps)
    return PromptPass(llama.unembed(lm, hidden[:, -1]), jnp.concatenate(ks), jnp.concatenate(vs), ctx, (),
                      layer_pos=jnp.concatenate(pos), layer_tags=jnp.concatenate(tags), layer_len=tuple(lens))


def chunked_prompt(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                   valid: jax.Array, pixel_values: jax.Array | None, chunk: int) -> PromptPass:
    """`run_prompt` prefilling `chunk` slots at a time (`llama.prefill_layers_chunked`): activations
    bounded by the chunk, the same PromptPass as the one-shot prefill up to float rounding, stats
    included. Use with `compress` as usual.

    A scoring method observes through `methods.chunk_observer`: a window scorer (SnapKV, PyramidKV,
    AdaKV, VL-Cache, AirCache, CSP; `observe_rows`) gets each layer's queries of its last n slots,
    kept as the chunks holding them pass, and is observed once every key is in; H2O (`observe_chunk`)
    sums its column sums chunk by chunk from each chunk's log-sum-exp. Memory beyond the chunk: the
    K/V cache and those n query rows per layer. In-prefill reductions (FastV, LightKV) shorten a
    layer's whole sequence between stages and raise ValueError, as does a custom scorer with neither hook.
    """
    num_visual = family.static_num_visual(cfg, pixel_values, input_ids.shape[0])
    check_prefill_chunk(method, cfg, chunk, num_visual)
    positions = llava.positions_from_mask(valid)
    x, tags, rope = family.prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    ctx = PrefillContext(tags=tags, positions=positions, valid=valid, num_visual=num_visual)
    kind = chunk_observer(method)
    S = input_ids.shape[1]
    keep_rows = int(method.observe_rows(S, ctx)) if kind == "rows" else 0
    observe_chunk = (lambda q, k, lse: method.observe_chunk(q, k, lse, ctx)) if kind == "chunk" else None
    hidden, k, v, q_rows, stats = llama.prefill_layers_chunked(params["lm"], cfg.text, x, rope, valid, chunk,
                                                               keep_rows=keep_rows, observe_chunk=observe_chunk)
    if kind == "rows":  # every key is in: observe each layer on its kept window rows
        stats = jax.lax.map(lambda qk: method.observe(qk[0], qk[1], ctx), (q_rows, k))
    return PromptPass(llama.unembed(params["lm"], hidden[:, -1]), k, v, ctx, stats)


def check_prefill_chunk(method: Method, cfg: LlavaConfig, chunk: int | None, num_visual: int) -> None:
    """ValueError unless `chunk` is None or a positive int that `method` can prefill with (see
    `chunked_prompt`); raised before anything traces."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill chunk must be a positive int or None, got {chunk!r}")
    name = type(method).__name__
    if reduction_schedule(method, cfg.text.num_layers, num_visual) is not None:
        raise ValueError(f"chunked prefill cannot run {name}: an in-prefill reduction shortens each layer's "
                         f"whole sequence between its stages (use prefill_chunk=None)")
    if chunk_observer(method) is None:
        raise ValueError(f"chunked prefill cannot observe {name}: a scorer needs an `observe_rows` or "
                         f"`observe_chunk` hook (vkv_jax.methods.base)")


def prompt_pass(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                valid: jax.Array, pixel_values: jax.Array | None, chunk: int | None = None) -> PromptPass:
    """`run_prompt` (chunk None) or `chunked_prompt` (`chunk` slots at a time)."""
    if chunk is None:
        return run_prompt(params, cfg, method, input_ids, valid, pixel_values)
    return chunked_prompt(params, cfg, method, input_ids, valid, pixel_values, chunk)


def compact_prompt(prompt: PromptPass, method: Method) -> cache_lib.DenseCache:
    """The method's keep-plan gathered into a dense cache [L, B, Hkv, C, D] whose slots [0, length) are
    all live (C: the method's static capacity; every slot for `full` and in-prefill reductions, whose
    later layers already hold fewer slots). Pure and jit-able; `page_prompt` pages it for decoding."""
    S = prompt.k.shape[3]
    plan = method.plan(prompt.stats, prompt.ctx)
    if prompt.layer_len is not None:
        if plan is not None:
            raise ValueError("a method with an in-prefill reduction cannot also return a keep-plan")
        full = cache_lib.from_prefill(prompt.k, prompt.v, prompt.layer_pos, prompt.layer_tags, S, prompt.layer_len)
        return cache_lib.compact(full, None, S)
    full = cache_lib.from_prefill(prompt.k, prompt.v, prompt.ctx.positions, prompt.ctx.tags, S)
    return cache_lib.compact(full, plan, S if plan is None else method.capacity(S, prompt.ctx.num_visual or 0))


def static_pool(prompt: PromptPass, method: Method) -> tuple[int, int]:
    """(page_size, num_pages) bounding any prompt of this shape (`prompt_pool`): known at trace time; on a
    split pool (`cache.pool_axes`) the pages of one device's block."""
    L, B, H, S, _ = prompt.k.shape
    return prompt_pool(method, S, prompt.ctx.num_visual or 0, L, B, H, prompt.layer_len,
                       split_counts(cache_lib.pool_axes(B, H)))


POOL_STEPS = 16  # pool sizes per octave in `fitted_pool`: at most 1/16 of the pages reserved beyond need


def fitted_pool(lengths: np.ndarray, steps: int = POOL_STEPS, splits: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(page_size, num_pages) of a pool that holds compacted lengths [L, B, Hkv] (host values): the page
    size from the mean slots an owner holds (`cache.page_size_for`: rounding owners up to whole pages
    wastes <= ~6%), the page count rounded up to one of `steps` sizes per octave (<= 1/steps more), so
    prompts of one shape and budget share a size and its decode executable.
    With steps=16, allocated <= 1.13 x live for any lengths. `splits` (row blocks, kv-head blocks): a pool
    split over a mesh (`cache.pool_axes`); the pages are one block's, enough for the fullest device."""
    n = np.asarray(lengths).astype(np.int64)
    page_size = cache_lib.page_size_for(max(1.0, float(n.mean())))
    pages = -(-n // page_size)
    if tuple(splits) == (1, 1):
        need = max(1, int(pages.sum()))
    else:  # the fullest device block: rows split nd ways, kv heads nh ways
        (L, B, H), (nd, nh) = n.shape, splits
        need = max(1, int(pages.reshape(L, nd, B // nd, nh, H // nh).sum((0, 2, 4)).max()))
    unit = 1 << max(0, need.bit_length() - int(steps).bit_length())  # 2^floor(log2 need) / steps (a power of 2)
    return page_size, -(-need // unit) * unit


def page_prompt(kept: cache_lib.DenseCache, pool: tuple[int, int], max_new_tokens: int = 0) -> cache_lib.KVCache:
    """The decode cache: `kept` (`compact_prompt`) in a pool of (page_size, num_pages) (static) plus
    `decode_capacity(max_new_tokens)` decode slots (none by default: `grow` adds them later, so the
    prefill's executable does not depend on the answer length). Under a mesh the pool splits over rows and
    kv heads (`cache.pool_axes`): num_pages is then each device's block."""
    page_size, num_pages = pool
    _, B, H = kept.length.shape
    return cache_lib.to_pages(kept, page_size, num_pages, decode_capacity(max_new_tokens),
                              cache_lib.pool_axes(B, H))


def compress(prompt: PromptPass, method: Method, max_new_tokens: int = 0,
             pool: tuple[int, int] | None = None) -> cache_lib.KVCache:
    """`compact_prompt` then `page_prompt`, pure and jit-able (`method`, `max_new_tokens`, `pool` static).
    The pool defaults to `static_pool`, the bound for any prompt of this shape; `generate` fits it to
    what compaction kept instead (`fitted_pool`, between two executables)."""
    return page_prompt(compact_prompt(prompt, method), pool or static_pool(prompt, method), max_new_tokens)


def prefill(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
            valid: jax.Array, pixel_values: jax.Array | None, max_new_tokens: int = 0,
            budget: jax.Array | None = None, pool: tuple[int, int] | None = None, chunk: int | None = None):
    """Full-attention prefill, then the method's compression (`compress`: the cache holds
    `max_new_tokens` free slots, none by default; `grow` adds them later; the pool `static_pool` unless
    given). With `budget` (a traced scalar), `method` is the static half of `methods.split_budget` and
    the budget's value is this. chunk: prefill `chunk` slots at a time (`chunked_prompt`), None: at once.

    Returns (last-position logits [B, V] f32, decode cache, next positions [B], PrefillStats).
    """
    method = bind_budget(method, budget)
    p = prompt_pass(params, cfg, method, input_ids, valid, pixel_values, chunk)
    cache = compress(p, method, max_new_tokens, pool)
    stats = PrefillStats(full_kv_bytes=accounting.prompt_kv_bytes(p.k, p.ctx.valid),
                         kept_per_layer=kept_by_modality(cache))
    return p.logits, cache, family.next_positions(cfg, valid, pixel_values), stats


def prefill_compact(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
                    valid: jax.Array, pixel_values: jax.Array | None, budget: jax.Array | None = None,
                    chunk: int | None = None):
    """`prefill` up to the compacted dense cache, for a pool fitted to it on the host (`fitted_pool`,
    then `page_prompt`): (logits [B, V] f32, kept DenseCache, next positions [B], full KV bytes)."""
    method = bind_budget(method, budget)
    p = prompt_pass(params, cfg, method, input_ids, valid, pixel_values, chunk)
    full_bytes = accounting.prompt_kv_bytes(p.k, p.ctx.valid)
    return p.logits, compact_prompt(p, method), family.next_positions(cfg, valid, pixel_values), full_bytes


def kept_by_modality(cache: cache_lib.KVCache) -> jax.Array:
    """[L, 2] float32 live prompt slots per layer, averaged over rows and kv heads: (text, vision)."""
    if cache.axes != cache_lib.NO_SPLIT:  # each device's block averages its owners; the blocks are equal
        axes = tuple(a for a in cache.axes if a)
        per_block = lambda c: jax.lax.pmean(kept_by_modality(c), axes)  # noqa: E731
        return per_device(per_block, cache.axes, (cache_lib.paged_specs(cache.axes),),
                          PartitionSpec())(cache_lib.local(cache))
    L, B, H = cache.prompt_len.shape
    layer = jnp.where(cache.page_owner >= 0, cache.page_owner // (B * H), L)  # [P]; free pages: L (dropped)
    live = cache.page_pos >= 0

    def per_layer(mask):
        return jax.ops.segment_sum(mask.sum(-1), layer, L + 1)[:L] / (B * H)

    text = per_layer(live & (cache.page_tag == cache_lib.TEXT))
    vision = per_layer(live & (cache.page_tag == cache_lib.VISION))
    return jnp.stack([text, vision], axis=-1).astype(jnp.float32)


PROMPT_ATTENTION = "auto"  # "auto" | "kernel" | "reference" | "packed": how `prompt_attention` reads pages


def prompt_attention(cache: cache_lib.KVCache, layer: jax.Array, q: jax.Array,
                     impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B, Hq, D] over layer `layer`'s prompt pages -> (out [B, Hq, D], lse [B, Hq]).

    "auto": the Pallas kernel (`paged_attention`, scalar-prefetched page tables) on TPU; elsewhere the
    packed walk over the layer's page range (`packed_attention`, cost ~ the layer's live pages).
    "kernel" / "reference": `paged_attention` with that impl (the reference gathers M pages per head)."""
    if cache.axes != cache_lib.NO_SPLIT:  # each device attends over its own block of pages
        heads = PartitionSpec(*cache.axes)
        attend = functools.partial(prompt_attention, impl=impl)
        return per_device(attend, cache.axes, (cache_lib.paged_specs(cache.axes), PartitionSpec(), heads),
                          (heads, heads))(cache_lib.local(cache), layer, q)
    impl = impl or PROMPT_ATTENTION
    if impl == "auto":
        impl = "kernel" if use_kernel("auto", ("tpu",)) else "packed"
    if impl == "packed":
        B, H = cache.prompt_len.shape[1:]
        return packed_attention(q, cache.k_pages, cache.v_pages, cache.page_pos, cache.page_owner,
                                cache.layer_start[layer], cache.layer_start[layer + 1], layer * (B * H),
                                num_kv_heads=H)
    return paged_attention(q, cache.k_pages, cache.v_pages, cache.page_table[layer], cache.prompt_len[layer],
                           return_lse=True, impl=impl)


def decode_step(params: dict[str, Any], cfg: LlavaConfig, cache: cache_lib.KVCache, tokens: jax.Array,
                positions: jax.Array, alive: jax.Array | None = None) -> tuple[jax.Array, cache_lib.KVCache]:
    """One token per row through every layer. tokens, positions [B] -> logits [B, V] f32, cache.

    Rows with `alive` False (finished) still run, but their slot is written dead (pos -1), so a later
    turn never attends to the padding they emit.
    """
    stored = positions if alive is None else jnp.where(alive, positions, -1)
    if isinstance(cache, cache_lib.DenseCache):  # the masked-full-cache reference of the equivalence tests
        return _decode_layers(params, cfg, cache, tokens, positions, _dense_attention(stored, cache.capacity),
                              cache_lib.advance)
    if cache.decode_capacity == 0:
        raise ValueError("the cache has no decode slots: grow it first (decode.grow / pipeline.grow)")
    return _decode_layers(params, cfg, cache, tokens, positions, _paged_attention(stored, cache.decode_capacity),
                          cache_lib.advance_decode)


def _paged_attention(stored: jax.Array, decode_slots: int):
    """(cache, layer, q [B, Hq, D], k, v [B, Hkv, D]) -> (attention [B, Hq, D], cache) over a paged cache:
    the token appended to the decode segment, then the layer's prompt pages and the decode segment (whose
    new token, at decode_len, is live here) merged by log-sum-exp."""
    t = jnp.arange(decode_slots, dtype=jnp.int32)

    def attend(c, index, q, k, v):
        c = cache_lib.append_decode(c, index, k, v, stored)
        out_p, lse_p = prompt_attention(c, index, q)
        live = (t < c.decode_len + 1) & (c.dpos[index] >= 0)  # [B, Hkv, T]
        out_d, lse_d = decode_attention(q, c.dk[index], c.dv[index], live, return_lse=True)
        return merge_by_lse(out_p, lse_p, out_d, lse_d), c

    return attend


def _dense_attention(stored: jax.Array, capacity: int):
    """`_paged_attention` for the dense layout: the token written at each head's own length (not yet
    advanced, so live here), then one query per row over the ragged cache."""
    slot = jnp.arange(capacity, dtype=jnp.int32)

    def attend(c, index, q, k, v):
        c = cache_lib.append(c, index, k, v, stored)
        live = (slot < c.length[index][..., None] + 1) & (c.pos[index] >= 0)  # [B, Hkv, C]
        return decode_attention(q, c.k[index], c.v[index], live), c

    return attend


def _decode_layers(params, cfg, cache, tokens, positions, attend, advance):
    """One token per row through every layer with `attend` (cache, layer, q, k, v) -> (attn, cache) as the
    attention; `advance` counts the token in the cache. Returns (logits [B, V] f32, cache)."""
    lm = params["lm"]
    tcfg = cfg.text
    x = llama.embed(lm, tokens)[:, None]  # [B, 1, D]

    def layer_fn(carry, inputs):
        h, c = carry
        layer, index = inputs
        q, k, v = llama.qkv(layer, tcfg, h, positions[:, None])
        attn, c = attend(c, index, q[:, :, 0], k[:, :, 0], v[:, :, 0])
        return (llama.attention_out_and_mlp(layer, tcfg, h, attn[:, :, None]), c), None

    layer_ids = jnp.arange(tcfg.num_layers, dtype=jnp.int32)
    (h, cache), _ = llama.scan_layers(layer_fn, (x, cache), lm["layers"], layer_ids)
    hidden = llama.rms_norm(h[:, 0], lm["final_norm"], tcfg.rms_norm_eps)
    return llama.unembed(lm, hidden), advance(cache)


def first_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling,
                 eos_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Sample the first new token [B] from the prefill logits; also `done` [B] for the first
    DecodeState (all False: nothing came before the first token)."""
    tokens = sample(logits, jax.random.fold_in(key, 0), sampling)
    return tokens, jnp.zeros(tokens.shape, bool)


def step(params: dict[str, Any], cfg: LlavaConfig, state: DecodeState, index: jax.Array, key: jax.Array,
         sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int) -> DecodeState:
    """Feed the last token, sample the next (token `index` of the answer). Rows whose fed token is EOS,
    or that ended earlier, emit pad_id; an EOS is cached like any token, the padding after it is not."""
    logits, cache = decode_step(params, cfg, state.cache, state.tokens, state.positions, alive=~state.done)
    ended = state.done | _is_eos(state.tokens, eos_ids)
    nxt = jnp.where(ended, pad_id, sample(logits, jax.random.fold_in(key, index), sampling))
    return DecodeState(cache=cache, tokens=nxt, positions=state.positions + 1, done=ended)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def scan_decode(params: dict[str, Any], cfg: LlavaConfig, state: DecodeState, key: jax.Array,
                max_new_tokens: int, sampling: Sampling, eos_ids: tuple[int, ...],
                pad_id: int) -> tuple[jax.Array, DecodeState]:
    """All remaining tokens in one `lax.scan`. Returns tokens [B, max_new_tokens] (first included)."""

    def body(s, index):
        s = step(params, cfg, s, index, key, sampling, eos_ids, pad_id)
        return s, s.tokens

    first = state.tokens
    state, rest = jax.lax.scan(body, state, jnp.arange(1, max_new_tokens, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1), state


def bucket_decode(params: dict[str, Any], cfg: LlavaConfig, state: DecodeState, key: jax.Array,
                  num_tokens: jax.Array, bucket: int, sampling: Sampling, eos_ids: tuple[int, ...],
                  pad_id: int) -> tuple[jax.Array, DecodeState]:
    """`scan_decode` for a traced length: a `lax.while_loop` runs exactly `num_tokens - 1` steps
    (num_tokens: int32 scalar in [1, bucket]; `bucket` static). Returns tokens [B, bucket] whose first
    `num_tokens` columns are what `scan_decode(..., max_new_tokens=num_tokens, ...)` returns (pad_id
    after), and the same final state."""
    out = jnp.full((state.tokens.shape[0], bucket), pad_id, jnp.int32).at[:, 0].set(state.tokens)

    def body(carry):
        index, s, out = carry
        s = step(params, cfg, s, index, key, sampling, eos_ids, pad_id)
        return index + 1, s, jax.lax.dynamic_update_slice(out, s.tokens[:, None], (0, index))

    n = jnp.minimum(jnp.asarray(num_tokens, jnp.int32), bucket)
    _, state, out = jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(1), state, out))
    return out, state


# ---- jitted entry points (static: config, method and sizes; sampling settings are traced) ----

@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "pool", "chunk"))
def prefill_jit(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens=0, budget=None, pool=None,
                chunk=None):
    return prefill(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens, budget, pool, chunk)


prefill_compact_jit = jax.jit(prefill_compact, static_argnames=("cfg", "method", "chunk"))
page_prompt_jit = jax.jit(page_prompt, static_argnames=("pool", "max_new_tokens"))
kept_by_modality_jit = jax.jit(kept_by_modality)



first_tokens_jit = jax.jit(first_tokens, static_argnames=("eos_ids",))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"),
                   donate_argnames=("state",))
def scan_decode_jit(params, cfg, state, key, max_new_tokens, sampling, eos_ids, pad_id):
    return scan_decode(params, cfg, state, key, max_new_tokens, sampling, eos_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "bucket", "capacity", "eos_ids", "pad_id"))
def bucket_decode_jit(params, cfg, state, key, sampling, num_tokens, bucket, capacity, eos_ids, pad_id):
    """`grow` the state's decode segment to `capacity` slots, then `bucket_decode`: one executable per
    (bucket, capacity), whatever the sampling settings and the exact length. (Not donating: the grown
    cache cannot reuse the smaller input buffers.)"""
    state = state.replace(cache=grow(state.cache, capacity))
    return bucket_decode(params, cfg, state, key, num_tokens, bucket, sampling, eos_ids, pad_id)


grow_jit = jax.jit(grow, static_argnames=("capacity",))


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids", "pad_id"), donate_argnames=("state",))
def step_jit(params, cfg, state, index, key, sampling, eos_ids, pad_id):
    return step(params, cfg, state, index, key, sampling, eos_ids, pad_id)


def stream_decode(params, cfg, state: DecodeState, key, max_new_tokens: int, sampling: Sampling,
                  eos_ids: tuple[int, ...], pad_id: int) -> Iterator[np.ndarray]:
    """Yield each step's tokens [B] (on the host) as it is produced, one jitted step per call; stops
    early once every row is done. The state is donated step to step, so tokens are copied out first."""
    yield np.asarray(state.tokens)
    for index in range(1, max_new_tokens):
        if bool((state.done | _is_eos(state.tokens, eos_ids)).all()):
            return
        state = step_jit(params, cfg, state, jnp.int32(index), key, sampling, eos_ids, pad_id)
        yield np.asarray(state.tokens)
