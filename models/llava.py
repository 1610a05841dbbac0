"""LLaVA composition: vision tower -> projector -> visual embeddings in place of image tokens.

Parameters: {"vision": clip params, "projector": {w1, b1[, w2, b2]}, "lm": llama params
[, "image_newline": [D] (LLaVA-NeXT / OneVision)]}.

Images come either as a plain `[B * n, C, H, W]` array (LLaVA-1.5, n images in every row, each
`num_image_tokens` tokens) or as `VisualInputs`: the crops of every image of the batch plus, for each
sequence slot, which crop features (or the image_newline embedding) it holds (`models.anyres`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.models import anyres, clip, llama
from vkv_jax.models.anyres import VisualInputs
from vkv_jax.models.config import LlavaConfig


def feature_layer_indices(cfg: LlavaConfig) -> tuple[int, ...]:
    """HF `hidden_states` indices of the selected features, made non-negative (i = after layer i)."""
    total = cfg.vision.num_layers + 1
    return tuple(i if i >= 0 else total + i for i in cfg.feature_layers)


def vision_layers_needed(cfg: LlavaConfig) -> int:
    """How many encoder layers the selected feature layers need (later layers never run)."""
    return max(feature_layer_indices(cfg))


def image_features(params: dict[str, Any], cfg: LlavaConfig, pixel_values: jax.Array) -> jax.Array:
    """[n_images, C, H, W] -> [n_images, num_image_tokens, D_text] projected visual embeddings."""
    states = clip.hidden_states(params["vision"], cfg.vision, pixel_values, vision_layers_needed(cfg))
    feats = [states[i] for i in feature_layer_indices(cfg)]
    if cfg.vision_feature_select_strategy == "default":
        feats = [f[:, 1:] for f in feats]  # drop CLS
    x = jnp.concatenate(feats, axis=-1)
    proj = params["projector"]
    x = x @ proj["w1"] + proj.get("b1", 0)
    if "w2" in proj:
        x = clip.activation(cfg.projector_hidden_act, x)
        x = x @ proj["w2"] + proj.get("b2", 0)
    return x


def static_num_visual(cfg: LlavaConfig, pixel_values: Any, batch: int) -> int:
    """Visual tokens per row known at trace time: every row's for a plain image array, the fewest of
    any row for `VisualInputs`, 0 without images."""
    if pixel_values is None:
        return 0
    if isinstance(pixel_values, VisualInputs):
        return int(pixel_values.num_visual)
    return int(pixel_values.shape[0] // batch * cfg.num_image_tokens)


def merge_embeddings(params: dict[str, Any], cfg: LlavaConfig, input_ids: jax.Array,
                     pixel_values: jax.Array | VisualInputs | None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with visual features scattered into the image-token slots, in order.

    input_ids [B, S]. pixel_values: [B * n_img, C, H, W] (row-major: row b's images are consecutive)
    with `n_img * num_image_tokens` image tokens per row, or `VisualInputs` (any layout), or None.
    Returns embeddings [B, S, D] and modality tags [B, S] int8 (1 on visual slots, newline tokens included).
    Video placeholders (OneVision's `video_token_id`) are visual slots like image tokens.
    """
    is_image = jnp.isin(input_ids, jnp.asarray(cfg.visual_token_ids, input_ids.dtype))
    ids = jnp.where(is_image, 0, input_ids)
    x = llama.embed(params["lm"], ids)
    if pixel_values is None:
        return x, jnp.zeros(input_ids.shape, jnp.int8)
    if isinstance(pixel_values, VisualInputs):
        feats = image_features(params, cfg, pixel_values.pixels)
        table = feats.reshape(-1, feats.shape[-1])
        newline = params.get("image_newline")
        newline = jnp.zeros(table.shape[-1:], table.dtype) if newline is None else newline.astype(table.dtype)
        table = jnp.concatenate([table, newline[None]], axis=0)  # [N * P + 1, D]
        src, w = pixel_values.source, pixel_values.weight
        if src.shape[-1] == 1:  # a plain gather (weights are all one)
            gathered = jnp.take(table, src[..., 0], axis=0)
        else:  # bilinear taps: summed in float32, as torch's interpolate accumulates
            gathered = sum(jnp.take(table, src[..., j], axis=0).astype(jnp.float32) * w[..., j, None]
                           for j in range(src.shape[-1]))
        return jnp.where(is_image[..., None], gathered.astype(x.dtype), x), is_image.astype(jnp.int8)
    B, S = input_ids.shape
    feats = image_features(params, cfg, pixel_values).astype(x.dtype)
    feats = feats.reshape(B, -1, feats.shape[-1])  # [B, n_img * N, D]
    rank = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
    gathered = jnp.take_along_axis(feats, rank[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, x), is_image.astype(jnp.int8)


def forward(params: dict[str, Any], cfg: LlavaConfig, input_ids: jax.Array,
            pixel_values: jax.Array | None, positions: jax.Array, valid: jax.Array,
            observe: Callable | None = None):
    """Full prompt forward. Returns final hidden [B, S, D], k, v [L, B, Hkv, S, Dh], tags, stats."""
    x, tags = merge_embeddings(params, cfg, input_ids, pixel_values)
    hidden, k, v, stats = llama.prefill_layers(params["lm"], cfg.text, x, positions, valid, observe)
    return hidden, k, v, tags, stats


def prompt_embeddings(params: dict[str, Any], cfg: LlavaConfig, input_ids: jax.Array, valid: jax.Array,
                      pixel_values: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The family's `prompt_embeddings`: merged embeddings [B, S, D], tags [B, S] and 1-D RoPE positions
    [B, S] from the padding mask."""
    x, tags = merge_embeddings(params, cfg, input_ids, pixel_values)
    return x, tags, jnp.maximum(positions_from_mask(valid), 0)


def next_positions(valid: jax.Array, pixel_values: Any = None) -> jax.Array:
    """[B] int32 RoPE position of each row's first generated token: its prompt length."""
    return valid.sum(axis=1).astype(jnp.int32)


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """[B, S] bool (left padding False) -> int32 positions 0.. on real tokens, -1 on padding."""
    return jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, -1).astype(jnp.int32)


def logits(params: dict[str, Any], cfg: LlavaConfig, input_ids: jax.Array,
           pixel_values: jax.Array | None, valid: jax.Array | None = None) -> jax.Array:
    """[B, S] ids (+ images) -> [B, S, V] float32 logits of every position."""
    if valid is None:
        valid = jnp.ones(input_ids.shape, bool)
    hidden, *_ = forward(params, cfg, input_ids, pixel_values, positions_from_mask(valid), valid)
    return llama.unembed(params["lm"], hidden)


def synthetic_inputs(cfg: LlavaConfig, batch: int, visual_tokens: int, text_tokens: int, seed: int = 0):
    """Random ids with `visual_tokens` image tokens per row after a 5-token preamble (LLaVA's
    "USER: <image>\\n ..." layout) and random images: input_ids [B, S] int32 and pixel_values
    [B * n_img, 3, H, W] float32 (n_img = visual_tokens / tokens per image); for LLaVA-NeXT / OneVision,
    `VisualInputs` of one image per row whose anyres layout has exactly `visual_tokens` tokens."""
    layout = _layout_of_count(cfg, visual_tokens) if cfg.anyres else None
    per_image = cfg.num_image_tokens
    if layout is None and (visual_tokens % per_image or visual_tokens <= 0):
        raise ValueError(f"--visual-tokens {visual_tokens} must be a positive multiple of the tower's "
                         f"{per_image} tokens per image")
    rng = np.random.default_rng(seed)
    hi = min(cfg.image_token_id, cfg.text.vocab_size)
    pre = min(5, text_tokens - 1)
    rows = []
    for _ in range(batch):
        text = rng.integers(3, hi, text_tokens)
        text[0] = 1  # BOS
        rows.append(np.concatenate([text[:pre], np.full(visual_tokens, cfg.image_token_id), text[pre:]]))
    ids = np.stack(rows).astype(np.int32)
    v = cfg.vision
    n_img = layout.num_crops if layout is not None else visual_tokens // per_image
    pix = rng.uniform(-1, 1, (batch * n_img, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    if layout is None:
        return ids, pix
    source, weight = anyres.pack_visual(ids, cfg.image_token_id, [[layout]] * batch, cfg.features_per_crop)
    return ids, VisualInputs(pix, source, weight, num_visual=visual_tokens)


def _layout_of_count(cfg: LlavaConfig, visual_tokens: int) -> anyres.ImageLayout:
    """The layout of an image whose anyres token count is `visual_tokens`: one of the sizes a benchmark can
    ask for (the crop and each grid pinpoint's own shape); ValueError names the achievable counts."""
    s = cfg.vision.image_size
    layouts = {}
    for h, w in sorted({(s, s), *cfg.image_grid_pinpoints}):
        layout = anyres.model_layout(cfg, h, w)
        layouts[layout.num_tokens] = (layout, (h, w))
    if visual_tokens not in layouts:
        sizes = dict(sorted((hw, n) for n, (_, hw) in layouts.items()))
        raise ValueError(f"--visual-tokens {visual_tokens}: a {cfg.model_type} image has a count set by its size; "
                         f"one image of a reference size gives {sizes} tokens (size (h, w): tokens)")
    return layouts[visual_tokens][0]
