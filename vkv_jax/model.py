"""The model a user holds: weights, config, tokenizer, image processor (and mesh), with `prepare`
(`vkv_jax.inputs`) and `logits`. One class per family's input form (`models.family.Family.model_class`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vkv_jax.checks import check_model_inputs
from vkv_jax.inputs import Preparer, QwenPreparer, device_images
from vkv_jax.models import family, sharding
from vkv_jax.models.config import LlavaConfig
from vkv_jax.models.image_processor import ImageProcessor
from vkv_jax.models.tokenizer import Tokenizer


def on_model_mesh(fn):
    """Run `fn(model, ...)` under `jax.set_mesh(model.mesh)` when the model has a mesh, so the executables it
    compiles split the batch and the paged KV cache over that mesh (`cache.pool_axes`)."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if getattr(model, "mesh", None) is None:
            return fn(model, *args, **kwargs)
        with jax.set_mesh(model.mesh):
            return fn(model, *args, **kwargs)

    return run



@dataclasses.dataclass
class LlavaModel(Preparer):
    params: dict[str, Any]
    config: LlavaConfig
    tokenizer: Tokenizer
    processor: ImageProcessor
    path: str
    dtype: Any = jnp.float32
    mesh: Mesh | None = None  # ("data", "model"): weights split over `model`, batch rows over `data`

    @property
    def replicated(self) -> list[str]:
        """Weights whose split axis does not divide the mesh's `model` axis, so every `model` device holds
        them whole (`models.sharding`); empty without a mesh."""
        return sharding.replicated_over_model(self.params)

    @on_model_mesh
    def logits(self, input_ids, pixel_values=None, attention_mask=None) -> jax.Array:
        """Full forward: [B, S] ids (+ [B * n, 3, H, W] images, n per row, or the `llava.VisualInputs` that
        `prepare` makes for anyres models and rows with differing images) -> [B, S, V] float32 logits.

        The ids (numpy or jax) are checked on the host first (`check_model_inputs`): ValueError for ids
        outside the vocabulary or image tokens that do not match the images.
        """
        check_model_inputs(self.config, input_ids, pixel_values, attention_mask)
        ids = jnp.asarray(input_ids, jnp.int32)
        valid = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        ids, valid, pix = sharding.shard_rows((ids, valid, device_images(pixel_values, self.dtype)), self.mesh)
        return _logits_jit(self.params, self.config, ids, pix, valid)



class QwenVLModel(QwenPreparer, LlavaModel):
    """Qwen2-VL / Qwen2.5-VL: `prepare` resizes each image to its native resolution (`smart_resize`), so
    every image has its own merged-patch grid and token count, and computes the M-RoPE positions
    (`models.qwen2_vl.rope_index`); `pixel_values` is a `qwen2_vl.QwenVisualInputs`. Its `processor` is
    a `QwenImageProcessor`."""


_logits_jit = jax.jit(family.logits, static_argnums=(1,))
