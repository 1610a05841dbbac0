"""The KV cache pytrees and their layout operations.

Decoding reads a `KVCache`: a **paged prompt segment** written once by compaction, plus a small **dense
decode segment** that every decode step appends one token to (docs/architecture.md "The cache pytree"):

    k_pages, v_pages  [P, ps, D]        post-RoPE keys / values of the kept prompt slots, ps slots a page
    page_pos          [P, ps]           int32 original position of each pooled slot, -1 when unused
    page_tag          [P, ps]           int8 modality: 0 text, 1 vision
    page_owner        [P]               int32 (layer * B + row) * Hkv + kv head owning the page, -1 if free
    page_table        [L, B, Hkv, M]    int32 pool page of each owner's i-th page (entries >= its pages: 0)
    layer_start       [L + 1]           int32 first pool page of each layer (pages are laid out layer-major,
                                        then row, kv head: one layer's pages are a contiguous range)
    prompt_len        [L, B, Hkv]       int32 kept prompt slots (all live: compaction drops padding)
    dk, dv            [L, B, Hkv, T, D] the decode segment: generated / fed tokens, one slot per step
    dpos              [L, B, Hkv, T]    int32 their positions, -1 for a finished row's padding or unused
    decode_len        []                int32 filled decode slots (the same in every layer, row and head)
    k_scale, v_scale  [P, ps]           float32 per-slot scales of quantized pages (`kv_quant`), else None
    dk_scale, dv_scale [L, B, Hkv, T]   float32 per-slot scales of a quantized decode segment, else None

The pool size P is static per executable: `generate` fits it on the host to what compaction kept
(`paging.fitted_pool`, <= ~1.13x live), and code inside one jit bounds it from the method's total budget
(`paging.static_pool` via `pool_pages`); either way allocated bytes follow the kept bytes even when budgets
move between layers and heads. A row only ever
reads the pages its own page table lists. `DenseCache` (k, v [L, B, Hkv, C, D], pos, tag, length) is what a
prefill produces and what compaction gathers into before paging (`to_pages`); `KVCache.dense()` turns a
paged cache back into that layout (decode slots right after each head's prompt slots, as a dense cache
appends them), and `pos` / `tag` / `length` / `live_mask()` are read through it.

A dense slot is *live* iff `slot < length` and `pos >= 0`: left-padding slots written by a batched
prefill stay inside `[0, length)` but carry `pos == -1`, so attention masks them and compaction drops them.
Methods never touch these layouts: they produce keep-sets, and `compact` turns a keep-set into storage.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vkv_jax import kv_quant
from vkv_jax.pallas_kernels import compact_kv
from vkv_jax.pallas_kernels.mesh import NO_SPLIT, per_device, rows_heads, split_axes

TEXT, VISION, GENERATED = 0, 1, 2
CAPACITY_ALIGN = 128


def round_capacity(n: int, align: int = CAPACITY_ALIGN) -> int:
    """Static cache capacity: `n` rounded up to a multiple of `align` (at least `align`)."""
    return max(align, int(math.ceil(n / align)) * align)


@flax.struct.dataclass
class DenseCache:
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
          dtype=jnp.float32) -> DenseCache:
    """A cache with no filled slots."""
    shape = (num_layers, batch, num_kv_heads, capacity)
    return DenseCache(
        k=jnp.zeros(shape + (head_dim,), dtype),
        v=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, -1, jnp.int32),
        tag=jnp.zeros(shape, jnp.int8),
        length=jnp.zeros(shape[:3], jnp.int32),
    )


def from_prefill(k: jax.Array, v: jax.Array, positions: jax.Array, tags: jax.Array,
                 capacity: int, lengths: tuple[int, ...] | None = None) -> DenseCache:
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
    return DenseCache(
        k=jnp.pad(k, pad),
        v=jnp.pad(v, pad),
        pos=jnp.pad(pos, pad[:4], constant_values=-1),
        tag=jnp.pad(tag, pad[:4]),
        length=length,
    )


def append(cache: DenseCache, layer: jax.Array, new_k: jax.Array, new_v: jax.Array,
           new_pos: jax.Array) -> DenseCache:
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


def advance(cache: DenseCache) -> DenseCache:
    """Count the token `append` wrote into every layer."""
    return cache.replace(length=cache.length + 1)


def compact(cache: DenseCache, plan, capacity: int) -> DenseCache:
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
    return DenseCache(
        k=k,
        v=v,
        pos=gather(cache.pos, -1),
        tag=gather(cache.tag, 0),
        length=new_len,
    )


# ---------------------------------------------------------------------------------------------- paged


def page_size_for(slots_per_owner: float, max_page: int = 128) -> int:
    """Static page size for owners holding about `slots_per_owner` slots: the largest power of two at
    most 1/16 of it (so rounding each owner up to whole pages wastes <= ~6%), in [1, max_page]."""
    target = max(1.0, float(slots_per_owner) / 16.0)
    return int(min(max_page, 1 << int(math.floor(math.log2(target)))))


def pool_pages(total_slots: int, owners: int, page_size: int) -> int:
    """Static pool size: pages enough for any split of at most `total_slots` slots over `owners`
    (layer, row, kv head) triples, each rounded up to whole pages: sum ceil(n_o / ps) <= (N + owners (ps - 1)) / ps."""
    return max(1, -(-(int(total_slots) + owners * (page_size - 1)) // page_size))


@flax.struct.dataclass
class KVCache:
    k_pages: jax.Array  # [P, ps, D]
    v_pages: jax.Array  # [P, ps, D]
    page_pos: jax.Array  # [P, ps] int32
    page_tag: jax.Array  # [P, ps] int8
    page_owner: jax.Array  # [P] int32
    page_table: jax.Array  # [L, B, Hkv, M] int32
    layer_start: jax.Array  # [L + 1] int32
    prompt_len: jax.Array  # [L, B, Hkv] int32
    dk: jax.Array  # [L, B, Hkv, T, D]
    dv: jax.Array  # [L, B, Hkv, T, D]
    dpos: jax.Array  # [L, B, Hkv, T] int32
    decode_len: jax.Array  # [] int32
    # quantized storage (`kv_quant`, int8 / float8 pages and decode slots): each slot's float32 scale
    k_scale: jax.Array | None = None  # [P, ps]
    v_scale: jax.Array | None = None  # [P, ps]
    dk_scale: jax.Array | None = None  # [L, B, Hkv, T]
    dv_scale: jax.Array | None = None  # [L, B, Hkv, T]
    # decode-phase compression (`decode_trim`): each decode slot's accumulated attention, and the settings
    dscore: jax.Array | None = None  # [L, B, Hkv, T] float32
    decode_trim: Any = flax.struct.field(pytree_node=False, default=None)  # `decode_trim.DecodeTrim`
    # mesh axes the pool is split over (rows, kv heads), None where unsplit: `pool_axes`
    axes: tuple = flax.struct.field(pytree_node=False, default=NO_SPLIT)

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def quantized(self) -> bool:
        """K and V stored quantized (`kv_quant`), each slot with its own scale."""
        return self.k_scale is not None

    @property
    def kv_dtype(self) -> str | None:
        """The quantized storage format (`kv_quant.KV_DTYPES`), None when stored in the model's dtype."""
        return jnp.dtype(self.k_pages.dtype).name if self.quantized else None

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def num_layers(self) -> int:
        return self.page_table.shape[0]

    @property
    def decode_capacity(self) -> int:
        """T: decode slots (static); `grow` adds more."""
        return self.dk.shape[3]

    @property
    def prompt_width(self) -> int:
        """M * ps: the most prompt slots one (layer, row, kv head) can hold."""
        return self.page_table.shape[3] * self.page_size

    @property
    def capacity(self) -> int:
        """Width of the dense view (`dense()`): prompt_width + decode_capacity."""
        return self.prompt_width + self.decode_capacity

    @property
    def length(self) -> jax.Array:
        """[L, B, Hkv] filled slots: kept prompt slots + decode slots."""
        return self.prompt_len + self.decode_len

    def dense(self) -> DenseCache:
        """The same cache in the dense layout (a copy): each head's prompt slots at [0, prompt_len), its
        decode slots right after; width `capacity`. For inspection and tests, not for decoding."""
        if self.axes != NO_SPLIT:
            return per_device(KVCache.dense, self.axes, (specs_of(self),), dense_specs(self.axes))(local(self))
        L, B, H, M = self.page_table.shape
        ps, T = self.page_size, self.decode_capacity
        C = M * ps + T
        slot = jnp.arange(C, dtype=jnp.int32)
        plen = self.prompt_len[..., None]
        in_prompt = slot < plen  # [L, B, H, C]
        page = jnp.take_along_axis(self.page_table, jnp.broadcast_to(jnp.clip(slot // ps, 0, M - 1),
                                                                     (L, B, H, C)), axis=-1)
        off = slot % ps
        t = jnp.clip(slot - plen, 0, max(T - 1, 0))
        in_decode = ~in_prompt & (slot - plen < self.decode_len) if T else jnp.zeros_like(in_prompt)

        def pick(pages, seg, fill):
            a = pages[page, off]
            if T:
                b = jnp.take_along_axis(seg, t.reshape(t.shape + (1,) * (seg.ndim - 4)), axis=3)
                a = jnp.where(in_decode.reshape(in_decode.shape + (1,) * (a.ndim - 4)), b, a)
            keep = (in_prompt | in_decode).reshape(in_prompt.shape + (1,) * (a.ndim - 4))
            return jnp.where(keep, a, jnp.asarray(fill, a.dtype))

        tag_seg = jnp.full(self.dpos.shape, GENERATED, jnp.int8)
        k, v = pick(self.k_pages, self.dk, 0), pick(self.v_pages, self.dv, 0)
        if self.quantized:  # the dense view reads back float32
            k = kv_quant.dequantize(k, pick(self.k_scale, self.dk_scale, 0))
            v = kv_quant.dequantize(v, pick(self.v_scale, self.dv_scale, 0))
        return DenseCache(k=k, v=v,
                          pos=pick(self.page_pos, self.dpos, -1), tag=pick(self.page_tag, tag_seg, 0),
                          length=self.length)

    @property
    def k(self) -> jax.Array:
        """[L, B, Hkv, capacity, D] keys in the dense view (a copy: for inspection)."""
        return self.dense().k

    @property
    def v(self) -> jax.Array:
        return self.dense().v

    @property
    def pos(self) -> jax.Array:
        """[L, B, Hkv, capacity] positions in the dense view."""
        return self.dense().pos

    @property
    def tag(self) -> jax.Array:
        return self.dense().tag

    def live_mask(self) -> jax.Array:
        return self.dense().live_mask()

    def allocated_bytes(self, decode_capacity: int | None = None) -> int:
        """Bytes of K and V as reserved (static): the page pool plus the decode segment (of
        `decode_capacity` slots, default the cache's own: what `grow` to that size would hold)."""
        pool = self.num_pages * self.page_size * self.slot_bytes
        return int(pool) + self.decode_segment_bytes(decode_capacity)

    def decode_segment_bytes(self, decode_capacity: int | None = None) -> int:
        """Bytes of K and V reserved by the decode segment of `decode_capacity` slots (default its own)."""
        T = self.decode_capacity if decode_capacity is None else int(decode_capacity)
        L, B, H = self.prompt_len.shape
        return L * B * H * T * self.slot_bytes

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's key and value (with their two float32 scales when quantized)."""
        return 2 * self.k_pages.shape[-1] * self.k_pages.dtype.itemsize + (8 if self.quantized else 0)

    def live_bytes_per_layer(self) -> jax.Array:
        """[L] float32 bytes of K and V held by live slots (prompt + live decode slots) in each layer."""
        t = jnp.arange(self.decode_capacity, dtype=jnp.int32)
        dec = ((t < self.decode_len) & (self.dpos >= 0)).sum((1, 2, 3))
        return (self.prompt_len.sum((1, 2)) + dec).astype(jnp.float32) * self.slot_bytes

    def live_bytes(self) -> jax.Array:
        """Bytes of K and V held by live slots (traced scalar, as float32)."""
        return self.live_bytes_per_layer().sum()

    def allocated_bytes_per_layer(self, decode_capacity: int | None = None) -> jax.Array:
        """[L] float32 bytes reserved for each layer: the pages its heads own plus its decode segment
        (of `decode_capacity` slots, default the cache's own); the pool's free pages belong to no layer."""
        L = self.num_layers  # layer_start holds L + 1 entries per block of a split pool
        pages = jnp.diff(self.layer_start.reshape(-1, L + 1), axis=-1).sum(0).astype(jnp.float32)
        B, H = self.prompt_len.shape[1:]
        T = self.decode_capacity if decode_capacity is None else int(decode_capacity)
        return (pages * self.page_size + B * H * T) * self.slot_bytes


def pool_axes(batch: int, num_kv_heads: int) -> tuple[str | None, str | None]:
    """The mesh axes a paged cache of `batch` rows and `num_kv_heads` kv heads splits over under the mesh in
    context (`jax.set_mesh`): rows over "data", kv heads over "model", where they divide (else that axis
    holds the whole of it: the documented fallback). `pallas_kernels.mesh.split_axes`."""
    return split_axes(batch, num_kv_heads)


def _block_spec(axes) -> PartitionSpec:
    """Spec of a pool axis made of one block per device: [blocks * n, ...] split over both axes."""
    names = tuple(a for a in axes if a)
    return PartitionSpec(names) if names else PartitionSpec()


def dense_specs(axes) -> DenseCache:
    """Partition specs of a DenseCache whose rows / kv heads split over `axes`."""
    lbh = rows_heads(axes, lead=1)
    return DenseCache(k=lbh, v=lbh, pos=lbh, tag=lbh, length=lbh)


def paged_specs(axes, quantized: bool = False, scored: bool = False) -> KVCache:
    """Partition specs of a KVCache split over `axes`: per-owner arrays [L, B, Hkv, ...] by rows / kv heads, the
    pool (and `layer_start`) one block per device (`to_pages`), `decode_len` replicated; with `quantized`, the
    scales like what they scale. The specs carry `axes=NO_SPLIT`, as each device's block does."""
    lbh, pool = rows_heads(axes, lead=1), _block_spec(axes)
    scales = dict(k_scale=pool, v_scale=pool, dk_scale=lbh, dv_scale=lbh) if quantized else {}
    if scored:
        scales["dscore"] = lbh
    return KVCache(k_pages=pool, v_pages=pool, page_pos=pool, page_tag=pool, page_owner=pool, page_table=lbh,
                   layer_start=pool, prompt_len=lbh, dk=lbh, dv=lbh, dpos=lbh, decode_len=PartitionSpec(), **scales)


def specs_of(cache: KVCache) -> KVCache:
    """`paged_specs` of this cache's split and storage."""
    # the static settings too: a pytree of specs must have the cache's structure
    return paged_specs(cache.axes, cache.quantized, cache.dscore is not None).replace(decode_trim=cache.decode_trim)


def local(cache: KVCache) -> KVCache:
    """The cache as `per_device` hands it over (its static `axes` cleared: each block is unsplit)."""
    return cache.replace(axes=NO_SPLIT)


def to_pages(dense: DenseCache, page_size: int, num_pages: int, decode_capacity: int = 0,
             axes: tuple[str | None, str | None] = NO_SPLIT, kv_dtype: str | None = None) -> KVCache:
    """Page a compacted dense cache: every (layer, row, kv head)'s slots [0, length) (all live, as
    `compact` leaves them) go to whole pages of a pool of `num_pages` (static), laid out layer-major.

    An owner whose pages would not fit (a pool sized below the plan's total; `pool_pages` never is)
    keeps only the slots that fit, so the cache stays consistent.

    axes (`pool_axes`): split rows / kv heads over those mesh axes: each device pages its own rows and kv
    heads into its own block of `num_pages` pages (page numbers, owners and `layer_start` block-local), so
    decoding reads only pages on its device; the pool's global page axis is the blocks side by side.

    kv_dtype (`kv_quant`): the pages and the decode segment stored quantized, one float32 scale per slot
    (the kept slots are quantized here, after scoring and compaction read them in full precision).
    """
    kv_dtype = kv_quant.check_kv_dtype(kv_dtype)
    if axes != NO_SPLIT:
        paged = per_device(functools.partial(to_pages, page_size=page_size, num_pages=num_pages,
                                             decode_capacity=decode_capacity, kv_dtype=kv_dtype),
                          axes, (dense_specs(axes),), paged_specs(axes, kv_dtype is not None))(dense)
        return paged.replace(axes=axes)
    L, B, H, C, D = dense.k.shape
    ps, P = int(page_size), int(num_pages)
    M = max(1, -(-C // ps))
    n = dense.length.reshape(-1)  # [O] owners, (l, b, h) order
    owner_pages = -(-n // ps)
    start = jnp.cumsum(owner_pages) - owner_pages  # exclusive
    owner_pages = jnp.clip(P - start, 0, owner_pages)
    n = jnp.minimum(n, owner_pages * ps)
    j = jnp.arange(M, dtype=jnp.int32)
    table = jnp.where(j < owner_pages[:, None], start[:, None] + j, 0).astype(jnp.int32)  # [O, M]
    # invert the tables: the owner of each pool page and the rank of its first slot (free pages: -1)
    used = (j < owner_pages[:, None]).reshape(-1)
    at = jnp.where(used, table.reshape(-1), P)  # P: dropped
    owner_of = jnp.full((P,), -1, jnp.int32).at[at].set(
        jnp.repeat(jnp.arange(L * B * H, dtype=jnp.int32), M), mode="drop")
    rank0 = jnp.zeros((P,), jnp.int32).at[at].set(jnp.tile(j * ps, L * B * H), mode="drop")
    rank = rank0[:, None] + jnp.arange(ps, dtype=jnp.int32)  # [P, ps]
    o = jnp.maximum(owner_of, 0)
    live = (owner_of >= 0)[:, None] & (rank < n[o][:, None])
    src = jnp.clip(rank, 0, C - 1)

    def pool(x, fill):
        flat = x.reshape((L * B * H, C) + x.shape[4:])
        g = flat[o[:, None], src]
        return jnp.where(live.reshape(live.shape + (1,) * (g.ndim - 2)), g, jnp.asarray(fill, x.dtype))

    layer_pages = owner_pages.reshape(L, B * H).sum(-1)
    layer_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(layer_pages).astype(jnp.int32)])
    T = int(decode_capacity)
    k_pages, v_pages = pool(dense.k, 0), pool(dense.v, 0)
    store, scales = dense.k.dtype, {}
    if kv_dtype is not None:
        k_pages, k_scale = kv_quant.quantize(k_pages, kv_dtype)
        v_pages, v_scale = kv_quant.quantize(v_pages, kv_dtype)
        store = kv_quant.storage_dtype(kv_dtype)
        empty_scale = jnp.zeros((L, B, H, T), jnp.float32)
        scales = dict(k_scale=k_scale, v_scale=v_scale, dk_scale=empty_scale, dv_scale=empty_scale)
    return KVCache(k_pages=k_pages, v_pages=v_pages, page_pos=pool(dense.pos, -1),
                   page_tag=pool(dense.tag, 0), page_owner=owner_of, page_table=table.reshape(L, B, H, M),
                   layer_start=layer_start, prompt_len=n.reshape(L, B, H).astype(jnp.int32),
                   dk=jnp.zeros((L, B, H, T, D), store), dv=jnp.zeros((L, B, H, T, D), store),
                   dpos=jnp.full((L, B, H, T), -1, jnp.int32), decode_len=jnp.zeros((), jnp.int32), **scales)


def grow(cache: KVCache, decode_capacity: int) -> KVCache:
    """The same cache with `decode_capacity` decode slots (static, >= the current T): the new slots are
    empty exactly as `to_pages` leaves them, so a grown cache equals one paged at that size directly.
    A cache that trims its decode segment (`decode_trim`) grows to its budget exactly, whatever is asked."""
    if cache.decode_trim is not None:
        decode_capacity = cache.decode_trim.budget
    extra = int(decode_capacity) - cache.decode_capacity
    if extra < 0:
        raise ValueError(f"grow: decode capacity {decode_capacity} is below the cache's {cache.decode_capacity}")
    if extra == 0:
        return cache
    pad = [(0, 0)] * 3 + [(0, extra)]
    scales = {}
    if cache.quantized:
        scales = dict(dk_scale=jnp.pad(cache.dk_scale, pad), dv_scale=jnp.pad(cache.dv_scale, pad))
    if cache.dscore is not None:
        scales["dscore"] = jnp.pad(cache.dscore, pad)
    return cache.replace(dk=jnp.pad(cache.dk, pad + [(0, 0)]), dv=jnp.pad(cache.dv, pad + [(0, 0)]),
                         dpos=jnp.pad(cache.dpos, pad, constant_values=-1), **scales)


def drop_positions_from(cache: KVCache, cut: jax.Array) -> KVCache:
    """The cache with every slot at original position >= cut[b] made dead, in row b (cut [B] int32).

    A (layer, row, kv head)'s prompt slots are in ascending original position, so the dropped prompt slots
    are a suffix: its `prompt_len` shrinks by their count (what the page-table kernel reads) and their
    `page_pos` becomes -1 (what the packed walk reads); their pages stay reserved. Decode slots at or past
    the cut get dpos -1."""
    if cache.axes != NO_SPLIT:
        cut_spec = PartitionSpec(cache.axes[0])
        return per_device(drop_positions_from, cache.axes, (specs_of(cache), cut_spec),
                          specs_of(cache))(local(cache), cut).replace(axes=cache.axes)
    L, B, H = cache.prompt_len.shape
    owner = jnp.maximum(cache.page_owner, 0)
    row_cut = cut.astype(jnp.int32)[(owner // H) % B]  # [P]
    dead = (cache.page_owner >= 0)[:, None] & (cache.page_pos >= row_cut[:, None])  # [P, ps]
    dropped = jax.ops.segment_sum(dead.sum(-1).astype(jnp.int32), owner, L * B * H).reshape(L, B, H)
    dpos = jnp.where(cache.dpos >= cut.astype(jnp.int32)[None, :, None, None], -1, cache.dpos)
    return cache.replace(page_pos=jnp.where(dead, -1, cache.page_pos), prompt_len=cache.prompt_len - dropped,
                         dpos=dpos)


def append_decode(cache: KVCache, layer: jax.Array, new_k: jax.Array, new_v: jax.Array,
                  new_pos: jax.Array) -> KVCache:
    """Write one decode token into layer `layer`'s decode slot `decode_len` for every (row, kv head).

    new_k, new_v: [B, Hkv, D]; new_pos: [B] int32 (-1: a finished row's padding); layer: traced int32.
    `decode_len` is left alone until `advance_decode` (all layers of a step write the same slot)."""
    B, H = cache.prompt_len.shape[1:]
    t = cache.decode_len
    z = jnp.int32(0)
    scales = {}
    if cache.quantized:  # quantized as it is written: one scale per (row, kv head)
        new_k, k_scale = kv_quant.quantize(new_k, cache.kv_dtype)
        new_v, v_scale = kv_quant.quantize(new_v, cache.kv_dtype)
        scales = {name: jax.lax.dynamic_update_slice(old, new[None, :, :, None], (layer, z, z, t))
                  for name, old, new in (("dk_scale", cache.dk_scale, k_scale), ("dv_scale", cache.dv_scale, v_scale))}
    k = jax.lax.dynamic_update_slice(cache.dk, new_k.astype(cache.dk.dtype)[None, :, :, None], (layer, z, z, t, z))
    v = jax.lax.dynamic_update_slice(cache.dv, new_v.astype(cache.dv.dtype)[None, :, :, None], (layer, z, z, t, z))
    p = jax.lax.dynamic_update_slice(cache.dpos, jnp.broadcast_to(new_pos[:, None], (B, H))[None, :, :, None],
                                     (layer, z, z, t))
    return cache.replace(dk=k, dv=v, dpos=p, **scales)


def advance_decode(cache: KVCache) -> KVCache:
    """Count the token `append_decode` wrote into every layer."""
    return cache.replace(decode_len=cache.decode_len + 1)
