"""Parameters placed straight into their device locations, slice by slice.

Every leaf of the parameter tree comes from a `LeafReader`: `read(index)` returns one slice
(one layer, or one expert of a layer: `index` runs over the leaf's `lead` stacked axes) as a
numpy array. A stacked leaf is preallocated on its devices (zeros in its final sharding, no
random draw) and each slice is copied to the devices and written into it by a donated update,
so the host holds a few slices at a time (read ahead by a thread pool), never a leaf or the
model. Readers are memory-mapped safetensors (`convert.importer.slice_readers`) or our Orbax
checkpoint (`checkpoint.model.checkpoint_readers`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

Index = tuple[int, ...]
READ_AHEAD = 4  # slices read (and transformed) ahead of the one being placed


@dataclasses.dataclass(frozen=True)
class LeafReader:
    """How to read one leaf of the parameter tree.

    Attributes:
      lead: how many leading (stacked) axes are read one index at a time (0: whole leaf).
      read: `read(index)` -> numpy slice `leaf[index]` (shape = the leaf's shape[lead:]),
        in any float dtype (cast to the leaf's dtype on the host); the integer codes of a
        quantized weight are read in their own dtype.
      nbytes: stored bytes of the whole leaf (for the progress bar).
    """

    lead: int
    read: Callable[[Index], np.ndarray]
    nbytes: int


def default_shardings(shapes: dict, mesh: jax.sharding.Mesh | None = None) -> dict:
    """The rules-table shardings on `mesh` (sharding.param_shardings), or the first device."""
    if mesh is not None:
        from mixtral_jax.parallel import sharding

        return sharding.param_shardings(shapes, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, shapes)


def show_progress(quiet: bool = False) -> bool:
    """Progress bars by today's convention: on unless quiet or stderr is not a terminal."""
    return not quiet and sys.stderr.isatty()


def place_params(
    shapes: dict,
    readers: dict[tuple[str, ...], LeafReader],
    shardings: dict,
    *,
    progress: bool = False,
    workers: int | None = None,
    desc: str = "load",
) -> dict:
    """The parameter tree of `shapes` (ShapeDtypeStruct leaves) filled from `readers`.

    Args:
      shapes: model.params.param_shapes(cfg): the leaves' shapes and (param) dtypes.
      readers: leaf path (tuple of names) -> its LeafReader; exactly the leaves of `shapes`.
      shardings: a Sharding per leaf, shaped like `shapes` (`default_shardings`).
      progress: a tqdm bar in bytes (GB/s) on stderr.
      workers: read-ahead threads (default min(4, cpus)).
    Returns:
      nested dict of jax.Arrays in their shardings.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    where = jax.tree.leaves(shardings)
    paths = [tuple(k.key for k in p) for p, _ in flat]
    total = sum(readers[p].nbytes for p in paths)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    out = []
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not progress
    )
    with bar, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for path, (_, shape), sharding in zip(paths, flat, where):
            out.append(_place_leaf(shape, sharding, readers[path], pool, bar))
    _release_host_memory()
    return jax.tree_util.tree_unflatten(treedef, out)


def _release_host_memory() -> None:
    """Hands the slices' freed heap back to the OS (glibc keeps it in per-thread arenas, which
    the reader threads filled); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _place_leaf(shape, sharding, reader: LeafReader, pool, bar) -> jax.Array:
    """One leaf: whole (lead 0) or preallocated and filled slice by slice."""
    dtype = np.dtype(shape.dtype)
    if reader.lead == 0:
        (x,) = (x for _, x in _read_ahead(pool, reader, dtype, [()], bar))
        _check_slice(x, shape.shape, ())
        return jax.device_put(x, sharding)
    buf = _zeros(tuple(shape.shape), dtype, sharding)
    piece_sharding = _slice_sharding(sharding, reader.lead)
    update = _updater(sharding, reader.lead)
    indices = list(np.ndindex(*shape.shape[: reader.lead]))
    for index, x in _read_ahead(pool, reader, dtype, indices, bar):
        _check_slice(x, shape.shape[reader.lead :], index)
        piece = jax.device_put(x, piece_sharding)
        buf = update(buf, piece, jnp.asarray(index + (0,) * x.ndim, jnp.int32))
    return buf


def _read_ahead(
    pool, reader: LeafReader, dtype, indices, bar
) -> Iterator[tuple[Index, np.ndarray]]:
    """(index, slice cast to `dtype`) in order, READ_AHEAD slices in flight on `pool`."""

    def job(index):
        x = reader.read(index)
        return x.nbytes, np.asarray(x).astype(dtype, copy=False)

    pending: collections.deque = collections.deque()
    it = iter(indices)
    for index in it:
        pending.append((index, pool.submit(job, index)))
        if len(pending) >= READ_AHEAD:
            break
    while pending:
        index, future = pending.popleft()
        nbytes, x = future.result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(job, nxt)))
        bar.update(nbytes)
        yield index, x


def _check_slice(x: np.ndarray, want, index: Index) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"slice {index} has shape {tuple(x.shape)}, expected {tuple(want)}")


def _slice_sharding(sharding, lead: int):
    """The sharding of one slice (the leaf's sharding without its first `lead` axes)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[lead:]))
    return sharding


@functools.cache
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _zeros(shape, dtype, sharding) -> jax.Array:
    return _zeros_fn(shape, np.dtype(dtype), sharding)()


@functools.cache
def _updater(sharding, lead: int):
    """buf, piece, start -> buf with buf[start[:lead]] = piece, in place (buf donated)."""

    def update(buf, piece, start):
        piece = piece.reshape((1,) * lead + piece.shape)
        return jax.lax.dynamic_update_slice(buf, piece, tuple(start))

    return jax.jit(update, donate_argnums=0, out_shardings=sharding)
