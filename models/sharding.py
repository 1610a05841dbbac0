"""Where each parameter lives on a device mesh, and reading checkpoint tensors straight into their shards.

The mesh has two named axes (`MESH_AXES`): `data` splits the rows of a batch, `model` splits weights
tensor-parallel, Megatron style: the column-parallel projections (q, k, v; MLP gate / up / fc1; the
projector's first layer) split their output features, the row-parallel ones (o, down, fc2, the projector's
second layer) their input features, and the vocabulary splits the embedding table and the LM head. Attention
projections split only at whole heads (q and o by query heads, k and v by kv heads); any other axis only
where its size divides the `model` axis. A tensor whose axis does not divide stays replicated over `model`
(the documented fallback: the computation is the same, only its memory and traffic change), and
`replicated_over_model` names those tensors. Norm scales and biases of row-parallel layers are replicated.

The rest of the computation is written for one device: `jit` partitions it from these weight shardings and
the batch's row sharding (GSPMD), so budgets that couple heads or layers are reduced over the whole mesh
exactly as on one device. The KV cache follows the kv heads and the rows (`vkv_jax.cache`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vkv_jax.models.safetensors_io import SafetensorsFile, check_finite_tensor

MESH_AXES = ("data", "model")

# leaf name -> (axis counted from the end, what must divide the `model` axis: "q" query heads, "kv" kv heads,
# "dim" the axis itself). Names are the loaders' (models/loading.py, models/qwen2_vl_loading.py).
_COLUMN = {"q": "q", "q_bias": "q", "k": "kv", "k_bias": "kv", "v": "kv", "v_bias": "kv",
           "gate": "dim", "gate_bias": "dim", "up": "dim", "up_bias": "dim", "fc1": "dim", "fc1_bias": "dim",
           "w1": "dim", "b1": "dim", "lm_head": "dim"}
_ROW = {"o": "q", "down": "dim", "fc2": "dim", "w2": "dim", "embed": "dim"}


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all of them); `model` defaults to what is left
    after `data`. E.g. `make_mesh(1, 8)` on a TPU v2-8: every weight split eight ways."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("data", data), ("model", model)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"mesh axis {name!r} must be a positive int, got {n!r}")
    if model is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, {len(devices)} available")
    grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def check_mesh(mesh: Any) -> Mesh:
    """The mesh, or TypeError / ValueError: a `jax.sharding.Mesh` whose axes are named "data" and "model"."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (vkv_jax.make_mesh builds one), got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes must be named {MESH_AXES}, got {tuple(mesh.axis_names)} "
                         "(vkv_jax.make_mesh(data, model) builds one)")
    return mesh


def axis_size(mesh: Mesh | None, name: str) -> int:
    return 1 if mesh is None else int(mesh.shape[name])


def _heads(path: tuple[str, ...], cfg: Any) -> dict[str, int]:
    """Query / kv head counts of the tower `path` belongs to."""
    if path[0] == "lm":
        return {"q": cfg.text.num_heads, "kv": cfg.text.num_kv_heads}
    if path[0] == "vision":
        return {"q": cfg.vision.num_heads, "kv": cfg.vision.num_heads}
    return {}


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], cfg: Any, model: int) -> PartitionSpec:
    """The PartitionSpec of parameter `path` (the loaders' layout; stacked layers keep their leading L axis
    unsplit) on a mesh whose `model` axis has `model` devices."""
    name = path[-1]
    if name in _COLUMN:
        axis, unit = -1, _COLUMN[name]
    elif name in _ROW:
        axis, unit = (0 if name == "embed" else -2), _ROW[name]
    else:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    count = shape[axis] if unit == "dim" else _heads(path, cfg).get(unit, 0)
    if model > 1 and count and count % model == 0 and shape[axis] % model == 0:
        spec[axis] = "model"
    return PartitionSpec(*spec)


def param_specs(shapes: dict[tuple[str, ...], tuple[int, ...]], cfg: Any, mesh: Mesh) -> dict:
    """{parameter path: PartitionSpec} for every path of `shapes`."""
    model = axis_size(mesh, "model")
    return {path: param_spec(path, shape, cfg, model) for path, shape in shapes.items()}


def replicated_over_model(params: Any) -> list[str]:
    """Paths of the weights `param_spec` would split that are whole on every `model` device (an axis that
    does not divide the `model` axis: the fallback), on a mesh whose `model` axis is larger than one."""
    rules = set(_COLUMN) | set(_ROW)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        sh = getattr(leaf, "sharding", None)
        if (names[-1] in rules and isinstance(sh, NamedSharding) and axis_size(sh.mesh, "model") > 1
                and "model" not in tuple(sh.spec)):
            out.append("/".join(names))
    return out


# ------------------------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """One checkpoint tensor, not read yet: `read(index)` returns our layout's `[index]` slice, reading only
    the bytes it needs from the memory-mapped file (`transform` turns the stored array into our layout as a
    view: a transpose or a reshape)."""

    file: SafetensorsFile
    key: str
    transform: Callable[[np.ndarray], np.ndarray]

    def read(self, index: tuple = (), dtype=np.float32, check_finite: bool = False) -> np.ndarray:
        out = np.array(self.transform(self.file.get(self.key))[index], dtype=dtype)
        if check_finite:
            check_finite_tensor(out, self.key, self.file.path)
        return out


Sources = dict[tuple[str, ...], dict[Any, TensorSource]]  # path -> {layer index (None: not stacked): source}


def _reader(by_layer: dict[Any, TensorSource], stacked: bool, dtype, check_finite: bool):
    """index (a tuple of slices of the parameter's global shape) -> that block as a host array."""

    def read(index):
        index = tuple(index)
        if not stacked:
            return by_layer[None].read(index, dtype, check_finite)
        layers = range(len(by_layer))[index[0]] if index else range(len(by_layer))
        return np.stack([by_layer[i].read(index[1:], dtype, check_finite) for i in layers])

    return read


def materialize(sources: Sources, shapes: dict[tuple[str, ...], tuple[int, ...]], dtype, num_layers: int,
                per_layer: bool, check_finite: bool, specs: dict | None = None, mesh: Mesh | None = None) -> dict:
    """The nested parameter dict: each parameter read from its sources, one at a time, onto the default
    device, or with `mesh` straight into the shards `specs` gives it (each device's callback reads its block
    only, so the host holds about one shard at a time). LM layer weights are stacked on a leading L axis, or
    with `per_layer` separate per-layer arrays (`llama.scan_layers`)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    params: dict[str, Any] = {}

    def place(read, shape, spec):
        if mesh is None:
            return jnp.asarray(read(tuple(slice(None) for _ in shape)))
        return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), read)

    for path, by_layer in sources.items():
        stacked = None not in by_layer
        shape = tuple(shapes[path])
        spec = specs[path] if specs is not None else PartitionSpec()
        if per_layer and stacked and path[:2] == ("lm", "layers"):
            layers = params.setdefault("lm", {}).setdefault("layers", [{} for _ in range(num_layers)])
            for i, layer in enumerate(layers):
                read = _reader({None: by_layer[i]}, False, np_dtype, check_finite)
                layer[path[-1]] = place(read, shape[1:], PartitionSpec(*tuple(spec)[1:]))
            continue
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = place(_reader(by_layer, stacked, np_dtype, check_finite), shape, spec)
    return params


def bytes_per_device(tree: Any) -> dict[str, int]:
    """{device: bytes of `tree`'s arrays it holds} (replicated arrays count on every device)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = str(shard.device)
            out[key] = out.get(key, 0) + int(shard.data.nbytes)
    return out


def shard_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Batch arrays (leading axis: rows, or rows x images) split over `data` where it divides, else
    replicated; on the mesh either way."""
    if mesh is None:
        return tree
    data = axis_size(mesh, "data")

    def put(x):
        if x is None or not hasattr(x, "shape"):
            return x
        spec = PartitionSpec("data") if x.ndim and x.shape[0] % data == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)
