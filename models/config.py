"""Frozen model configs (static under jit), parsed from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2", "vicuna", "qwen2_vl_text", "qwen2_5_vl_text")
SUPPORTED_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


_REQUIRED = object()


def _field(d: dict[str, Any], key: str, kind: type, where: str, default: Any = _REQUIRED, minimum: Any = None):
    """d[key] converted to `kind` (int / float / str), or ValueError naming `where`.key and what is expected.

    A missing key takes `default` (None in the file counts as missing); without one it is an error.
    """
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json: {where} is missing the required field {key!r} ({kind.__name__})")
        return default
    if isinstance(value, bool) or (kind is not str and isinstance(value, (str, list, dict))) \
            or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"config.json: {where}.{key} must be {'an' if kind is int else 'a'} {kind.__name__}, "
                         f"got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config.json: {where}.{key} must be a {kind.__name__}, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"config.json: {where}.{key} must be >= {minimum}, got {value!r}")
    return out


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json has no {key!r} (a LLaVA config holds text_config and vision_config)")
    if not isinstance(cfg[key], dict):
        raise ValueError(f"config.json: {key} must be a JSON object, got {type(cfg[key]).__name__}")
    return cfg[key]


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
    # Qwen2-VL M-RoPE: frequencies [0, a) rotate by the temporal position, [a, a+b) by the height, the
    # rest by the width (positions [3, B, S]); empty = plain 1-D RoPE
    mrope_section: tuple[int, ...] = ()

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
    model_type: str = "clip_vision_model"  # or siglip_vision_model: no class token, no pre-LayerNorm

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"

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
    model_type: str = "llava"  # llava | llava_next | llava_onevision
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: (h, w) grid resolutions
    max_patches: int | None = None  # OneVision's vision_aspect_ratio "anyres_max_N"
    video_token_id: int | None = None  # OneVision: the id of video placeholders (visual slots like images')

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose slots hold visual features: the image token's (and the video token's)."""
        return (self.image_token_id,) + (() if self.video_token_id is None else (self.video_token_id,))

    @property
    def anyres(self) -> bool:
        """Images are tiled (base crop + grid tiles + image_newline tokens; `models.anyres`)."""
        return self.model_type in ("llava_next", "llava_onevision")

    @property
    def fixed_image_grid(self) -> bool:
        """Every image is one crop of the tower's own patch grid (LLaVA-1.5), so image layouts carry nothing
        the count does not."""
        return not self.anyres

    @property
    def features_per_crop(self) -> int:
        """Visual features one crop yields (the vision tower's patches, + CLS with the "full" strategy)."""
        full = self.vision_feature_select_strategy == "full" and self.vision.has_class_token
        return self.vision.num_patches + (1 if full else 0)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens one image contributes to the LM sequence (LLaVA-1.5); for anyres models the
        count depends on the image's size (`models.anyres.anyres_layout`): this is the base crop's."""
        return self.features_per_crop

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
    if kind == "mrope":  # Qwen2-VL's v4 name for default frequencies with `mrope_section`
        kind = "default"
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
    w = "text_config"
    hidden = _field(text, "hidden_size", int, w, minimum=1)
    heads = _field(text, "num_attention_heads", int, w, minimum=1)
    kv_heads = _field(text, "num_key_value_heads", int, w, default=heads, minimum=1)
    if heads % kv_heads:
        raise ValueError(f"config.json: text_config.num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    head_dim = _field(text, "head_dim", int, w, default=hidden // heads, minimum=1)
    if head_dim < 1 or head_dim % 2:
        raise ValueError(f"config.json: text_config head_dim must be a positive even number (RoPE rotates "
                         f"pairs), got {head_dim}")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported LM hidden_act {act!r}; supported: silu")
    qwen = model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
    rope_params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    mrope = rope_params.get("mrope_section")
    if model_type != "qwen2" and qwen:
        mrope = [16, 24, 24] if mrope is None else mrope  # transformers' default
        if (not isinstance(mrope, (list, tuple)) or len(mrope) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in mrope)
                or sum(mrope) != head_dim // 2):
            raise ValueError(f"config.json: text_config mrope_section must be 3 non-negative ints summing to "
                             f"head_dim / 2 = {head_dim // 2}, got {mrope!r}")
    return TextConfig(
        vocab_size=_field(text, "vocab_size", int, w, minimum=1),
        hidden_size=hidden,
        intermediate_size=_field(text, "intermediate_size", int, w, minimum=1),
        num_layers=_field(text, "num_hidden_layers", int, w, minimum=1),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_field(text, "rms_norm_eps", float, w, default=1e-6),
        rope=_rope_from_hf(text),
        # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias covers all four.
        attention_bias=bool(text.get("attention_bias", False)) or qwen,
        o_bias=bool(text.get("attention_bias", False)) and not qwen,
        mlp_bias=bool(text.get("mlp_bias", False)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        max_position_embeddings=_field(text, "max_position_embeddings", int, w, default=4096, minimum=1),
        mrope_section=tuple(mrope) if qwen and model_type != "qwen2" else (),
    )


def vision_config_from_hf(vision: dict[str, Any]) -> VisionConfig:
    model_type = vision.get("model_type", "clip_vision_model")
    if model_type not in SUPPORTED_VISION_TYPES:
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: {SUPPORTED_VISION_TYPES}")
    siglip = model_type == "siglip_vision_model"
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported vision hidden_act {act!r}; supported: quick_gelu, gelu, gelu_pytorch_tanh")
    w = "vision_config"
    image_size = _field(vision, "image_size", int, w, minimum=1)
    patch_size = _field(vision, "patch_size", int, w, minimum=1)
    if patch_size > image_size:
        raise ValueError(f"config.json: vision_config.patch_size ({patch_size}) exceeds image_size ({image_size})")
    return VisionConfig(
        hidden_size=_field(vision, "hidden_size", int, w, minimum=1),
        intermediate_size=_field(vision, "intermediate_size", int, w, minimum=1),
        num_layers=_field(vision, "num_hidden_layers", int, w, minimum=1),
        num_heads=_field(vision, "num_attention_heads", int, w, minimum=1),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=_field(vision, "num_channels", int, w, default=3, minimum=1),
        layer_norm_eps=_field(vision, "layer_norm_eps", float, w, default=1e-6 if siglip else 1e-5),
        hidden_act=act,
        model_type=model_type,
    )


def _feature_layers(layer: Any, num_layers: int) -> tuple[int, ...]:
    """vision_feature_layer (an int or a list of ints, HF hidden_states indices) -> a checked tuple."""
    layers = [layer] if isinstance(layer, int) and not isinstance(layer, bool) else layer
    if not isinstance(layers, (list, tuple)) or not layers \
            or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise ValueError(f"config.json: vision_feature_layer must be an int or a list of ints, got {layer!r}")
    for x in layers:  # hidden_states has num_layers + 1 entries (embeddings, then one per layer)
        if not -(num_layers + 1) <= x <= num_layers:
            raise ValueError(f"config.json: vision_feature_layer {x} is out of range for a {num_layers}-layer "
                             f"vision tower: use {-(num_layers + 1)}..{num_layers}")
    return tuple(layers)


SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
# transformers' LlavaNextConfig default when the file has none
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def max_patches_from_aspect_ratio(value: Any) -> int:
    """OneVision's vision_aspect_ratio "anyres_max_N" -> N."""
    if not isinstance(value, str) or not value.startswith("anyres_max_") or not value[11:].isdigit() \
            or int(value[11:]) < 1:
        raise ValueError(f"config.json: unsupported vision_aspect_ratio {value!r}; supported: 'anyres_max_N' (N >= 1)")
    return int(value[11:])


def llava_config_from_hf(cfg: dict[str, Any]) -> LlavaConfig:
    """Parse a HF LLaVA / LLaVA-NeXT / LLaVA-OneVision `config.json` dict; unsupported architectures
    raise ValueError."""
    from vkv_jax.models.anyres import check_pinpoints

    if not isinstance(cfg, dict):
        raise ValueError(f"config.json must hold a JSON object, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"a LLaVA config needs model_type in {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    text, vision = _section(cfg, "text_config"), _section(cfg, "vision_config")
    onevision = model_type == "llava_onevision"
    layer = cfg.get("vision_feature_layer", -1 if onevision else -2)
    strategy = cfg.get("vision_feature_select_strategy", "full" if onevision else "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; supported: default, full")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "silu", "relu"):
        raise ValueError(f"unsupported projector_hidden_act {act!r}")
    token_key = "image_token_index" if cfg.get("image_token_index") is not None else "image_token_id"
    image_token = _field(cfg, token_key, int, "config", default=32000, minimum=0)
    vision_cfg = vision_config_from_hf(vision)
    layers = _feature_layers(layer, vision_cfg.num_layers)
    anyres: dict[str, Any] = {}
    if model_type != "llava":
        pinpoints = cfg.get("image_grid_pinpoints")
        anyres["image_grid_pinpoints"] = check_pinpoints(DEFAULT_PINPOINTS if pinpoints is None else pinpoints,
                                                         vision_cfg.image_size)
        has_cls = vision_cfg.has_class_token
        if (strategy == "full") == has_cls:  # the tile grid must be exactly side x side features per crop
            raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r} with a "
                             f"{vision_cfg.model_type} tower is not supported for {model_type} (anyres needs "
                             f"{vision_cfg.image_size // vision_cfg.patch_size}^2 features per crop)")
        if onevision:
            anyres["max_patches"] = max_patches_from_aspect_ratio(cfg.get("vision_aspect_ratio", "anyres_max_9"))
            video_key = "video_token_index" if cfg.get("video_token_index") is not None else "video_token_id"
            anyres["video_token_id"] = _field(cfg, video_key, int, "config", default=151647, minimum=0)
    return LlavaConfig(
        model_type=model_type,
        **anyres,
        text=text_config_from_hf(text),
        vision=vision_cfg,
        image_token_id=image_token,
        vision_feature_layer=layers[0] if isinstance(layer, int) else layers,
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


# ---- Qwen2-VL / Qwen2.5-VL ----

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The native-resolution vision transformer of Qwen2-VL (LayerNorm + MLP blocks, full attention per
    image) and Qwen2.5-VL (RMSNorm + SwiGLU blocks, windowed attention except `fullatt_blocks`)."""

    hidden_size: int  # the tower's width (Qwen2-VL's `embed_dim`)
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_hidden_size: int  # the patch merger's output: the LM's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    windowed: bool = False  # Qwen2.5-VL
    window_size: int = 112  # pixels
    fullatt_blocks: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C x temporal x patch x patch."""
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Qwen2-VL / Qwen2.5-VL: vision tower + 2x2 patch merger + Qwen2 LM with M-RoPE."""

    text: TextConfig
    vision: QwenVisionConfig
    image_token_id: int
    model_type: str = "qwen2_vl"
    video_token_id: int | None = None
    vision_start_token_id: int | None = None

    anyres = False  # the LLaVA tiling path never applies
    fixed_image_grid = False  # native resolution: every image has its own grid

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose slots hold visual features (images only: videos are not read)."""
        return (self.image_token_id,)


def qwen_vl_config_from_hf(cfg: dict[str, Any]) -> QwenVLConfig:
    """Parse a Qwen2-VL / Qwen2.5-VL `config.json` (transformers v5 `text_config`, or v4's text fields at
    the top level)."""
    model_type = cfg["model_type"]
    text = dict(cfg["text_config"]) if isinstance(cfg.get("text_config"), dict) else \
        {k: v for k, v in cfg.items() if k not in ("vision_config", "model_type")}
    text["model_type"] = f"{model_type}_text"
    if cfg.get("tie_word_embeddings"):  # v5 keeps it at the top level, v4 inside the text fields
        text["tie_word_embeddings"] = True
    vision = _section(cfg, "vision_config")
    w = "vision_config"
    qwen25 = model_type == "qwen2_5_vl"
    width = _field(vision, "hidden_size" if qwen25 else "embed_dim", int, w, default=3584 if qwen25 else 1280,
                   minimum=1)
    heads = _field(vision, "num_heads", int, w, default=16, minimum=1)
    if width % heads or (width // heads) % 4:
        raise ValueError(f"config.json: vision_config width {width} / num_heads {heads} must be a multiple of 4 "
                         "(the 2-D rotary embedding splits each head in four)")
    act = vision.get("hidden_act", "silu" if qwen25 else "quick_gelu")
    if act not in ("quick_gelu", "gelu", "silu", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported vision hidden_act {act!r}; supported: quick_gelu, gelu, silu, "
                         "gelu_pytorch_tanh")
    text_cfg = text_config_from_hf(text)
    depth = _field(vision, "depth", int, w, default=32, minimum=1)
    out = _field(vision, "out_hidden_size" if qwen25 else "hidden_size", int, w, default=text_cfg.hidden_size)
    if out != text_cfg.hidden_size:
        raise ValueError(f"config.json: the vision merger's output ({out}) must equal the LM's hidden_size "
                         f"({text_cfg.hidden_size})")
    inter = (_field(vision, "intermediate_size", int, w, default=3420, minimum=1) if qwen25
             else width * _field(vision, "mlp_ratio", int, w, default=4, minimum=1))
    full = tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))) if qwen25 else ()
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in full):
        raise ValueError(f"config.json: vision_config.fullatt_block_indexes must be layer indices in "
                         f"[0, {depth}), got {list(full)}")
    vrope = vision.get("rope_parameters") or {}
    vis = QwenVisionConfig(
        hidden_size=width, intermediate_size=inter, num_layers=depth, num_heads=heads, out_hidden_size=out,
        patch_size=_field(vision, "patch_size", int, w, default=14, minimum=1),
        temporal_patch_size=_field(vision, "temporal_patch_size", int, w, default=2, minimum=1),
        spatial_merge_size=_field(vision, "spatial_merge_size", int, w, default=2, minimum=1),
        num_channels=_field(vision, "in_channels" if "in_channels" in vision else "in_chans", int, w, default=3,
                            minimum=1),  # the hub's configs say in_chans
        hidden_act=act, rope_theta=float(vrope.get("rope_theta", 10000.0)), windowed=qwen25,
        window_size=_field(vision, "window_size", int, w, default=112, minimum=1), fullatt_blocks=full)
    if qwen25 and vis.window_size // vis.spatial_merge_size // vis.patch_size < 1:
        raise ValueError(f"config.json: vision_config.window_size {vis.window_size} is smaller than one merged "
                         f"patch ({vis.spatial_merge_size * vis.patch_size} pixels)")
    return QwenVLConfig(
        text=text_cfg, vision=vis, model_type=model_type,
        image_token_id=_field(cfg, "image_token_id", int, "config", default=151655, minimum=0),
        video_token_id=_field(cfg, "video_token_id", int, "config", default=151656, minimum=0),
        vision_start_token_id=_field(cfg, "vision_start_token_id", int, "config", default=151652, minimum=0))
