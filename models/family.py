"""Model families behind one protocol, registered by `model_type`.

LLaVA / LLaVA-NeXT / OneVision and Qwen2-VL / Qwen2.5-VL differ in how a checkpoint is read, how a prompt
becomes embeddings and in its RoPE positions (1-D from the padding mask, or Qwen's M-RoPE [3, B, S]), and so
in where decoding continues; the Llama-family layers, the cache and the methods are shared. A `Family`
holds what differs; `register` files it under its `model_types`, and everything else finds it by
`cfg.model_type` (`of(cfg)`). A new family is its model modules plus one `register` call
(`vkv_jax.families` registers the built-in ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax.models import llama


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family supplies. Every function takes the family's config first (`cfg`)."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this family loads
    config_from_hf: Callable[[dict], Any]  # config.json dict -> the family's frozen config
    # (directory, cfg, dtype, *, per_layer, check_finite, mesh) -> params pytree
    load_params: Callable[..., dict]
    random_params: Callable[..., dict]  # (cfg, seed, dtype) -> params pytree of the checkpoint's shapes
    processor_from_dir: Callable[[str], Any]  # the checkpoint's image processor
    # (params, cfg, input_ids [B, S], valid [B, S], images) -> embeddings [B, S, D], tags [B, S] int8
    # (1 on visual slots), RoPE positions (>= 0) [B, S] or [3, B, S]
    prompt_embeddings: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    next_positions: Callable[..., jax.Array]  # (valid [B, S], images) -> [B] int32 first decode position
    static_num_visual: Callable[..., int]  # (cfg, images, batch) -> visual tokens per row known at trace time
    # (cfg, input_ids [B, S] numpy, image slots per row [B], images) -> None; ValueError / TypeError
    check_images: Callable[..., None]
    # (cfg, batch, visual_tokens, text_tokens, seed) -> input_ids [B, S], images: random inputs whose rows
    # hold exactly `visual_tokens` visual tokens (benchmarks, tests)
    synthetic_inputs: Callable[..., tuple[Any, Any]]
    visual_inputs_type: type | None = None  # the batch-of-images pytree `prepare` makes (has astype, prefix)
    model_class: type | None = None  # the API's model class (`prepare`, `logits`) `vkv_jax.load` returns


_FAMILIES: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """File `fam` under each of its model types; ValueError when a type is already taken by another."""
    for model_type in fam.model_types:
        taken = _FAMILIES.get(model_type)
        if taken is not None and taken.name != fam.name:
            raise ValueError(f"model_type {model_type!r} is already registered by family {taken.name!r}")
    for model_type in fam.model_types:
        _FAMILIES[model_type] = fam
    return fam


def unregister(name: str) -> None:
    """Remove family `name` and its model types (KeyError if none is registered): a test or notebook that
    registered its own family leaves the registry as it found it."""
    types = [t for t, f in _FAMILIES.items() if f.name == name]
    if not types:
        raise KeyError(f"no model family named {name!r} is registered")
    for model_type in types:
        del _FAMILIES[model_type]


def supported_model_types() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def for_model_type(model_type: Any) -> Family:
    fam = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise ValueError(f"unsupported model_type {model_type!r}; vkv_jax loads "
                         f"{', '.join(supported_model_types())} checkpoints")
    return fam


def of(cfg) -> Family:
    """The family of a parsed config."""
    return for_model_type(cfg.model_type)


def config_from_hf(raw: dict[str, Any]):
    """Any supported `config.json` dict -> its family's config; ValueError for anything else."""
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold a JSON object, got a {type(raw).__name__}")
    return for_model_type(raw.get("model_type")).config_from_hf(raw)


def visual_inputs_types() -> tuple[type, ...]:
    return tuple({f.visual_inputs_type for f in _FAMILIES.values() if f.visual_inputs_type is not None})


def prompt_embeddings(params: dict[str, Any], cfg, input_ids: jax.Array, valid: jax.Array,
                      pixel_values: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """input_ids, valid [B, S] (+ images) -> embeddings [B, S, D], tags [B, S] int8 (1 on visual slots)
    and RoPE positions (>= 0): [B, S], or [3, B, S] for M-RoPE."""
    return of(cfg).prompt_embeddings(params, cfg, input_ids, valid, pixel_values)


def static_num_visual(cfg, pixel_values: Any, batch: int) -> int:
    """Visual tokens per row known at trace time (the fewest of any row when rows differ)."""
    return of(cfg).static_num_visual(cfg, pixel_values, batch)


def next_positions(cfg, valid: jax.Array, pixel_values: Any) -> jax.Array:
    """[B] int32 RoPE position of each row's first generated token (the prompt length, plus Qwen's rope
    delta)."""
    return of(cfg).next_positions(valid, pixel_values)


def prompt_prefix(pixel_values: Any, length: int) -> Any:
    """The images of a batch whose prompts are cut to their first `length` slots (the pre-template
    protocol prefills all but the template): a family's visual-inputs pytree cut by its `prefix`; a plain
    pixel array or None as it is. The cut-off slots must be text."""
    if isinstance(pixel_values, visual_inputs_types()):
        return pixel_values.prefix(length)
    return pixel_values


def logits(params: dict[str, Any], cfg, input_ids: jax.Array, pixel_values: Any,
           valid: jax.Array | None = None) -> jax.Array:
    """[B, S] ids (+ images) -> [B, S, V] float32 logits of every position."""
    if valid is None:
        valid = jnp.ones(input_ids.shape, bool)
    x, _, rope = prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    hidden, *_ = llama.prefill_layers(params["lm"], cfg.text, x, rope, valid)
    return llama.unembed(params["lm"], hidden)
