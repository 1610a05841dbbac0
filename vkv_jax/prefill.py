"""The prompt pass: full-attention prefill of a left-padded batch, and the compaction of what a method keeps.

`run_prompt` prefills every layer at once, calling the method's `observe` in each (its statistics stacked on
L); `reduced_prompt` runs an in-prefill reduction (LightKV, FastV), the layers scanned in segments between the
method's stages, each later segment on the shorter sequence, every layer's K/V written into one common width
with its own length; `chunked_prompt` prefills `chunk` slots at a time. All three return a `PromptPass`,
which `compact_prompt` turns into the dense cache of the kept slots (the method's keep-plan gathered);
`vkv_jax.paging` pages it for decoding and `vkv_jax.request` glues the two.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from vkv_jax import cache as cache_lib
from vkv_jax.methods import Method, PrefillContext, Reduction, reduction_schedule
from vkv_jax.models import family, llama, llava
from vkv_jax.models.config import LlavaConfig


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
    reduction = reduction_schedule(method, cfg.text.num_layers, num_visual, pixel_values is not None)
    if reduction is not None:
        return reduced_prompt(params, cfg, method, reduction, x, ctx, rope)
    # a method with `observe_lse` (H2O) also gets each layer's attention log-sum-exp [B, Hq, S]
    observe_lse = bool(method.observe_lse)
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

    A scoring method observes as its `chunk_observer` hook says: a window scorer (SnapKV, PyramidKV,
    AdaKV, VL-Cache, AirCache, CSP; `observe_rows`) gets each layer's queries of its last n slots,
    kept as the chunks holding them pass, and is observed once every key is in; H2O (`observe_chunk`)
    sums its column sums chunk by chunk from each chunk's log-sum-exp. Memory beyond the chunk: the
    K/V cache and those n query rows per layer. In-prefill reductions (FastV, LightKV) shorten a
    layer's whole sequence between stages and raise ValueError, as does a custom scorer with neither hook.
    """
    num_visual = family.static_num_visual(cfg, pixel_values, input_ids.shape[0])
    check_prefill_chunk(method, cfg, chunk, num_visual, pixel_values is not None)
    positions = llava.positions_from_mask(valid)
    x, tags, rope = family.prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    ctx = PrefillContext(tags=tags, positions=positions, valid=valid, num_visual=num_visual)
    kind = method.chunk_observer()
    S = input_ids.shape[1]
    keep_rows = int(method.observe_rows(S, ctx)) if kind == "rows" else 0
    observe_chunk = method.observe_chunk if kind == "chunk" else None
    hidden, k, v, q_rows, stats = llama.prefill_layers_chunked(params["lm"], cfg.text, x, rope, valid, chunk,
                                                               keep_rows=keep_rows, observe_chunk=observe_chunk)
    if kind == "rows":  # every key is in: observe each layer on its kept window rows
        stats = jax.lax.map(lambda qk: method.observe(qk[0], qk[1], ctx), (q_rows, k))
    return PromptPass(llama.unembed(params["lm"], hidden[:, -1]), k, v, ctx, stats)


def check_prefill_chunk(method: Method, cfg: LlavaConfig, chunk: int | None, num_visual: int,
                        any_visual: bool = False) -> None:
    """ValueError unless `chunk` is None or a positive int that `method` can prefill with (see
    `chunked_prompt`); raised before anything traces."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill chunk must be a positive int or None, got {chunk!r}")
    name = type(method).__name__
    if reduction_schedule(method, cfg.text.num_layers, num_visual, any_visual) is not None:
        raise ValueError(f"chunked prefill cannot run {name}: an in-prefill reduction shortens each layer's "
                         f"whole sequence between its stages (use prefill_chunk=None)")
    if method.chunk_observer() is None:
        raise ValueError(f"chunked prefill cannot observe {name}: a scorer needs an `observe_rows` or "
                         f"`observe_chunk` hook (vkv_jax.methods.base.Method)")


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
    k, v = method.merge_kv(prompt.k, prompt.v, prompt.ctx)
    full = cache_lib.from_prefill(k, v, prompt.ctx.positions, prompt.ctx.tags, S)
    return cache_lib.compact(full, plan, S if plan is None else method.capacity(S, prompt.ctx.num_visual or 0))
