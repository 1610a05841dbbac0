"""One benchmark setting (dtype, batch, visual and text tokens) and its synthetic inputs for any family."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from vkv_jax.models import anyres, family, qwen2_vl
from vkv_jax.models.config import LlavaConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Setting:
    dtype: str
    batch: int
    visual_tokens: int
    text_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def name(self) -> str:
        return f"{self.dtype}/b{self.batch}/v{self.visual_tokens}/s{self.prompt_tokens}"


# ---------------------------------------------------------------- inputs and byte counts

def make_inputs(cfg: LlavaConfig, batch: int, visual_tokens: int, text_tokens: int, seed: int = 0):
    """Random token ids with `visual_tokens` image tokens per row after a 5-token preamble (LLaVA's
    "USER: <image>\\n ..." layout), and random images. Returns input_ids [B, S] int32 and pixel_values
    [B * n_img, 3, H, W] float32 (n_img = visual_tokens / tokens per image); for LLaVA-NeXT / OneVision,
    `llava.VisualInputs` of one image per row whose anyres layout has exactly `visual_tokens` tokens."""
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2, got {text_tokens}")
    if family.is_qwen(cfg):
        return _qwen_inputs(cfg, batch, visual_tokens, text_tokens, seed)
    layout = _anyres_layout(cfg, visual_tokens) if cfg.anyres else None
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
    return ids, anyres.VisualInputs(pix, source, weight, num_visual=visual_tokens)


def _qwen_inputs(cfg, batch: int, visual_tokens: int, text_tokens: int, seed: int):
    """Qwen2-VL: one image per row of the most nearly square merged-patch grid with `visual_tokens`
    tokens, random patches, the ids' M-RoPE positions."""
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
    positions, _ = qwen2_vl.rope_index(ids, np.ones(ids.shape, bool), [[grid]] * batch, cfg.image_token_id, m)
    patches = rng.uniform(-1, 1, (batch * grid[1] * grid[2], cfg.vision.patch_dim)).astype(np.float32)
    return ids, qwen2_vl.QwenVisualInputs(patches, positions, (grid,) * batch, num_visual=visual_tokens)


def _anyres_layout(cfg: LlavaConfig, visual_tokens: int) -> anyres.ImageLayout:
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
