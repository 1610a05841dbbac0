"""Model inputs: a prompt batch prepared (chat template, tokens, images, videos) and what the decode path
reads of it (visual counts, image grids, device arrays).

`Preparer.prepare` is the `prepare` of every model class (`api.LlavaModel` mixes it in; `QwenPreparer` for
Qwen2-VL's native-resolution images and M-RoPE positions). It reads the model's `config`, `tokenizer` and
`processor`, and raises TypeError / ValueError / FileNotFoundError naming the bad prompt or image.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vkv_jax.checks import visual_slots
from vkv_jax.models import anyres, family, llava, qwen2_vl
from vkv_jax.models.config import LlavaConfig

LENGTH_BUCKET = 64  # prompts are left-padded to a multiple of this: one compile per bucket


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



class Preparer:
    """`prepare` and its steps, for a model with `config`, `tokenizer` and `processor` (LLaVA-1.5, -NeXT,
    -OneVision)."""

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



class QwenPreparer(Preparer):
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
    """`Inputs.pixel_values` (an array, a family's visual-inputs pytree or None) as jit arguments, pixels in
    `dtype`."""
    if pixel_values is None:
        return None
    if isinstance(pixel_values, family.visual_inputs_types()):
        return pixel_values.astype(dtype)
    return jnp.asarray(pixel_values, dtype)



def bind_visual_layout(method, cfg: LlavaConfig, inputs: Inputs):
    """A method that windows over image grids (LightKV: `with_grids`) gets the batch's per-row grids (each
    image's base crop and unpadded tile grid, in the row's visual ordinals) for anyres models and rows with
    several images; any other method, or one LLaVA-1.5 image per row, is returned as it is."""
    layouts = inputs.layouts
    if not layouts or not any(layouts):
        return method
    if cfg.fixed_image_grid and all(len(row) == 1 for row in layouts):
        return method
    return method.with_grids(tuple(anyres.row_regions(row) for row in layouts), visual_per_row(cfg, inputs))


def visual_token_bound(cfg: LlavaConfig, inputs: Inputs, method=None) -> int:
    """The static visual-token count of a batch (`PrefillContext.num_visual`): every row's, or with rows
    that differ the fewest of any row. An in-prefill reduction handles rows of different counts when it
    says so (`ragged_visual`: FastV, LightKV bound to the batch's grids); otherwise it needs equal counts:
    ValueError, before anything compiles."""
    pix = inputs.pixel_values
    bound = family.static_num_visual(cfg, pix, inputs.batch_size)
    counts = visual_per_row(cfg, inputs)
    if method is not None and method.reduces_in_prefill and not method.ragged_visual and len(set(counts)) > 1:
        raise ValueError(f"{type(method).__name__} shortens every row's visual span by the same static amount, so "
                         f"every row of a batch needs the same number of visual tokens; got {counts} (run rows "
                         "with different images or image sizes in separate batches, or bind the rows' grids "
                         "and counts with inputs.bind_visual_layout)")
    return bound



def visual_per_row(cfg: LlavaConfig, inputs: Inputs) -> list[int]:
    if inputs.visual_tokens is not None:
        return list(inputs.visual_tokens)
    return [int(n) for n in visual_slots(cfg, inputs.input_ids).sum(axis=1)]
