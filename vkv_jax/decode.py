"""Decoding: one token per row through every layer over a paged cache, and the decode loops.

`decode_step` appends one token to every (layer, row, kv head) and attends over the layer's prompt pages
(`paging.prompt_attention`) and the dense decode segment, merged by log-sum-exp. Positions continue from
each row's original prompt length (plus Qwen2-VL's rope delta: `models.family.next_positions`), never from
the compressed length. On top of it, the only ways tokens go through the cache:

* `feed`: teacher-forced tokens (a follow-up turn, a re-fed template, ragged rows with padding);
* `step`: feed the last token and sample the next (EOS ends a row; padding after it is never cached);
* the loops over `step`, one per mode: `scan_decode` (a `lax.scan` of static length, inside a caller's jit),
  `bucket_decode` (a `lax.while_loop` of traced length in a power-of-two bucket: what `generate` compiles
  once per bucket, `bucket_decode_jit`) and `stream_decode` (one jitted step per call, yielding tokens).

Sampling settings are traced (`sampling.Sampling`), so none of these compiles per setting.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax import cache as cache_lib
from vkv_jax import decode_trim, kv_quant, paging
from vkv_jax.models import llama
from vkv_jax.models.config import LlavaConfig
from vkv_jax.pallas_kernels import decode_attention, merge_by_lse
from vkv_jax.sampling import Sampling, fold_in, sample


@flax.struct.dataclass
class DecodeState:
    """What one decode step carries. tokens/positions/done: [B]."""

    cache: cache_lib.KVCache
    tokens: jax.Array  # last sampled token, the next step's input
    positions: jax.Array  # original position of `tokens`
    done: jax.Array  # row ended before `tokens` (an earlier token was EOS): `tokens` is padding


def decode_step(params: dict[str, Any], cfg: LlavaConfig, cache: cache_lib.KVCache, tokens: jax.Array,
                positions: jax.Array, alive: jax.Array | None = None,
                prompt_attention: str = "auto") -> tuple[jax.Array, cache_lib.KVCache]:
    """One token per row through every layer. tokens, positions [B] -> logits [B, V] f32, cache.

    Rows with `alive` False (finished) still run, but their slot is written dead (pos -1), so a later
    turn never attends to the padding they emit. prompt_attention (static): how the prompt pages are read
    (`paging.prompt_attention`: "auto", "kernel", "reference" or "packed").
    """
    stored = positions if alive is None else jnp.where(alive, positions, -1)
    if isinstance(cache, cache_lib.DenseCache):  # the masked-full-cache reference of the equivalence tests
        return _decode_layers(params, cfg, cache, tokens, positions, _dense_attention(stored, cache.capacity),
                              cache_lib.advance)
    if cache.decode_capacity == 0:
        raise ValueError("the cache has no decode slots: grow it first (paging.grow / pipeline.grow)")
    if cache.decode_trim is not None:  # a full ring first frees `interval` slots
        cache = decode_trim.trim_if_full(cache)
    return _decode_layers(params, cfg, cache, tokens, positions,
                          _paged_attention(stored, cache.decode_capacity, prompt_attention), cache_lib.advance_decode)


def _paged_attention(stored: jax.Array, decode_slots: int, impl: str):
    """(cache, layer, q [B, Hq, D], k, v [B, Hkv, D]) -> (attention [B, Hq, D], cache) over a paged cache:
    the token appended to the decode segment, then the layer's prompt pages and the decode segment (whose
    new token, at decode_len, is live here) merged by log-sum-exp."""
    t = jnp.arange(decode_slots, dtype=jnp.int32)

    def attend(c, index, q, k, v):
        c = cache_lib.append_decode(c, index, k, v, stored)
        out_p, lse_p = paging.prompt_attention(c, index, q, impl)
        live = (t < c.decode_len + 1) & (c.dpos[index] >= 0)  # [B, Hkv, T]
        dk, dv = c.dk[index], c.dv[index]
        if c.quantized:  # the decode segment is short: read it back whole
            dk, dv = kv_quant.dequantize(dk, c.dk_scale[index]), kv_quant.dequantize(dv, c.dv_scale[index])
        out_d, lse_d = decode_attention(q, dk, dv, live, return_lse=True)
        if c.dscore is not None:  # decode-phase compression scores each decode slot by the attention it gets
            c = decode_trim.accumulate(c, index, q, dk, live, jnp.logaddexp(lse_p, lse_d))
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


def feed(params: dict[str, Any], cfg: LlavaConfig, cache: cache_lib.KVCache, tokens: jax.Array,
         positions: jax.Array, alive: jax.Array | None = None) -> tuple[jax.Array, cache_lib.KVCache, jax.Array]:
    """Teacher-force tokens [B, T] into the cache one `decode_step` at a time from positions [B]: a
    follow-up turn, a re-fed chat template, ragged rows. alive [B, T] (default all True) is False on a
    row's padding (left padding of ragged rows, or a finished row's pending token): such a step writes a
    dead slot and does not advance the row's position. Returns (logits [B, V] f32 after each row's last
    token, cache, next positions [B]). Needs T free decode slots (`paging.grow`)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    alive = jnp.ones(tokens.shape, bool) if alive is None else jnp.asarray(alive, bool)

    def body(carry, inputs):
        c, pos = carry
        token, live = inputs
        logits, c = decode_step(params, cfg, c, token, pos, alive=live)
        return (c, pos + live.astype(pos.dtype)), logits

    (cache, positions), logits = jax.lax.scan(body, (cache, positions), (tokens.T, alive.T))
    return logits[-1], cache, positions



def first_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling,
                 eos_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Sample the first new token [B] from the prefill logits; also `done` [B] for the first
    DecodeState (all False: nothing came before the first token)."""
    tokens = sample(logits, fold_in(key, 0), sampling)
    return tokens, jnp.zeros(tokens.shape, bool)


def step(params: dict[str, Any], cfg: LlavaConfig, state: DecodeState, index: jax.Array, key: jax.Array,
         sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int) -> DecodeState:
    """Feed the last token, sample the next (token `index` of the answer). Rows whose fed token is EOS,
    or that ended earlier, emit pad_id; an EOS is cached like any token, the padding after it is not."""
    logits, cache = decode_step(params, cfg, state.cache, state.tokens, state.positions, alive=~state.done)
    ended = state.done | _is_eos(state.tokens, eos_ids)
    nxt = jnp.where(ended, pad_id, sample(logits, fold_in(key, index), sampling))
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
    state = state.replace(cache=paging.grow(state.cache, capacity))
    return bucket_decode(params, cfg, state, key, num_tokens, bucket, sampling, eos_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids", "pad_id"), donate_argnames=("state",))
def step_jit(params, cfg, state, index, key, sampling, eos_ids, pad_id):
    return step(params, cfg, state, index, key, sampling, eos_ids, pad_id)


def stream_decode(params, cfg, state: DecodeState, key, max_new_tokens: int, sampling: Sampling,
                  eos_ids: tuple[int, ...], pad_id: int, step_exe: Any = None) -> Iterator[np.ndarray]:
    """Yield each step's tokens [B] (on the host) as it is produced, one jitted step per call; stops
    early once every row is done. The state is donated step to step, so tokens are copied out first.
    step_exe: `step_jit` compiled ahead for this state (`compile_cache.compiled(step_jit, ...)`, so its
    compile time is measured apart), or None to call `step_jit` (compiling on the first step)."""
    if step_exe is None:
        step_exe = functools.partial(step_jit, cfg=cfg, eos_ids=eos_ids, pad_id=pad_id)
    yield np.asarray(state.tokens)
    for index in range(1, max_new_tokens):
        if bool((state.done | _is_eos(state.tokens, eos_ids)).all()):
            return
        state = step_exe(params=params, state=state, index=jnp.int32(index), key=key, sampling=sampling)
        yield np.asarray(state.tokens)
