"""Llama-family causal LM (Llama-2/Vicuna, Llama-3, Mistral, Qwen2 biases) as pure functions.

Parameters (a plain dict; per-layer weights stacked on a leading L axis, matmul weights [in, out]):

    embed       [V, D]
    layers      attn_norm [L, D]; q [L, D, Hq*Dh]; k, v [L, D, Hkv*Dh]; o [L, Hq*Dh, D]
                (q_bias, k_bias, v_bias, o_bias when the config has them)
                mlp_norm [L, D]; gate, up [L, D, F]; down [L, F, D] (+ *_bias with mlp_bias)
    final_norm  [D]
    lm_head     [D, V]   absent when embeddings are tied

Attention logits, softmax and RMSNorm statistics run in float32 whatever the weight dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.models.attention import (
    MASK_VALUE,
    blocked_attention,
    choose_impl,
    dense_attention,
    prefill_attention,
)
from vkv_jax.models.config import TextConfig, rope_inv_freq


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """[..., D] -> [..., D]; statistics in float32, result cast back before the weight (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(cfg: TextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, Dh] for integer positions [B, S] (negative positions are padding: any value), or
    for M-RoPE positions [3, B, S] (temporal, height, width; `cfg.mrope_section`): frequency i turns
    with the component its section names, as transformers' Qwen2-VL `recomposition_frequencies`. Text
    tokens (all three components equal, decoding included) get plain RoPE either way."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    if positions.ndim == 3 and cfg.mrope_section:
        component = np.repeat(np.arange(3), cfg.mrope_section)  # [Dh / 2]: which axis turns frequency i
        freqs = jnp.where(component == 0, freqs[0], jnp.where(component == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, H, S, Dh] with cos/sin [B, S, Dh] (the rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _linear(x, layer: dict[str, Any], name: str):
    y = x @ layer[name]
    bias = layer.get(name + "_bias")
    return y if bias is None else y + bias


def qkv(layer: dict[str, Any], cfg: TextConfig, x: jax.Array, positions: jax.Array):
    """Project and rotate. x [B, S, D], positions [B, S] -> q [B, Hq, S, Dh], k, v [B, Hkv, S, Dh]."""
    B, S, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    q = _linear(h, layer, "q").reshape(B, S, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    k = _linear(h, layer, "k").reshape(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    v = _linear(h, layer, "v").reshape(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    cos, sin = rope_tables(cfg, positions, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without repeating K/V, under an explicit mask (materialises [T, C]
    logits; the prefill itself runs `attention.prefill_attention`, which need not).

    q [B, Hq, T, Dh]; k, v [B, Hkv, C, Dh]; mask [B, 1 or Hkv, T, C] bool (True = may attend).
    Returns [B, Hq, T, Dh] in q's dtype.
    """
    B, Hq, T, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, T, Dh)
    logits = jnp.einsum("bkgtd,bkcd->bkgtc", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (Dh ** -0.5)
    logits = jnp.where(mask[:, :, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgtc,bkcd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, Hq, T, Dh).astype(q.dtype)


def attention_out_and_mlp(layer: dict[str, Any], cfg: TextConfig, x: jax.Array,
                          attn: jax.Array) -> jax.Array:
    """Residual attention output + SwiGLU MLP. x [B, T, D], attn [B, Hq, T, Dh] -> [B, T, D]."""
    B, _, T, _ = attn.shape
    x = x + _linear(attn.transpose(0, 2, 1, 3).reshape(B, T, -1), layer, "o")
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    gated = jax.nn.silu(_linear(h, layer, "gate")) * _linear(h, layer, "up")
    return x + _linear(gated, layer, "down")


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, S] key validity -> [B, 1, S, S] causal mask that also hides padding keys."""
    S = valid.shape[1]
    causal = jnp.tril(jnp.ones((S, S), bool))
    return (causal[None] & valid[:, None, :])[:, None]


def scan_layers(fn: Callable, carry: Any, layers: Any, xs: Any = None):
    """`lax.scan(fn, carry, layers)` (or over `(layers, xs)`) for stacked layer weights, or the same
    loop unrolled in Python when `layers` is a list of per-layer weight dicts.

    Why two layouts: XLA:CPU materialises a slice of a stacked weight before a matmul reads it, so a
    scanned decode step copies every weight once per token (measured 3x slower per decode step on the
    2-core CPU). `load()` therefore keeps per-layer arrays on CPU; accelerators keep the stacked layout
    (one compiled layer body, fast compiles). Outputs are stacked on a leading axis either way.
    """
    if not isinstance(layers, (list, tuple)):
        return jax.lax.scan(fn, carry, layers if xs is None else (layers, xs))
    ys = []
    for i, layer in enumerate(layers):
        carry, y = fn(carry, layer if xs is None else (layer, jax.tree.map(lambda a, i=i: a[i], xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def slice_layers(layers: Any, start: int, stop: int) -> Any:
    """Layers [start, stop) of either layout (stacked dict or per-layer list)."""
    if isinstance(layers, (list, tuple)):
        return list(layers[start:stop])
    return jax.tree.map(lambda a: a[start:stop], layers)


def unstack_layers(layers: dict[str, Any]) -> list[dict[str, Any]]:
    """Stacked {name: [L, ...]} -> [{name: [...]}] * L as separate buffers (see `scan_layers`)."""
    L = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: jnp.array(a[i]), layers) for i in range(L)]


def stack_layers(layers: Any) -> dict[str, Any]:
    """Either layout -> stacked {name: [L, ...]}."""
    if isinstance(layers, (list, tuple)):
        return jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return layers


def run_layers(layers: Any, cfg: TextConfig, x: jax.Array, positions: jax.Array,
               valid: jax.Array, observe: Callable | None = None, return_last_q: bool = False,
               observe_lse: bool = False, attn_impl: str = "auto"):
    """Run a stack of decoder layers (any slice, either weight layout) over a prompt (`scan_layers`).

    x [B, S, D]; positions [B, S] int32 RoPE positions (>= 0); valid [B, S] bool key validity.
    `observe(q, k) -> stats` is called per layer with post-RoPE q [B, Hq, S, Dh], k [B, Hkv, S, Dh];
    with `observe_lse`, `observe(q, k, lse)` also gets the attention's per-query log-sum-exp of the
    scaled causal logits, lse [B, Hq, S] float32 (meaningless on padding rows; None where the attention
    gives none, cuDNN: the observer then computes its own).
    attn_impl: `attention.prefill_attention`'s impl ('auto' picks by backend and S).
    Returns: hidden [B, S, D] before the final norm, k, v [n, B, Hkv, S, Dh], stats stacked on n, and
    with `return_last_q` also the last layer's q [B, Hq, S, Dh] (what an in-prefill reduction scores).
    """

    def layer_fn(carry, layer):
        h = carry[0]
        q, k, v = qkv(layer, cfg, h, positions)
        attn, lse = prefill_attention(q, k, v, valid, causal=True, impl=attn_impl)
        h = attention_out_and_mlp(layer, cfg, h, attn)
        if observe is None:
            stats = ()
        else:
            stats = observe(q, k, lse) if observe_lse else observe(q, k)
        return ((h, q) if return_last_q else (h,)), (k, v, stats)

    B, S, _ = x.shape
    init = (x, jnp.zeros((B, cfg.num_heads, S, cfg.head_dim), x.dtype)) if return_last_q else (x,)
    carry, (k, v, stats) = scan_layers(layer_fn, init, layers)
    return (carry[0], k, v, stats) + ((carry[1],) if return_last_q else ())


def prefill_layers(params: dict[str, Any], cfg: TextConfig, x: jax.Array, positions: jax.Array,
                   valid: jax.Array, observe: Callable | None = None, observe_lse: bool = False,
                   attn_impl: str = "auto"):
    """Run every decoder layer over a full prompt.

    x [B, S, D] input embeddings; positions [B, S] int32 (-1 on padding); valid [B, S] bool.
    `observe(q, k) -> stats` (or `observe(q, k, lse)` with `observe_lse`) is called per layer with
    post-RoPE q [B, Hq, S, Dh], k [B, Hkv, S, Dh] (`run_layers`).
    Returns: hidden [B, S, D] after the final norm, k, v [L, B, Hkv, S, Dh], stats stacked on L.
    """
    h, k, v, stats = run_layers(params["layers"], cfg, x, jnp.maximum(positions, 0), valid, observe,
                                observe_lse=observe_lse, attn_impl=attn_impl)
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), k, v, stats


def prefill_layers_chunked(params: dict[str, Any], cfg: TextConfig, x: jax.Array, positions: jax.Array,
                           valid: jax.Array, chunk: int, keep_rows: int = 0,
                           observe_chunk: Callable | None = None):
    """`prefill_layers` run `chunk` slots at a time (chunked prefill), as one compiled loop over the chunks.

    The prompt is left-padded to a multiple of the chunk (P < chunk dead slots, like left padding). Each
    layer's K/V live in a buffer of all S + P slots that shifts left by one chunk per step: chunk c's
    keys are appended at the end, so its queries are always the last `chunk` of the buffer's key slots and
    the slots not yet written sit on the left, invalid, as padding does. Every chunk therefore runs the same
    computation (one loop body, compiled once whatever the number of chunks) through `dense_attention` or
    `blocked_attention` (causal, padding keys hidden), and activations hold [B, chunk, .] rows. Each step
    attends over the whole buffer, half of it dead on average: the price of one compiled body. The result
    equals the one-shot prefill's up to float rounding.

    What an observer needs, without ever holding a layer's S query rows (a causal row's softmax is
    complete inside its chunk, so both are exact):
    keep_rows: every layer's post-RoPE queries of the last `keep_rows` slots are kept (an observation
      window; they may span several chunks);
    observe_chunk(q, k, lse, key_valid) -> stats [B, Hkv, C]: called per layer and chunk with the chunk's
      queries q [B, Hq, T, Dh] (the last T of the C slots of k), the keys k [B, Hkv, C, Dh], its
      attention's log-sum-exp lse [B, Hq, T] f32 and which of the C key slots are real (key_valid [B, C]);
      the stats, per key slot, are moved back to the prompt's slots and summed over chunks (stats that
      add up over query rows: H2O's column sums).

    x [B, S, D]; positions [B, S] int32 (-1 on padding) or M-RoPE [3, B, S]; valid [B, S] bool; chunk >= 1.
    Returns: the last chunk's hidden [B, chunk, D] after the final norm (its last row is the prompt's last
    slot), k, v [L, B, Hkv, S, Dh], q_rows [L, B, Hq, keep_rows, Dh] and the summed stats [L, B, Hkv, S]
    (() without observe_chunk).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill chunk must be a positive int, got {chunk!r}")
    B, S, _ = x.shape
    if not 0 <= keep_rows <= S:
        raise ValueError(f"keep_rows must be in [0, {S}], got {keep_rows}")
    n_chunks = -(-S // chunk)
    P = n_chunks * chunk - S
    C = S + P  # key slots of the shifting buffer

    def left_pad(a, axis, value=0):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (P, 0)
        return jnp.pad(a, widths, constant_values=value)

    x, valid = left_pad(x, 1), left_pad(valid, 1, False)
    rope = left_pad(jnp.maximum(positions, 0), positions.ndim - 1)
    attend_chunk = blocked_attention if choose_impl(C, x.dtype, "cpu") == "blocked" else dense_attention
    layers = params["layers"]
    L, Hkv, Hq, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    shift = lambda buf, new: jnp.concatenate([buf[:, :, chunk:], new], axis=2)  # noqa: E731  [B, H, C, Dh]

    def chunk_step(i, carry):
        _, k_buf, v_buf, key_valid, q_buf, stats = carry
        c0 = i * chunk
        h = jax.lax.dynamic_slice_in_dim(x, c0, chunk, axis=1)
        rope_c = jax.lax.dynamic_slice_in_dim(rope, c0, chunk, axis=rope.ndim - 1)
        key_valid = jnp.concatenate([key_valid[:, chunk:], jax.lax.dynamic_slice_in_dim(valid, c0, chunk, 1)], 1)

        def layer_fn(h, inputs):
            layer, (k_past, v_past) = inputs
            q, k, v = qkv(layer, cfg, h, rope_c)
            k_all, v_all = shift(k_past, k.astype(k_past.dtype)), shift(v_past, v.astype(v_past.dtype))
            attn, lse = attend_chunk(q, k_all, v_all, key_valid, causal=True)
            seen = () if observe_chunk is None else observe_chunk(q, k_all, lse, key_valid)
            return attention_out_and_mlp(layer, cfg, h, attn), (k_all, v_all, q, seen)

        h, (k_buf, v_buf, q, seen) = scan_layers(layer_fn, h, layers, (k_buf, v_buf))
        # the newest keep_rows query rows
        q_buf = jnp.concatenate([q_buf, q.astype(q_buf.dtype)], axis=3)[:, :, :, chunk:]
        if observe_chunk is not None:  # buffer slot j holds padded slot j - (C - c1): move the stats there
            back = jnp.concatenate([seen, jnp.zeros_like(seen)], axis=-1)
            stats = stats + jax.lax.dynamic_slice_in_dim(back, C - (c0 + chunk), C, axis=-1)
        return h, k_buf, v_buf, key_valid, q_buf, stats

    kv = jnp.zeros((L, B, Hkv, C, Dh), x.dtype)
    stats = jnp.zeros((L, B, Hkv, C), jnp.float32) if observe_chunk is not None else ()
    carry = (x[:, :chunk], kv, kv, jnp.zeros_like(valid), jnp.zeros((L, B, Hq, keep_rows, Dh), x.dtype), stats)
    h, k, v, _, q_rows, stats = jax.lax.fori_loop(0, n_chunks, chunk_step, carry)
    if observe_chunk is not None:
        stats = stats[..., P:]
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), k[..., P:, :], v[..., P:, :], q_rows, stats


def unembed(params: dict[str, Any], hidden: jax.Array) -> jax.Array:
    """[..., D] final-normed hidden -> [..., V] float32 logits."""
    head = params.get("lm_head")
    if head is None:
        head = params["embed"].T
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def embed(params: dict[str, Any], ids: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], ids, axis=0)
