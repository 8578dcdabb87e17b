"""Model checkpoints: our parameter tree in Orbax, with its config (and tokenizer) beside it.

Layout of a model checkpoint directory:

  DIR/config.json      Hugging Face-style model config (`hf_config.py`)
  DIR/params/          Orbax PyTree checkpoint of `model.get_params(model)`
  DIR/tokenizer.model  sentencepiece model, when one was given

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
import os
import shutil
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.fileio import atomic_directory
from mixtral_jax.hf.config import load_hf_config, save_hf_config
from mixtral_jax.parallel import distributed

PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"


def save_model(
    directory: str,
    params: dict,
    cfg: ModelConfig,
    tokenizer_path: str | None = None,
    *,
    this_process_only: bool = False,
    overwrite: bool = False,
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
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with ocp.StandardCheckpointer(**options) as ckptr:
            ckptr.save(os.path.join(staging, PARAMS_DIR), params)
        _write_config_and_tokenizer(staging, cfg, tokenizer_path)


def _write_config_and_tokenizer(
    directory: str, cfg: ModelConfig, tokenizer_path: str | None
) -> None:
    """config.json, and a copy of the tokenizer when there is one, into `directory`."""
    save_hf_config(cfg, os.path.join(directory, "config.json"))
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
    for path, leaf in leaves:
        if not isinstance(leaf, StreamedLeaf):
            leaf = np.asarray(leaf)
            leaf = StreamedLeaf(leaf.shape, leaf.dtype, 0, lambda _, v=leaf: v)
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
        _write_config_and_tokenizer(staging, cfg, tokenizer_path)


def save_model_sharded(
    directory: str,
    leaves: Iterable[tuple[tuple[str, ...], jax.Array]],
    cfg: ModelConfig,
    tokenizer_path: str | None = None,
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
        return save_model(directory, tree, cfg, tokenizer_path)
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
        _write_config_and_tokenizer(staging, cfg, tokenizer_path)


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
    directory: str, *, param_dtype: str | None = None, **config_changes
) -> tuple[ModelConfig, dict]:
    """Reads a model checkpoint: (config, params as a nested dict of jax arrays).

    Args:
      directory: a directory written by `save_model`.
      param_dtype: cast the stored parameters to this dtype (default: as stored).
      config_changes: ModelConfig fields to change (e.g. moe_impl); sizes must still match.
    Raises:
      ConfigError: not a model checkpoint, or the weights disagree with the config.
    """
    if not is_model_checkpoint(directory):
        raise ConfigError(
            f"{directory} is not a model checkpoint (needs config.json and {PARAMS_DIR}/)"
        )
    cfg = load_hf_config(directory, **config_changes)
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    from mixtral_jax.model.params import abstract, get_params

    expected = get_params(abstract(cfg))
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(os.path.join(os.path.abspath(directory), PARAMS_DIR))
        stored_tree = getattr(stored, "item_metadata", stored)
        _check_shapes(expected, stored_tree, directory)
        target = jax.tree.map(
            lambda e: jax.ShapeDtypeStruct(e.shape, jnp.dtype(cfg.compute.param_dtype)), expected
        )
        params = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
    return cfg, params


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
        from mixtral_jax.model.params import abstract, get_params

        expected = get_params(abstract(cfg))
        params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir)
        _check_shapes(expected, getattr(stored, "item_metadata", stored), directory)
        # "Restoring" with a handler that opens each stored array and reads nothing.
        registry = ocp.type_handlers.create_type_handler_registry((_LazyLeaf, _OpenHandler()))
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
        with ocp.Checkpointer(handler) as ckptr:
            tree = ckptr.restore(
                params_dir,
                args=ocp.args.PyTreeRestore(
                    item=jax.tree.map(lambda _: 0, expected),
                    restore_args=jax.tree.map(
                        lambda _: ocp.RestoreArgs(restore_type=_LazyLeaf), expected
                    ),
                ),
            )
        return cfg, cls._wrap(tree)

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
