"""Paging: the sizes of the decode cache, the page pool of a compacted prompt, and attention over its pages.

One module owns every size the paged cache (`vkv_jax.cache.KVCache`) is built with:
* the decode segment: `decode_capacity` slots, the power-of-two bucket of the answer length (`decode_bucket`),
  so one decode executable serves a whole bucket; `grow` adds them to a cache paged without;
* the prompt's pool: `static_pool` bounds it from the method's total budget at trace time (code that must
  stay inside one jit), `fitted_pool` fits it on the host to what compaction kept (<= ~1.13x live:
  `vkv_jax.request` does this for `generate`); under a mesh either is one device's block;
* `page_prompt` writes a compacted `DenseCache` into that pool.
`prompt_attention` reads one layer's pages for a decode query (the Pallas kernel on TPU, the packed walk
elsewhere), and `kept_by_modality` counts what a paged cache holds per layer.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from vkv_jax import cache as cache_lib
from vkv_jax.methods import Method
from vkv_jax.pallas_kernels import packed_attention, paged_attention
from vkv_jax.pallas_kernels._dispatch import use_kernel
from vkv_jax.pallas_kernels.mesh import per_device, split_counts

if TYPE_CHECKING:
    from vkv_jax.prefill import PromptPass

KV_POOLS = ("fitted", "static")


def check_kv_pool(kv_pool: str) -> str:
    if kv_pool not in KV_POOLS:
        raise ValueError(f"kv_pool must be one of {', '.join(map(repr, KV_POOLS))}, got {kv_pool!r}")
    return kv_pool


DECODE_BUCKET_MIN = 16


def decode_capacity(max_new_tokens: int) -> int:
    """Static decode-segment slots for `max_new_tokens` appended tokens: 0 for none, else its
    power-of-two bucket (`decode_bucket`), so one decode executable serves the whole bucket."""
    return 0 if max_new_tokens <= 0 else decode_bucket(max_new_tokens)


def prompt_capacity(method: Method, prompt_len: int, num_visual: int) -> int:
    """Static prompt slots one (layer, row, kv head) of the compressed cache may hold: `method.capacity`,
    which is `prompt_len` for methods that keep the prefill cache (their plan is None)."""
    return method.capacity(prompt_len, num_visual)


def prompt_slots_per_row(method: Method, prompt_len: int, num_visual: int, num_layers: int, num_kv_heads: int,
                         layer_len: tuple[int, ...] | None = None) -> int:
    """Static bound on the prompt slots one row keeps over all layers and kv heads: the method's
    `total_capacity` (by default every (layer, head) at `capacity`; adaptive methods: a fixed total moved
    between layers / heads); after an in-prefill reduction, the layers' own lengths."""
    if layer_len is not None:
        return num_kv_heads * int(sum(layer_len))
    return int(method.total_capacity(prompt_len, num_visual, num_layers, num_kv_heads))


def prompt_pool(method: Method, prompt_len: int, num_visual: int, num_layers: int, batch: int, num_kv_heads: int,
                layer_len: tuple[int, ...] | None = None, splits: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Static (page_size, num_pages) of the compressed prompt's page pool for `batch` rows. `splits` (row
    blocks, kv-head blocks): a pool split over a mesh (`cache.pool_axes`), whose pages are one device's
    block: its rows' share of the bound, or every slot of its kv heads, whichever is less (a budget moved
    between heads may all land on one device)."""
    per_row = prompt_slots_per_row(method, prompt_len, num_visual, num_layers, num_kv_heads, layer_len)
    page_size = cache_lib.page_size_for(per_row / (num_layers * num_kv_heads))
    rows, heads = batch // splits[0], num_kv_heads // splits[1]
    slots = per_row
    if tuple(splits) != (1, 1):
        widest = max(layer_len) if layer_len else prompt_capacity(method, prompt_len, num_visual)
        slots = min(per_row, num_layers * heads * widest)
    return page_size, cache_lib.pool_pages(rows * slots, num_layers * rows * heads, page_size)


def decode_bucket(max_new_tokens: int) -> int:
    """Static length of the decode loop compiled for `max_new_tokens`: the next power of two, at least
    `DECODE_BUCKET_MIN` (16). One executable serves every length in (bucket / 2, bucket]."""
    return max(DECODE_BUCKET_MIN, 1 << (int(max_new_tokens) - 1).bit_length())


def grow(cache: cache_lib.KVCache, capacity: int) -> cache_lib.KVCache:
    """The same cache with `capacity` decode slots (static, >= cache.decode_capacity; `cache.grow`): the
    new slots are empty as paging leaves them, so a grown cache is bit-identical to one made that size."""
    return cache_lib.grow(cache, capacity)


def grow_for(cache: cache_lib.KVCache, need: int) -> cache_lib.KVCache:
    """`cache` with room for `need` (static) more decode slots, so feeding a follow-up turn never writes past
    the decode segment. Called with a concrete cache (outside a jit) it grows only when the room is short,
    to the power-of-two bucket of decode_len + need; inside a jit, where decode_len is traced, to
    capacity + need, enough whatever the fill. Grown slots are empty (`grow`): tokens are unchanged."""
    need = int(need)
    if isinstance(cache.decode_len, jax.core.Tracer):
        return grow(cache, cache.decode_capacity + need)
    filled = int(cache.decode_len)
    if filled + need <= cache.decode_capacity:
        return cache
    return grow(cache, max(decode_capacity(filled + need), cache.decode_capacity))


def static_pool(prompt: PromptPass, method: Method) -> tuple[int, int]:
    """(page_size, num_pages) bounding any prompt of this shape (`prompt_pool`): known at trace time; on a
    split pool (`cache.pool_axes`) the pages of one device's block."""
    L, B, H, S, _ = prompt.k.shape
    return prompt_pool(method, S, prompt.ctx.num_visual or 0, L, B, H, prompt.layer_len,
                       split_counts(cache_lib.pool_axes(B, H)))


POOL_STEPS = 16  # pool sizes per octave in `fitted_pool`: at most 1/16 of the pages reserved beyond need


def fitted_pool(lengths: np.ndarray, steps: int = POOL_STEPS, splits: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(page_size, num_pages) of a pool that holds compacted lengths [L, B, Hkv] (host values): the page
    size from the mean slots an owner holds (`cache.page_size_for`: rounding owners up to whole pages
    wastes <= ~6%), the page count rounded up to one of `steps` sizes per octave (<= 1/steps more), so
    prompts of one shape and budget share a size and its decode executable.
    With steps=16, allocated <= 1.13 x live for any lengths. `splits` (row blocks, kv-head blocks): a pool
    split over a mesh (`cache.pool_axes`); the pages are one block's, enough for the fullest device."""
    n = np.asarray(lengths).astype(np.int64)
    page_size = cache_lib.page_size_for(max(1.0, float(n.mean())))
    pages = -(-n // page_size)
    if tuple(splits) == (1, 1):
        need = max(1, int(pages.sum()))
    else:  # the fullest device block: rows split nd ways, kv heads nh ways
        (L, B, H), (nd, nh) = n.shape, splits
        need = max(1, int(pages.reshape(L, nd, B // nd, nh, H // nh).sum((0, 2, 4)).max()))
    unit = 1 << max(0, need.bit_length() - int(steps).bit_length())  # 2^floor(log2 need) / steps (a power of 2)
    return page_size, -(-need // unit) * unit


def page_prompt(kept: cache_lib.DenseCache, pool: tuple[int, int], max_new_tokens: int = 0,
                kv_dtype: str | None = None) -> cache_lib.KVCache:
    """The decode cache: `kept` (`compact_prompt`) in a pool of (page_size, num_pages) (static) plus
    `decode_capacity(max_new_tokens)` decode slots (none by default: `grow` adds them later, so the
    prefill's executable does not depend on the answer length). Under a mesh the pool splits over rows and
    kv heads (`cache.pool_axes`): num_pages is then each device's block. kv_dtype (static, `kv_quant`):
    pages and decode slots stored quantized (int8 / float8_e4m3fn, one scale per slot)."""
    page_size, num_pages = pool
    _, B, H = kept.length.shape
    return cache_lib.to_pages(kept, page_size, num_pages, decode_capacity(max_new_tokens),
                              cache_lib.pool_axes(B, H), kv_dtype)


def kept_by_modality(cache: cache_lib.KVCache) -> jax.Array:
    """[L, 2] float32 live prompt slots per layer, averaged over rows and kv heads: (text, vision)."""
    if cache.axes != cache_lib.NO_SPLIT:  # each device's block averages its owners; the blocks are equal
        axes = tuple(a for a in cache.axes if a)
        per_block = lambda c: jax.lax.pmean(kept_by_modality(c), axes)  # noqa: E731
        return per_device(per_block, cache.axes, (cache_lib.specs_of(cache),),
                          PartitionSpec())(cache_lib.local(cache))
    L, B, H = cache.prompt_len.shape
    layer = jnp.where(cache.page_owner >= 0, cache.page_owner // (B * H), L)  # [P]; free pages: L (dropped)
    live = cache.page_pos >= 0

    def per_layer(mask):
        return jax.ops.segment_sum(mask.sum(-1), layer, L + 1)[:L] / (B * H)

    text = per_layer(live & (cache.page_tag == cache_lib.TEXT))
    vision = per_layer(live & (cache.page_tag == cache_lib.VISION))
    return jnp.stack([text, vision], axis=-1).astype(jnp.float32)


PROMPT_ATTENTIONS = ("auto", "kernel", "reference", "packed")


def prompt_attention(cache: cache_lib.KVCache, layer: jax.Array, q: jax.Array,
                     impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Attention of q [B, Hq, D] over layer `layer`'s prompt pages -> (out [B, Hq, D], lse [B, Hq]).

    "auto": the Pallas kernel (`paged_attention`, scalar-prefetched page tables) on TPU; elsewhere the
    packed walk over the layer's page range (`packed_attention`, cost ~ the layer's live pages).
    "kernel" / "reference": `paged_attention` with that impl (the reference gathers M pages per head)."""
    if cache.axes != cache_lib.NO_SPLIT:  # each device attends over its own block of pages
        heads = PartitionSpec(*cache.axes)
        attend = functools.partial(prompt_attention, impl=impl)
        return per_device(attend, cache.axes, (cache_lib.specs_of(cache), PartitionSpec(), heads),
                          (heads, heads))(cache_lib.local(cache), layer, q)
    if impl not in PROMPT_ATTENTIONS:
        raise ValueError(f"prompt attention impl must be one of {PROMPT_ATTENTIONS}, got {impl!r}")
    if impl == "auto":
        impl = "kernel" if use_kernel("auto", ("tpu",)) else "packed"
    if impl == "packed":
        B, H = cache.prompt_len.shape[1:]
        return packed_attention(q, cache.k_pages, cache.v_pages, cache.page_pos, cache.page_owner,
                                cache.layer_start[layer], cache.layer_start[layer + 1], layer * (B * H),
                                num_kv_heads=H, k_scale=cache.k_scale, v_scale=cache.v_scale)
    return paged_attention(q, cache.k_pages, cache.v_pages, cache.page_table[layer], cache.prompt_len[layer],
                           return_lse=True, impl=impl, k_scale=cache.k_scale, v_scale=cache.v_scale)


page_prompt_jit = jax.jit(page_prompt, static_argnames=("pool", "max_new_tokens", "kv_dtype"))
grow_jit = jax.jit(grow, static_argnames=("capacity",))
kept_by_modality_jit = jax.jit(kept_by_modality)
