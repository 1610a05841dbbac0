"""Model-family dispatch: what the decode path needs from a model besides the LM layers.

LLaVA / LLaVA-NeXT / OneVision (`llava`) and Qwen2-VL / Qwen2.5-VL (`qwen2_vl`) differ in how a prompt
becomes embeddings and in its RoPE positions (1-D from the padding mask, or Qwen's M-RoPE [3, B, S]),
and so in where decoding continues; the Llama-family layers, the cache and the methods are shared.
Every function takes the config first and picks the family by its type.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vkv_jax.models import llama, llava, qwen2_vl
from vkv_jax.models.config import QwenVLConfig


def is_qwen(cfg) -> bool:
    return isinstance(cfg, QwenVLConfig)


def prompt_embeddings(params: dict[str, Any], cfg, input_ids: jax.Array, valid: jax.Array,
                      pixel_values: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """input_ids, valid [B, S] (+ images) -> embeddings [B, S, D], tags [B, S] int8 (1 on visual slots)
    and RoPE positions (>= 0): [B, S], or [3, B, S] for M-RoPE."""
    if is_qwen(cfg):
        x, tags = qwen2_vl.merge_embeddings(params, cfg, input_ids, pixel_values)
        return x, tags, qwen2_vl.rope_positions(valid, pixel_values)
    x, tags = llava.merge_embeddings(params, cfg, input_ids, pixel_values)
    return x, tags, jnp.maximum(llava.positions_from_mask(valid), 0)


def static_num_visual(cfg, pixel_values: Any, batch: int) -> int:
    """Visual tokens per row known at trace time (the fewest of any row when rows differ)."""
    if is_qwen(cfg):
        return 0 if pixel_values is None else int(pixel_values.num_visual)
    return llava.static_num_visual(cfg, pixel_values, batch)


def prompt_prefix(pixel_values: Any, length: int) -> Any:
    """The images of a batch whose prompts are cut to their first `length` slots (the pre-template
    protocol prefills all but the template): the per-slot arrays (`VisualInputs.source` / `weight`,
    `QwenVisualInputs.positions`) cut alike; a plain pixel array or None as it is. The cut-off slots must
    be text."""
    if isinstance(pixel_values, llava.VisualInputs):
        return pixel_values.replace(source=pixel_values.source[:, :length], weight=pixel_values.weight[:, :length])
    if isinstance(pixel_values, qwen2_vl.QwenVisualInputs):
        return pixel_values.replace(positions=pixel_values.positions[:, :, :length])
    return pixel_values


def next_positions(cfg, valid: jax.Array, pixel_values: Any) -> jax.Array:
    """[B] int32 RoPE position of each row's first generated token: the prompt length, plus Qwen's
    rope delta."""
    if is_qwen(cfg):
        return qwen2_vl.next_positions(valid, pixel_values)
    return valid.sum(axis=1).astype(jnp.int32)


def logits(params: dict[str, Any], cfg, input_ids: jax.Array, pixel_values: Any,
           valid: jax.Array | None = None) -> jax.Array:
    """[B, S] ids (+ images) -> [B, S, V] float32 logits of every position."""
    if valid is None:
        valid = jnp.ones(input_ids.shape, bool)
    x, _, rope = prompt_embeddings(params, cfg, input_ids, valid, pixel_values)
    hidden, *_ = llama.prefill_layers(params["lm"], cfg.text, x, rope, valid)
    return llama.unembed(params["lm"], hidden)
