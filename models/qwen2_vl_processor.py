"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' ``Qwen2VLImageProcessorPil``.

Native resolution: each image is resized (PIL, bicubic) to the `smart_resize` size, a multiple of
patch x merge pixels per side with its area inside [min_pixels, max_pixels] and its aspect ratio kept;
then rescaled, normalized and cut into patches. A still image is repeated `temporal_patch_size` times
along time, so one flattened patch holds C x T x P x P values (the order of the vision tower's Conv3d
weights), and patches are listed merge block by merge block: the 2 x 2 patches that the merger fuses
into one LM token are consecutive.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from vkv_jax.models.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, load_json, pil_resize

QWEN_PROCESSOR_TYPES = frozenset(f"Qwen2VLImageProcessor{s}" for s in ("", "Fast", "Pil"))
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses anything longer


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) -> the resized (h', w'): multiples of `factor`, h' * w' in [min_pixels, max_pixels] (up to
    the rounding to `factor`), aspect ratio kept. transformers' `smart_resize`, step for step (Python's
    round-half-even included). ValueError for an aspect ratio above 200, as there."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"a {width}x{height} image has an aspect ratio of {ratio:.0f}: Qwen2-VL's processor "
                         f"takes at most {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(chw: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """[C, H, W] float32 -> [H/P * W/P, C * T * P * P] patches in merge-block order (transformers' layout)."""
    C, H, W = chw.shape
    gh, gw = H // patch, W // patch
    x = chw.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, *x.shape[5:]))
    return x.reshape(gh * gw, C * temporal * patch * patch)


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """Build with `from_config` / `from_dir`; `process(image)` -> (patches [N, C*T*P*P], grid (1, h, w))."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3  # bicubic
    pixels: ImageProcessor = dataclasses.field(default_factory=lambda: ImageProcessor(
        do_resize=False, do_center_crop=False, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD))

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"preprocessor config: {name} must be an int >= 1, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"preprocessor config: min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.max_pixels < self.factor ** 2:
            raise ValueError(f"preprocessor config: max_pixels {self.max_pixels} is below one merged patch "
                             f"({self.factor}x{self.factor} pixels)")

    @property
    def factor(self) -> int:
        """Side in pixels of what becomes one LM token (patch x merge)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(cls, config: dict) -> QwenImageProcessor:
        """From a `preprocessor_config.json` dict: `min_pixels` / `max_pixels` at the top level override
        `size` ({shortest_edge, longest_edge}, or the older {min_pixels, max_pixels}), as transformers does."""
        size = dict(config.get("size") or {})
        kw: dict[str, Any] = {}
        lo = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        hi = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if lo is not None:
            kw["min_pixels"] = lo
        if hi is not None:
            kw["max_pixels"] = hi
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if config.get(key) is not None:
                kw[key] = config[key]
        plain = {k: v for k, v in config.items() if k in ("do_rescale", "rescale_factor", "do_normalize",
                                                          "image_mean", "image_std", "do_convert_rgb")}
        base = ImageProcessor.from_config({"do_resize": False, "do_center_crop": False, **plain})
        return cls(pixels=base, **kw)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> QwenImageProcessor:
        """From `preprocessor_config.json` (or `processor_config.json`'s image_processor entry)."""
        path = os.fspath(path)
        for name, sub in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                config = load_json(full)
                config = config.get(sub) if sub else config
                if isinstance(config, dict):
                    kind = config.get("image_processor_type")
                    if kind is not None and kind not in QWEN_PROCESSOR_TYPES:
                        raise ValueError(f"{full}: image_processor_type={kind!r} is not a Qwen2-VL processor "
                                         f"({sorted(QWEN_PROCESSOR_TYPES)})")
                    return cls.from_config(config)
        raise FileNotFoundError(f"no image-processor config in {path!r}: expected preprocessor_config.json")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_tokens(self, height: int, width: int) -> int:
        """LM tokens (merged patches) an image of this size becomes."""
        h, w = self.resized_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def process(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """An image (PIL, array, path) -> patches [h * w, C*T*P*P] float32 and its patch grid (1, h, w)."""
        chw = self.pixels.load_rgb(image)
        h, w = self.resized_size(*chw.shape[1:])
        resized = pil_resize(chw, h, w, self.resample)
        x = self.pixels.process_one(np.moveaxis(resized, 0, -1))
        return patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size), \
            (1, h // self.patch_size, w // self.patch_size)
