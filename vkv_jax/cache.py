"""The KV cache pytree and its layout operations.

Layout (dense with lengths; docs/architecture.md "The cache pytree"):

    k, v    [L, B, Hkv, C, D]   post-RoPE keys / values; filled slots are [0, length)
    pos     [L, B, Hkv, C]      int32 original position of each slot, -1 for empty or padding
    tag     [L, B, Hkv, C]      int8 modality: 0 text, 1 vision, 2 generated
    length  [L, B, Hkv]         int32 filled slots per layer / row / kv head

A slot is *live* iff `slot < length` and `pos >= 0`: left-padding slots written by a batched prefill
stay inside `[0, length)` but carry `pos == -1`, so attention masks them and compaction drops them.
Methods never touch this layout: they produce keep-sets, and `compact` turns a keep-set into storage.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from vkv_jax.pallas_kernels import compact_kv

TEXT, VISION, GENERATED = 0, 1, 2
CAPACITY_ALIGN = 128


def round_capacity(n: int, align: int = CAPACITY_ALIGN) -> int:
    """Static cache capacity: `n` rounded up to a multiple of `align` (at least `align`)."""
    return max(align, int(math.ceil(n / align)) * align)


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, Hkv, C, D]
    v: jax.Array  # [L, B, Hkv, C, D]
    pos: jax.Array  # [L, B, Hkv, C] int32
    tag: jax.Array  # [L, B, Hkv, C] int8
    length: jax.Array  # [L, B, Hkv] int32

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def live_mask(self) -> jax.Array:
        """[L, B, Hkv, C] bool: slots attention may read."""
        slot = jnp.arange(self.capacity, dtype=jnp.int32)
        return (slot < self.length[..., None]) & (self.pos >= 0)

    def allocated_bytes(self) -> int:
        """Bytes of the K and V buffers as allocated (static)."""
        return int(self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize)

    def live_bytes(self) -> jax.Array:
        """Bytes of K and V held by live slots (traced scalar, int32-safe as float32)."""
        per_slot = 2 * self.k.shape[-1] * self.k.dtype.itemsize
        return self.live_mask().sum().astype(jnp.float32) * per_slot


def empty(num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
          dtype=jnp.float32) -> KVCache:
    """A cache with no filled slots."""
    shape = (num_layers, batch, num_kv_heads, capacity)
    return KVCache(
        k=jnp.zeros(shape + (head_dim,), dtype),
        v=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, -1, jnp.int32),
        tag=jnp.zeros(shape, jnp.int8),
        length=jnp.zeros(shape[:3], jnp.int32),
    )


def from_prefill(k: jax.Array, v: jax.Array, positions: jax.Array, tags: jax.Array,
                 capacity: int, lengths: tuple[int, ...] | None = None) -> KVCache:
    """Build a cache from a full prefill.

    Args:
      k, v: [L, B, Hkv, S, D] post-RoPE keys / values of every prompt slot (padding included).
      positions: [B, S] int32 original positions, -1 on padding; or [L, B, S] per layer (in-prefill
        reduction: later layers' rows are shorter, right-padded with -1).
      tags: [B, S] int8 modality tags (or [L, B, S] like positions).
      capacity: static C >= S.
      lengths: static filled slots per layer (default S in every layer).
    Returns: a KVCache with `length == S` (or `lengths`) everywhere (padding slots are dead through `pos == -1`).
    """
    L, B, H, S, _ = k.shape
    if capacity < S:
        raise ValueError(f"cache capacity {capacity} is smaller than the prompt length {S}")
    pad = [(0, 0)] * 3 + [(0, capacity - S), (0, 0)]
    positions = positions if positions.ndim == 3 else positions[None]
    tags = tags if tags.ndim == 3 else tags[None]
    pos = jnp.broadcast_to(positions[:, :, None, :], (L, B, H, S)).astype(jnp.int32)
    tag = jnp.broadcast_to(tags[:, :, None, :], (L, B, H, S)).astype(jnp.int8)
    length = (jnp.full((L, B, H), S, jnp.int32) if lengths is None
              else jnp.broadcast_to(jnp.asarray(lengths, jnp.int32)[:, None, None], (L, B, H)))
    return KVCache(
        k=jnp.pad(k, pad),
        v=jnp.pad(v, pad),
        pos=jnp.pad(pos, pad[:4], constant_values=-1),
        tag=jnp.pad(tag, pad[:4]),
        length=length,
    )


def append(cache: KVCache, layer: jax.Array, new_k: jax.Array, new_v: jax.Array,
           new_pos: jax.Array) -> KVCache:
    """Write one decode token into layer `layer` at each (row, kv head)'s own length.

    new_k, new_v: [B, Hkv, D];  new_pos: [B] int32;  layer: traced int32 scalar.
    Only B*Hkv slots are scattered (in place inside a loop carry); `length` is left alone so that all
    layers of one step can be written before `advance` bumps every length at once.
    """
    B, H = cache.length.shape[1:]
    b = jnp.arange(B)[:, None]
    h = jnp.arange(H)[None, :]
    slot = cache.length[layer]  # [B, Hkv]
    return cache.replace(
        k=cache.k.at[layer, b, h, slot].set(new_k.astype(cache.k.dtype)),
        v=cache.v.at[layer, b, h, slot].set(new_v.astype(cache.v.dtype)),
        pos=cache.pos.at[layer, b, h, slot].set(jnp.broadcast_to(new_pos[:, None], (B, H))),
        tag=cache.tag.at[layer, b, h, slot].set(jnp.int8(GENERATED)),
    )


def advance(cache: KVCache) -> KVCache:
    """Count the token `append` wrote into every layer."""
    return cache.replace(length=cache.length + 1)


def compact(cache: KVCache, plan, capacity: int) -> KVCache:
    """Gather each (layer, row, kv head)'s kept slots into a new cache of static `capacity`.

    Args:
      cache: the prefill cache, capacity C.
      plan: a `KeepPlan` (indices [L, B, Hkv, K] slot indices, ascending in ranks [0, count);
        count [L, B, Hkv]), or None to keep every filled slot (no compression).
      capacity: static C' >= K (the caller adds room for decode tokens).
    Returns: a KVCache of capacity C' whose slots [0, length) are the kept slots in ascending original
    order with their k, v, pos, tag; length = number of kept *live* slots. Kept slots that are
    dead (padding, pos == -1, or >= the old length) are dropped, so padding never survives.
    """
    if plan is None:
        L, B, H, C = cache.pos.shape
        K = C
        indices = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (L, B, H, C))
        count = cache.length
    else:
        indices = plan.indices.astype(jnp.int32)
        count = plan.count.astype(jnp.int32)
        K = indices.shape[-1]
    if capacity < K:
        raise ValueError(f"compact: capacity {capacity} is smaller than the plan width {K}")
    C = cache.capacity
    indices = jnp.clip(indices, 0, C - 1)
    rank = jnp.arange(K, dtype=jnp.int32)
    pos_at = jnp.take_along_axis(cache.pos, indices, axis=-1)
    live = (rank < count[..., None]) & (pos_at >= 0) & (indices < cache.length[..., None])
    # Stable partition: live entries first (keeping their ascending order), dead ones after.
    order = jnp.argsort(jnp.where(live, rank, K + rank), axis=-1)
    indices = jnp.take_along_axis(indices, order, axis=-1)
    new_len = live.sum(-1).astype(jnp.int32)
    keep = rank < new_len[..., None]

    def gather(x, fill):
        g = jnp.take_along_axis(x, indices, axis=3)
        g = jnp.where(keep, g, jnp.asarray(fill, x.dtype))
        return jnp.pad(g, [(0, 0)] * 3 + [(0, capacity - K)], constant_values=fill)

    # K/V move through the compaction kernel on TPU (its jnp reference elsewhere); pos/tag are small.
    k, v = compact_kv(cache.k, cache.v, indices, new_len, capacity)
    return KVCache(
        k=k,
        v=v,
        pos=gather(cache.pos, -1),
        tag=gather(cache.tag, 0),
        length=new_len,
    )
