"""Model checkpoints: our parameter tree in Orbax, with its config (and tokenizer) beside it.

Layout of a model checkpoint directory:

  DIR/config.json      Hugging Face-style model config (`hf_config.py`)
  DIR/params/          Orbax PyTree checkpoint of `model.get_params(model)`
  DIR/tokenizer.model  sentencepiece model, when one was given

`train.py` starts from one (fine-tuning), `infer.py` loads one, the converter writes one.
`save_model` writes a whole in-memory tree; `save_model_streaming` writes leaf by leaf (Orbax
partial saves), so a converter holds one leaf at a time. Both give the same directory layout.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax import distributed
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.hf_config import load_hf_config, save_hf_config

PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"


def save_model(directory: str, params: dict, cfg: ModelConfig,
               tokenizer_path: str | None = None, *, this_process_only: bool = False) -> None:
    """Writes a model checkpoint. `directory` must not exist yet (nothing is overwritten).

    `this_process_only`: in a multi-process run, only the calling process writes (its params
    are whole host arrays); the others do not take part.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {directory} already exists")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = directory + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        options = {}
        if this_process_only:
            me = jax.process_index()
            options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})
        with ocp.StandardCheckpointer(**options) as ckptr:
            ckptr.save(os.path.join(staging, PARAMS_DIR), params)
        save_hf_config(cfg, os.path.join(staging, "config.json"))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(staging, TOKENIZER_FILE))
        os.replace(staging, directory)  # the checkpoint appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model_streaming(directory: str, leaves: Iterable[tuple[tuple[str, ...], object]],
                         cfg: ModelConfig, tokenizer_path: str | None = None) -> None:
    """Like `save_model`, but each (path, array) leaf is written as soon as it is produced.

    Peak memory is about one leaf (plus Orbax's copy of it) instead of the whole tree. Uses
    Orbax's partial saving (`orbax.checkpoint.experimental.v1.partial`); where that API is
    missing the leaves are gathered and written by `save_model`. Leaves may be global jax
    Arrays: in a multi-process run every process calls this and writes its own shards. The
    result reads with `load_model` either way. `directory` must not exist; it appears whole or
    not at all.
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
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {directory} already exists")
    staging = directory + ".partial"
    main = distributed.is_main()  # several processes: process 0 owns the directories
    if main:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    distributed.barrier("model checkpoint staging")
    session = os.path.join(staging, "session")
    # Uncompressed: zstd on random-looking bf16 weights saves ~10-25% of disk at ~0.1 GB/s per
    # core; the sources (safetensors) are uncompressed too. load_model reads either.
    from orbax.checkpoint.experimental import v1 as ocp_v1

    context = ocp_v1.Context()
    context.array.saving.use_compression = False
    try:
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
        save_hf_config(cfg, os.path.join(staging, "config.json"))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(staging, TOKENIZER_FILE))
        os.replace(staging, directory)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)


def _put(tree: dict, path: tuple[str, ...], leaf) -> dict:
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = leaf
    return tree


def is_model_checkpoint(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, PARAMS_DIR)) and os.path.isfile(
        os.path.join(directory, "config.json"))


def load_model(directory: str, *, param_dtype: str | None = None,
               **config_changes) -> tuple[ModelConfig, dict]:
    """Reads a model checkpoint: (config, params as a nested dict of jax arrays).

    Args:
      directory: a directory written by `save_model`.
      param_dtype: cast the stored parameters to this dtype (default: as stored).
      config_changes: ModelConfig fields to change (e.g. moe_impl); sizes must still match.
    Raises:
      ConfigError: not a model checkpoint, or the weights disagree with the config.
    """
    if not is_model_checkpoint(directory):
        raise ConfigError(f"{directory} is not a model checkpoint (needs config.json and {PARAMS_DIR}/)")
    cfg = load_hf_config(directory, **config_changes)
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    from mixtral_jax.model import abstract, get_params  # local: model imports stay out of I/O

    expected = get_params(abstract(cfg))
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(os.path.join(os.path.abspath(directory), PARAMS_DIR))
        stored_tree = getattr(stored, "item_metadata", stored)
        _check_shapes(expected, stored_tree, directory)
        target = jax.tree.map(
            lambda e: jax.ShapeDtypeStruct(e.shape, jnp.dtype(cfg.param_dtype)), expected)
        params = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
    return cfg, params


def _check_shapes(expected: dict, stored, directory: str) -> None:
    want = {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(
                stored, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k} has shape {have[k]}, config says {want[k]}"
                 for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if problems:
        raise ConfigError(f"checkpoint {directory} does not match its config.json: "
                          + "; ".join(problems))


class LazyParams(dict):
    """The nested parameter dict of a model checkpoint whose leaves are read on first use.

    Only the most recently used leaf stays in memory, so walking the leaves one after the other
    (as `hf_weights.params_to_hf` does) holds one leaf at a time. Leaves are numpy arrays in the
    stored dtype. Build with `LazyParams.open(directory)`.
    """

    @classmethod
    def open(cls, directory: str) -> tuple[ModelConfig, "LazyParams"]:
        cfg = load_hf_config(directory)
        from mixtral_jax.model import abstract, get_params  # local: model imports stay out of I/O

        expected = get_params(abstract(cfg))
        params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir)
        _check_shapes(expected, getattr(stored, "item_metadata", stored), directory)
        cache: dict = {}
        tree = jax.tree_util.tree_map_with_path(
            lambda p, _: _LazyLeaf(params_dir, tuple(k.key for k in p), cache), expected)
        return cfg, cls._wrap(tree)

    @classmethod
    def _wrap(cls, tree):
        return cls({k: cls._wrap(v) if isinstance(v, dict) else v for k, v in tree.items()})


class _LazyLeaf:
    """One stored leaf; `np.asarray(leaf)` or `leaf[i]` reads it (evicting the previous one)."""

    def __init__(self, params_dir: str, path: tuple[str, ...], cache: dict):
        self.params_dir, self.path, self.cache = params_dir, path, cache

    def _value(self) -> np.ndarray:
        if self.cache.get("path") != self.path:
            self.cache.clear()  # drop the previous leaf before reading the next
            item = _put({}, self.path, 0)
            args = _put({}, self.path, ocp.RestoreArgs(restore_type=np.ndarray))
            with ocp.PyTreeCheckpointer() as ckptr:
                tree = ckptr.restore(self.params_dir, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=True))
            for name in self.path:
                tree = tree[name]
            self.cache.update(path=self.path, value=tree)
        return self.cache["value"]

    def __array__(self, dtype=None, copy=None):
        value = self._value()
        return value if dtype is None else value.astype(dtype)

    def __getitem__(self, index):
        return self._value()[index]

    @property
    def dtype(self):
        return self._value().dtype


def to_numpy(params: dict) -> dict:
    """Host copies of every leaf."""
    return jax.tree.map(np.asarray, params)
