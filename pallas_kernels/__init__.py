"""Pallas kernels for vkv_jax, each beside a pure-jnp reference with the same signature.

Public functions take `impl="auto"|"kernel"|"reference"` and `interpret=None` (see `_dispatch`):
the compiled kernel on accelerators that support it, the jnp reference on CPU unless `impl="kernel"`
(then Pallas interpret mode).
"""

from . import mesh
from ._dispatch import IMPLS
from .compaction import compact_kv, compact_kv_reference, compact_rows_reference
from .decode_attention import decode_attention, decode_attention_reference, live_mask
from .paged_attention import merge_by_lse, packed_attention, paged_attention, paged_attention_reference
from .window_scores import WindowScores, window_scores, window_scores_reference

__all__ = ["IMPLS", "compact_kv", "compact_kv_reference", "compact_rows_reference",
           "decode_attention", "decode_attention_reference", "live_mask", "merge_by_lse", "mesh", "packed_attention",
           "paged_attention", "paged_attention_reference",
           "WindowScores", "window_scores", "window_scores_reference"]
