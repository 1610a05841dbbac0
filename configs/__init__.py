"""Model shape presets (JSON), loaded with `vkv_jax.configs.load_preset`.

A preset names an LM + vision tower shape (random weights are drawn by the caller) and the default
number of visual tokens per prompt: for LLaVA-1.5 shapes a multiple of the tower's tokens per image; for
anyres presets (`model_type` llava_next / llava_onevision, with `image_grid_pinpoints`) the count of one
image of the size `image` [h, w] under the real tiling (`models.anyres`); Qwen2-VL presets hold a
config.json dict (`hf_config`) and count `image` at its native resolution (`smart_resize`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: Any  # vkv_jax.models.config.LlavaConfig
    visual_tokens: int
    raw: dict


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """A preset by name (`llava-1.5-7b`, `llava-next-7b-mistral`, `cpu-156m`, `smoke`) or by JSON path."""
    from vkv_jax.models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig

    path = pathlib.Path(name_or_path)
    if not path.suffix == ".json" or not path.exists():
        path = HERE / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"no preset {str(name_or_path)!r}; available: {', '.join(available())} "
                                "(or a path to a .json preset)")
    raw = json.loads(path.read_text())
    if "hf_config" in raw:  # Qwen2-VL / Qwen2.5-VL: a config.json dict; the count of one `image` [h, w]
        from vkv_jax.models import family
        from vkv_jax.models.qwen2_vl_processor import smart_resize

        cfg = family.config_from_hf(raw["hf_config"])
        factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
        h, w = smart_resize(*raw["image"], factor, int(raw["min_pixels"]), int(raw["max_pixels"]))
        return Preset(raw.get("name", path.stem), raw.get("description", ""), cfg, (h // factor) * (w // factor), raw)
    t = dict(raw["text"])
    theta = float(t.pop("rope_theta", 10000.0))
    text = TextConfig(**t, rope=RopeConfig(theta=theta))
    vision = VisionConfig(**raw["vision"])
    anyres_kw = {}
    if raw.get("model_type", "llava") != "llava":
        from vkv_jax.models.anyres import check_pinpoints
        from vkv_jax.models.config import max_patches_from_aspect_ratio

        anyres_kw = dict(model_type=raw["model_type"],
                         image_grid_pinpoints=check_pinpoints(raw["image_grid_pinpoints"], vision.image_size))
        if raw.get("vision_aspect_ratio"):
            anyres_kw["max_patches"] = max_patches_from_aspect_ratio(raw["vision_aspect_ratio"])
    cfg = LlavaConfig(text=text, vision=vision, image_token_id=int(raw["image_token_id"]),
                      vision_feature_layer=raw.get("vision_feature_layer", -2),
                      vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"), **anyres_kw)
    if cfg.anyres:
        from vkv_jax.models.anyres import model_layout

        visual = model_layout(cfg, *raw["image"]).num_tokens
        if int(raw.get("visual_tokens", visual)) != visual:
            raise ValueError(f"preset {path}: visual_tokens {raw['visual_tokens']} != the {visual} tokens of a "
                             f"{raw['image']} image")
    else:
        visual = int(raw.get("visual_tokens", cfg.num_image_tokens))
    return Preset(raw.get("name", path.stem), raw.get("description", ""), cfg, visual, raw)
