"""The public API: `load`, `LlavaModel.prepare`, `generate`, `LlavaModel.logits`.

Every error a user can cause is raised here, as ValueError / FileNotFoundError naming the bad value,
before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vkv_jax import accounting, decode, paging, prefill, request
from vkv_jax.compile_cache import compiled
from vkv_jax.methods import Compression, build, split_budget
from vkv_jax.methods.base import reduction_schedule
from vkv_jax.models import anyres, family, llava, loading, qwen2_vl, qwen2_vl_loading, sharding
from vkv_jax.models.config import LlavaConfig, QwenVLConfig
from vkv_jax.models.image_processor import ImageProcessor
from vkv_jax.models.qwen2_vl_processor import QwenImageProcessor
from vkv_jax.models.tokenizer import Tokenizer
from vkv_jax.request import start_request
from vkv_jax.sampling import Sampling, check_sampling, check_seed

LENGTH_BUCKET = 64  # prompts are left-padded to a multiple of this: one compile per bucket

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Inputs:
    """A prepared batch. input_ids, valid: [B, S] (left padded to a bucket); pixel_values [B * n, 3, H, W]
    (LLaVA-1.5, n images per row), `llava.VisualInputs` (anyres models, rows with differing images) or
    `qwen2_vl.QwenVisualInputs` (Qwen2-VL: patches, grids and M-RoPE positions)."""

    input_ids: np.ndarray
    valid: np.ndarray
    pixel_values: np.ndarray | llava.VisualInputs | qwen2_vl.QwenVisualInputs | None
    prompt_lengths: list[int]
    # from `prepare`: visual tokens per row, and each row's images' layouts (`models.anyres.ImageLayout`)
    visual_tokens: list[int] | None = None
    layouts: list[list[Any]] | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, T] generated ids; after EOS, rows hold pad ids
    text: list[str]
    stats: dict[str, Any]
    # with generate(..., return_layout=True): the decode-start cache's slot layout on the host,
    # {"pos", "tag": [L, B, Hkv, C], "length": [L, B, Hkv]}: which prompt positions each layer kept
    layout: dict[str, np.ndarray] | None = None


def on_model_mesh(fn):
    """Run `fn(model, ...)` under `jax.set_mesh(model.mesh)` when the model has a mesh, so the executables it
    compiles split the batch and the paged KV cache over that mesh (`cache.pool_axes`)."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if getattr(model, "mesh", None) is None:
            return fn(model, *args, **kwargs)
        with jax.set_mesh(model.mesh):
            return fn(model, *args, **kwargs)

    return run


@dataclasses.dataclass
class LlavaModel:
    params: dict[str, Any]
    config: LlavaConfig
    tokenizer: Tokenizer
    processor: ImageProcessor
    path: str
    dtype: Any = jnp.float32
    mesh: Mesh | None = None  # ("data", "model"): weights split over `model`, batch rows over `data`

    @property
    def replicated(self) -> list[str]:
        """Weights whose split axis does not divide the mesh's `model` axis, so every `model` device holds
        them whole (`models.sharding`); empty without a mesh."""
        return sharding.replicated_over_model(self.params)

    @property
    def image_token(self) -> str:
        return self.tokenizer.id_to_token(self.config.image_token_id) or "<image>"

    def prepare(self, images: Sequence[Any] | None = None, prompts: Sequence[str] | str = (),
                *, bucket: int = LENGTH_BUCKET, videos: Sequence[Any] | None = None) -> Inputs:
        """Chat template + tokenisation + image preprocessing for a batch.

        images: None for text only, or one entry per prompt: an image (PIL image, [H, W(, C)] uint8 /
        uint16 / [0, 1] float array, or file path) or a list of images for that prompt ([] for none).
        A prompt's images go before its text, or into its own image placeholders (`model.image_token`,
        filled in order; then the counts must match). Each image becomes its own number of visual tokens
        (anyres models: base crop + unpadded tiles + newline tokens, `models.anyres`), so rows differ in
        visual tokens; left padding evens them out. Bad prompts and images raise TypeError / ValueError /
        FileNotFoundError naming their index, before anything compiles.

        videos (LLaVA-OneVision only): None, or one entry per prompt: None for none, or one video: a
        sequence of frames (each an image as above), a [F, H, W(, C)] array, or a folder of frame images
        (sorted by name). Each frame is resized to the tower's size (`ImageProcessor.process_video`); a
        video is F pooled frame grids + one newline token (`anyres.video_layout`), its tokens visual,
        placed after the prompt's images (or in the placeholder after theirs). The prepared ids hold the
        image token id on every visual slot, video slots included.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} has type {type(prompt).__name__} ({prompt!r:.40}), expected a str")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if not prompts:
            raise ValueError("prepare() needs at least one prompt")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts (one image per prompt), or one "
                             "list of images per prompt")
        if images is not None and any(im is None for im in images):
            i = next(i for i, im in enumerate(images) if im is None)
            raise TypeError(f"image {i} is None: a batch is all image prompts or all text prompts "
                            "(images=None for text only; [] for a prompt without images)")
        if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
            raise ValueError(f"bucket must be an integer >= 1, got {bucket!r}")
        per_row = [[] for _ in prompts] if images is None else \
            [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        for b, video in enumerate(self._check_videos(videos, len(prompts))):
            if video is not None:
                per_row[b].append(video)
        crops, layouts = self._process_images(per_row)
        context = self.config.text.max_position_embeddings
        image_token = self.image_token
        rows = []
        for b, (prompt, lays) in enumerate(zip(prompts, layouts)):
            inline = prompt.count(image_token)
            if inline and inline != len(lays):
                raise ValueError(f"prompt {b} holds {inline} {image_token!r} placeholder(s) but {len(lays)} image(s) "
                                 "were given for it: one image per placeholder")
            counts = [lay.num_tokens for lay in lays]
            if not lays:
                ids = self.tokenizer.encode(self.tokenizer.render_prompt(prompt, num_images=0))
            else:
                ids = self.tokenizer.encode_prompt(prompt, counts, image_token=image_token, num_images=len(lays),
                                                   images_in_prompt=bool(inline))
            if len(ids) >= context:
                raise ValueError(
                    f"prompt {b} is {len(ids)} tokens ({sum(counts)} of them for its {len(lays)} image(s): "
                    f"{counts}) but the model's context is {context}: no room left to generate")
            rows.append(ids)
        S = int(math.ceil(max(len(r) for r in rows) / bucket) * bucket)
        ids = np.full((len(rows), S), self.tokenizer.pad_id, np.int32)
        valid = np.zeros((len(rows), S), bool)
        for b, r in enumerate(rows):
            ids[b, S - len(r):] = r
            valid[b, S - len(r):] = True
        visual = [sum(lay.num_tokens for lay in lays) for lays in layouts]
        pixel_values = None
        if any(layouts):
            pixel_values = self._visual_inputs(ids, valid, crops, layouts, visual)
        return Inputs(ids, valid, pixel_values, [len(r) for r in rows], visual_tokens=visual, layouts=layouts)

    def _check_videos(self, videos, n_prompts: int) -> list[_Video | None]:
        """videos as `prepare` takes them -> one `_Video` (frames loaded lazily) or None per prompt."""
        if videos is None:
            return [None] * n_prompts
        if self.config.model_type != "llava_onevision":
            raise ValueError(f"videos need a llava_onevision model; this one is {self.config.model_type}")
        if not isinstance(videos, (list, tuple)) or len(videos) != n_prompts:
            raise ValueError(f"videos must be a list with one entry (a video or None) per prompt: got "
                             f"{len(videos) if isinstance(videos, (list, tuple)) else type(videos).__name__} "
                             f"for {n_prompts} prompts")
        return [None if v is None else _Video(video_frames(v, f"video {b}")) for b, v in enumerate(videos)]

    def _visual_inputs(self, ids: np.ndarray, valid: np.ndarray, crops: list, layouts: list, visual: list[int]):
        """The batch's images as the model takes them: LLaVA-1.5 with n images in every row, the plain
        array [B * n, C, H, W]; otherwise `llava.VisualInputs`."""
        n_img = {len(lays) for lays in layouts}
        if not self.config.anyres and len(n_img) == 1 and 0 not in n_img:
            return np.concatenate(crops)
        source, weight = anyres.pack_visual(ids, self.config.visual_token_ids, layouts, self.config.features_per_crop)
        return llava.VisualInputs(np.concatenate(crops), source, weight, num_visual=min(visual))

    def _process_images(self, per_row: list[list[Any]]) -> tuple[list[np.ndarray], list[list[anyres.ImageLayout]]]:
        """Every image -> its crops [n, C, H, W] (all images, row by row) and each row's ImageLayouts."""
        cfg, proc = self.config, self.processor
        v = cfg.vision
        want = (v.image_size, v.image_size)
        if cfg.anyres and proc.anyres is None:
            raise ValueError(f"a {cfg.model_type} model needs its anyres image processor (preprocessor_config.json's "
                             "image_processor_type), got a CLIP-style one")
        crops, layouts = [], []
        side = v.image_size // v.patch_size
        for b, row in enumerate(per_row):
            lays = []
            # OneVision tiles a prompt's image only when it is the prompt's one image (videos aside)
            tile = cfg.model_type != "llava_onevision" or sum(not isinstance(x, _Video) for x in row) == 1
            for i, image in enumerate(row):
                if isinstance(image, _Video):
                    try:
                        crops.append(proc.process_video(image.frames))
                    except (TypeError, ValueError, FileNotFoundError) as e:
                        raise type(e)(f"video {b}: {e}") from e
                    lays.append(anyres.video_layout(len(image.frames), side))
                    continue
                where = f"image {i} of prompt {b}" if len(row) > 1 else f"image {b}"
                try:
                    if not cfg.anyres:
                        pix = proc([image])
                    else:
                        chw = proc.load_rgb(image)
                        pix = proc.process_anyres(chw, tile=tile)
                except (TypeError, ValueError, FileNotFoundError) as e:
                    raise type(e)(f"{where}: {e}".replace(f"{where}: image 0: ", f"{where}: ")) from e
                if tuple(pix.shape[-2:]) != want:
                    raise ValueError(f"image processor produces {tuple(pix.shape[-2:])} images but the vision "
                                     f"tower expects {want}: check preprocessor_config.json")
                if not cfg.anyres:
                    lay = anyres.plain_layout(cfg.num_image_tokens, side)
                else:
                    h, w = chw.shape[1:]
                    lay = anyres.anyres_layout(h, w, v.image_size, side, cfg.image_grid_pinpoints, True,
                                               cfg.max_patches, tile)
                    if tile and (lay.regions[1][1] == 0 or lay.regions[1][2] == 0):
                        raise ValueError(f"{where} is {w}x{h} pixels: too small (or too thin) for {cfg.model_type}'s "
                                         "tiling, its unpadded feature grid is empty; use a larger image")
                crops.append(pix)
                lays.append(lay)
            layouts.append(lays)
        return crops, layouts

    @on_model_mesh
    def logits(self, input_ids, pixel_values=None, attention_mask=None) -> jax.Array:
        """Full forward: [B, S] ids (+ [B * n, 3, H, W] images, n per row, or the `llava.VisualInputs` that
        `prepare` makes for anyres models and rows with differing images) -> [B, S, V] float32 logits.

        The ids (numpy or jax) are checked on the host first (`check_model_inputs`): ValueError for ids
        outside the vocabulary or image tokens that do not match the images.
        """
        check_model_inputs(self.config, input_ids, pixel_values, attention_mask)
        ids = jnp.asarray(input_ids, jnp.int32)
        valid = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        ids, valid, pix = sharding.shard_rows((ids, valid, device_images(pixel_values, self.dtype)), self.mesh)
        return _logits_jit(self.params, self.config, ids, pix, valid)


class QwenVLModel(LlavaModel):
    """Qwen2-VL / Qwen2.5-VL: `prepare` resizes each image to its native resolution (`smart_resize`), so
    every image has its own merged-patch grid and token count, and computes the M-RoPE positions
    (`models.qwen2_vl.rope_index`); `pixel_values` is a `qwen2_vl.QwenVisualInputs`. Its `processor` is
    a `QwenImageProcessor`."""

    def _process_images(self, per_row):
        """Every image -> (its patches [N, C*T*P*P], its grid (1, h, w)) and each row's ImageLayouts."""
        merge = self.config.vision.spatial_merge_size
        crops, layouts = [], []
        for b, row in enumerate(per_row):
            lays = []
            for i, image in enumerate(row):
                where = f"image {i} of prompt {b}" if len(row) > 1 else f"image {b}"
                try:
                    patches, grid = self.processor.process(image)
                except (TypeError, ValueError, FileNotFoundError) as e:
                    raise type(e)(f"{where}: {e}") from e
                crops.append((patches, grid))
                lays.append(qwen2_vl.image_layout(grid, merge))
            layouts.append(lays)
        return crops, layouts

    def _visual_inputs(self, ids, valid, crops, layouts, visual):
        grids = [g for _, g in crops]
        it = iter(grids)
        per_row = [[next(it) for _ in lays] for lays in layouts]
        positions, _ = qwen2_vl.rope_index(ids, valid, per_row, self.config.image_token_id,
                                           self.config.vision.spatial_merge_size)
        return qwen2_vl.QwenVisualInputs(np.concatenate([p for p, _ in crops]), positions, tuple(grids),
                                         num_visual=min(visual))


@dataclasses.dataclass(frozen=True)
class _Video:
    """One prompt's video inside `prepare`: its frames, each any accepted image input."""

    frames: tuple


VIDEO_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def video_frames(video: Any, where: str = "video") -> tuple:
    """A video as `prepare` takes it -> its frames: a folder of frame images (sorted by file name; no
    video decoding), a [F, H, W(, C)] array, or a sequence of frames. ValueError / FileNotFoundError
    naming `where` for anything else."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{where}: {path!r} is not a folder of frame images (videos are read as "
                                    "frames; decode a video file to frames first)")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(VIDEO_FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"{where}: folder {path!r} holds no frame images ({', '.join(VIDEO_FRAME_SUFFIXES)})")
        return tuple(os.path.join(path, n) for n in names)
    if isinstance(video, np.ndarray):
        if video.ndim not in (3, 4) or video.shape[0] == 0:
            raise ValueError(f"{where}: a video array must be [frames, H, W(, C)] with at least one frame, got "
                             f"shape {video.shape}")
        return tuple(video)
    if isinstance(video, (list, tuple)) and video:
        return tuple(video)
    raise ValueError(f"{where}: expected a folder of frames, a [frames, H, W(, C)] array or a non-empty list of "
                     f"frames, got {type(video).__name__}")


def device_images(pixel_values, dtype):
    """`Inputs.pixel_values` (an array, `llava.VisualInputs` or None) as jit arguments, pixels in `dtype`."""
    if pixel_values is None:
        return None
    if isinstance(pixel_values, (llava.VisualInputs, qwen2_vl.QwenVisualInputs)):
        return pixel_values.astype(dtype)
    return jnp.asarray(pixel_values, dtype)


def bind_visual_layout(method, cfg: LlavaConfig, inputs: Inputs):
    """A method that windows over image grids (LightKV: `with_grids`) gets the batch's per-row grids (each
    image's base crop and unpadded tile grid, in the row's visual ordinals) for anyres models and rows with
    several images; any other method, or one LLaVA-1.5 image per row, is returned as it is."""
    layouts = inputs.layouts
    if not layouts or not any(layouts):
        return method
    if isinstance(cfg, LlavaConfig) and not cfg.anyres and all(len(row) == 1 for row in layouts):
        return method
    return method.with_grids(tuple(anyres.row_regions(row) for row in layouts), _visual_per_row(cfg, inputs))


def visual_token_bound(cfg: LlavaConfig, inputs: Inputs, method=None) -> int:
    """The static visual-token count of a batch (`PrefillContext.num_visual`): every row's, or with rows
    that differ the fewest of any row. An in-prefill reduction handles rows of different counts when it
    says so (`ragged_visual`: FastV, LightKV bound to the batch's grids); otherwise it needs equal counts:
    ValueError, before anything compiles."""
    pix = inputs.pixel_values
    bound = family.static_num_visual(cfg, pix, inputs.batch_size)
    counts = _visual_per_row(cfg, inputs)
    if (method is not None and len(set(counts)) > 1 and not method.ragged_visual
            and reduction_schedule(method, cfg.text.num_layers, max(counts)) is not None):
        raise ValueError(f"{type(method).__name__} shortens every row's visual span by the same static amount, so "
                         f"every row of a batch needs the same number of visual tokens; got {counts} (run rows "
                         "with different images or image sizes in separate batches, or bind the rows' grids "
                         "and counts with api.bind_visual_layout)")
    return bound


def _visual_per_row(cfg: LlavaConfig, inputs: Inputs) -> list[int]:
    if inputs.visual_tokens is not None:
        return list(inputs.visual_tokens)
    return [int(n) for n in _visual_slots(cfg, inputs.input_ids).sum(axis=1)]


def _visual_slots(cfg, input_ids) -> np.ndarray:
    """[B, S] bool: the slots of image (and OneVision video) placeholders."""
    return np.isin(np.asarray(input_ids), getattr(cfg, "visual_token_ids", (cfg.image_token_id,)))


_logits_jit = jax.jit(family.logits, static_argnums=(1,))


def check_model_inputs(cfg: LlavaConfig, input_ids, pixel_values=None, attention_mask=None) -> None:
    """ValueError / TypeError for a forward the model cannot run, checked on the host before any tracing.

    input_ids [B, S] integers in [0, vocab) (the image token id counts as valid); attention_mask [B, S];
    pixel_values [B * n, C, H, W] with every row holding n * num_image_tokens image tokens, or
    `llava.VisualInputs` (anyres models, rows with differing images: every image-token slot fed), or None
    and no image tokens at all.
    """
    ids = np.asarray(input_ids)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    vocab, image_id = cfg.text.vocab_size, cfg.image_token_id
    bad = ((ids < 0) | (ids >= vocab)) & ~_visual_slots(cfg, ids)
    if bad.any():
        b, i = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(f"input_ids[{b}, {i}] = {int(ids[b, i])} is not a token id of this model: the vocabulary "
                         f"is [0, {vocab}) ({int(bad.sum())} bad id(s) in all)")
    if attention_mask is not None and np.shape(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, input_ids {ids.shape}: they must match")
    per_row = _visual_slots(cfg, ids).sum(axis=1)
    if pixel_values is None:
        if per_row.any():
            raise ValueError(f"input_ids hold {int(per_row.sum())} image tokens (id {image_id}) but no pixel_values "
                             "were given")
        return
    if isinstance(cfg, QwenVLConfig):
        _check_qwen_inputs(cfg, ids, per_row, pixel_values)
        return
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
        raise ValueError(f"row {b} of input_ids holds {int(per_row[b])} image tokens (id {image_id}) but "
                         f"{n_images} image(s) for {B} row(s) need {need} per row ({cfg.num_image_tokens} per image)")


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
    is_image = _visual_slots(cfg, ids)
    if (is_image & ~fed).any():
        b = int(np.nonzero((is_image & ~fed).any(1))[0][0])
        raise ValueError(f"row {b} of input_ids holds image tokens that VisualInputs gives no features (more "
                         "image tokens than its images need)")
    if int(vis.num_visual) > int(per_row.min()):
        raise ValueError(f"VisualInputs.num_visual={vis.num_visual} exceeds the fewest image tokens of any row "
                         f"({int(per_row.min())})")


def _check_qwen_inputs(cfg: QwenVLConfig, ids: np.ndarray, per_row: np.ndarray, vis) -> None:
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


def load(path: str | os.PathLike | None = None, dtype: str = "float32", *, mesh: Mesh | None = None,
         check_finite: bool = True) -> LlavaModel:
    """Load a local HF checkpoint directory (no network): `model_type` llava (LLaVA-1.5), llava_next (anyres
    tiling, CLIP tower; Vicuna / Mistral / Llama-3 LMs), llava_onevision (SigLIP tower, Qwen2 LM,
    anyres_max), or qwen2_vl / qwen2_5_vl (a `QwenVLModel`: native-resolution tower, M-RoPE). No path: the
    shipped default model.

    Every tensor is checked as it is read (shape against config.json, floating dtype, and with
    `check_finite` no nan / inf); errors name the tensor's checkpoint key.

    mesh: a ("data", "model") `jax.sharding.Mesh` (`vkv_jax.make_mesh`): every weight is read straight into
    its shards, tensor-parallel over `model` (`models.sharding`: heads, MLP features, vocabulary; an axis that
    does not divide `model` stays replicated, listed in `model.replicated`), and `generate` splits the
    batch's rows over `data`. Without it everything lives on the default device.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if mesh is not None:
        sharding.check_mesh(mesh)
    from vkv_jax import default_model

    path = default_model.resolve(path)
    _, cfg = loading.read_config(path)
    tokenizer = Tokenizer.from_dir(path)
    # on CPU, per-layer weight buffers decode ~3x faster than a scan over stacked ones (llama.scan_layers)
    per_layer = jax.default_backend() == "cpu"
    kwargs = dict(per_layer=per_layer, check_finite=check_finite, mesh=mesh)
    if isinstance(cfg, QwenVLConfig):
        params = qwen2_vl_loading.load_params(path, cfg, _DTYPES[dtype], **kwargs)
        return QwenVLModel(params, cfg, tokenizer, QwenImageProcessor.from_dir(path), path, _DTYPES[dtype], mesh)
    processor = ImageProcessor.from_dir(path)
    params = loading.load_params(path, cfg, _DTYPES[dtype], **kwargs)
    return LlavaModel(params, cfg, tokenizer, processor, path, _DTYPES[dtype], mesh)


def check_request(model: LlavaModel, inputs: Inputs, max_new_tokens: int) -> None:
    """Raise ValueError for a generation request the model cannot serve (before anything compiles): ids
    outside the vocabulary, image tokens that do not match the images, a prompt too long for the context."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = model.config.text.max_position_embeddings
    longest = max(inputs.prompt_lengths)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the model's context of {context}")
    check_model_inputs(model.config, inputs.input_ids, inputs.pixel_values, inputs.valid)


def _compression_seconds(params, cfg, method, ids, valid, pix, budget, prefill_s: float,
                         chunk: int | None = None) -> float:
    """Scoring + compaction time: the method's prefill minus a full-cache prefill of the same batch
    (chunked alike), timed side by side after a warm-up of each (the better of two for the method)."""
    ours = dict(params=params, input_ids=ids, valid=valid, pixel_values=pix, budget=budget)
    full = {**ours, "budget": None}
    prefill, _ = compiled(request.prefill_compact_jit, dict(cfg=cfg, method=method, chunk=chunk), **ours)
    baseline, _ = compiled(request.prefill_compact_jit, dict(cfg=cfg, method=build(Compression("full")), chunk=chunk),
                           **full)
    jax.block_until_ready(baseline(**full))  # warm
    start = time.perf_counter()
    jax.block_until_ready(prefill(**ours))
    prefill_s = min(prefill_s, time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(baseline(**full))
    return max(prefill_s - (time.perf_counter() - start), 0.0)


@on_model_mesh
def generate(model: LlavaModel, inputs: Inputs, max_new_tokens: int = 32,
             compression: Compression | None = None, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stream: bool = False,
             measure_overhead: bool = False, return_layout: bool = False, kv_pool: str = "fitted",
             prefill_chunk: int | None = None) -> GenerateOutput:
    """Prefill (+ compression), then decode `max_new_tokens` with a `lax.while_loop` (or a streaming loop).

    Compiles a bounded set of executables however many requests a process serves: the sampling settings
    (temperature, top_k, top_p) are traced values; the prefill's executable does not depend on
    `max_new_tokens` (the decode executable adds the decode slots to the cache); the decode loop is
    compiled per power-of-two bucket of `max_new_tokens` (`paging.decode_bucket`, at least 16) and runs
    exactly `max_new_tokens - 1` steps. Executables live in `vkv_jax.compile_cache` (an LRU).

    kv_pool: "fitted" (default) sizes the prompt's page pool from the slots the method kept (<= ~1.13x
    the live bytes; its size keys the small paging and the decode executables, so a process serving many
    budgets or prompt lengths compiles one of each per pool size, 16 sizes an octave); "static" bounds it
    from the method's total budget in the prefill's executable (compiles per prompt and budget bucket
    only; for a traced VL-Cache / AirCache budget the bound is the whole prompt). See `request.prefill_request`.

    prefill_chunk: prefill the prompt that many slots at a time (None: at once), every layer of a chunk
    attending to the earlier chunks' K/V: activation memory follows the chunk, not the prompt, and the
    logits, scores and keep-sets are the one-shot prefill's up to float rounding (`prefill.chunked_prompt`).
    Every method but the in-prefill reductions (FastV, LightKV: ValueError) runs chunked.

    The returned stats hold prompt/visual token counts, KV bytes before and after compression, kept
    tokens per layer (text / vision), decoder prefill FLOPs (from the shapes; in-prefill methods such as
    LightKV and FastV save some), and prefill / decode timings with compile time apart.
    `measure_overhead=True` also times a full-cache prefill of the same batch, side by side, and
    reports the difference as the time spent in scoring + compaction (`compression_s`).
    """
    if isinstance(compression, str):
        raise TypeError(f"compression must be a vkv_jax.Compression, got the string {compression!r}: "
                        f"use compression=vkv_jax.Compression({compression!r}, budget=...)")
    if compression is not None and not isinstance(compression, Compression):
        raise TypeError(f"compression must be a vkv_jax.Compression or None, got {type(compression).__name__}")
    compression = compression or Compression("full")
    method = bind_visual_layout(build(compression), model.config, inputs)
    # a traced budget where the method allows it: `method` then keys only the budget's kind / bucket
    method, budget = split_budget(method, inputs.input_ids.shape[1])
    check_sampling(temperature, top_k, top_p)  # ValueError on a bad setting
    sampling = Sampling(temperature, top_k, top_p)
    check_seed(seed)
    paging.check_kv_pool(kv_pool)
    check_request(model, inputs, max_new_tokens)
    cfg = model.config
    vocab = cfg.text.vocab_size
    if top_k > vocab:
        warnings.warn(f"top_k={top_k} exceeds the vocabulary ({vocab} tokens): keeping every token "
                      f"(as top_k=0)", stacklevel=2)
    eos = tuple(sorted(model.tokenizer.eos_ids))
    pad = int(model.tokenizer.pad_id)
    ids, valid, pix = sharding.shard_rows((jnp.asarray(inputs.input_ids), jnp.asarray(inputs.valid),
                                  device_images(inputs.pixel_values, model.dtype)), model.mesh)
    key = jax.random.key(seed)
    traced = sampling.as_arrays()

    num_visual = visual_token_bound(cfg, inputs, method)  # the fewest of any row when rows differ
    lengths = accounting.layer_lengths(method, cfg, ids.shape[1], num_visual)  # checks an in-prefill schedule
    prefill.check_prefill_chunk(method, cfg, prefill_chunk, num_visual)
    flops = accounting.prefill_flops(cfg, lengths, inputs.batch_size)
    flops_full = accounting.prefill_flops(cfg, (ids.shape[1],) * cfg.text.num_layers, inputs.batch_size)

    started = start_request(model.params, cfg, method, ids, valid, pix, budget=budget, key=key, sampling=traced,
                            eos_ids=eos, max_new_tokens=max_new_tokens, kv_pool=kv_pool, prefill_chunk=prefill_chunk,
                            grow=stream)
    done_prefill, state, capacity = started.prefilled, started.state, started.decode_slots
    cache = done_prefill.cache  # the decode-start cache, before any decode slot
    prefill_s, prefill_compile = done_prefill.seconds, done_prefill.compile_seconds
    compression_s = None
    if measure_overhead and compression.name != "full" and flops == flops_full:  # (in-prefill methods save time)
        compression_s = _compression_seconds(model.params, cfg, method, ids, valid, pix, budget, prefill_s,
                                             prefill_chunk)
    kv_allocated = cache.allocated_bytes(capacity)  # what decoding holds: the pool + the grown decode segment
    kv_live = float(cache.live_bytes())
    layout = None
    if return_layout:  # the decode-start cache in the dense view (prompt slots, then empty decode slots)
        dense = paging.grow_jit(cache, capacity).dense()
        layout = {"pos": np.asarray(dense.pos), "tag": np.asarray(dense.tag), "length": np.asarray(dense.length)}

    start = time.perf_counter()
    if stream:
        steps = list(decode.stream_decode(model.params, cfg, state, key, max_new_tokens, traced, eos, pad))
        tokens = np.full((inputs.batch_size, max_new_tokens), pad, np.int32)
        tokens[:, :len(steps)] = np.stack([np.asarray(s) for s in steps], axis=1)
        decode_compile = 0.0
    else:
        bucket = paging.decode_bucket(max_new_tokens)
        static = dict(cfg=cfg, bucket=bucket, capacity=capacity, eos_ids=eos, pad_id=pad)
        decode_args = dict(params=model.params, state=state, key=key, sampling=traced,
                           num_tokens=jnp.int32(max_new_tokens))
        run, decode_compile = compiled(decode.bucket_decode_jit, static, **decode_args)
        start = time.perf_counter()
        out, _ = run(**decode_args)
        tokens = np.asarray(jax.block_until_ready(out))[:, :max_new_tokens]
    decode_s = time.perf_counter() - start

    kept = np.asarray(paging.kept_by_modality_jit(cache))
    stats = {
        "method": compression.name,
        "budget": compression.budget,
        "prompt_tokens": list(inputs.prompt_lengths),
        "visual_tokens": _visual_per_row(cfg, inputs),
        "kv_bytes_full": done_prefill.full_kv_bytes,
        "kv_bytes": kv_live,
        "kv_bytes_allocated": kv_allocated,
        "kv_bytes_decode_segment": float(cache.decode_segment_bytes(capacity)),
        "kv_bytes_per_layer": np.asarray(cache.live_bytes_per_layer()).tolist(),
        "kv_bytes_allocated_per_layer": np.asarray(cache.allocated_bytes_per_layer(capacity)).tolist(),
        "kv_page_size": cache.page_size,
        "kv_pages": cache.num_pages,
        "kept_text_per_layer": kept[:, 0].tolist(),
        "kept_vision_per_layer": kept[:, 1].tolist(),
        "prefill_flops": flops,
        "prefill_flops_full": flops_full,
        "prefill_flops_saved": 1.0 - flops / flops_full,
        "prefill_s": prefill_s,
        "prefill_compile_s": prefill_compile,
        "compression_s": compression_s,
        "decode_s": decode_s,
        "decode_compile_s": decode_compile,
        "decode_tokens_per_s": inputs.batch_size * max(max_new_tokens - 1, 1) / max(decode_s, 1e-9),
        "new_tokens": max_new_tokens,
    }
    return GenerateOutput(tokens=tokens, text=[model.tokenizer.decode_generated(row, eos) for row in tokens],
                          stats=stats, layout=layout)


