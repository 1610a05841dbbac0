"""Write a parameter pytree as a Hugging Face LLaVA checkpoint (config.json + model.safetensors).

The keys are the legacy layout that transformers' `save_pretrained` writes by default, so the result
loads with `vkv_jax.load` and with transformers' `LlavaForConditionalGeneration.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from vkv_jax.models import llama, safetensors_io
from vkv_jax.models.config import LlavaConfig
from vkv_jax.models.llava import vision_layers_needed
from vkv_jax.models.loading import LM_LAYER_KEYS, TOP_LEVEL_KEYS, VISION_LAYER_KEYS


def hf_config_dict(cfg: LlavaConfig, dtype: str = "float32") -> dict[str, Any]:
    t, v = cfg.text, cfg.vision
    rope = {"rope_type": t.rope.kind, "rope_theta": t.rope.theta}
    if t.rope.kind == "linear":
        rope["factor"] = t.rope.factor
    elif t.rope.kind == "llama3":
        rope.update(factor=t.rope.factor, low_freq_factor=t.rope.low_freq_factor,
                    high_freq_factor=t.rope.high_freq_factor,
                    original_max_position_embeddings=t.rope.original_max_position_embeddings)
    layer = cfg.vision_feature_layer
    arch = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[cfg.model_type]
    extra: dict[str, Any] = {}
    if cfg.anyres:
        extra["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cfg.max_patches:
        extra["vision_aspect_ratio"] = f"anyres_max_{cfg.max_patches}"
    return {
        **extra,
        "architectures": [arch],
        "model_type": cfg.model_type,
        "dtype": dtype,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.num_image_tokens,
        "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps, "rope_parameters": rope, "attention_bias": t.attention_bias,
            "mlp_bias": t.mlp_bias, "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "projection_dim": v.hidden_size,
        },
    }


def _untransform(x: np.ndarray, how: str, cfg: LlavaConfig) -> np.ndarray:
    if how == "T":
        return np.ascontiguousarray(x.T)
    if how == "conv":
        v = cfg.vision
        return np.ascontiguousarray(x.T.reshape(v.hidden_size, v.num_channels, v.patch_size, v.patch_size))
    return np.ascontiguousarray(x)


def to_hf_tensors(params: dict[str, Any], cfg: LlavaConfig) -> dict[str, np.ndarray]:
    """Parameter pytree -> {legacy HF key: torch-layout numpy array}."""
    out: dict[str, np.ndarray] = {}
    legacy_top = {"lm_head.weight": "language_model.lm_head.weight"}
    for key, (path, how) in TOP_LEVEL_KEYS.items():
        node = params
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            continue
        hf_key = legacy_top.get(key, key)
        if hf_key.startswith("language_model.") and not hf_key.startswith("language_model.lm_head"):
            hf_key = "language_model.model." + hf_key[len("language_model."):]
        out[hf_key] = _untransform(np.asarray(node), how, cfg)
    for root, prefix, table, n in (
            ("lm", "language_model.model.layers", LM_LAYER_KEYS, cfg.text.num_layers),
            ("vision", "vision_tower.encoder.layers", VISION_LAYER_KEYS, vision_layers_needed(cfg))):
        layers = llama.stack_layers(params[root]["layers"])
        for suffix, (name, how) in table.items():
            if name not in layers:
                continue
            stacked = np.asarray(layers[name])
            for i in range(n):
                out[f"{prefix}.{i}.{suffix}"] = _untransform(stacked[i], how, cfg)
    return out


def save_checkpoint(directory: str | os.PathLike, params: dict[str, Any], cfg: LlavaConfig) -> None:
    """Write config.json and model.safetensors (the checkpoint's dtype is the parameters' dtype).

    Vision layers past the selected feature layer are not in `params`; the written config keeps only
    the layers that exist, which changes nothing LLaVA computes.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = to_hf_tensors(params, cfg)
    dtype = str(np.asarray(params["lm"]["embed"]).dtype)
    safetensors_io.save(os.path.join(directory, "model.safetensors"), tensors)
    used = vision_layers_needed(cfg)
    if used < cfg.vision.num_layers:
        idx = tuple(i if i >= 0 else cfg.vision.num_layers + 1 + i for i in cfg.feature_layers)
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=used),
                                  vision_feature_layer=idx[0] if len(idx) == 1 else idx)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
