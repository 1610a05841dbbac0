"""AnyRes visual-token layouts (LLaVA-NeXT, LLaVA-OneVision), computed on the host as transformers does.

An anyres image goes through the vision tower as several square crops: the whole image resized to the
tower's size (the *base* crop) and the tiles of the image resized and padded to the best-fitting grid
resolution (`image_grid_pinpoints`). transformers then lays the tiles' features out as one large grid,
crops away the rows / columns that only saw padding (`unpad_image`), optionally shrinks the grid
bilinearly (OneVision's `anyres_max_N`), and appends an `image_newline` embedding after every grid row.

The shapes of all of that depend on the image size, so here it is reduced to a static description that
`llava.merge_embeddings` applies inside jit: for every visual token of an image, up to K feature rows it
is a weighted sum of (`ImageLayout.source` / `weight`, K = 1 except for bilinear downsampling), indexing
the image's crops' features flattened as [n_crops * P] with `NEWLINE` standing for `image_newline`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NEWLINE = -1  # a source index meaning "the image_newline embedding"


@flax.struct.dataclass
class VisualInputs:
    """The images of a batch whose rows differ in visual tokens (anyres tiling, several images per row).

    pixels [N, C, H, W]: every crop of every image, row by row (an image's crops consecutive).
    source [B, S, K] int32: for each slot, K rows of the feature table [N * P + 1] (crop n's feature p
      is row n * P + p; the last row is image_newline) whose `weight`-ed sum it holds; 0 on text slots.
    weight [B, S, K] float32 (K = 1 unless a grid was downsampled bilinearly).
    num_visual: static, the fewest visual tokens in any row (what `PrefillContext.num_visual` bounds).
    """

    pixels: jax.Array
    source: jax.Array
    weight: jax.Array
    num_visual: int = flax.struct.field(pytree_node=False, default=0)

    def astype(self, dtype) -> VisualInputs:
        return self.replace(pixels=jnp.asarray(self.pixels, dtype), source=jnp.asarray(self.source, jnp.int32),
                            weight=jnp.asarray(self.weight, jnp.float32))

    def prefix(self, length: int) -> VisualInputs:
        """The images of the prompts cut to their first `length` slots (the cut-off slots are text)."""
        return self.replace(source=self.source[:, :length], weight=self.weight[:, :length])


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the (h, w) pinpoint keeping the most of the image's pixels
    when it is scaled to fit, ties to the least wasted area, then to the earlier pinpoint."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def check_pinpoints(pinpoints, crop: int) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints from a config -> a tuple of (h, w) pairs, each a multiple of the crop size."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    out = []
    for p in pinpoints:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in p)):
            raise ValueError(f"image_grid_pinpoints entry {p!r} is not a [height, width] pair of positive ints")
        if p[0] % crop or p[1] % crop:
            raise ValueError(f"unsupported image_grid_pinpoints entry {list(p)}: both sides must be multiples of the "
                             f"vision tower's image_size ({crop}); the tiles are {crop}x{crop} crops")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


def unpadded_extent(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """transformers' `unpad_image` on a [rows, cols] feature grid of an image of (height, width):
    the kept rows [r0, r1) and columns [c0, c1)."""
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = int(round(width * (rows / height), 7))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch `interpolate(mode="bilinear", align_corners=False)` along one axis: for each output index the
    two input indices and their weights (i0, i1, w1), w0 = 1 - w1; the scale is n_in / n_out."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How one image becomes visual tokens.

    num_crops: crops through the vision tower (base first, then tiles row-major)
    grid:      (rows, cols) of tiles, (0, 0) for an image sent as its base crop only
    source:    [T, K] int32 feature row of each token in the image's [num_crops * P] features, or NEWLINE
    weight:    [T, K] float32 (K = 1: all ones)
    regions:   ((start, rows, cols, stride), ...) the token spans that form 2-D grids: the base crop, then
               the unpadded (downsampled) tile grid, whose rows are `stride` tokens apart (cols + 1 with
               newlines, which belong to no grid); what LightKV windows over
    kind:      "image" or "video" (OneVision: frames as crops, `video_layout`)
    """

    num_crops: int
    grid: tuple[int, int]
    source: np.ndarray
    weight: np.ndarray
    regions: tuple[tuple[int, int, int], ...]
    kind: str = "image"

    @property
    def num_tokens(self) -> int:
        return int(self.source.shape[0])


@functools.lru_cache(maxsize=4096)
def anyres_layout(height: int, width: int, crop: int, side: int, pinpoints: tuple, newline: bool = True,
                  max_patches: int | None = None, tile: bool = True) -> ImageLayout:
    """The layout of an image of (height, width) pixels.

    crop: the vision tower's image size; side: features per crop side (crop // patch), P = side**2;
    pinpoints: ((h, w), ...); max_patches: OneVision's anyres_max_N (bilinear downsampling of the tile
    grid when it exceeds N crops' worth of features by more than 10%); tile=False: the base crop only
    (followed by one newline), as OneVision lays out the images of a multi-image prompt.
    """
    P = side * side
    base = np.arange(P, dtype=np.int32)
    if not tile:
        src = np.concatenate([base, [NEWLINE] if newline else []]).astype(np.int32)[:, None]
        return ImageLayout(1, (0, 0), src, np.ones(src.shape, np.float32), ((0, side, side, side),))
    bh, bw = select_best_resolution(height, width, pinpoints)
    rows, cols = bh // crop, bw // crop
    H, W = rows * side, cols * side
    r0, r1, c0, c1 = unpadded_extent(H, W, height, width)
    Y, X = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    # feature row of grid cell (Y, X): crop 1 + tile (Y // side, X // side), cell (Y % side, X % side)
    cell = (1 + (Y // side) * cols + X // side) * P + (Y % side) * side + X % side  # [h, w]
    h, w = cell.shape
    ratio = math.sqrt(h * w / (max_patches * side ** 2)) if max_patches else 0.0
    if ratio > 1.1:
        oh, ow = int(h // ratio), int(w // ratio)
        y0, y1, wy = bilinear_taps(h, oh)
        x0, x1, wx = bilinear_taps(w, ow)
        src = np.stack([cell[y0][:, x0], cell[y0][:, x1], cell[y1][:, x0], cell[y1][:, x1]], -1)  # [oh, ow, 4]
        wy, wx = wy[:, None], wx[None, :]
        wts = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1).astype(np.float32)
        h, w = oh, ow
    else:
        src, wts = cell[..., None], np.ones(cell.shape + (1,), np.float32)
    K = src.shape[-1]
    if newline:  # one newline token after every grid row
        src = np.concatenate([src, np.full((h, 1, K), NEWLINE)], axis=1)
        nl = np.zeros((h, 1, K), np.float32)
        nl[..., 0] = 1.0
        wts = np.concatenate([wts, nl], axis=1)
    src = np.concatenate([np.pad(base[:, None], [(0, 0), (0, K - 1)]), src.reshape(-1, K)]).astype(np.int32)
    wts = np.concatenate([np.pad(np.ones((P, 1), np.float32), [(0, 0), (0, K - 1)]), wts.reshape(-1, K)])
    regions = ((0, side, side, side), (P, h, w, w + int(newline)))
    return ImageLayout(1 + rows * cols, (rows, cols), src, wts.astype(np.float32), regions)


@functools.lru_cache(maxsize=256)
def video_layout(frames: int, side: int) -> ImageLayout:
    """The layout of a OneVision video of `frames` frames (transformers' `get_video_features`): each frame
    is one crop through the tower, its side x side feature grid pooled bilinearly to ceil(side / 2) per
    side (`apply_pooling`: torch interpolate, align_corners=False), the frames' pooled grids in order, then
    ONE image_newline token after the last frame (not one per grid row as for images)."""
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    out = -(-side // 2)
    y0, y1, wy = bilinear_taps(side, out)
    x0, x1, wx = bilinear_taps(side, out)
    cell = np.arange(side * side).reshape(side, side)
    src = np.stack([cell[y0][:, x0], cell[y0][:, x1], cell[y1][:, x0], cell[y1][:, x1]], -1).reshape(-1, 4)
    wy, wx = wy[:, None], wx[None, :]
    wts = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1).reshape(-1, 4)
    P, T = side * side, out * out
    src = np.concatenate([src + f * P for f in range(frames)] + [[[NEWLINE, 0, 0, 0]]]).astype(np.int32)
    wts = np.concatenate([wts] * frames + [[[1.0, 0.0, 0.0, 0.0]]]).astype(np.float32)
    return ImageLayout(frames, (0, 0), src, wts, tuple((f * T, out, out, out) for f in range(frames)), "video")


def plain_layout(num_tokens: int, side: int) -> ImageLayout:
    """A LLaVA-1.5 image: one crop, its `num_tokens` features in order (a class token first when
    num_tokens = side**2 + 1)."""
    src = np.arange(num_tokens, dtype=np.int32)[:, None]
    return ImageLayout(1, (0, 0), src, np.ones(src.shape, np.float32),
                       ((num_tokens - side * side, side, side, side),))


def pack_visual(input_ids: np.ndarray, image_token_id: int | tuple[int, ...], layouts: list[list[ImageLayout]],
                features_per_crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot feature sources of a batch. input_ids [B, S] with each row's image tokens (any of the ids
    `image_token_id`: image and video placeholders) in the order of `layouts[b]` (one ImageLayout per
    image or video; crops numbered row by row, image by image).

    Returns source [B, S, K] int32 into the feature table [N * P + 1] (the last row = image_newline; 0 on
    text slots) and weight [B, S, K] float32, K the widest layout's. Raises ValueError when a row's image
    tokens do not add up to its images' tokens.
    """
    B, S = input_ids.shape
    P = features_per_crop
    K = max([lay.source.shape[1] for row in layouts for lay in row], default=1)
    total = sum(lay.num_crops for row in layouts for lay in row)
    source = np.zeros((B, S, K), np.int32)
    weight = np.zeros((B, S, K), np.float32)
    crop = 0
    for b, row in enumerate(layouts):
        slots = np.nonzero(np.isin(input_ids[b], image_token_id))[0]
        need = sum(lay.num_tokens for lay in row)
        if len(slots) != need:
            raise ValueError(f"row {b} holds {len(slots)} image tokens (id {image_token_id}) but its "
                             f"{len(row)} image(s) need {need}")
        at = 0
        for lay in row:
            src = np.where(lay.source == NEWLINE, total * P, lay.source + crop * P)
            k = src.shape[1]
            idx = slots[at:at + lay.num_tokens]
            source[b, idx, :k] = src
            weight[b, idx, :k] = lay.weight
            at += lay.num_tokens
            crop += lay.num_crops
    return source, weight


def model_layout(cfg, height: int, width: int, tile: bool = True) -> ImageLayout:
    """The layout an image of (height, width) gets under an anyres `LlavaConfig`."""
    v = cfg.vision
    return anyres_layout(int(height), int(width), v.image_size, v.image_size // v.patch_size, cfg.image_grid_pinpoints,
                         True, cfg.max_patches, tile)


def row_regions(layouts: list[ImageLayout]) -> tuple[tuple[int, int, int, int], ...]:
    """One row's image grids in the row's visual ordinals (0.. across its images, the order of its image
    tokens): each image's `regions` shifted by the visual tokens of the images before it."""
    at, out = 0, []
    for lay in layouts:
        out += [(at + start, rows, cols, stride) for start, rows, cols, stride in lay.regions]
        at += lay.num_tokens
    return tuple(out)


def region_tokens(region: tuple[int, int, int, int]) -> np.ndarray:
    """[rows, cols] int: the visual ordinals of a (start, rows, cols, stride) grid, raster order (a row
    starts `stride` tokens after the previous one: newline tokens sit between)."""
    start, rows, cols, stride = region
    return start + stride * np.arange(rows)[:, None] + np.arange(cols)[None, :]
