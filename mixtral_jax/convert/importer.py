"""Hugging Face / Mistral / pickle checkpoint -> our model checkpoint (Orbax + config.json).

Order of work, so that a failure leaves nothing behind:
  1. `open_source` checks files, layout, config, names, shapes and dtypes (no tensor data read);
  2. each of our leaves is a `checkpoint.StreamedLeaf`: its slices (one layer, or one expert of
     a layer) are made from one stored tensor at a time (an expert stack at most) as they are
     written, with a progress bar in bytes; `--check-finite` scans each slice;
  3. `checkpoint.save_model_streaming` writes slice after slice into a staging directory that is
     renamed into place only after the last one (and after the finiteness verdict): an error at
     any point leaves no output behind.
With a mesh, each leaf is instead a global jax.Array in its target sharding
(`iter_sharded_leaves`), written leaf by leaf by `checkpoint.save_model_sharded`.
"""

from __future__ import annotations

import glob
import itertools
import os

import numpy as np
from tqdm import tqdm

from mixtral_jax import checkpoint
from mixtral_jax.convert.source import ConversionError, Source, open_source
from mixtral_jax.hf.weights import TABLE, slice_keys

TOKENIZER_CANDIDATES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")


def find_tokenizer(directory: str) -> str | None:
    """The sentencepiece model shipped in `directory`, if any."""
    for name in TOKENIZER_CANDIDATES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    found = sorted(glob.glob(os.path.join(directory, "tokenizer.model*")))
    return found[0] if found else None


def iter_leaves(
    src: Source,
    *,
    check_finite: bool = False,
    bar: tqdm | None = None,
    problems: list[str] | None = None,
):
    """(path, `checkpoint.StreamedLeaf`) of our parameter tree; nothing is read until a slice is.

    Each slice (`leaf[l]` or `leaf[l, e]`) is made from one stored tensor, in
    `src.cfg.compute.param_dtype`. `bar` counts the stored bytes read. With `check_finite`, non-finite
    values are listed in `problems` (named, with their count); the caller raises.
    """
    cfg, get = src.cfg, src.getter()
    dtype = np.dtype(_np_dtype(cfg.compute.param_dtype))
    shapes = _leaf_shapes(cfg)
    problems = [] if problems is None else problems
    for m in TABLE:
        keys = dict(slice_keys(m, cfg))  # index along the stacked axes -> HF key

        def fill(index, m=m, keys=keys):
            hf = get(keys[index])
            if check_finite:
                bad = int(np.size(hf) - np.count_nonzero(np.isfinite(hf)))
                if bad:
                    problems.append(f"{keys[index]} has {bad} non-finite value(s)")
            ours = m.to_ours(hf, cfg).astype(dtype, copy=False)  # casts only for --dtype
            if bar is not None:
                bar.update(hf.nbytes)
            return ours

        yield (
            m.path,
            checkpoint.StreamedLeaf(shapes[m.path], dtype, m.per_layer + m.per_expert, fill),
        )


def slice_readers(src: Source) -> dict:
    """leaf path -> `checkpoint.placement.LeafReader` over the memory-mapped source: each slice
    (`leaf[l]` or `leaf[l, e]`) is cut from one stored tensor, transformed, and nothing else of
    the file is read (for `placement.place_params`: loading straight to the devices)."""
    from mixtral_jax.checkpoint.placement import LeafReader

    cfg, get = src.cfg, src.mapped_getter()
    readers = {}
    for m in TABLE:
        keys = dict(slice_keys(m, cfg))

        def read(index, m=m, keys=keys):
            return m.to_ours(get(keys[index]), cfg)

        lead = m.per_layer + m.per_expert
        readers[m.path] = LeafReader(lead, read, _leaf_bytes(cfg, m.path, src))
    return readers


def _leaf_bytes(cfg, path, src: Source) -> int:
    """Stored bytes of our leaf `path` (its element count at the stored itemsize)."""
    name = next(iter(src.plan.expected))
    itemsize = src.weights.dtype(name).itemsize
    return int(np.prod(_leaf_shapes(cfg)[path])) * itemsize


def _leaf_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax

    from mixtral_jax.model.params import param_shapes

    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    return {tuple(k.key for k in p): tuple(x.shape) for p, x in flat}


def build_params(src: Source, *, check_finite: bool = False, progress: bool = True) -> dict:
    """Our whole nested parameter dict (numpy) in memory: for tests and small models."""
    params: dict = {}
    problems: list[str] = []
    with _bar(src, progress) as bar:
        for path, leaf in iter_leaves(src, check_finite=check_finite, bar=bar, problems=problems):
            node = params
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = leaf.materialize()
    if problems:
        raise ConversionError(src.directory, problems)
    return params


def _bar(src: Source, progress: bool) -> tqdm:
    return tqdm(
        total=src.total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="convert",
        disable=not progress,
    )


def iter_sharded_leaves(
    src: Source, mesh, *, check_finite: bool = False, problems: list[str] | None = None
):
    """(path, global jax.Array) of our parameter tree, each leaf created straight in the rules
    table's sharding over `mesh` (sharding.param_shardings).

    Each device's block is filled by a callback that reads only the stored tensors that block
    overlaps (whole layers / experts on the stacked axes, then sliced), so a process reads and
    holds only its own shards of one leaf; Orbax then writes each shard from its owner.
    """
    import jax

    from mixtral_jax.model.params import param_shapes
    from mixtral_jax.parallel import sharding

    cfg, get = src.cfg, src.getter()
    dtype = np.dtype(_np_dtype(cfg.compute.param_dtype))
    shardings = sharding.param_shardings(param_shapes(cfg), mesh)
    shapes = _leaf_shapes(cfg)
    problems = [] if problems is None else problems
    for m in TABLE:
        keys = dict(slice_keys(m, cfg))  # stacked index -> HF key
        lead = m.per_layer + m.per_expert
        node = shardings
        for name in m.path:
            node = node[name]
        shape = shapes[m.path]
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


def to_orbax(
    source_dir: str,
    out_dir: str,
    *,
    allow_pickle: bool = False,
    dtype: str | None = None,
    check_finite: bool = False,
    tokenizer: str | None = None,
    progress: bool = True,
    mesh=None,
) -> Source:
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
    if mesh is not None:
        leaves = iter_sharded_leaves(src, mesh, check_finite=check_finite)
        checkpoint.save_model_sharded(
            out_dir,
            leaves,
            src.cfg,
            tokenizer or find_tokenizer(source_dir),
            extra_config=src.extra,
        )
        return src
    problems: list[str] = []

    def verify():  # after the last slice, before the checkpoint is moved into place
        if problems:
            raise ConversionError(src.directory, problems)

    with _bar(src, progress) as bar:
        leaves = iter_leaves(src, check_finite=check_finite, bar=bar, problems=problems)
        checkpoint.save_model_streaming(
            out_dir,
            leaves,
            src.cfg,
            tokenizer or find_tokenizer(source_dir),
            verify=verify,
            extra_config=src.extra,
        )
    return src
