"""Qwen2-VL / Qwen2.5-VL composition: vision tower -> merged-patch embeddings in place of the image
tokens -> the Qwen2 LM with multimodal RoPE.

M-RoPE positions (`rope_index`, transformers' `get_rope_index`): a text token's three components
(temporal, height, width) are all its running position; an image's tokens get (start, start + row,
start + column) over its merged-patch grid, and the text after it continues from start + max(rows,
cols). So a row's largest position is below its token count, and decoding continues at the row's
prompt length plus its rope delta (max position + 1 - length), not at the length. The positions are
computed on the host (they depend only on the ids and the static image grids) and travel in
`QwenVisualInputs`; the cache stores post-RoPE keys, so compression never needs them again.

Parameters: {"vision": `qwen2_vl_vision` params, "lm": llama params}.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vkv_jax.models import llama, qwen2_vl_vision
from vkv_jax.models.anyres import ImageLayout
from vkv_jax.models.config import QwenVLConfig

Grid = tuple[int, int, int]


@flax.struct.dataclass
class QwenVisualInputs:
    """The images of a batch. patches [N, C*T*P*P]: every image's patches, row by row (`QwenImageProcessor`);
    positions [3, B, S] int32 M-RoPE positions (0 on padding, as transformers); grids: each image's
    static (t, h, w) in patches; num_visual: static, the fewest visual tokens in any row."""

    patches: jax.Array
    positions: jax.Array
    grids: tuple[Grid, ...] = flax.struct.field(pytree_node=False, default=())
    num_visual: int = flax.struct.field(pytree_node=False, default=0)

    def astype(self, dtype) -> QwenVisualInputs:
        return self.replace(patches=jnp.asarray(self.patches, dtype), positions=jnp.asarray(self.positions, jnp.int32))

    def prefix(self, length: int) -> QwenVisualInputs:
        """The images of the prompts cut to their first `length` slots (the cut-off slots are text)."""
        return self.replace(positions=self.positions[:, :, :length])


def tokens_per_image(grid: Grid, merge: int) -> int:
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def image_layout(grid: Grid, merge: int) -> ImageLayout:
    """One image's tokens as an `ImageLayout`: a single merged-patch grid, row-major (what LightKV
    windows over)."""
    t, h, w = grid
    rows, cols = h // merge, w // merge
    n = t * rows * cols
    src = np.arange(n, dtype=np.int32)[:, None]
    return ImageLayout(1, (0, 0), src, np.ones(src.shape, np.float32),
                       tuple((f * rows * cols, rows, cols, cols) for f in range(t)))


def rope_index(input_ids: np.ndarray, valid: np.ndarray, grids: list[list[Grid]], image_token_id: int,
               merge: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `get_rope_index` for images. input_ids, valid [B, S]; grids[b]: row b's images in
    order (each image's tokens consecutive). Returns positions [3, B, S] int32 (0 on padding) and the
    rope deltas [B] (max position + 1 - real tokens). ValueError when a row's image tokens do not
    match its grids."""
    B, S = input_ids.shape
    out = np.zeros((3, B, S), np.int32)
    deltas = np.zeros(B, np.int32)
    for b in range(B):
        ids = input_ids[b][valid[b]]
        is_img = ids == image_token_id
        pos = np.zeros((3, len(ids)), np.int64)
        images = iter(grids[b])
        i, cur = 0, 0
        while i < len(ids):
            if not is_img[i]:
                j = i
                while j < len(ids) and not is_img[j]:
                    j += 1
                pos[:, i:j] = cur + np.arange(j - i)
                cur += j - i
                i = j
                continue
            grid = next(images, None)
            if grid is None:
                raise ValueError(f"row {b} has more image tokens than its {len(grids[b])} image(s) give")
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            n = t * h * w
            if not is_img[i:i + n].all() or len(ids[i:i + n]) != n:
                raise ValueError(f"row {b}: an image of {n} tokens ({t}x{h}x{w} merged patches) does not match "
                                 "its run of image tokens")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pos[:, i:i + n] = cur + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
            cur += max(h, w)
            i += n
        if next(images, None) is not None:
            raise ValueError(f"row {b} has fewer image tokens than its {len(grids[b])} image(s) need")
        out[:, b, valid[b]] = pos
        deltas[b] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    return out, deltas


def image_features(params: dict[str, Any], cfg: QwenVLConfig, vis: QwenVisualInputs) -> jax.Array:
    """Every image's merged-patch embeddings, image after image: [num_tokens, D]."""
    return qwen2_vl_vision.image_features(params["vision"], cfg.vision, vis.patches, vis.grids)


def merge_embeddings(params: dict[str, Any], cfg: QwenVLConfig, input_ids: jax.Array,
                     vis: QwenVisualInputs | None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with the visual features scattered into the image-token slots (row-major over
    the batch, as transformers' masked_scatter). input_ids [B, S] -> x [B, S, D], tags [B, S] int8."""
    is_image = input_ids == cfg.image_token_id
    x = llama.embed(params["lm"], jnp.where(is_image, 0, input_ids))
    if vis is None:
        return x, jnp.zeros(input_ids.shape, jnp.int8)
    feats = image_features(params, cfg, vis).astype(x.dtype)
    rank = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(input_ids.shape)
    return jnp.where(is_image[..., None], jnp.take(feats, rank, axis=0), x), is_image.astype(jnp.int8)


def prompt_embeddings(params: dict[str, Any], cfg: QwenVLConfig, input_ids: jax.Array, valid: jax.Array,
                      vis: QwenVisualInputs | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The family's `prompt_embeddings`: merged embeddings [B, S, D], tags [B, S] and M-RoPE positions."""
    x, tags = merge_embeddings(params, cfg, input_ids, vis)
    return x, tags, rope_positions(valid, vis)


def static_num_visual(cfg: QwenVLConfig, vis: QwenVisualInputs | None, batch: int) -> int:
    """Visual tokens per row known at trace time: the fewest of any row, 0 without images."""
    return 0 if vis is None else int(vis.num_visual)


def rope_positions(valid: jax.Array, vis: QwenVisualInputs | None) -> jax.Array:
    """RoPE positions of a prompt: [3, B, S] M-RoPE with images, else [B, S] (0 on padding)."""
    if vis is None:
        return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    return vis.positions


def next_positions(valid: jax.Array, vis: QwenVisualInputs | None) -> jax.Array:
    """[B] int32 RoPE position of each row's first generated token: its prompt length + rope delta."""
    if vis is None:
        return valid.sum(axis=1).astype(jnp.int32)
    return (jnp.where(valid[None], vis.positions, -1).max(axis=(0, 2)) + 1).astype(jnp.int32)


def synthetic_inputs(cfg: QwenVLConfig, batch: int, visual_tokens: int, text_tokens: int, seed: int = 0):
    """Random ids with `visual_tokens` image tokens per row after a 5-token preamble, one image per row
    of the most nearly square merged-patch grid with that many tokens, random patches and the ids' M-RoPE
    positions: input_ids [B, S] int32, `QwenVisualInputs`."""
    if visual_tokens <= 0:
        raise ValueError(f"--visual-tokens must be positive, got {visual_tokens}")
    rows = max(d for d in range(1, int(visual_tokens ** 0.5) + 1) if visual_tokens % d == 0)
    m = cfg.vision.spatial_merge_size
    grid = (1, rows * m, visual_tokens // rows * m)
    rng = np.random.default_rng(seed)
    hi = min(cfg.image_token_id, cfg.text.vocab_size)
    pre = min(5, text_tokens - 1)
    text = rng.integers(3, hi, (batch, text_tokens))
    ids = np.concatenate([text[:, :pre], np.full((batch, visual_tokens), cfg.image_token_id), text[:, pre:]], 1)
    ids = ids.astype(np.int32)
    positions, _ = rope_index(ids, np.ones(ids.shape, bool), [[grid]] * batch, cfg.image_token_id, m)
    patches = rng.uniform(-1, 1, (batch * grid[1] * grid[2], cfg.vision.patch_dim)).astype(np.float32)
    return ids, QwenVisualInputs(patches, positions, (grid,) * batch, num_visual=visual_tokens)
