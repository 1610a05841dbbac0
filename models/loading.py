"""Load a Hugging Face LLaVA checkpoint directory into the parameter pytree.

Three key layouts are in circulation: the legacy `language_model.model.*` /
`vision_tower.*` written by `save_pretrained`, the hub llava-hf `vision_tower.vision_model.*`, and
the `model.*`-prefixed in-memory names. All are normalised to one layout before mapping. The headers are
checked first; then each parameter is read from the memory-mapped files and placed on the device before the
next is read (`sharding.materialize`), so the host holds about one parameter at a time, or on a mesh one
shard of one.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vkv_jax.models import family, sharding
from vkv_jax.models.config import LlavaConfig
from vkv_jax.models.llava import vision_layers_needed
from vkv_jax.models.safetensors_io import SafetensorsFile, checkpoint_files

# Parameters present in checkpoints that LLaVA never reads.
_IGNORED = re.compile(r"^(.*rotary_emb\.inv_freq|vision_tower\.embeddings\.position_ids|vision_tower\.head\..*)$")

# HF key -> (our param name, how to convert): one LM decoder layer, one CLIP encoder layer, the rest.
# saving.py writes checkpoints through the same tables.
LM_LAYER_KEYS = {
    "input_layernorm.weight": ("attn_norm", "copy"),
    "self_attn.q_proj.weight": ("q", "T"), "self_attn.q_proj.bias": ("q_bias", "copy"),
    "self_attn.k_proj.weight": ("k", "T"), "self_attn.k_proj.bias": ("k_bias", "copy"),
    "self_attn.v_proj.weight": ("v", "T"), "self_attn.v_proj.bias": ("v_bias", "copy"),
    "self_attn.o_proj.weight": ("o", "T"), "self_attn.o_proj.bias": ("o_bias", "copy"),
    "post_attention_layernorm.weight": ("mlp_norm", "copy"),
    "mlp.gate_proj.weight": ("gate", "T"), "mlp.gate_proj.bias": ("gate_bias", "copy"),
    "mlp.up_proj.weight": ("up", "T"), "mlp.up_proj.bias": ("up_bias", "copy"),
    "mlp.down_proj.weight": ("down", "T"), "mlp.down_proj.bias": ("down_bias", "copy"),
}
VISION_LAYER_KEYS = {
    "layer_norm1.weight": ("ln1_scale", "copy"), "layer_norm1.bias": ("ln1_bias", "copy"),
    "layer_norm2.weight": ("ln2_scale", "copy"), "layer_norm2.bias": ("ln2_bias", "copy"),
    "self_attn.q_proj.weight": ("q", "T"), "self_attn.q_proj.bias": ("q_bias", "copy"),
    "self_attn.k_proj.weight": ("k", "T"), "self_attn.k_proj.bias": ("k_bias", "copy"),
    "self_attn.v_proj.weight": ("v", "T"), "self_attn.v_proj.bias": ("v_bias", "copy"),
    "self_attn.out_proj.weight": ("o", "T"), "self_attn.out_proj.bias": ("o_bias", "copy"),
    "mlp.fc1.weight": ("fc1", "T"), "mlp.fc1.bias": ("fc1_bias", "copy"),
    "mlp.fc2.weight": ("fc2", "T"), "mlp.fc2.bias": ("fc2_bias", "copy"),
}
TOP_LEVEL_KEYS = {
    "lm_head.weight": (("lm", "lm_head"), "T"),
    "language_model.embed_tokens.weight": (("lm", "embed"), "copy"),
    "language_model.norm.weight": (("lm", "final_norm"), "copy"),
    "multi_modal_projector.linear_1.weight": (("projector", "w1"), "T"),
    "multi_modal_projector.linear_1.bias": (("projector", "b1"), "copy"),
    "multi_modal_projector.linear_2.weight": (("projector", "w2"), "T"),
    "multi_modal_projector.linear_2.bias": (("projector", "b2"), "copy"),
    "vision_tower.embeddings.class_embedding": (("vision", "class_embed"), "copy"),
    "vision_tower.embeddings.patch_embedding.weight": (("vision", "patch_embed"), "conv"),
    "vision_tower.embeddings.patch_embedding.bias": (("vision", "patch_bias"), "copy"),  # SigLIP
    "vision_tower.embeddings.position_embedding.weight": (("vision", "pos_embed"), "copy"),
    "vision_tower.pre_layrnorm.weight": (("vision", "pre_norm", "scale"), "copy"),
    "vision_tower.pre_layrnorm.bias": (("vision", "pre_norm", "bias"), "copy"),
    "vision_tower.post_layernorm.weight": (("vision", "post_norm", "scale"), "copy"),
    "vision_tower.post_layernorm.bias": (("vision", "post_norm", "bias"), "copy"),
    "image_newline": (("image_newline",), "copy"),  # LLaVA-NeXT / OneVision: [D_text]
}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors names
_LAYER_RE = re.compile(r"^(language_model|vision_tower\.encoder)\.layers\.(\d+)\.(.+)$")


def normalize_key(key: str) -> str:
    """Map any of the three LLaVA key layouts onto `language_model.* / vision_tower.* / lm_head`."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key.startswith("language_model.model."):
        key = "language_model." + key[len("language_model.model."):]
    elif key.startswith("language_model.lm_head."):
        key = key[len("language_model."):]
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key[len("vision_tower.vision_model."):]
    return key


def _target(key: str) -> tuple[tuple[str, ...], int | None, str] | None:
    """Normalised key -> (param path, stacked layer index or None, transform)."""
    if key in TOP_LEVEL_KEYS:
        path, how = TOP_LEVEL_KEYS[key]
        return path, None, how
    m = _LAYER_RE.match(key)
    if m:
        tower, idx, rest = m.groups()
        table = LM_LAYER_KEYS if tower == "language_model" else VISION_LAYER_KEYS
        if rest in table:
            name, how = table[rest]
            root = "lm" if tower == "language_model" else "vision"
            return (root, "layers", name), int(idx), how
    return None


def _transform(x: np.ndarray, how: str) -> np.ndarray:
    if how == "T":
        return x.T
    if how == "conv":  # [O, C, p, p] -> [C*p*p, O], matching `clip.patchify`'s flattening order
        return x.reshape(x.shape[0], -1).T
    return x


def read_config(directory: str | os.PathLike) -> tuple[dict[str, Any], LlavaConfig]:
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"model path {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise ValueError(f"model path {directory!r} is not a directory (expected a HF LLaVA checkpoint dir)")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no config.json (expected a HF LLaVA checkpoint dir)")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not the checkpoint's config (a JSON file)")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    try:
        return raw, family.config_from_hf(raw)
    except ValueError as e:
        raise ValueError(f"{e} [{path}]") from None


def load_params(directory: str | os.PathLike, cfg: LlavaConfig, dtype=jnp.float32,
                per_layer: bool = False, check_finite: bool = True, mesh: Mesh | None = None) -> dict[str, Any]:
    """Read every tensor of the checkpoint into the parameter pytree (on the default device, or with `mesh`
    straight into each device's shard: `sharding.param_spec`).

    LM layer weights come stacked on a leading L axis, or with `per_layer=True` as a list of per-layer
    dicts of separate buffers (faster decoding on CPU: see `llama.scan_layers`), never both at once.
    Missing or unknown keys raise ValueError listing them. Each tensor is checked as it is read, before
    anything reaches the device: its shape against the one config.json implies, its dtype (weights are
    floating point), and with `check_finite` its values (no nan / inf after the cast to `dtype`); the
    error names the tensor's checkpoint key and file.
    """
    files = checkpoint_files(directory)
    sources: sharding.Sources = {}
    filled: dict[tuple[str, ...], set[int | None]] = {}
    unknown: list[str] = []
    layer_counts = {"lm": cfg.text.num_layers, "vision": cfg.vision.num_layers}
    vision_used = vision_layers_needed(cfg)
    shapes = param_shapes(cfg)

    for path in files:
        st = SafetensorsFile(path)
        for raw_key in st.keys():
            key = normalize_key(raw_key)
            if _IGNORED.match(key):
                continue
            target = _target(key)
            if target is None:
                unknown.append(raw_key)
                continue
            tpath, idx, how = target
            if tpath[:2] == ("vision", "post_norm") and tpath not in shapes:
                continue  # only a SigLIP tower whose last layer is read uses its post-LayerNorm
            if tpath == ("image_newline",) and tpath not in shapes:
                unknown.append(raw_key)
                continue
            if tpath[0] == "vision" and idx is not None and idx >= vision_used:
                continue  # layers past the selected feature layer never run
            if idx is not None and idx >= layer_counts[tpath[0]]:
                unknown.append(raw_key)
                continue
            n = layer_counts[tpath[0]] if tpath[0] == "lm" else vision_used
            if tpath not in shapes:  # a tensor the config does not call for (a tied lm_head, say): as stored
                shapes[tpath] = ((n,) if idx is not None else ()) + _transform(st.get(raw_key), how).shape
            check_stored(st, raw_key, _hf_shape(shapes[tpath][idx is not None:], how, cfg))
            sources.setdefault(tpath, {})[idx] = sharding.TensorSource(st, raw_key, functools.partial(_transform,
                                                                                                     how=how))
            filled.setdefault(tpath, set()).add(idx)

    if unknown:
        raise ValueError(f"{directory}: unknown checkpoint keys (not a LLaVA/Llama/CLIP layout?): "
                         f"{sorted(unknown)[:20]}" + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
    missing = _missing(cfg, filled, vision_used)
    if missing:
        raise ValueError(f"{directory}: checkpoint is missing tensors: {missing[:20]}"
                         + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
    specs = None if mesh is None else sharding.param_specs(shapes, cfg, mesh)
    return sharding.materialize(sources, shapes, dtype, cfg.text.num_layers, per_layer, check_finite, specs, mesh)


def _required(cfg: LlavaConfig) -> list[tuple[str, ...]]:
    t = cfg.text
    req = [("lm", "embed"), ("lm", "final_norm"), ("projector", "w1"), ("vision", "patch_embed"),
           ("vision", "pos_embed")]
    if cfg.vision.has_class_token:
        req += [("vision", "class_embed"), ("vision", "pre_norm", "scale"), ("vision", "pre_norm", "bias")]
    else:
        req.append(("vision", "patch_bias"))
    if not t.tie_word_embeddings:
        req.append(("lm", "lm_head"))
    if cfg.projector_bias:
        req.append(("projector", "b1"))
    if cfg.projector_layers == 2:
        req.append(("projector", "w2"))
        if cfg.projector_bias:
            req.append(("projector", "b2"))
    lm_layer = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
    if t.attention_bias:
        lm_layer += ["q_bias", "k_bias", "v_bias"]
    if t.o_bias:
        lm_layer.append("o_bias")
    if t.mlp_bias:
        lm_layer += ["gate_bias", "up_bias", "down_bias"]
    req += [("lm", "layers", n) for n in lm_layer]
    req += [("vision", "layers", n) for n, _ in VISION_LAYER_KEYS.values()]
    if cfg.anyres:
        req.append(("image_newline",))
    return req


def _missing(cfg: LlavaConfig, filled: dict, vision_used: int) -> list[str]:
    out = []
    for tpath in _required(cfg):
        got = filled.get(tpath, set())
        if tpath[1:2] == ("layers",):
            n = cfg.text.num_layers if tpath[0] == "lm" else vision_used
            lacking = [i for i in range(n) if i not in got]
            if lacking:
                out.append(f"{'/'.join(tpath)} (layers {lacking[:8]}{'...' if len(lacking) > 8 else ''})")
        elif not got:
            out.append("/".join(tpath))
    return out


def _hf_shape(shape: tuple[int, ...], how: str, cfg: LlavaConfig) -> tuple[int, ...]:
    """Our layout's shape -> the shape the tensor has in the checkpoint (inverse of `_transform`)."""
    if how == "T":
        return shape[::-1]
    if how == "conv":  # [C*p*p, O] -> [O, C, p, p]
        v = cfg.vision
        return (shape[1], v.num_channels, v.patch_size, v.patch_size)
    return shape


def check_stored(st: SafetensorsFile, key: str, expected: tuple[int, ...]) -> None:
    """Shape and dtype of one stored tensor, from the header (nothing is read yet)."""
    found = st.shape(key)
    if found != expected:
        raise ValueError(f"{st.path}: tensor {key!r} has shape {found}, but config.json implies {expected}")
    if st.dtype_name(key) not in _FLOAT_DTYPES:
        raise ValueError(f"{st.path}: tensor {key!r} is stored as {st.dtype(key)} ({st.dtype_name(key)}); "
                         f"weights must be floating point ({', '.join(_FLOAT_DTYPES)})")


def param_shapes(cfg: LlavaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's shape in the loader's layout (layer weights stacked: a leading L axis)."""
    t, v = cfg.text, cfg.vision
    L, Lv = t.num_layers, vision_layers_needed(cfg)
    D, F, Dv, Fv = t.hidden_size, t.intermediate_size, v.hidden_size, v.intermediate_size
    qd, kd = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = {
        ("lm", "embed"): (t.vocab_size, D), ("lm", "final_norm"): (D,),
        ("lm", "layers", "attn_norm"): (L, D), ("lm", "layers", "mlp_norm"): (L, D),
        ("lm", "layers", "q"): (L, D, qd), ("lm", "layers", "k"): (L, D, kd),
        ("lm", "layers", "v"): (L, D, kd), ("lm", "layers", "o"): (L, qd, D),
        ("lm", "layers", "gate"): (L, D, F), ("lm", "layers", "up"): (L, D, F),
        ("lm", "layers", "down"): (L, F, D),
        ("projector", "w1"): (Dv * len(cfg.feature_layers), D),
        ("vision", "class_embed"): (Dv,), ("vision", "patch_embed"): (v.num_channels * v.patch_size ** 2, Dv),
        ("vision", "pos_embed"): (v.num_patches + 1, Dv),
        ("vision", "pre_norm", "scale"): (Dv,), ("vision", "pre_norm", "bias"): (Dv,),
    }
    if not v.has_class_token:  # SigLIP: no class token, no pre-LayerNorm, a patch-embedding bias
        del shapes[("vision", "class_embed")], shapes[("vision", "pre_norm", "scale")]
        del shapes[("vision", "pre_norm", "bias")]
        shapes[("vision", "pos_embed")] = (v.num_patches, Dv)
        shapes[("vision", "patch_bias")] = (Dv,)
    if not t.tie_word_embeddings:
        shapes[("lm", "lm_head")] = (D, t.vocab_size)
    if t.attention_bias:
        shapes.update({("lm", "layers", "q_bias"): (L, qd), ("lm", "layers", "k_bias"): (L, kd),
                       ("lm", "layers", "v_bias"): (L, kd)})
    if cfg.projector_bias:
        shapes[("projector", "b1")] = (D,)
    if cfg.projector_layers == 2:
        shapes[("projector", "w2")] = (D, D)
        if cfg.projector_bias:
            shapes[("projector", "b2")] = (D,)
    vis_layer = {"ln1_scale": (Dv,), "ln1_bias": (Dv,), "ln2_scale": (Dv,), "ln2_bias": (Dv,),
                 "q": (Dv, Dv), "k": (Dv, Dv), "v": (Dv, Dv), "o": (Dv, Dv),
                 "q_bias": (Dv,), "k_bias": (Dv,), "v_bias": (Dv,), "o_bias": (Dv,),
                 "fc1": (Dv, Fv), "fc1_bias": (Fv,), "fc2": (Fv, Dv), "fc2_bias": (Dv,)}
    shapes.update({("vision", "layers", n): (Lv,) + s for n, s in vis_layer.items()})
    # after the vision layers so that random_params' draws for bias-free configs stay as they were
    if cfg.anyres:
        shapes[("image_newline",)] = (D,)
    if t.o_bias:
        shapes[("lm", "layers", "o_bias")] = (L, D)
    if t.mlp_bias:
        shapes.update({("lm", "layers", "gate_bias"): (L, F), ("lm", "layers", "up_bias"): (L, F),
                       ("lm", "layers", "down_bias"): (L, D)})
    return shapes


def random_params(cfg: LlavaConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Seeded random parameters with the loader's exact layout (for benchmarks and tests)."""
    return random_params_from_shapes(param_shapes(cfg), seed, dtype, scale)


def random_params_from_shapes(shapes: dict[tuple[str, ...], tuple[int, ...]], seed: int = 0, dtype=jnp.float32,
                              scale: float = 0.02) -> dict[str, Any]:
    """The nested parameter dict of `shapes`: norm scales one, everything else N(0, scale), drawn in order."""
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {}
    for path, shape in shapes.items():
        name = path[-1]
        if name in ("attn_norm", "mlp_norm", "final_norm", "scale") or name.endswith("_scale"):
            value = np.ones(shape, np.float32)
        else:
            value = rng.normal(0.0, scale, shape).astype(np.float32)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[name] = jnp.asarray(value, dtype)
    return params
