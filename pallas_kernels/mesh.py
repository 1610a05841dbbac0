"""Kernels (and the paged cache) per device under a mesh.

A Pallas kernel is a custom call that `jit`'s partitioner (GSPMD) cannot split: given sharded operands it
would gather them whole onto every device. Under `jax.set_mesh(mesh)` with a ("data", "model") mesh
(`vkv_jax.make_mesh`), each kernel entry therefore runs inside `jax.shard_map` over the rows ("data") and
kv heads ("model") its operands carry, where they divide (`split_axes`): each device runs the kernel on
its own rows and heads, which is all the kernel needs, since every one of them works per (row, kv head).
Inside a `shard_map` (or without a mesh) nothing is split again.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import AxisType, PartitionSpec

NO_SPLIT = (None, None)


def split_axes(batch: int, num_kv_heads: int) -> tuple[str | None, str | None]:
    """The mesh axes (rows, kv heads) arrays of `batch` rows and `num_kv_heads` kv heads split over under the
    mesh in context: rows over "data", kv heads over "model", each where that axis is longer than one and
    divides; None elsewhere (that axis keeps the whole of it), and NO_SPLIT without a mesh or inside a
    `shard_map` (already per device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Manual in tuple(mesh.axis_types):
        return NO_SPLIT
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = "data" if size.get("data", 1) > 1 and batch % size["data"] == 0 else None
    heads = "model" if size.get("model", 1) > 1 and num_kv_heads % size["model"] == 0 else None
    return rows, heads


def split_counts(axes: tuple[str | None, str | None]) -> tuple[int, int]:
    """(row blocks, kv-head blocks) of arrays split over `axes` under the mesh in context."""
    if axes == NO_SPLIT:
        return 1, 1
    mesh = jax.sharding.get_abstract_mesh()
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(size[a] if a else 1 for a in axes)


def rows_heads(axes, lead: int = 0) -> PartitionSpec:
    """Spec of an array [*lead axes, B, H, ...] split over `axes` (rows, heads)."""
    return PartitionSpec(*([None] * lead), *axes)


def per_device(fn: Callable, axes, in_specs, out_specs) -> Callable:
    """`fn` on each device's block (`jax.shard_map` over the mesh in context), or `fn` itself when `axes`
    split nothing."""
    if axes == NO_SPLIT:
        return fn
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"arrays split over the mesh axes {axes} need the mesh in context: jax.set_mesh(mesh)")
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
