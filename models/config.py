"""Frozen model configs (static under jit), parsed from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2", "vicuna")
SUPPORTED_VISION_TYPES = ("clip_vision_model",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False  # q/k/v (and o, Llama-style) projection biases
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # default drops CLS, full keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_layers: int = 2  # 2 = mlp2x_gelu, 1 = plain linear

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens one image contributes to the LM sequence."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layers = self.vision_feature_layer
        return (layers,) if isinstance(layers, int) else tuple(layers)


def _rope_from_hf(text: dict[str, Any]) -> RopeConfig:
    # transformers v5 writes `rope_parameters`; v4 checkpoints carry `rope_theta` + `rope_scaling`.
    params = dict(text.get("rope_parameters") or {})
    scaling = text.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope type {kind!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def text_config_from_hf(text: dict[str, Any]) -> TextConfig:
    model_type = text.get("model_type", "llama")
    if model_type not in SUPPORTED_TEXT_TYPES:
        raise ValueError(f"unsupported text model_type {model_type!r}; supported: {SUPPORTED_TEXT_TYPES}")
    if text.get("sliding_window") and text.get("use_sliding_window", model_type == "mistral"):
        # Mistral-7B-v0.2+ sets sliding_window null; v0.1's 4096 window matters only past 4096 tokens.
        if int(text["sliding_window"]) < int(text.get("max_position_embeddings", 0) or 0):
            raise ValueError("sliding-window attention is not supported (set sliding_window to null)")
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported LM hidden_act {act!r}; supported: silu")
    qwen = model_type == "qwen2"
    return TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(text),
        # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias covers all four.
        attention_bias=bool(text.get("attention_bias", False)) or qwen,
        o_bias=bool(text.get("attention_bias", False)) and not qwen,
        mlp_bias=bool(text.get("mlp_bias", False)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
    )


def vision_config_from_hf(vision: dict[str, Any]) -> VisionConfig:
    model_type = vision.get("model_type", "clip_vision_model")
    if model_type not in SUPPORTED_VISION_TYPES:
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: {SUPPORTED_VISION_TYPES}")
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported vision hidden_act {act!r}; supported: quick_gelu, gelu")
    return VisionConfig(
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_layers=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        num_channels=int(vision.get("num_channels", 3)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        hidden_act=act,
    )


def llava_config_from_hf(cfg: dict[str, Any]) -> LlavaConfig:
    """Parse a HF LLaVA `config.json` dict; unsupported architectures raise ValueError."""
    if cfg.get("model_type") != "llava":
        raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}; vkv_jax loads 'llava' checkpoints")
    for key in ("text_config", "vision_config"):
        if key not in cfg:
            raise ValueError(f"config.json has no {key!r}")
    layer = cfg.get("vision_feature_layer", -2)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; supported: default, full")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "silu", "relu"):
        raise ValueError(f"unsupported projector_hidden_act {act!r}")
    image_token = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
    return LlavaConfig(
        text=text_config_from_hf(cfg["text_config"]),
        vision=vision_config_from_hf(cfg["vision_config"]),
        image_token_id=int(image_token),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(int(x) for x in layer),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        projector_layers=int(cfg.get("projector_layers", 2)),
    )


def rope_inv_freq(cfg: TextConfig):
    """Inverse frequencies [head_dim // 2] (numpy float32), as transformers computes them."""
    import numpy as np

    rope = cfg.rope
    dim = cfg.head_dim
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv
