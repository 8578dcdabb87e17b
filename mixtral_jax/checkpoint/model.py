"""Model checkpoints: our parameter tree in Orbax, with its config (and tokenizer) beside it.

Layout of a model checkpoint directory:

  DIR/config.json      Hugging Face-style model config (`hf_config.py`)
  DIR/params/          Orbax PyTree checkpoint of `model.get_params(model)`
  DIR/tokenizer.model  sentencepiece model, when one was given
  DIR/checksums.json   per array, the CRC32 of each stored slice (one layer / expert of a
                       stacked leaf, in index order) of its stored bytes; checked on load

`train.py` starts from one (fine-tuning), `infer.py` loads one, the converter writes one.
`save_model` writes a whole in-memory tree. The converter's two writers give the same layout:
`save_model_streaming` writes host leaves slice by slice (`StreamedLeaf`: one layer / expert of a
stacked leaf in memory at a time), `save_model_sharded` writes global jax Arrays leaf by leaf
(Orbax partial saves), each process its shards. `LazyParams` reads a checkpoint slice by slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.fileio import atomic_directory
from mixtral_jax.hf.config import load_hf_config, save_hf_config
from mixtral_jax.parallel import distributed

PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
CHECKSUMS_FILE = "checksums.json"  # per array: CRC32 of each stored slice, verified on load


def save_model(
    directory: str,
    params: dict,
    cfg: ModelConfig,
    tokenizer_path: str | None = None,
    *,
    this_process_only: bool = False,
    overwrite: bool = False,
    extra_config: dict | None = None,
) -> None:
    """Writes a model checkpoint; it appears whole or not at all (`fileio.atomic_directory`).

    `directory` must not exist yet, unless `overwrite` (then it is replaced once the new one is
    complete). `this_process_only`: in a multi-process run, only the calling process writes (its
    params are whole host arrays); the others do not take part.
    """
    if not overwrite and os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {os.path.abspath(directory)} already exists")
    options = {}
    if this_process_only:
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    # One storage chunk per slice (layer / expert), as the streaming writer: a slice reads alone.
    save_args = jax.tree_util.tree_map_with_path(
        lambda p, _: ocp.SaveArgs(shard_axes=tuple(range(stack_axes(_names(p))))), params
    )
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with ocp.StandardCheckpointer(**options) as ckptr:
            ckptr.save(os.path.join(staging, PARAMS_DIR), params, save_args=save_args)
        if all(_addressable(x) for x in jax.tree.leaves(params)):
            sums = {
                _dotted(p): _array_crcs(x, stack_axes(_names(p)))
                for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            }
        else:  # not all on this process: read back what was written
            sums = _crcs_from_disk(os.path.join(staging, PARAMS_DIR))
        _write_checksums(staging, sums)
        _write_config_and_tokenizer(staging, cfg, tokenizer_path, extra_config)


def stack_axes(path: tuple[str, ...]) -> int:
    """How many leading axes of our leaf `path` stack layers / experts (0, 1 or 2). A quantized
    weight's codes (W) and scales (W_scale) are stacked as the weight is."""
    from mixtral_jax.hf.weights import TABLE
    from mixtral_jax.parallel.sharding import SCALE_SUFFIX

    path = (*path[:-1], path[-1].removesuffix(SCALE_SUFFIX)) if path else tuple(path)
    for m in TABLE:
        if m.path == tuple(path):
            return m.per_layer + m.per_expert
    return 0


def _names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", k) for k in path)


def _dotted(path) -> str:
    return ".".join(_names(path))


def _addressable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def slice_crc(x: np.ndarray) -> int:
    """CRC32 of an array's bytes in C order."""
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _array_crcs(x, lead: int) -> dict:
    """{"lead": lead, "crc32": [CRC32 of x[index] for index over the first `lead` axes]}."""
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    return {"lead": lead, "crc32": [slice_crc(x[i]) for i in np.ndindex(*x.shape[:lead])]}


def _crcs_from_disk(params_dir: str) -> dict:
    """The checksums of a written params/ directory, read back slice by slice."""
    stores = _open_stores(params_dir, None)
    out = {}
    for path, leaf in _flat_leaves(stores):
        lead = stack_axes(path)
        crcs = [slice_crc(leaf[i]) for i in np.ndindex(*leaf.shape[:lead])]
        out[".".join(path)] = {"lead": lead, "crc32": crcs}
    return out


def _flat_leaves(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_leaves(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _write_checksums(directory: str, sums: dict) -> None:
    """checksums.json into `directory` (a staging directory: it appears with the checkpoint)."""
    with open(os.path.join(directory, CHECKSUMS_FILE), "w", encoding="utf-8") as f:
        json.dump({"algorithm": "crc32", "arrays": sums}, f, sort_keys=True)
        f.write("\n")


def read_checksums(directory: str) -> dict | None:
    """name -> {"lead", "crc32"} of a model checkpoint, or None when it has none (older)."""
    from mixtral_jax.fileio import read_json

    path = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return None
    data = read_json(path, CHECKSUMS_FILE)
    if not isinstance(data, dict) or data.get("algorithm") != "crc32":
        raise ConfigError(f"{path}: not a crc32 checksum file")
    return data.get("arrays", {})


def _write_config_and_tokenizer(
    directory: str, cfg: ModelConfig, tokenizer_path: str | None, extra: dict | None = None
) -> None:
    """config.json (with `extra`: a source config.json's fields we do not read, passed
    through), and a copy of the tokenizer when there is one, into `directory`."""
    save_hf_config(cfg, os.path.join(directory, "config.json"), extra=extra)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(directory, TOKENIZER_FILE))


@dataclasses.dataclass(eq=False)
class StreamedLeaf:
    """A host leaf that is produced one slice at a time while it is written.

    Attributes:
      shape: the whole leaf's shape.
      dtype: numpy dtype of every slice.
      lead: how many leading axes are written one index at a time (0: the leaf is one slice).
      fill: `fill(index)` -> the numpy slice `leaf[index]`, `index` a tuple of `lead` ints.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    lead: int
    fill: Callable[[tuple[int, ...]], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def indices(self) -> Iterable[tuple[int, ...]]:
        return np.ndindex(*self.shape[: self.lead])

    def materialize(self) -> np.ndarray:
        """The whole leaf in memory (for small models and tests)."""
        out = np.empty(self.shape, self.dtype)
        for index in self.indices():
            out[index] = self.fill(index)
        return out

    def __deepcopy__(self, memo):  # Orbax copies host arrays defensively; nothing to copy here
        return self


class _StreamedLeafHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler (same files, same `np.ndarray` type in the metadata), except that a
    `StreamedLeaf` is written slice by slice, one leaf after the other: the next slice is made
    while the previous one is written, so about two slices are in memory."""

    _lock: asyncio.Lock | None = None
    _failed = False

    async def _open_and_write(self, value, tspec, ts_context):
        if not isinstance(value, StreamedLeaf):
            return await super()._open_and_write(value, tspec, ts_context)
        if self._lock is None:
            self._lock = asyncio.Lock()  # Orbax gathers all leaves at once: take turns
        async with self._lock:
            if self._failed:  # an earlier leaf failed: write nothing more
                return
            self._failed = True  # until this leaf is complete
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            pending = None
            try:
                for index in value.indices():
                    data = await asyncio.to_thread(value.fill, index)
                    if data.shape != value.shape[value.lead :] or data.dtype != value.dtype:
                        raise ValueError(
                            f"slice {index} is {data.dtype}{list(data.shape)}, expected "
                            f"{value.dtype}{list(value.shape[value.lead :])}"
                        )
                    if pending is not None:
                        await pending
                    pending = t[index].write(data, can_reference_source_data_indefinitely=True)
                if pending is not None:
                    await pending
                pending = None
                self._failed = False
            finally:
                if pending is not None:  # failing: let the write in flight finish first
                    with contextlib.suppress(Exception):
                        await pending


def save_model_streaming(
    directory: str,
    leaves: Iterable[tuple[tuple[str, ...], object]],
    cfg: ModelConfig,
    tokenizer_path: str | None = None,
    *,
    verify: Callable[[], None] | None = None,
    extra_config: dict | None = None,
) -> None:
    """Like `save_model`, from (path, leaf) pairs whose leaves are host arrays or `StreamedLeaf`s.

    A `StreamedLeaf` is stored in chunks of one slice (one index of its `lead` axes), each
    written as soon as `fill` makes it, so peak memory is about two slices, not a leaf or the
    model. One process writes (the caller). `verify()`, when given, runs after the last slice and
    before the checkpoint is moved into place; whatever it raises leaves nothing behind.
    `directory` must not exist; it appears whole or not at all. Reads with `load_model`.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {directory} already exists")
    tree: dict = {}
    save_args: dict = {}
    sums: dict = {}
    for path, leaf in leaves:
        if not isinstance(leaf, StreamedLeaf):  # written (and later read) slice by slice
            leaf = np.asarray(leaf)
            lead = stack_axes(path) if leaf.ndim > stack_axes(path) else 0
            leaf = StreamedLeaf(leaf.shape, leaf.dtype, lead, lambda i, v=leaf: v[i])
        leaf = _summed(leaf, sums.setdefault(".".join(path), {"lead": leaf.lead}))
        _put(tree, path, leaf)
        # One storage chunk per slice: a slice write never rewrites a chunk already written.
        _put(save_args, path, ocp.SaveArgs(shard_axes=tuple(range(leaf.lead))))
    registry = ocp.type_handlers.create_type_handler_registry(
        (StreamedLeaf, _StreamedLeafHandler()), (jax.Array, ocp.type_handlers.ArrayHandler())
    )
    # Uncompressed: zstd on random-looking bf16 weights saves ~10-25% of disk at ~0.1 GB/s per
    # core; the sources (safetensors) are uncompressed too. load_model reads either.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with atomic_directory(directory) as staging:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(
                os.path.join(staging, PARAMS_DIR),
                args=ocp.args.PyTreeSave(tree, save_args=save_args),
            )
        if verify is not None:
            verify()
        _write_checksums(staging, sums)
        _write_config_and_tokenizer(staging, cfg, tokenizer_path, extra_config)


def _summed(leaf: StreamedLeaf, entry: dict) -> StreamedLeaf:
    """`leaf` whose `fill` also records each slice's CRC32 into entry["crc32"] (index order)."""
    count = int(np.prod(leaf.shape[: leaf.lead], dtype=np.int64))
    crcs = entry.setdefault("crc32", [None] * count)

    def fill(index, fill=leaf.fill):
        data = fill(index)
        if data.dtype == leaf.dtype and data.shape == leaf.shape[leaf.lead :]:
            flat = int(np.ravel_multi_index(index, leaf.shape[: leaf.lead])) if index else 0
            crcs[flat] = slice_crc(data)
        return data

    return StreamedLeaf(leaf.shape, leaf.dtype, leaf.lead, fill)


def save_model_sharded(
    directory: str,
    leaves: Iterable[tuple[tuple[str, ...], jax.Array]],
    cfg: ModelConfig,
    tokenizer_path: str | None = None,
    *,
    extra_config: dict | None = None,
) -> None:
    """Like `save_model`, from (path, global jax.Array) pairs, each written as it is produced.

    Every process calls this and writes its own shards of each leaf (Orbax partial saves,
    `orbax.checkpoint.experimental.v1.partial`), so a process holds its shards of one leaf at a
    time; where that API is missing the leaves are gathered and written by `save_model`.
    `directory` must not exist; it appears whole or not at all.
    """
    try:
        from orbax.checkpoint.experimental.v1 import partial
    except ImportError:
        partial = None
    if partial is None:
        tree: dict = {}
        for path, leaf in leaves:
            _put(tree, path, leaf)
        return save_model(directory, tree, cfg, tokenizer_path, extra_config=extra_config)
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {os.path.abspath(directory)} already exists")
    from orbax.checkpoint.experimental import v1 as ocp_v1

    context = ocp_v1.Context()
    context.array.saving.use_compression = False  # as save_model_streaming
    main = distributed.is_main()  # several processes: process 0 owns the directories
    with atomic_directory(directory, owner=main) as staging:
        distributed.barrier("model checkpoint staging")
        session = os.path.join(staging, "session")
        with context:
            for path, leaf in leaves:
                partial.save(session, _put({}, path, leaf))
            partial.finalize(session)
        distributed.barrier("model checkpoint written")
        if not main:
            return
        # The finalized session holds the PyTree checkpoint in `state/`: our params/ directory.
        os.replace(os.path.join(session, "state"), os.path.join(staging, PARAMS_DIR))
        metadata = os.path.join(session, "_CHECKPOINT_METADATA")  # as save_model's params/ has
        if os.path.isfile(metadata):
            os.replace(metadata, os.path.join(staging, PARAMS_DIR, "_CHECKPOINT_METADATA"))
        shutil.rmtree(session)
        _write_checksums(staging, _crcs_from_disk(os.path.join(staging, PARAMS_DIR)))
        _write_config_and_tokenizer(staging, cfg, tokenizer_path, extra_config)


def _put(tree: dict, path: tuple[str, ...], leaf) -> dict:
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = leaf
    return tree


def is_model_checkpoint(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, PARAMS_DIR)) and os.path.isfile(
        os.path.join(directory, "config.json")
    )


def load_model(
    directory: str,
    *,
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    **config_changes,
) -> tuple[ModelConfig, dict]:
    """Reads a model checkpoint: (config, params as a nested dict of jax arrays).

    Each array is read slice by slice (one layer / expert), checked against checksums.json and
    placed straight into its device location (`placement.place_params`): the host never holds
    the model.

    Args:
      directory: a directory written by `save_model` (or the streaming / sharded writers).
      param_dtype: cast the stored parameters to this dtype (default: config.json's).
      mesh: place by the rules table on this mesh (default: the first device).
      progress: a progress bar (bytes, GB/s) on stderr.
      config_changes: ModelConfig fields to change (e.g. moe_impl); sizes must still match.
    Raises:
      ConfigError: not a model checkpoint, the weights disagree with the config, or an array
        fails its checksum (named, one line).
    """
    from mixtral_jax.checkpoint.placement import default_shardings, place_params
    from mixtral_jax.model.params import param_shapes

    if not is_model_checkpoint(directory):
        raise ConfigError(
            f"{directory} is not a model checkpoint (needs config.json and {PARAMS_DIR}/)"
        )
    cfg = load_hf_config(directory, **config_changes)
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    shapes = param_shapes(cfg)
    readers = checkpoint_readers(directory, shapes)
    params = place_params(shapes, readers, default_shardings(shapes, mesh), progress=progress)
    return cfg, params


def checkpoint_readers(directory: str, shapes: dict) -> dict:
    """leaf path -> `placement.LeafReader` over the stored arrays of a model checkpoint; each
    slice is checked against checksums.json as it is read (one-line warning when there is none).

    Raises:
      ConfigError: the stored shapes disagree with `shapes` (every difference listed).
    """
    from mixtral_jax.checkpoint.placement import LeafReader

    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    stores = _open_stores(params_dir, shapes, directory)
    sums = read_checksums(directory)
    if sums is None:
        print(
            f"warning: {directory} has no {CHECKSUMS_FILE} (written before checksums): "
            "its weights are not verified",
            file=sys.stderr,
        )
    readers = {}
    for path, leaf in _flat_leaves(stores):
        name = ".".join(path)
        entry = None if sums is None else sums.get(name)
        if sums is not None and entry is None:
            raise ConfigError(f"{directory}: {CHECKSUMS_FILE} has no entry for array {name}")
        lead = min(stack_axes(path), _sliced_axes(leaf)) if entry is None else int(entry["lead"])
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
        readers[path] = LeafReader(lead, _verified_read(directory, name, leaf, entry), nbytes)
    return readers


def _sliced_axes(leaf) -> int:
    """How many leading axes of a stored leaf are chunked one index at a time (an older
    checkpoint may store a leaf as one chunk: reading it slice by slice would re-read it)."""
    try:
        chunk = leaf.store.chunk_layout.read_chunk.shape
    except (AttributeError, ValueError):
        return 0
    count = 0
    while count < len(chunk) and chunk[count] == 1:
        count += 1
    return count


def _verified_read(directory: str, name: str, leaf, entry: dict | None):
    """read(index) of a stored leaf, checking the slice's CRC32 when `entry` records it."""
    lead = 0 if entry is None else int(entry["lead"])
    shape = leaf.shape[:lead]

    def read(index):
        try:
            data = leaf[index] if index else np.asarray(leaf)
        except Exception as e:  # noqa: BLE001 - a damaged store: named, one line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{directory}: cannot read array {name}: {first}") from None
        if entry is not None:
            want = entry["crc32"][int(np.ravel_multi_index(index, shape)) if index else 0]
            got = slice_crc(data)
            if got != want:
                where = f" slice {list(index)}" if index else ""
                raise ConfigError(
                    f"{directory}: array {name}{where} fails its checksum (crc32 {got:08x}, "
                    f"recorded {want:08x}): the checkpoint is corrupt"
                )
        return data

    return read


def _open_stores(params_dir: str, expected: dict | None, directory: str | None = None) -> dict:
    """The stored arrays of a params/ directory as a nested dict of `_LazyLeaf` (no data read);
    with `expected`, the stored shapes are checked against it first."""
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir)
    stored = getattr(stored, "item_metadata", stored)
    if expected is not None:
        _check_shapes(expected, stored, directory or params_dir)
    else:
        expected = jax.tree.map(lambda x: x, dict(stored), is_leaf=lambda x: hasattr(x, "shape"))
    # "Restoring" with a handler that opens each stored array and reads nothing.
    registry = ocp.type_handlers.create_type_handler_registry((_LazyLeaf, _OpenHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        return ckptr.restore(
            params_dir,
            args=ocp.args.PyTreeRestore(
                item=jax.tree.map(lambda _: 0, expected),
                restore_args=jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=_LazyLeaf), expected
                ),
            ),
        )


def _check_shapes(expected: dict, stored, directory: str) -> None:
    want = {
        jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    have = {
        jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(
            stored, is_leaf=lambda x: hasattr(x, "shape")
        )[0]
    }
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k} has shape {have[k]}, config says {want[k]}"
        for k in sorted(set(want) & set(have))
        if want[k] != have[k]
    ]
    if problems:
        raise ConfigError(
            f"checkpoint {directory} does not match its config.json: " + "; ".join(problems)
        )


class LazyParams(dict):
    """The nested parameter dict of a model checkpoint whose leaves read only what is indexed.

    `leaf[i]` reads the slice `i` from disk (a layer, or one expert of a layer, as
    `hf.weights.params_to_hf` walks them); `np.asarray(leaf)` reads the whole leaf. Nothing is
    cached, so walking the slices holds one slice at a time. Values are numpy in the stored
    dtype. Build with `LazyParams.open(directory)`.
    """

    @classmethod
    def open(cls, directory: str) -> tuple[ModelConfig, LazyParams]:
        cfg = load_hf_config(directory)
        from mixtral_jax.model.params import param_shapes

        params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
        return cfg, cls._wrap(_open_stores(params_dir, param_shapes(cfg), directory))

    @classmethod
    def _wrap(cls, tree):
        return cls({k: cls._wrap(v) if isinstance(v, dict) else v for k, v in tree.items()})


class _LazyLeaf:
    """One stored array; `leaf[index]` or `np.asarray(leaf)` reads it."""

    def __init__(self, store: ts.TensorStore):
        self.store = store

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.store.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype.numpy_dtype)

    def __getitem__(self, index) -> np.ndarray:
        return self.store[index].read().result()

    def __array__(self, dtype=None, copy=None):
        value = self.store.read().result()
        return value if dtype is None else value.astype(dtype)


class _OpenHandler(ocp.type_handlers.NumpyHandler):
    """Restores each array as a `_LazyLeaf` over its open TensorStore (no data read)."""

    async def deserialize(self, infos, args=None):
        out = []
        for info in infos:
            tspec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
            out.append(_LazyLeaf(await ts.open(ts.Spec(tspec), open=True, context=info.ts_context)))
        return out


def to_numpy(params: dict) -> dict:
    """Host copies of every leaf."""
    return jax.tree.map(np.asarray, params)
