"""Host-side checks of what a user hands the model, before anything is traced or compiled.

Each raises ValueError / TypeError naming the bad value and what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vkv_jax.models import family, llava, qwen2_vl
from vkv_jax.models.config import LlavaConfig, QwenVLConfig


def visual_slots(cfg, input_ids) -> np.ndarray:
    """[B, S] bool: the slots of image (and OneVision video) placeholders."""
    return np.isin(np.asarray(input_ids), cfg.visual_token_ids)



def check_model_inputs(cfg: LlavaConfig, input_ids, pixel_values=None, attention_mask=None) -> None:
    """ValueError / TypeError for a forward the model cannot run, checked on the host before any tracing.

    input_ids [B, S] integers in [0, vocab) (the image token id counts as valid); attention_mask [B, S];
    pixel_values None and no image tokens at all, or the family's images, checked against the ids by its
    `check_images` (LLaVA: `check_llava_images`, Qwen2-VL: `check_qwen_images`).
    """
    ids = np.asarray(input_ids)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    vocab, image_id = cfg.text.vocab_size, cfg.image_token_id
    bad = ((ids < 0) | (ids >= vocab)) & ~visual_slots(cfg, ids)
    if bad.any():
        b, i = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(f"input_ids[{b}, {i}] = {int(ids[b, i])} is not a token id of this model: the vocabulary "
                         f"is [0, {vocab}) ({int(bad.sum())} bad id(s) in all)")
    if attention_mask is not None and np.shape(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, input_ids {ids.shape}: they must match")
    per_row = visual_slots(cfg, ids).sum(axis=1)
    if pixel_values is None:
        if per_row.any():
            raise ValueError(f"input_ids hold {int(per_row.sum())} image tokens (id {image_id}) but no pixel_values "
                             "were given")
        return
    family.of(cfg).check_images(cfg, ids, per_row, pixel_values)


def check_llava_images(cfg: LlavaConfig, ids: np.ndarray, per_row: np.ndarray, pixel_values) -> None:
    """The LLaVA families' images against input_ids [B, S] (`per_row` image slots per row): a plain
    [B * n, C, H, W] array with n images' tokens in every row, or `llava.VisualInputs`."""
    v = cfg.vision
    want = (v.num_channels, v.image_size, v.image_size)
    if isinstance(pixel_values, llava.VisualInputs):
        _check_visual_inputs(cfg, ids, per_row, pixel_values, want)
        return
    if cfg.anyres:
        raise ValueError(f"a {cfg.model_type} model takes its images as llava.VisualInputs (from model.prepare: "
                         "the crops plus where each visual token comes from), not a plain pixel array")
    shape = tuple(np.shape(pixel_values))
    if len(shape) != 4 or shape[1:] != want:
        raise ValueError(f"pixel_values must be [images, {want[0]}, {want[1]}, {want[2]}], got shape {shape}")
    B, n_images = ids.shape[0], shape[0]
    if n_images % B:
        raise ValueError(f"pixel_values holds {n_images} images for {B} rows of input_ids: every row needs the "
                         "same number of images")
    need = n_images // B * cfg.num_image_tokens
    wrong = np.nonzero(per_row != need)[0]
    if wrong.size:
        b = int(wrong[0])
        raise ValueError(f"row {b} of input_ids holds {int(per_row[b])} image tokens (id {cfg.image_token_id}) "
                         f"but {n_images} image(s) for {B} row(s) need {need} per row ({cfg.num_image_tokens} per "
                         "image)")


def _check_visual_inputs(cfg: LlavaConfig, ids: np.ndarray, per_row: np.ndarray, vis: llava.VisualInputs,
                         want: tuple[int, int, int]) -> None:
    """VisualInputs against input_ids: crop shape, one source per slot, sources inside the feature table,
    every image-token slot fed (a positive weight) and the static bound not above any row's count."""
    shape = tuple(np.shape(vis.pixels))
    if len(shape) != 4 or shape[1:] != want or shape[0] < 1:
        raise ValueError(f"VisualInputs.pixels must be [crops, {want[0]}, {want[1]}, {want[2]}], got shape {shape}")
    src, w = np.asarray(vis.source), np.asarray(vis.weight)
    if src.ndim != 3 or src.shape[:2] != ids.shape or w.shape != src.shape:
        raise ValueError(f"VisualInputs.source / weight must be [{ids.shape[0]}, {ids.shape[1]}, K] like input_ids, "
                         f"got {src.shape} / {w.shape}")
    rows = shape[0] * cfg.features_per_crop + 1
    if src.min() < 0 or src.max() >= rows:
        raise ValueError(f"VisualInputs.source indexes rows outside the feature table of {shape[0]} crops "
                         f"({rows} rows, image_newline last)")
    fed = (w > 0).any(-1)
    is_image = visual_slots(cfg, ids)
    if (is_image & ~fed).any():
        b = int(np.nonzero((is_image & ~fed).any(1))[0][0])
        raise ValueError(f"row {b} of input_ids holds image tokens that VisualInputs gives no features (more "
                         "image tokens than its images need)")
    if int(vis.num_visual) > int(per_row.min()):
        raise ValueError(f"VisualInputs.num_visual={vis.num_visual} exceeds the fewest image tokens of any row "
                         f"({int(per_row.min())})")


def check_qwen_images(cfg: QwenVLConfig, ids: np.ndarray, per_row: np.ndarray, vis) -> None:
    """QwenVisualInputs against input_ids: patches for the grids, image tokens for the merged patches,
    M-RoPE positions [3, B, S]."""
    if not isinstance(vis, qwen2_vl.QwenVisualInputs):
        raise ValueError(f"a {cfg.model_type} model takes its images as qwen2_vl.QwenVisualInputs (from "
                         f"model.prepare), got {type(vis).__name__}")
    v = cfg.vision
    patches = sum(t * h * w for t, h, w in vis.grids)
    if tuple(np.shape(vis.patches)) != (patches, v.patch_dim):
        raise ValueError(f"QwenVisualInputs.patches must be [{patches}, {v.patch_dim}] for grids {vis.grids}, got "
                         f"{tuple(np.shape(vis.patches))}")
    tokens = sum(qwen2_vl.tokens_per_image(g, v.spatial_merge_size) for g in vis.grids)
    if int(per_row.sum()) != tokens:
        raise ValueError(f"input_ids hold {int(per_row.sum())} image tokens but the images' grids give {tokens}")
    if tuple(np.shape(vis.positions)) != (3,) + ids.shape:
        raise ValueError(f"QwenVisualInputs.positions must be [3, {ids.shape[0]}, {ids.shape[1]}] like input_ids, "
                         f"got {tuple(np.shape(vis.positions))}")
    if int(vis.num_visual) > int(per_row.min()):
        raise ValueError(f"QwenVisualInputs.num_visual={vis.num_visual} exceeds the fewest image tokens of any row "
                         f"({int(per_row.min())})")



def check_request(model: Any, inputs: Any, max_new_tokens: int) -> None:
    """Raise ValueError for a generation request (`api.LlavaModel`, `inputs.Inputs`) the model cannot serve
    (before anything compiles): ids outside the vocabulary, image tokens that do not match the images, a
    prompt too long for the context."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = model.config.text.max_position_embeddings
    longest = max(inputs.prompt_lengths)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the model's context of {context}")
    check_model_inputs(model.config, inputs.input_ids, inputs.pixel_values, inputs.valid)
