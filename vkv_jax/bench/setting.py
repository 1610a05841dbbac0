"""One benchmark setting (dtype, batch, visual and text tokens) and its synthetic inputs for any family."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vkv_jax.models import family

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

def make_inputs(cfg, batch: int, visual_tokens: int, text_tokens: int, seed: int = 0):
    """Random token ids with `visual_tokens` image tokens per row after a 5-token preamble (LLaVA's
    "USER: <image>\\n ..." layout) and random images, in the family's input form
    (`models.family.Family.synthetic_inputs`): input_ids [B, S] int32 and the images."""
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2, got {text_tokens}")
    return family.of(cfg).synthetic_inputs(cfg, batch, visual_tokens, text_tokens, seed)
