"""Load a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory into the parameter pytree.

Two key layouts are read: the hub's (`model.layers.*`, `visual.*`, `lm_head`) and transformers v5's
(`model.language_model.*`, `model.visual.*`). The LM's tensors map onto the Llama layout through
`loading.LM_LAYER_KEYS`; the vision tower's onto `qwen2_vl_vision`'s. Every tensor is checked as it is
read (shape against config.json, floating dtype, finite values), as `loading.load_params` does.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vkv_jax.models import sharding
from vkv_jax.models.config import QwenVLConfig
from vkv_jax.models.loading import LM_LAYER_KEYS, check_stored, random_params_from_shapes
from vkv_jax.models.safetensors_io import SafetensorsFile, checkpoint_files

VISION_BLOCK_KEYS = {
    "norm1.weight": "norm1_scale", "norm1.bias": "norm1_bias",
    "norm2.weight": "norm2_scale", "norm2.bias": "norm2_bias",
    "attn.qkv.weight": "qkv", "attn.qkv.bias": "qkv_bias", "attn.proj.weight": "o", "attn.proj.bias": "o_bias",
    "mlp.fc1.weight": "fc1", "mlp.fc1.bias": "fc1_bias", "mlp.fc2.weight": "fc2", "mlp.fc2.bias": "fc2_bias",
    "mlp.gate_proj.weight": "gate", "mlp.gate_proj.bias": "gate_bias", "mlp.up_proj.weight": "up",
    "mlp.up_proj.bias": "up_bias", "mlp.down_proj.weight": "down", "mlp.down_proj.bias": "down_bias",
}
TOP_KEYS = {
    "lm_head.weight": ("lm", "lm_head"), "language_model.embed_tokens.weight": ("lm", "embed"),
    "language_model.norm.weight": ("lm", "final_norm"), "visual.patch_embed.proj.weight": ("vision", "patch_embed"),
    "visual.merger.ln_q.weight": ("vision", "merger", "norm_scale"),
    "visual.merger.ln_q.bias": ("vision", "merger", "norm_bias"),
    "visual.merger.mlp.0.weight": ("vision", "merger", "w1"), "visual.merger.mlp.0.bias": ("vision", "merger", "b1"),
    "visual.merger.mlp.2.weight": ("vision", "merger", "w2"), "visual.merger.mlp.2.bias": ("vision", "merger", "b2"),
}
_LAYER_RE = re.compile(r"^(language_model|visual\.blocks)\.(\d+)\.(.+)$")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def normalize_key(key: str) -> str:
    """Either layout -> `language_model.* / visual.* / lm_head.*`."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key.startswith(("layers.", "embed_tokens.", "norm.")):
        key = "language_model." + key
    return key.replace("language_model.layers.", "language_model.", 1)


def param_shapes(cfg: QwenVLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's shape in our layout (layer weights stacked on a leading axis)."""
    t, v = cfg.text, cfg.vision
    L, D, F = t.num_layers, t.hidden_size, t.intermediate_size
    qd, kd = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    Lv, E, Fv, M = v.num_layers, v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    shapes = {
        ("lm", "embed"): (t.vocab_size, D), ("lm", "final_norm"): (D,),
        ("lm", "layers", "attn_norm"): (L, D), ("lm", "layers", "mlp_norm"): (L, D),
        ("lm", "layers", "q"): (L, D, qd), ("lm", "layers", "k"): (L, D, kd), ("lm", "layers", "v"): (L, D, kd),
        ("lm", "layers", "q_bias"): (L, qd), ("lm", "layers", "k_bias"): (L, kd), ("lm", "layers", "v_bias"): (L, kd),
        ("lm", "layers", "o"): (L, qd, D), ("lm", "layers", "gate"): (L, D, F), ("lm", "layers", "up"): (L, D, F),
        ("lm", "layers", "down"): (L, F, D),
        ("vision", "patch_embed"): (v.patch_dim, E),
        ("vision", "merger", "norm_scale"): (E,), ("vision", "merger", "w1"): (M, M), ("vision", "merger", "b1"): (M,),
        ("vision", "merger", "w2"): (M, D), ("vision", "merger", "b2"): (D,),
    }
    if not t.tie_word_embeddings:
        shapes[("lm", "lm_head")] = (D, t.vocab_size)
    block = {"norm1_scale": (E,), "norm2_scale": (E,), "qkv": (E, 3 * E), "qkv_bias": (3 * E,), "o": (E, E),
             "o_bias": (E,)}
    if v.windowed:  # RMSNorm, SwiGLU
        block.update({"gate": (E, Fv), "gate_bias": (Fv,), "up": (E, Fv), "up_bias": (Fv,), "down": (Fv, E),
                      "down_bias": (E,)})
    else:  # LayerNorm, MLP
        block.update({"norm1_bias": (E,), "norm2_bias": (E,), "fc1": (E, Fv), "fc1_bias": (Fv,), "fc2": (Fv, E),
                      "fc2_bias": (E,)})
        shapes[("vision", "merger", "norm_bias")] = (E,)
    shapes.update({("vision", "layers", n): (Lv,) + s for n, s in block.items()})
    return shapes


def _target(key: str) -> tuple[tuple[str, ...], int | None] | None:
    if key in TOP_KEYS:
        return TOP_KEYS[key], None
    m = _LAYER_RE.match(key)
    if m is None:
        return None
    tower, idx, rest = m.groups()
    if tower == "language_model":
        name = LM_LAYER_KEYS.get(rest, (None,))[0]
        return (("lm", "layers", name), int(idx)) if name else None
    name = VISION_BLOCK_KEYS.get(rest)
    return (("vision", "layers", name), int(idx)) if name else None


def _to_ours(x: np.ndarray, tpath: tuple[str, ...]) -> np.ndarray:
    """HF tensor -> our layout: linear weights transposed to [in, out], the Conv3d flattened to
    [C*T*P*P, E] (the processor's patch order)."""
    if tpath == ("vision", "patch_embed"):
        return x.reshape(x.shape[0], -1).T
    return x.T if x.ndim == 2 and tpath[-1] not in ("embed",) else x


def _hf_shape(shape: tuple[int, ...], tpath: tuple[str, ...], cfg: QwenVLConfig) -> tuple[int, ...]:
    if tpath == ("vision", "patch_embed"):
        v = cfg.vision
        return (shape[1], v.num_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return shape[::-1] if len(shape) == 2 and tpath[-1] != "embed" else shape


def load_params(directory: str | os.PathLike, cfg: QwenVLConfig, dtype=jnp.float32, per_layer: bool = False,
                check_finite: bool = True, mesh: Mesh | None = None) -> dict[str, Any]:
    """Every tensor of the checkpoint in our layout (LM layers stacked, or per layer with `per_layer`), on
    the default device or with `mesh` straight into each device's shard (`sharding.param_spec`).
    Missing or unknown keys and tensors of the wrong shape raise ValueError naming them."""
    shapes = param_shapes(cfg)
    counts = {"lm": cfg.text.num_layers, "vision": cfg.vision.num_layers}
    sources: sharding.Sources = {}
    filled: dict[tuple[str, ...], set] = {}
    unknown = []
    for path in checkpoint_files(directory):
        st = SafetensorsFile(path)
        for raw in st.keys():
            key = normalize_key(raw)
            if _IGNORED.match(key):
                continue
            target = _target(key)
            if target is None or target[0] not in shapes or (target[1] is not None
                                                              and target[1] >= counts[target[0][0]]):
                if key == "lm_head.weight" and cfg.text.tie_word_embeddings:
                    continue  # a tied head saved anyway
                unknown.append(raw)
                continue
            tpath, idx = target
            shape = shapes[tpath][idx is not None:]
            check_stored(st, raw, _hf_shape(shape, tpath, cfg))
            sources.setdefault(tpath, {})[idx] = sharding.TensorSource(st, raw, functools.partial(_to_ours,
                                                                                                 tpath=tpath))
            filled.setdefault(tpath, set()).add(idx)
    if unknown:
        raise ValueError(f"{directory}: unknown checkpoint keys for {cfg.model_type}: {sorted(unknown)[:20]}"
                         + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
    missing = ["/".join(p) for p, s in shapes.items()
               if len(filled.get(p, ())) != (counts[p[0]] if p[1] == "layers" else 1)]
    if missing:
        raise ValueError(f"{directory}: checkpoint is missing tensors: {missing[:20]}")
    specs = None if mesh is None else sharding.param_specs(shapes, cfg, mesh)
    return sharding.materialize(sources, shapes, dtype, cfg.text.num_layers, per_layer, check_finite, specs, mesh)


def random_params(cfg: QwenVLConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Seeded random parameters in the loader's layout (benchmarks with the preset shapes)."""
    return random_params_from_shapes(param_shapes(cfg), seed, dtype, scale)
