"""The weight files of a source directory: which files, which tensors, and reading one of them.

`open_weights(directory, problems, allow_pickle=...)` returns a `WeightFiles` (tensor name ->
shape, dtype, reader) after checking everything that can be checked without reading tensor data:
every safetensors header (`safetensors_io`), and a shard index's file names (present, inside the
directory, symlinks resolved), that every indexed name is in its shard, and that no name is
stored twice or left out of the index.

Pickles (`pytorch_model*.bin`, `*.pth`, `*.pt`) are refused unless `allow_pickle`; even then
they are opened only with torch >= 2.6 and `torch.load(weights_only=True)`, whose unpickler
builds tensors and nothing else. torch is imported on that path only.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.convert import safetensors_io as st
from mixtral_jax.fileio import read_json

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "consolidated*.pth", "*.pt")
MIN_TORCH = (2, 6)


class WeightFiles:
    """Tensors of a directory by name: `shape(k)`, `dtype(k)`, `read(k)`, `nbytes(k)`."""

    def __init__(
        self,
        specs: dict[str, tuple[tuple[int, ...], np.dtype]],
        reader: Callable[[str], np.ndarray],
        files: list[str],
        mapper: Callable[[str], np.ndarray] | None = None,
    ):
        self.specs = specs
        self._reader = reader
        self._mapper = mapper or reader
        self.files = files

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def keys(self):
        return self.specs.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.specs[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self.specs[key][1]

    def nbytes(self, key: str) -> int:
        shape, dtype = self.specs[key]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def read(self, key: str) -> np.ndarray:
        return self._reader(key)

    def map(self, key: str) -> np.ndarray:
        """The tensor memory-mapped where the format allows (safetensors), else read."""
        return self._mapper(key)


def _inside(directory: str, relative: str, problems: list[str], what: str) -> str | None:
    """The real path of `relative` if it stays inside `directory` and exists, else a problem."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(directory, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        problems.append(f"{what} {relative!r} points outside {directory}")
        return None
    if not os.path.isfile(path):
        problems.append(f"{what} {relative!r} does not exist")
        return None
    return path


def _safetensors(
    directory: str, names: list[str], problems: list[str], weight_map: dict[str, str] | None
) -> WeightFiles:
    infos: dict[str, st.TensorInfo] = {}
    where: dict[str, str] = {}
    paths = []
    for name in names:
        path = _inside(directory, name, problems, "shard")
        if path is None:
            continue
        paths.append(path)
        for key, info in st.read_header(path, problems).items():
            if key in infos:
                problems.append(f"tensor {key!r} is stored in both {where[key]} and {name}")
                continue
            infos[key], where[key] = info, name
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in infos and os.path.isfile(os.path.join(directory, shard)):
                problems.append(f"index maps {key!r} to {shard}, which does not contain it")
            elif key in where and where[key] != shard:
                problems.append(f"index maps {key!r} to {shard}, but it is in {where[key]}")
        for key in sorted(set(infos) - set(weight_map)):
            problems.append(f"tensor {key!r} in {where[key]} is not in the shard index")
    specs = {k: (i.shape, i.dtype) for k, i in infos.items()}
    return WeightFiles(
        specs, lambda k: st.read_tensor(infos[k]), paths, lambda k: st.map_tensor(infos[k])
    )


def _read_index(directory: str, name: str, problems: list[str]) -> dict[str, str] | None:
    try:
        weight_map = read_json(os.path.join(directory, name), "shard index")["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map is not an object of strings")
    except ConfigError as e:
        problems.append(f"{name} is not a valid shard index: {e}")
        return None
    except (KeyError, TypeError) as e:
        problems.append(f"{name} is not a valid shard index ({type(e).__name__}: {e})")
        return None
    return weight_map


def find_weight_files(directory: str) -> tuple[str, list[str]]:
    """(kind, file names) of the weights in `directory`: kind is safetensors or pickle."""
    if os.path.isfile(os.path.join(directory, HF_INDEX)):
        return "index", [HF_INDEX]
    if os.path.isfile(os.path.join(directory, HF_SINGLE)):
        return "safetensors", [HF_SINGLE]
    found = sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(directory, "consolidated*.safetensors"))
    )
    if found:
        return "safetensors", found
    pickles = sorted(
        {
            os.path.basename(p)
            for pattern in PICKLE_PATTERNS
            for p in glob.glob(os.path.join(directory, pattern))
        }
    )
    if pickles:
        return "pickle", pickles
    return "none", []


def open_weights(
    directory: str, problems: list[str], *, allow_pickle: bool = False
) -> WeightFiles | None:
    """The checked tensor table of `directory`, or None with the reasons in `problems`."""
    kind, names = find_weight_files(directory)
    if kind == "none":
        problems.append(
            f"{directory} holds no weights (model.safetensors, its index, "
            "consolidated*.safetensors, or pickles)"
        )
        return None
    if kind == "index":
        weight_map = _read_index(directory, HF_INDEX, problems)
        if weight_map is None:
            return None
        return _safetensors(directory, sorted(set(weight_map.values())), problems, weight_map)
    if kind == "safetensors":
        return _safetensors(directory, names, problems, None)
    if not allow_pickle:
        problems.append(
            f"{directory} holds only pickle weights ({', '.join(names)}), which can "
            "run code when loaded: convert them to safetensors, or pass "
            "--allow-pickle to load them with torch.load(weights_only=True)"
        )
        return None
    return _pickles(directory, [n for n in names if not n.endswith(".index.json")], problems)


def _pickles(directory: str, names: list[str], problems: list[str]) -> WeightFiles | None:
    try:
        import torch
    except ImportError:
        problems.append("--allow-pickle needs torch >= 2.6, which is not installed")
        return None
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        problems.append(
            f"--allow-pickle needs torch >= 2.6 (weights_only loading is not safe "
            f"before it, CVE-2025-32434); found {torch.__version__}"
        )
        return None
    tensors: dict = {}
    for name in names:
        path = _inside(directory, name, problems, "file")
        if path is None:
            continue
        try:
            # weights_only=True: the restricted unpickler; never retried without it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any refusal is reported, never retried
            problems.append(
                f"{name}: refused by torch.load(weights_only=True) "
                f"({type(e).__name__}); convert it to safetensors"
            )
            continue
        if not isinstance(state, dict):
            problems.append(f"{name}: holds a {type(state).__name__}, not a state dict")
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                problems.append(f"{name}: {key!r} is a {type(value).__name__}, not a tensor")
            elif key in tensors:
                problems.append(f"tensor {key!r} is stored in more than one file")
            else:
                tensors[key] = value
    specs = {k: (tuple(v.shape), _numpy_dtype(v.dtype)) for k, v in tensors.items()}
    return WeightFiles(specs, lambda k: _to_numpy(tensors[k]), names)


def _numpy_dtype(torch_dtype) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    return (
        np.dtype(st.DTYPES["BF16"])
        if name == "bfloat16"
        else np.dtype(
            {"float32": np.float32, "float16": np.float16, "float64": np.float64}.get(name, np.void)
        )
    )


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(st.DTYPES["BF16"])
    return tensor.contiguous().numpy()
