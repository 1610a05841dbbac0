"""What one `vkv_jax.generate` call measured: a typed record that reads like the dict it replaces.

`GenerateStats` is a frozen dataclass and a read-only mapping (`stats["kv_bytes"]`, `dict(stats)`), so code
written against the earlier dict keeps working. `row(b)` is the record of one row (per-row lists become
that row's value): what `python -m vkv_jax.generate --json` prints, with nothing picked by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

PER_ROW = ("prompt_tokens", "visual_tokens")  # fields holding one value per row of the batch


@dataclasses.dataclass(frozen=True)
class GenerateStats(Mapping):
    method: str
    budget: float | int | None  # as the Compression gave it (None: the method's default)
    prompt_tokens: list[int]  # per row: real prompt tokens
    visual_tokens: list[int]  # per row: visual tokens in the prompt
    kv_bytes_full: float  # live bytes the uncompressed prompt cache would hold
    kv_bytes: float  # live bytes of the decode-start cache
    kv_bytes_allocated: float  # what decoding reserves: the prompt's page pool + the decode segment
    kv_bytes_decode_segment: float
    kv_bytes_per_layer: list[float]
    kv_bytes_allocated_per_layer: list[float]
    kv_page_size: int
    kv_pages: int
    kv_dtype: str | None  # the quantized storage format (`kv_quant`), None: the model's dtype
    kv_slot_bytes: int  # bytes of one slot's key and value (+ their two float32 scales when quantized)
    decode_budget: int | None  # decode slots per (layer, row, kv head) under `DecodeTrim`, None: all kept
    # live prompt slots per layer, averaged over the batch's rows and kv heads (a row keeps whole slots
    # per kv head; adaptive methods give heads different counts, so the mean may be fractional)
    kept_text_per_layer: list[float]
    kept_vision_per_layer: list[float]
    prefill_flops: float  # decoder prefill FLOPs from the shapes (in-prefill methods save some)
    prefill_flops_full: float
    prefill_flops_saved: float
    prefill_s: float  # prefill + compression + paging on the device, compile apart
    prefill_compile_s: float
    compression_s: float | None  # scoring + compaction, with generate(measure_overhead=True)
    decode_s: float  # the decode loop, compile apart
    decode_compile_s: float
    decode_tokens_per_s: float  # B * (new_tokens - 1) / decode_s
    new_tokens: int

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def row(self, b: int) -> dict[str, Any]:
        """Every field as a plain dict, the per-row fields (`PER_ROW`) at row b."""
        return {k: (v[b] if k in PER_ROW else v) for k, v in self.items()}
