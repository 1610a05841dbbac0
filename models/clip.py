"""CLIP vision tower (pre-LN ViT with a class token) and SigLIP's (no class token, no pre-LayerNorm, a
patch-embedding bias, tanh-approximated GELU) as pure functions.

Parameters:

    patch_embed   [C*p*p, Dv]   the conv kernel flattened in (channel, row, col) order
    class_embed   [Dv]
    pos_embed     [N+1, Dv]
    pre_norm      scale, bias [Dv]          (HF's `pre_layrnorm`)
    layers        ln1_scale, ln1_bias, ln2_scale, ln2_bias [Lv, Dv];
                  q, k, v, o [Lv, Dv, Dv] (+ q_bias, k_bias, v_bias, o_bias [Lv, Dv]);
                  fc1 [Lv, Dv, F], fc1_bias [Lv, F], fc2 [Lv, F, Dv], fc2_bias [Lv, Dv]

SigLIP has `patch_bias` [Dv] and neither `class_embed` nor `pre_norm`; pos_embed is [N, Dv].
LLaVA (and OneVision, whose SigLIP keeps `hidden_states[-1]` untied from the post-LayerNormed
`last_hidden_state` in transformers) reads hidden states before the post-LayerNorm, so it is not part of
the parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax.models.attention import prefill_attention
from vkv_jax.models.config import VisionConfig


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale + bias


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p] in raster order, matching a stride-p conv."""
    B, C, H, W = pixel_values.shape
    x = pixel_values.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def embed_image(params: dict[str, Any], cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
    """[B, C, H, W] -> [B, N+1, Dv] (class token first), before the pre-LayerNorm; SigLIP: [B, N, Dv]."""
    dtype = params["patch_embed"].dtype
    patches = patchify(pixel_values.astype(dtype), cfg.patch_size) @ params["patch_embed"]
    if not cfg.has_class_token:
        return patches + params["patch_bias"] + params["pos_embed"]
    cls = jnp.broadcast_to(params["class_embed"], (patches.shape[0], 1, patches.shape[-1]))
    return jnp.concatenate([cls, patches], axis=1) + params["pos_embed"]


def encoder_layer(layer: dict[str, Any], cfg: VisionConfig, x: jax.Array, attn_impl: str = "auto") -> jax.Array:
    """[B, T, Dv] -> [B, T, Dv]; bidirectional attention (`attention.prefill_attention`, no mask)."""
    B, T, Dv = x.shape
    H = cfg.num_heads
    h = layer_norm(x, layer["ln1_scale"], layer["ln1_bias"], cfg.layer_norm_eps)
    q, k, v = ((h @ layer[n] + layer[n + "_bias"]).reshape(B, T, H, Dv // H).transpose(0, 2, 1, 3)
               for n in ("q", "k", "v"))
    attn, _ = prefill_attention(q, k, v, None, causal=False, impl=attn_impl)
    attn = attn.transpose(0, 2, 1, 3).reshape(B, T, Dv)
    x = x + attn @ layer["o"] + layer["o_bias"]
    h = layer_norm(x, layer["ln2_scale"], layer["ln2_bias"], cfg.layer_norm_eps)
    h = activation(cfg.hidden_act, h @ layer["fc1"] + layer["fc1_bias"])
    return x + h @ layer["fc2"] + layer["fc2_bias"]


def hidden_states(params: dict[str, Any], cfg: VisionConfig, pixel_values: jax.Array,
                  num_layers: int, attn_impl: str = "auto") -> jax.Array:
    """HF's `hidden_states[0..num_layers]`: [num_layers+1, B, N+1, Dv].

    Entry 0 is the pre-LayerNormed embedding; entry i the output of layer i. Only the layers a
    feature selection needs are run.
    """
    x = embed_image(params, cfg, pixel_values)
    if "pre_norm" in params:  # CLIP only
        x = layer_norm(x, params["pre_norm"]["scale"], params["pre_norm"]["bias"], cfg.layer_norm_eps)
    if num_layers == 0:  # the embeddings are the selected features: no layer runs (nor is loaded)
        return x[None]
    layers = jax.tree.map(lambda a: a[:num_layers], params["layers"])

    def step(h, layer):
        h = encoder_layer(layer, cfg, h, attn_impl)
        return h, h

    _, outs = jax.lax.scan(step, x, layers)
    return jnp.concatenate([x[None], outs], axis=0)
