"""Safetensors files read and written with numpy alone: checked headers, one tensor at a time.

We parse the header ourselves (8-byte little-endian length, then JSON) so that every defect a
malicious or truncated file can have is found *before* anything is written, and reported as a
problem string rather than an exception from deep inside a library:

  header length larger than the file or than 100 MB, non-UTF-8 / non-JSON / non-object header,
  duplicate names, unknown dtypes, negative or non-integer shapes, offsets that are out of order,
  overlap, leave gaps, disagree with shape x itemsize, or run past the end of the file.

A tensor is then read with one `np.fromfile` at its offset (bfloat16 through ml_dtypes), so
peak memory is that tensor. Writing streams too: the header is computed from shapes alone, then
each tensor's bytes are appended as it is produced.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit of the reference implementation

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorInfo:
    """Where one tensor lives: file, dtype, shape, absolute byte range."""

    __slots__ = ("dtype", "end", "path", "shape", "start")

    def __init__(self, path: str, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate tensor name {key!r}")
        seen[key] = value
    return seen


def read_header(path: str, problems: list[str]) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file; each defect is appended to `problems`."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problems.append(f"{name}: truncated ({size} bytes, no header length)")
                return {}
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                problems.append(
                    f"{name}: header length {n} exceeds the file ({size} bytes) "
                    f"or the {MAX_HEADER_BYTES}-byte limit (truncated or corrupt)"
                )
                return {}
            raw = f.read(n)
    except OSError as e:
        problems.append(f"{name}: cannot read ({e.strerror or e})")
        return {}
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        problems.append(f"{name}: header is not valid UTF-8 JSON ({e})")
        return {}
    if not isinstance(header, dict):
        problems.append(f"{name}: header is not a JSON object")
        return {}
    header.pop("__metadata__", None)
    return _tensor_infos(path, name, header, 8 + n, size, problems)


def _tensor_infos(path, name, header, data_start, size, problems) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    before = len(problems)
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape {list(shape)}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"data_offsets {[begin, end]}")
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{name}: tensor {key!r} has a malformed entry ({e})")
            continue
        want = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if end - begin != want:
            problems.append(
                f"{name}: tensor {key!r} spans {end - begin} bytes, its shape "
                f"{list(shape)} x {dtype} needs {want}"
            )
            continue
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    if len(problems) > before:
        return {}
    cursor = data_start
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != cursor:
            problems.append(
                f"{name}: tensor {key!r} starts at byte {info.start - data_start}, "
                f"expected {cursor - data_start} (overlapping or gapped offsets)"
            )
            return {}
        cursor = info.end
    if cursor != size:
        kind = "truncated" if cursor > size else "has trailing bytes"
        problems.append(f"{name}: {kind}: data ends at byte {cursor}, the file has {size}")
        return {}
    return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's values (one read of exactly its bytes)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    with open(info.path, "rb") as f:
        f.seek(info.start)
        out = np.fromfile(f, dtype=info.dtype, count=count)
    if out.size != count:
        raise OSError(f"{os.path.basename(info.path)}: file shrank while reading")
    return out.reshape(info.shape)


def map_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor memory-mapped read-only (nothing is read until indexed; the pages touched are
    released with the returned array)."""
    if os.path.getsize(info.path) < info.end:
        raise OSError(f"{os.path.basename(info.path)}: file shrank while reading")
    if info.nbytes == 0:
        return np.empty(info.shape, info.dtype)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.start, shape=info.shape)


def header_bytes(
    specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> bytes:
    """The length prefix and JSON header for tensors written in the given order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class StreamWriter:
    """Writes one safetensors file tensor by tensor; the order and shapes are fixed up front."""

    def __init__(self, path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]]):
        self._specs = list(specs)
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 (open across write calls; close() ends it)
        self._file.write(header_bytes(self._specs))

    def write(self, key: str, array: np.ndarray) -> None:
        want_key, dtype, shape = self._specs[self._next]
        if key != want_key or array.dtype != dtype or tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"tensor {key} {array.dtype}{list(array.shape)} written where "
                f"{want_key} {dtype}{list(shape)} was declared"
            )
        self._file.flush()
        np.ascontiguousarray(array).tofile(self._file)  # no bytes copy
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self._next} of {len(self._specs)} declared tensors written")
