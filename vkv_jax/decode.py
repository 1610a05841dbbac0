"""Prefill, compression, decode step, and the decode loops (`lax.scan` and streaming).

Data flow (DESIGN.md): prefill with full attention, collecting each layer's post-RoPE K/V and the
method's per-layer statistics -> the method's keep-plan -> a compacted cache -> decode steps that
append to each (layer, row, kv head)'s own length. Positions continue from each row's original
prompt length, never from the compressed length.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import cache as cache_lib
from vkv_jax.methods import Method, PrefillContext
from vkv_jax.models import llama, llava
from vkv_jax.models.config import LlavaConfig
from vkv_jax.pallas_kernels import decode_attention
from vkv_jax.sampling import Sampling, sample


@flax.struct.dataclass
class DecodeState:
    """What one decode step carries. tokens/positions/done: [B]."""

    cache: cache_lib.KVCache
    tokens: jax.Array  # last sampled token, the next step's input
    positions: jax.Array  # original position of `tokens`
    done: jax.Array  # row has emitted EOS


@flax.struct.dataclass
class PrefillStats:
    full_kv_bytes: jax.Array  # live bytes of the uncompressed prompt cache
    kept_per_layer: jax.Array  # [L, 2] live prompt slots per row and kv head, averaged: (text, vision)


def decode_capacity(prompt_capacity: int, max_new_tokens: int) -> int:
    return cache_lib.round_capacity(prompt_capacity + max_new_tokens)


@flax.struct.dataclass
class PromptPass:
    """Everything a full-attention prefill produces, before compression.

    logits [B, V] f32 at the last slot; k, v [L, B, Hkv, S, Dh]; positions [B, S]; stats: the method's
    per-layer statistics stacked on L.
    """

    logits: jax.Array
    k: jax.Array
    v: jax.Array
    ctx: PrefillContext
    stats: Any


def run_prompt(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
               valid: jax.Array, pixel_values: jax.Array | None) -> PromptPass:
    """Full-attention prefill of a left-padded batch, calling `method.observe` in every layer.

    input_ids, valid: [B, S]; pixel_values [B * n_img, C, H, W] or None.
    """
    B = input_ids.shape[0]
    positions = llava.positions_from_mask(valid)
    x, tags = llava.merge_embeddings(params, cfg, input_ids, pixel_values)
    num_visual = int(pixel_values.shape[0] // B * cfg.num_image_tokens) if pixel_values is not None else 0
    ctx = PrefillContext(tags=tags, positions=positions, valid=valid, num_visual=num_visual)
    hidden, k, v, stats = llama.prefill_layers(
        params["lm"], cfg.text, x, positions, valid, observe=lambda q, kk: method.observe(q, kk, ctx))
    return PromptPass(llama.unembed(params["lm"], hidden[:, -1]), k, v, ctx, stats)


def prefill(params: dict[str, Any], cfg: LlavaConfig, method: Method, input_ids: jax.Array,
            valid: jax.Array, pixel_values: jax.Array | None, max_new_tokens: int):
    """Full-attention prefill, then the method's compression.

    Returns (last-position logits [B, V] f32, decode cache, next positions [B], PrefillStats).
    """
    S = input_ids.shape[1]
    p = run_prompt(params, cfg, method, input_ids, valid, pixel_values)
    plan = method.plan(p.stats, p.ctx)
    if plan is None:
        cache = cache_lib.from_prefill(p.k, p.v, p.ctx.positions, p.ctx.tags, decode_capacity(S, max_new_tokens))
        full = cache
    else:
        full = cache_lib.from_prefill(p.k, p.v, p.ctx.positions, p.ctx.tags, S)
        capacity = decode_capacity(method.capacity(S, p.ctx.num_visual), max_new_tokens)
        cache = cache_lib.compact(full, plan, capacity)
    stats_out = PrefillStats(full_kv_bytes=full.live_bytes(), kept_per_layer=kept_by_modality(cache))
    next_positions = valid.sum(axis=1).astype(jnp.int32)
    return p.logits, cache, next_positions, stats_out


def kept_by_modality(cache: cache_lib.KVCache) -> jax.Array:
    """[L, 2] float32 live prompt slots per layer, averaged over rows and kv heads: (text, vision)."""
    live = cache.live_mask()
    text = (live & (cache.tag == cache_lib.TEXT)).sum(axis=3).mean(axis=(1, 2))
    vision = (live & (cache.tag == cache_lib.VISION)).sum(axis=3).mean(axis=(1, 2))
    return jnp.stack([text, vision], axis=-1).astype(jnp.float32)


def decode_step(params: dict[str, Any], cfg: LlavaConfig, cache: cache_lib.KVCache, tokens: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, cache_lib.KVCache]:
    """One token per row through every layer. tokens, positions [B] -> logits [B, V] f32, cache."""
    lm = params["lm"]
    tcfg = cfg.text
    x = llama.embed(lm, tokens)[:, None]  # [B, 1, D]
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)

    def layer_fn(carry, inputs):
        h, c = carry
        layer, index = inputs
        q, k, v = llama.qkv(layer, tcfg, h, positions[:, None])
        c = cache_lib.append(c, index, k[:, :, 0], v[:, :, 0], positions)
        # the new token sits at slot `length` (not yet advanced), so it is live here
        live = (slot < c.length[index][..., None] + 1) & (c.pos[index] >= 0)  # [B, Hkv, C]
        # one query per row over a ragged cache: the Pallas kernel on TPU, its jnp reference elsewhere
        attn = decode_attention(q[:, :, 0], c.k[index], c.v[index], live)[:, :, None]
        return (llama.attention_out_and_mlp(layer, tcfg, h, attn), c), None

    layer_ids = jnp.arange(tcfg.num_layers, dtype=jnp.int32)
    (h, cache), _ = jax.lax.scan(layer_fn, (x, cache), (lm["layers"], layer_ids))
    hidden = llama.rms_norm(h[:, 0], lm["final_norm"], tcfg.rms_norm_eps)
    return llama.unembed(lm, hidden), cache_lib.advance(cache)


def first_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling,
                 eos_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Sample the first new token [B] from the prefill logits; also whether it is EOS [B]."""
    tokens = sample(logits, jax.random.fold_in(key, 0), sampling)
    return tokens, _is_eos(tokens, eos_ids)


def step(params: dict[str, Any], cfg: LlavaConfig, state: DecodeState, index: jax.Array, key: jax.Array,
         sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int) -> DecodeState:
    """Feed the last token, sample the next (token `index` of the answer). Finished rows emit pad_id."""
    logits, cache = decode_step(params, cfg, state.cache, state.tokens, state.positions)
    nxt = sample(logits, jax.random.fold_in(key, index), sampling)
    nxt = jnp.where(state.done, pad_id, nxt)
    return DecodeState(cache=cache, tokens=nxt, positions=state.positions + 1,
                       done=state.done | _is_eos(nxt, eos_ids))


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


# ---- jitted entry points (static: config, method, sampling and sizes) ----

@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens"))
def prefill_jit(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens):
    return prefill(params, cfg, method, input_ids, valid, pixel_values, max_new_tokens)


first_tokens_jit = jax.jit(first_tokens, static_argnames=("sampling", "eos_ids"))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_ids", "pad_id"),
                   donate_argnames=("state",))
def scan_decode_jit(params, cfg, state, key, max_new_tokens, sampling, eos_ids, pad_id):
    return scan_decode(params, cfg, state, key, max_new_tokens, sampling, eos_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "pad_id"), donate_argnames=("state",))
def step_jit(params, cfg, state, index, key, sampling, eos_ids, pad_id):
    return step(params, cfg, state, index, key, sampling, eos_ids, pad_id)


def stream_decode(params, cfg, state: DecodeState, key, max_new_tokens: int, sampling: Sampling,
                  eos_ids: tuple[int, ...], pad_id: int) -> Iterator[np.ndarray]:
    """Yield each step's tokens [B] (on the host) as it is produced, one jitted step per call; stops
    early once every row is done. The state is donated step to step, so tokens are copied out first."""
    yield np.asarray(state.tokens)
    for index in range(1, max_new_tokens):
        if bool(state.done.all()):
            return
        state = step_jit(params, cfg, state, jnp.int32(index), key, sampling, eos_ids, pad_id)
        yield np.asarray(state.tokens)
