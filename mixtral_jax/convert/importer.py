"""Hugging Face / Mistral / pickle checkpoint -> our model checkpoint (Orbax + config.json).

Order of work, so that a failure leaves nothing behind:
  1. `open_source` checks files, layout, config, names, shapes and dtypes (no tensor data read);
  2. each of our leaves is filled slice by slice from one stored tensor at a time (an expert
     stack at most), with a progress bar in bytes; `--check-finite` scans each slice;
  3. `checkpoint.save_model_streaming` writes each leaf as soon as it is complete, into a
     staging directory that is renamed into place only after the last leaf (and after the
     finiteness verdict): an error at any point leaves no output behind.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil

import numpy as np
from tqdm import tqdm

from mixtral_jax import checkpoint
from mixtral_jax.convert.source import ConversionError, Source, open_source
from mixtral_jax.hf_weights import TABLE, slice_keys

TOKENIZER_CANDIDATES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")


def find_tokenizer(directory: str) -> str | None:
    """The sentencepiece model shipped in `directory`, if any."""
    for name in TOKENIZER_CANDIDATES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    found = sorted(glob.glob(os.path.join(directory, "tokenizer.model*")))
    return found[0] if found else None


def iter_leaves(src: Source, *, check_finite: bool = False, progress: bool = True,
                scratch: str | None = None, problems: list[str] | None = None):
    """(path, leaf) of our parameter tree, each leaf filled from one stored tensor at a time.

    Leaves are numpy in `src.cfg.param_dtype`. With `scratch` (a directory), leaves larger
    than `SCRATCH_MIN_BYTES` live in a memory-mapped file there, so the process's own memory
    stays near the one leaf Orbax copies while writing. With `check_finite`, non-finite slices
    go into `problems` (named, with their count) and a `ConversionError` is raised after the
    last leaf, before anything is finalized.
    """
    cfg, get = src.cfg, src.getter()
    dtype = np.dtype(_np_dtype(cfg.param_dtype))
    problems = [] if problems is None else problems
    with tqdm(total=src.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc="convert", disable=not progress) as bar:
        for m in TABLE:
            leaf = None
            for index, key in slice_keys(m, cfg):
                hf = get(key)
                if check_finite:
                    bad = int(np.size(hf) - np.count_nonzero(np.isfinite(hf)))
                    if bad:
                        problems.append(f"{key} has {bad} non-finite value(s)")
                ours = m.to_ours(hf, cfg)
                if leaf is None:
                    leading = (cfg.num_layers,) * m.per_layer + (cfg.num_experts,) * m.per_expert
                    leaf = _new_leaf(leading + ours.shape, dtype, scratch, m.path)
                leaf[index] = ours  # casts only when --dtype asked for it
                bar.update(hf.nbytes)
            yield m.path, leaf
            filename = getattr(leaf, "filename", None)
            del leaf
            if filename:
                os.remove(filename)  # written out: give the scratch space back
    if check_finite and problems:
        raise ConversionError(src.directory, problems)


SCRATCH_MIN_BYTES = 64 * 1024**2


def _new_leaf(shape, dtype, scratch, path) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if scratch is None or nbytes < SCRATCH_MIN_BYTES:
        return np.empty(shape, dtype)
    os.makedirs(scratch, exist_ok=True)
    # A raw memory map (no .npy header: numpy's header writer cannot describe bfloat16).
    return np.memmap(os.path.join(scratch, ".".join(path)), dtype=dtype, mode="w+", shape=shape)


def build_params(src: Source, *, check_finite: bool = False, progress: bool = True) -> dict:
    """Our whole nested parameter dict (numpy) in memory: for tests and small models."""
    params: dict = {}
    for path, leaf in iter_leaves(src, check_finite=check_finite, progress=progress):
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return params


def iter_sharded_leaves(src: Source, mesh, *, check_finite: bool = False,
                        problems: list[str] | None = None):
    """(path, global jax.Array) of our parameter tree, each leaf created straight in the rules
    table's sharding over `mesh` (sharding.param_shardings).

    Each device's block is filled by a callback that reads only the stored tensors that block
    overlaps (whole layers / experts on the stacked axes, then sliced), so a process reads and
    holds only its own shards of one leaf; Orbax then writes each shard from its owner.
    """
    import jax  # noqa: PLC0415

    from mixtral_jax import sharding  # noqa: PLC0415

    cfg, get = src.cfg, src.getter()
    dtype = np.dtype(_np_dtype(cfg.param_dtype))
    shardings = sharding.param_shardings(cfg, mesh)
    problems = [] if problems is None else problems
    for m in TABLE:
        keys = dict(slice_keys(m, cfg))  # stacked index -> HF key
        lead = len(next(iter(keys)))
        node = shardings
        for name in m.path:
            node = node[name]
        first = m.to_ours(get(next(iter(keys.values()))), cfg)
        shape = (cfg.num_layers,) * m.per_layer + (cfg.num_experts,) * m.per_expert + first.shape
        seen: set[str] = set()

        def block(index, m=m, keys=keys, lead=lead, shape=shape, seen=seen):
            ranges = [range(*sl.indices(shape[i])) for i, sl in enumerate(index[:lead])]
            rest = index[lead:]
            out = None
            for pos in itertools.product(*ranges):
                hf = get(keys[pos])
                if check_finite and keys[pos] not in seen:
                    seen.add(keys[pos])
                    bad = int(np.size(hf) - np.count_nonzero(np.isfinite(hf)))
                    if bad:
                        problems.append(f"{keys[pos]} has {bad} non-finite value(s)")
                piece = m.to_ours(hf, cfg)[rest].astype(dtype, copy=False)
                if out is None:
                    out = np.empty(tuple(len(r) for r in ranges) + piece.shape, dtype)
                out[tuple(p - r.start for p, r in zip(pos, ranges))] = piece
            return out

        yield m.path, jax.make_array_from_callback(shape, node, block)
    if check_finite and problems:
        raise ConversionError(src.directory, problems)


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else name


def to_orbax(source_dir: str, out_dir: str, *, allow_pickle: bool = False,
             dtype: str | None = None, check_finite: bool = False,
             tokenizer: str | None = None, progress: bool = True, mesh=None) -> Source:
    """Converts `source_dir` into a new model checkpoint at `out_dir`.

    With `mesh` (a jax Mesh with sharding.py's axes), every leaf is created in its target
    sharding and each process writes only its shards (`iter_sharded_leaves`).

    Raises:
      ConversionError: every problem with the source, the target or the tokenizer; nothing is
        written (and nothing is left half-written) when it is raised.
    """
    pre: list[str] = []
    if os.path.exists(out_dir):
        pre.append(f"output {out_dir} already exists: choose a new directory")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        pre.append(f"tokenizer {tokenizer} does not exist")
    try:
        src = open_source(source_dir, allow_pickle=allow_pickle, dtype=dtype)
    except ConversionError as e:
        raise ConversionError(source_dir, pre + e.problems) from None
    if pre:
        raise ConversionError(source_dir, pre)
    scratch = os.path.abspath(out_dir) + ".scratch"
    try:
        if mesh is not None:
            leaves = iter_sharded_leaves(src, mesh, check_finite=check_finite)
        else:
            leaves = iter_leaves(src, check_finite=check_finite, progress=progress,
                                 scratch=scratch)
        checkpoint.save_model_streaming(out_dir, leaves, src.cfg,
                                        tokenizer or find_tokenizer(source_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return src
