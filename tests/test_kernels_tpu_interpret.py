"""The kernels under Pallas' TPU-semantics interpreter (SMEM scalar prefetch, VMEM scratch, NaN-filled
uninitialised memory, out-of-bounds reads raise). Slow on CPU (window_scores ~25 s, decode ~10 s), so
only compaction runs by default; set VKV_TPU_INTERPRET=1 to run all three."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling test modules' input builders
import test_kernels_compaction as tc  # noqa: E402
import test_kernels_decode_attention as td  # noqa: E402
import test_kernels_window_scores as tw  # noqa: E402

from vkv_jax.pallas_kernels.compaction import compact_kv_kernel, compact_kv_reference
from vkv_jax.pallas_kernels.decode_attention import decode_attention_kernel, decode_attention_reference
from vkv_jax.pallas_kernels.window_scores import window_scores_kernel, window_scores_reference

slow = pytest.mark.skipif(os.environ.get("VKV_TPU_INTERPRET") != "1",
                          reason="TPU interpret mode is slow on CPU; set VKV_TPU_INTERPRET=1")


def _params():
    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def test_compact_kv_tpu_interpret():
    k, v = tc._cache(jnp.bfloat16)
    idx, cnt = tc._keep_set(1, 10)
    for g, r in zip(compact_kv_kernel(k, v, idx, cnt, 16, interpret=_params()),
                    compact_kv_reference(k, v, idx, cnt, 16)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


@slow
def test_decode_attention_tpu_interpret():
    q, k, v, length, pos = td._inputs(4, jnp.bfloat16)
    out = decode_attention_kernel(q, k, v, (length, pos), block_c=td.BLOCK_C, interpret=_params())
    ref = decode_attention_reference(q, k, v, (length, pos))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=1e-2)


@slow
def test_window_scores_tpu_interpret():
    q, k, q_slot, key_valid, q_group, key_group, allowed = tw._inputs(4, jnp.bfloat16)
    kw = dict(n_softmax=1.0, key_allowed=allowed, per_head=True, q_group=q_group,
              key_group=key_group, threshold_p=0.01)
    errs = tw._max_err(window_scores_kernel(q, k, q_slot, key_valid, block_k=tw.BLOCK_K,
                                            interpret=_params(), **kw),
                       window_scores_reference(q, k, q_slot, key_valid, **kw))
    for f, e in errs.items():
        assert e <= (0 if f == "count_above" else 2e-5), (f, e)
