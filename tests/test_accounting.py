"""Byte accounting against hand counts on small hand-built trees (the FLOP counts are checked against the
preset's shapes in test_bench.py and test_prefill_reduction.py)."""

import jax.numpy as jnp
import numpy as np

from vkv_jax import accounting


def _params(tied: bool):
    lm = {"embed": jnp.zeros((10, 4), jnp.float32), "final_norm": jnp.zeros((4,), jnp.float32),
          "layers": [{"q": jnp.zeros((4, 8), jnp.bfloat16)}, {"q": jnp.zeros((4, 8), jnp.bfloat16)}]}
    if not tied:
        lm["lm_head"] = jnp.zeros((4, 10), jnp.float32)
    return {"lm": lm, "vision": {"w": jnp.zeros((3, 3), jnp.float32)}}


def test_param_bytes_count_what_a_decode_step_streams():
    layers, norm, embed, row, head, vision = 2 * 4 * 8 * 2, 4 * 4, 10 * 4 * 4, 4 * 4, 4 * 10 * 4, 9 * 4
    untied = accounting.param_bytes(_params(tied=False))
    assert untied["total"] == layers + norm + embed + head + vision
    assert untied["vision_and_projector"] == vision
    assert untied["decode_read"] == layers + norm + head + row  # one embedding row, the whole lm_head
    tied = accounting.param_bytes(_params(tied=True))
    assert tied["decode_read"] == layers + norm + embed + row  # unembed reads the whole tied table
    assert accounting.count_params(_params(tied=False)) == 2 * 32 + 4 + 40 + 40 + 9


def test_prompt_kv_bytes_counts_real_tokens_only():
    k = jnp.zeros((3, 2, 4, 5, 8), jnp.bfloat16)  # L, B, Hkv, S, D
    valid = jnp.asarray(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    assert float(accounting.prompt_kv_bytes(k, valid)) == 8 * 3 * 4 * 2 * 8 * 2  # 8 tokens x L Hkv (K+V) D bytes
    assert accounting.decode_step_read_bytes(100, 23.0) == 123.0
