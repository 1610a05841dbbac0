"""Zero-copy, one-tensor-at-a-time reading of `.safetensors` files (bfloat16 included).

The `safetensors` package cannot hand bfloat16 to numpy, and its flax mode puts every tensor on the
device; the format is simple enough to memory-map directly: an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped safetensors file. `keys()`, `shape(key)`, `get(key) -> np.ndarray` (read-only view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        check_file(self.path, "a safetensors file")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"{self.path}: truncated or corrupt safetensors header "
                                 f"(header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                             "not an object)")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        for key, info in header.items():
            if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)
                    and len(info["data_offsets"]) == 2):
                raise ValueError(f"{self.path}: corrupt safetensors header entry for tensor {key!r}: {info!r}")
            start, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if end > data_size or end - start != nbytes:
                raise ValueError(f"{self.path}: truncated or corrupt safetensors file "
                                 f"(tensor {key!r} needs bytes {start}..{end}, data has {data_size})")
        self._header = header
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n) if data_size else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(_DTYPES[self._header[key]["dtype"]])

    def dtype_name(self, key: str) -> str:
        """The dtype as the file names it (F32, BF16, I32, ...)."""
        return self._header[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        info = self._header[key]
        start, end = info["data_offsets"]
        raw = self._data[start:end] if self._data is not None else np.zeros(0, np.uint8)
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def check_file(path: str, what: str) -> None:
    """`path` is an existing file, not a folder: FileNotFoundError / ValueError naming it and `what` it should be
    (opening a folder would raise IsADirectoryError with the bare path)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not {what}")


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a HF checkpoint dir (single file or sharded with an index). A name that is
    a folder (model.safetensors/, the index, a shard) is a ValueError naming it."""
    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        check_file(index, "a safetensors index (JSON)")
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected a JSON object with a 'weight_map' of "
                             f"tensor name -> shard file): {type(e).__name__}: {e}") from None
        missing = [p for p in files if not os.path.exists(os.path.join(directory, p))]
        if missing:
            raise FileNotFoundError(f"{directory}: shards listed in model.safetensors.index.json are missing: "
                                    f"{missing}")
        for p in files:
            check_file(os.path.join(directory, p), "a safetensors shard (listed in model.safetensors.index.json)")
        return [os.path.join(directory, p) for p in files]
    if os.path.exists(single):
        check_file(single, "a safetensors file")
        return [single]
    found = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
    if found:
        for p in found:
            check_file(os.path.join(directory, p), "a safetensors file")
        return [os.path.join(directory, p) for p in found]
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                            "(only safetensors checkpoints are supported)")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        st = SafetensorsFile(path)
        for key in st.keys():
            yield key, st.get(key)


def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file (any dtype above, bfloat16 included; 8-byte aligned)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in names:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def _all_finite(x: np.ndarray) -> bool:
    """No nan / inf in x. numpy has no SIMD loop for bfloat16: there the exponent bits are checked
    directly (all ones = inf or nan), about 3x faster than np.isfinite on it."""
    if x.dtype == ml_dtypes.bfloat16:
        return x.size == 0 or int((x.view(np.uint16) & 0x7F80).max()) != 0x7F80
    return bool(np.isfinite(x).all())


def check_finite_tensor(x: np.ndarray, key: str, file: str) -> None:
    """ValueError naming the tensor when x holds nan / inf."""
    if _all_finite(x):
        return
    flat = np.asarray(x, np.float32).reshape(-1)
    nan, inf = int(np.isnan(flat).sum()), int(np.isinf(flat).sum())
    raise ValueError(f"{file}: tensor {key!r} holds non-finite values ({nan} nan, {inf} inf of {flat.size}"
                     f"{', after the cast to ' + str(x.dtype) if inf else ''}); the checkpoint is corrupt or "
                     "was saved after a diverged run (vkv_jax.load(..., check_finite=False) skips this check)")
