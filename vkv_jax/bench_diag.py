"""Diagnostic decode step for `vkv_jax.bench --diagnose`: the library's `decode.decode_step` with one
change, the decoder layers unrolled in Python over per-layer weight arrays instead of a `lax.scan` over
the stacked [L, ...] weights.

Why: on XLA:CPU a matmul whose weight operand is a (dynamic or static) slice of a stacked array gets the
slice materialised first, so every decode step copies all layer weights before reading them; measured
on the 2-core development machine, an 8-layer weight chain ran at ~2 GB/s under `lax.scan` and ~8-17 GB/s
over separate per-layer arrays. This module exists only to measure that headroom side by side (it
checks it emits the library's tokens); the library itself is unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax import cache as cache_lib
from vkv_jax import decode
from vkv_jax.models import llama
from vkv_jax.pallas_kernels import decode_attention
from vkv_jax.sampling import sample


def split_layers(params: dict[str, Any]) -> dict[str, Any]:
    """{'layers': [per-layer dicts as separate device arrays], rest of the LM params}."""
    lm = params["lm"]
    L = jax.tree.leaves(lm["layers"])[0].shape[0]
    layers = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), lm["layers"]) for i in range(L)]
    jax.block_until_ready(layers)
    return {**{k: v for k, v in lm.items() if k != "layers"}, "layers": layers}


def decode_step_unrolled(lm: dict[str, Any], cfg, cache: cache_lib.KVCache, tokens, positions):
    """`decode.decode_step` with the layer loop unrolled over `split_layers` weights."""
    tcfg = cfg.text
    h = llama.embed(lm, tokens)[:, None]
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)
    for index, layer in enumerate(lm["layers"]):
        q, k, v = llama.qkv(layer, tcfg, h, positions[:, None])
        cache = cache_lib.append(cache, jnp.int32(index), k[:, :, 0], v[:, :, 0], positions)
        live = (slot < cache.length[index][..., None] + 1) & (cache.pos[index] >= 0)
        attn = decode_attention(q[:, :, 0], cache.k[index], cache.v[index], live)[:, :, None]
        h = llama.attention_out_and_mlp(layer, tcfg, h, attn)
    hidden = llama.rms_norm(h[:, 0], lm["final_norm"], tcfg.rms_norm_eps)
    return llama.unembed(lm, hidden), cache_lib.advance(cache)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "pad_id"), donate_argnames=("state",))
def step_unrolled_jit(lm, cfg, state: decode.DecodeState, index, key, sampling, eos_ids, pad_id):
    """`decode.step` over `decode_step_unrolled`."""
    logits, cache = decode_step_unrolled(lm, cfg, state.cache, state.tokens, state.positions)
    nxt = sample(logits, jax.random.fold_in(key, index), sampling)
    nxt = jnp.where(state.done, pad_id, nxt)
    done = state.done | (jnp.isin(nxt, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else False)
    return decode.DecodeState(cache=cache, tokens=nxt, positions=state.positions + 1, done=done)
