"""The Qwen2-VL / Qwen2.5-VL vision transformer, as pure functions.

Patches (`qwen2_vl_processor`) -> linear patch embedding (the Conv3d of transformers) -> blocks with a
2-D rotary embedding (each head's first half turns with the patch row, the second with its column) ->
the patch merger (norm, 2 x 2 neighbouring patches concatenated, MLP) -> one LM embedding per merged
patch. Attention never crosses images: Qwen2-VL attends within each image; Qwen2.5-VL within windows
of `window_size` pixels, except in its `fullatt_blocks`. Image grids are static (from the processor),
so the segments each layer attends over are fixed index tables built with numpy at trace time.

Parameters {"patch_embed": [C*T*P*P, E], "layers": {...} stacked on a leading axis, "merger": {...}}:

    layers  norm1_scale, norm2_scale [Lv, E] (+ norm1_bias, norm2_bias: Qwen2-VL's LayerNorm)
            qkv [Lv, E, 3E], qkv_bias [Lv, 3E], o [Lv, E, E], o_bias [Lv, E]
            Qwen2-VL: fc1 [Lv, E, F], fc1_bias, fc2 [Lv, F, E], fc2_bias
            Qwen2.5-VL: gate, up [Lv, E, F], down [Lv, F, E] with *_bias (SwiGLU)
    merger  norm_scale [E] (+ norm_bias), w1 [4E, 4E], b1, w2 [4E, D], b2
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.models.attention import prefill_attention
from vkv_jax.models.clip import activation, layer_norm
from vkv_jax.models.config import QwenVisionConfig
from vkv_jax.models.llama import rms_norm

Grid = tuple[int, int, int]  # (t, h, w) in patches


def rotary_positions(grids: tuple[Grid, ...], merge: int) -> np.ndarray:
    """[N, 2] int32 (row, column) of every patch, in the processor's merge-block order."""
    out = []
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def window_order(grids: tuple[Grid, ...], cfg: QwenVisionConfig) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows: the merged-patch permutation that makes every window contiguous [N / m^2]
    and the windows' lengths in patches (transformers' `get_vision_window_index`; windows of
    `window_size` pixels, the last row / column of windows cut short by the image edge)."""
    m = cfg.spatial_merge_size
    side = cfg.window_size // m // cfg.patch_size  # merged patches per window side
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        nh, nw = -(-gh // side), -(-gw // side)
        index = np.full((t, nh * side, nw * side), -1)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        index = index.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
        for window in index:
            kept = window[window >= 0]
            if kept.size:
                order.append(kept + offset)
                lengths.append(kept.size * m * m)
        offset += t * gh * gw
    return np.concatenate(order), lengths


def segment_table(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous segments of the given lengths -> gather index [G, M] (padding repeats the segment's
    first slot) and validity [G, M] bool."""
    M = max(lengths)
    starts = np.cumsum([0] + lengths[:-1])
    col = np.arange(M)
    valid = col[None] < np.asarray(lengths)[:, None]
    return np.where(valid, starts[:, None] + col[None], starts[:, None]).astype(np.int32), valid


def segment_attention(q, k, v, table: tuple[np.ndarray, np.ndarray]) -> jax.Array:
    """Bidirectional attention within each segment. q, k, v [N, H, hd]; table from `segment_table`.
    Returns [N, H, hd]."""
    index, valid = table
    gather = lambda x: jnp.take(x, jnp.asarray(index), axis=0).transpose(0, 2, 1, 3)  # [G, H, M, hd]
    out, _ = prefill_attention(gather(q), gather(k), gather(v), jnp.asarray(valid), causal=False)
    where = np.flatnonzero(valid.reshape(-1))  # segment slot of every patch, in patch order
    flat = out.transpose(0, 2, 1, 3).reshape(-1, *q.shape[1:])
    return jnp.take(flat, jnp.asarray(where), axis=0)


def _norm(x, layer: dict[str, Any], name: str):
    bias = layer.get(name + "_bias")
    if bias is None:  # Qwen2.5-VL: RMSNorm
        return rms_norm(x, layer[name + "_scale"], 1e-6)
    return layer_norm(x, layer[name + "_scale"], bias, 1e-6)


def _rotate(x, cos, sin):
    """transformers' `apply_rotary_pos_emb_vision`: in float32, rotate-half. x [N, H, hd]; cos, sin [N, hd]."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def block(layer: dict[str, Any], cfg: QwenVisionConfig, x, cos, sin, table) -> jax.Array:
    """One vision block. x [N, E] -> [N, E]."""
    N, E = x.shape
    H = cfg.num_heads
    h = _norm(x, layer, "norm1")
    qkv = (h @ layer["qkv"] + layer["qkv_bias"]).reshape(N, 3, H, E // H)
    q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
    attn = segment_attention(q, k, v, table).reshape(N, E)
    x = x + attn @ layer["o"] + layer["o_bias"]
    h = _norm(x, layer, "norm2")
    if "fc1" in layer:
        h = activation(cfg.hidden_act, h @ layer["fc1"] + layer["fc1_bias"]) @ layer["fc2"] + layer["fc2_bias"]
    else:
        gate = activation(cfg.hidden_act, h @ layer["gate"] + layer["gate_bias"])
        h = (gate * (h @ layer["up"] + layer["up_bias"])) @ layer["down"] + layer["down_bias"]
    return x + h


def rotary_tables(grids: tuple[Grid, ...], cfg: QwenVisionConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, hd] float32: head_dim / 4 frequencies for the row, as many for the column, doubled."""
    quarter = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    pos = jnp.asarray(rotary_positions(grids, cfg.spatial_merge_size)).astype(jnp.float32)
    freqs = (pos[..., None] * jnp.asarray(inv_freq, jnp.float32)).reshape(pos.shape[0], -1)  # [N, hd / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def image_features(params: dict[str, Any], cfg: QwenVisionConfig, patches: jax.Array,
                   grids: tuple[Grid, ...]) -> jax.Array:
    """patches [N, C*T*P*P] of every image (grids: each image's static (t, h, w)) -> LM embeddings
    [N / merge^2, D], image by image, each image's merged patches row-major."""
    m2 = cfg.spatial_merge_size ** 2
    x = patches.astype(params["patch_embed"].dtype) @ params["patch_embed"]
    cos, sin = rotary_tables(grids, cfg)
    full = segment_table([h * w for t, h, w in grids for _ in range(t)])  # one segment per frame
    if cfg.windowed:
        order, lengths = window_order(grids, cfg)
        patch_order = (order[:, None] * m2 + np.arange(m2)).reshape(-1)
        x, cos, sin = (jnp.take(a, jnp.asarray(patch_order), axis=0) for a in (x, cos, sin))
        windows = segment_table(lengths)
    layers = params["layers"]
    for i in range(cfg.num_layers):
        layer = layers[i] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a, i=i: a[i], layers)
        table = windows if cfg.windowed and i not in cfg.fullatt_blocks else full
        x = block(layer, cfg, x, cos, sin, table)
    merger = params["merger"]
    h = _norm(x, merger, "norm").reshape(-1, m2 * x.shape[-1])
    h = jax.nn.gelu(h @ merger["w1"] + merger["b1"], approximate=False) @ merger["w2"] + merger["b2"]
    if cfg.windowed:
        h = jnp.take(h, jnp.asarray(np.argsort(order)), axis=0)
    return h
