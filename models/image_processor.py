"""CLIP / LLaVA-1.5 image preprocessing with PIL + numpy, equal to transformers' ``CLIPImageProcessorPil``.

Each step reproduces the transformers 5.x PIL backend exactly (same PIL resize call, same integer
rounding of the resized shape, same crop offsets, same float64-then-float32 rescale), because the
vision tower is sensitive to one-pixel shifts and parity tests compare logits against HF.
Pipeline per image: convert to RGB -> [LLaVA: pad to square] -> resize -> center crop -> rescale ->
normalize, giving ``[3, H, W]`` float32; images are stacked to ``[B, 3, H, W]``.

Inputs beyond 8 bits are scaled to 0..255 first (transformers' plain ``convert("RGB")`` would clip them
to white): 16-bit PIL images (modes ``I;16*`` and ``I``, read as 0..65535) and uint16 arrays map by
round(v * 255 / 65535); float PIL images (mode ``F``) and float arrays must hold values in [0, 1] and
map by round(v * 255). Anything else (other integer dtypes, floats outside [0, 1]) is a ValueError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageProcessor"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# image_processor_type values we reproduce. LLaVA-NeXT / OneVision / Qwen2-VL / SigLIP use other
# pipelines (anyres tiling, patch packing, plain resize) and must not silently get the CLIP one.
_CLIP_TYPES = frozenset({"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                         "CLIPFeatureExtractor"})
_LLAVA_TYPES = frozenset({"LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"})
# anyres processors (tiles + base crop; `do_pad` there pads the crop count for batching, nothing we need)
_ANYRES_TYPES = {f"{name}{suffix}": kind for name, kind in (("LlavaNextImageProcessor", "llava_next"),
                                                            ("LlavaOnevisionImageProcessor", "llava_onevision"))
                 for suffix in ("", "Fast", "Pil")}
_DEFAULT_PINPOINTS = {  # the transformers classes' defaults
    "llava_next": ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    "llava_onevision": tuple((a * 384, b * 384) for a in range(1, 7) for b in range(1, 7)),
}


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """transformers' ``get_size_dict``: an int is a shortest edge (CLIP) or a square; a pair is (h, w)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, [h, w] or a dict, got {value!r}")
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        keys = set(value)
        if keys in ({"shortest_edge"}, {"height", "width"}):
            return {k: int(v) for k, v in value.items()}
    raise ValueError(f"{name}={value!r} is not supported: use an int, [h, w], {{'shortest_edge': n}} "
                     "or {'height': h, 'width': w}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """CLIP-style preprocessing. Build with ``from_dir`` / ``from_config``; call on a list of images.

    ``size`` is ``{"shortest_edge": n}`` or ``{"height": h, "width": w}``; ``crop_size`` is
    ``{"height": h, "width": w}``. ``do_pad`` is LLaVA's pad-to-square (with the mean colour) before
    resizing. Defaults are CLIPImageProcessor's.
    """

    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    do_convert_rgb: bool = True
    do_pad: bool = False
    anyres: str | None = None  # "llava_next" | "llava_onevision": tiled crops (`process_anyres`)
    image_grid_pinpoints: tuple = ()

    def __post_init__(self):
        if int(self.resample) not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample={self.resample!r} is not a PIL resampling filter "
                             f"(0..5, e.g. 3 = bicubic)")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {v!r}")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: dict) -> ImageProcessor:
        """From a ``preprocessor_config.json`` dict (CLIP / LLaVA image-processor keys)."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type")
        if kind is not None and kind not in _CLIP_TYPES | _LLAVA_TYPES | set(_ANYRES_TYPES):
            raise ValueError(f"image_processor_type={kind!r} is not supported; vkv_jax reproduces "
                             f"{sorted(_CLIP_TYPES | _LLAVA_TYPES | set(_ANYRES_TYPES))}")
        is_llava = kind in _LLAVA_TYPES
        if kind in _ANYRES_TYPES:
            return cls._anyres_from_config(config, _ANYRES_TYPES[kind])
        if config.get("do_pad") and not is_llava:
            raise ValueError(f"do_pad=True is only supported for LLaVA image processors, got type {kind!r}")
        default_to_square = bool(config.get("default_to_square", False))
        kw: dict[str, Any] = {}
        if config.get("size") is not None:
            kw["size"] = _size_dict(config["size"], default_to_square, "size")
        if config.get("crop_size") is not None:
            crop = _size_dict(config["crop_size"], True, "crop_size")
            if "height" not in crop:
                raise ValueError(f"crop_size must give height and width, got {config['crop_size']!r}")
            kw["crop_size"] = crop
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if config.get(key) is not None:
                kw[key] = bool(config[key])
        if config.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(config["rescale_factor"])
        for key in ("image_mean", "image_std"):
            v = config.get(key)
            if v is not None:
                kw[key] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        if config.get("resample") is not None:
            kw["resample"] = int(config["resample"])
        return cls(**kw)

    @classmethod
    def _anyres_from_config(cls, config: dict, anyres: str) -> ImageProcessor:
        """LLaVA-NeXT / OneVision processors: the same per-crop steps, with the class defaults of each."""
        plain = {k: v for k, v in config.items() if k not in ("image_processor_type", "do_pad",
                                                               "image_grid_pinpoints")}
        if anyres == "llava_next":
            plain.setdefault("size", {"shortest_edge": 224})
            plain.setdefault("crop_size", {"height": 224, "width": 224})
        else:  # OneVision: a plain square resize, no crop
            plain.setdefault("size", {"height": 384, "width": 384})
            plain["do_center_crop"] = bool(config.get("do_center_crop") or False)
        base = cls.from_config(plain)
        pins = config.get("image_grid_pinpoints")
        pins = _DEFAULT_PINPOINTS[anyres] if pins is None else pins
        if not isinstance(pins, (list, tuple)) or not pins or any(
                not isinstance(p, (list, tuple)) or len(p) != 2 for p in pins):
            raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {pins!r}")
        out = dataclasses.replace(base, anyres=anyres, image_grid_pinpoints=tuple((int(a), int(b)) for a, b in pins))
        if base.do_center_crop and "height" not in base.crop_size:
            raise ValueError("crop_size must give height and width")
        return out

    @property
    def crop_side(self) -> int:
        """Side of the square tiles an anyres image is cut into (transformers' `patch_size` there)."""
        if self.do_center_crop:
            return self.crop_size["height"]
        return self.size.get("height", self.size.get("shortest_edge"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageProcessor:
        """From ``preprocessor_config.json``, or the ``image_processor`` entry of ``processor_config.json``
        (where transformers 5 saves it when the whole processor is saved)."""
        path = os.fspath(path)
        pre = os.path.join(path, "preprocessor_config.json")
        proc = os.path.join(path, "processor_config.json")
        if os.path.isfile(pre):
            return cls.from_config(load_json(pre))
        if os.path.isfile(proc):
            sub = load_json(proc).get("image_processor")
            if isinstance(sub, dict):
                return cls.from_config(sub)
        raise FileNotFoundError(f"no image-processor config in {path!r}: expected preprocessor_config.json "
                                "(or processor_config.json with an 'image_processor' entry)")

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> tuple[int, int] | None:
        """Output (H, W): the crop size, or the fixed resize size; None when it depends on the input."""
        if self.do_center_crop:
            return (self.crop_size["height"], self.crop_size["width"])
        if self.do_resize and "height" in self.size:
            return (self.size["height"], self.size["width"])
        return None

    # ------------------------------------------------------------------ processing
    def __call__(self, images: Any) -> np.ndarray:
        """Images -> pixel values ``[B, 3, H, W]`` float32.

        ``images``: one image or a list of them; each a PIL image, a numpy array ``[H, W]`` or
        ``[H, W, C]`` with C in {1, 3, 4} (uint8 0..255; uint16 0..65535 and float [0, 1] are scaled to
        0..255), or a file path. Errors name the image's index in the list.
        """
        if self.anyres:
            raise ValueError(f"this is a {self.anyres} (anyres) image processor: an image becomes several crops, "
                             "use process_anyres(load_rgb(image)) per image (model.prepare does)")
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        out = []
        for i, image in enumerate(images):
            try:
                out.append(self.process_one(image))
            except (TypeError, ValueError, FileNotFoundError) as e:  # say which image of the batch
                kind = TypeError if isinstance(e, TypeError) else \
                    FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
                raise kind(f"image {i}: {e}") from e
        shapes = {o.shape for o in out}
        if len(shapes) != 1:
            raise ValueError(f"processed images have different shapes {sorted(shapes)}; enable center crop "
                             "or a fixed {'height','width'} size to batch them")
        return np.stack(out).astype(np.float32, copy=False)

    def process_one(self, image: Any) -> np.ndarray:
        """One image -> ``[3, H, W]`` float32."""
        chw = self._to_chw_uint8(image)
        if self.do_pad:
            chw = _pad_to_square(chw, tuple(int(x * 255) for x in self.image_mean))
        return self._finish(chw)

    def load_rgb(self, image: Any) -> np.ndarray:
        """Any accepted image input -> uint8 ``[3, H, W]`` (what `process_anyres` takes)."""
        return self._to_chw_uint8(image)

    def process_anyres(self, chw: np.ndarray, tile: bool = True) -> np.ndarray:
        """One uint8 ``[3, H, W]`` image -> its crops ``[n, 3, s, s]`` float32, as transformers'
        LlavaNext / LlavaOnevision image processors: the whole image resized to the crop size, then the
        tiles of the image resized (aspect kept) and zero-padded to the best-fitting pinpoint, row-major.
        ``tile=False`` (OneVision, several images in one prompt): the image padded to a square with the
        mean colour, one crop."""
        from vkv_jax.models.anyres import select_best_resolution

        if not tile:
            return self._finish(_pad_to_square(chw, tuple(int(x * 255) for x in self.image_mean)))[None]
        side = self.crop_side
        H, W = chw.shape[1:]
        bh, bw = select_best_resolution(H, W, self.image_grid_pinpoints)
        # transformers' get_patch_output_size: fit inside (bh, bw), the short side rounded up
        if bw / W < bh / H:
            nh, nw = min(math.ceil(H * (bw / W)), bh), bw
        else:
            nh, nw = bh, min(math.ceil(W * (bh / H)), bw)
        resized = pil_resize(chw, nh, nw, self.resample)
        py, ry = divmod(bh - nh, 2)
        px, rx = divmod(bw - nw, 2)
        padded = np.pad(resized, ((0, 0), (py, py + ry), (px, px + rx)))
        crops = [pil_resize(chw, side, side, self.resample)]
        crops += [padded[:, i:i + side, j:j + side] for i in range(0, bh, side) for j in range(0, bw, side)]
        return np.stack([self._finish(c) for c in crops])

    def process_video(self, frames: Sequence[Any]) -> np.ndarray:
        """A OneVision video's frames -> ``[F, 3, s, s]`` float32: each frame (any accepted image input)
        resized to the crop size without keeping its aspect ratio, rescaled and normalized, as
        transformers' LlavaOnevisionVideoProcessor does per frame (its defaults: bicubic, no crop), with
        PIL's bicubic resize where transformers uses torchvision's (not installed here, so not compared)."""
        if isinstance(frames, (str, bytes)) or not isinstance(frames, (list, tuple, np.ndarray)) or len(frames) == 0:
            raise ValueError(f"a video must be a non-empty sequence of frames, got {type(frames).__name__}")
        side = self.crop_side
        out = []
        for i, frame in enumerate(frames):
            try:
                chw = self._to_chw_uint8(frame)
            except (TypeError, ValueError, FileNotFoundError) as e:
                raise type(e)(f"frame {i}: {e}") from e
            out.append(self._rescale_normalize(pil_resize(chw, side, side, self.resample)))
        return np.stack(out)

    def _finish(self, chw: np.ndarray) -> np.ndarray:
        """The per-crop steps on a uint8 ``[3, H, W]``: resize, center crop, rescale, normalize."""
        if self.do_resize:
            chw = self._resize(chw)
        if self.do_center_crop:
            chw = _center_crop(chw, self.crop_size["height"], self.crop_size["width"])
        return self._rescale_normalize(chw)

    def _rescale_normalize(self, chw: np.ndarray) -> np.ndarray:
        x = chw
        if self.do_rescale:
            # transformers upcasts to float64 before scaling, then casts to float32.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=x.dtype)
            std = np.asarray(self.image_std, dtype=x.dtype)
            x = (x - mean[:, None, None]) / std[:, None, None]
        return x.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ steps
    def _to_chw_uint8(self, image: Any) -> np.ndarray:
        """Input -> uint8 ``[3, H, W]`` (RGB; alpha composited onto white, as transformers does)."""
        if isinstance(image, (str, os.PathLike)):
            image = _open(os.fspath(image))
        if isinstance(image, Image.Image):
            image = _pil_to_8bit(image)
            if self.do_convert_rgb:
                arr = np.array(_pil_to_rgb(image))
            else:
                arr = np.array(image)
        elif isinstance(image, np.ndarray):
            arr = _array_to_rgb(image) if self.do_convert_rgb else image
        else:
            raise TypeError(f"unsupported image type {type(image).__name__} ({image!r:.40}): use a PIL image, "
                            "a numpy array [H, W] or [H, W, C] (uint8, uint16, or float in [0, 1]) or a file path")
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3] after conversion, got shape "
                             f"{arr.shape} dtype {arr.dtype} (is do_convert_rgb off?)")
        if arr.size == 0:
            raise ValueError(f"image is empty (shape {arr.shape[:2]})")
        return np.ascontiguousarray(np.moveaxis(arr, -1, 0))

    def _output_hw(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        # torchvision-style shortest-edge resize: the long side is truncated, not rounded.
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)

    def _resize(self, chw: np.ndarray) -> np.ndarray:
        h, w = self._output_hw(chw.shape[1], chw.shape[2])
        return pil_resize(chw, h, w, self.resample)


def pil_resize(chw: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """uint8 [3, H, W] -> [3, h, w] through PIL, as transformers' PIL backend resizes."""
    pil = Image.fromarray(np.moveaxis(chw, 0, -1))
    resized = pil.resize((w, h), resample=Image.Resampling(int(resample)))
    return np.moveaxis(np.array(resized), -1, 0)


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _open(path: str) -> Image.Image:
    """A file path as transformers' ``load_image`` reads it: EXIF-rotated, then plain ``convert("RGB")``
    (16-bit and float images scaled to 8 bits first, see the module docstring).

    Images over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are a ValueError; PIL
    itself only warns up to twice the limit.
    """
    if os.path.isdir(path):
        raise ValueError(f"image path {path!r} is a directory, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                return _pil_to_8bit(im).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{found.group(1)} pixels" if found else "more pixels than allowed"
        raise ValueError(f"image {path!r} has {size}, over PIL's decompression-bomb limit of "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels; if you trust the file, "
                         "raise the limit before preparing it (`PIL.Image.MAX_IMAGE_PIXELS = <pixels>`, or None "
                         "to turn the check off)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"could not read image {path!r}: {e}") from e


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _pil_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, ``I``) and float (``F``) PIL images -> mode ``L``, scaled; others unchanged."""
    if image.mode not in _SIXTEEN_BIT_MODES and image.mode != "F":
        return image
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
    if image.mode == "F":
        return Image.fromarray(_float_to_uint8(arr, "a mode 'F' PIL image"), "L")
    return Image.fromarray(_uint16_to_uint8(arr, f"a mode {image.mode!r} PIL image"), "L")


def _uint16_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """0..65535 -> 0..255 by round(v * 255 / 65535) (so 65535 -> 255, 257 -> 1)."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"{what} is read as 16-bit (0..65535) but holds values {lo}..{hi}")
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """[0, 1] floats -> 0..255 by round(v * 255)."""
    x = arr.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds nan or inf; float images must hold values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} holds values in [{lo:g}, {hi:g}]; float images must hold values in [0, 1] "
                         "(scaled by 255); for 0..255 data pass a uint8 array (arr.astype(np.uint8))")
    return np.round(x * 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    # transformers composites transparency onto white (plain convert("RGB") would keep hidden colours).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, C] (C in 1, 3, 4) uint8 / uint16 / [0, 1] float -> [H, W, 3] uint8."""
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"numpy images must be non-empty [H, W] or [H, W, C] arrays, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = _uint16_to_uint8(arr, "a uint16 array")
    elif np.issubdtype(arr.dtype, np.floating):
        arr = _float_to_uint8(arr, f"a {arr.dtype} array")
    elif arr.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (0..255), uint16 (0..65535) or float (0..1), got dtype "
                         f"{arr.dtype}; if the values are 0..255, pass arr.astype(np.uint8)")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be [H, W] or [H, W, C] with C in (1, 3, 4), "
                         f"got shape {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def _pad_to_square(chw: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """LLaVA-1.5's expand2square: centre the image on a square of the mean colour."""
    c, h, w = chw.shape
    if h == w:
        return chw
    m = max(h, w)
    out = np.empty((c, m, m), dtype=chw.dtype)
    out[:] = np.asarray(color, dtype=chw.dtype)[:, None, None]
    if w > h:
        start = (m - h) // 2
        out[:, start:start + h, :] = chw
    else:
        start = (m - w) // 2
        out[:, :, start:start + w] = chw
    return out


def _center_crop(chw: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``center_crop``: floor offsets; zero-pads (centred, ceil) when the image is smaller."""
    _, h, w = chw.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return chw[:, top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros(chw.shape[:-2] + (new_h, new_w), dtype=chw.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = chw
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]
