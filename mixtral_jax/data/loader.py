"""Documents -> held-out split -> packed batches in a seeded order per epoch, resumable, prefetched.

One pipeline for every source: `Documents` (token arrays in memory, for small sources read at
start-up) and `shards.ShardSet` (a prepared directory, memory-mapped) offer the same three
calls (`lengths`, `read`, `unigram_counts`), and everything after them is shared, so a prepared
shard set trains bit-identically to the in-memory path on the same corpus.

- Held-out split: a seeded permutation of the documents puts the first `eval_fraction` of them
  aside for eval loss (`Split`); nothing of size N is held in memory.
- Order: each epoch visits the training documents in its own seeded order (`Permutation` keyed
  by seed and epoch: a global shuffle evaluated lazily), packed first-fit into rows of T+1
  tokens (`packing.Packer`); each batch draws its B rows from a pool of the next POOL packed
  rows (a quarter of an epoch's rows for a small corpus), so the pieces of one long document
  spread over many batches.
- State: the packer's position (a few KB of JSON), saved in every checkpoint.
- Several processes: each packs the same rows from the document lengths, and reads the tokens of
  its own rows of each batch only (`BatchIterator.select`).
- `Prefetch` runs the iterator a few batches ahead in a thread, off the step loop.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.data.packing import Packer, row_arrays
from mixtral_jax.data.permutation import Permutation

POOL = 1024  # packed rows a batch's rows are drawn from (packing.Packer's pool)


class Documents:
    """Token documents in memory [n_i] int32 each: the in-memory twin of `shards.ShardSet`."""

    def __init__(self, docs: list[np.ndarray]):
        self.docs = docs
        self.num_docs = len(docs)
        self._lengths = np.array([len(d) for d in docs], np.int64)
        self.num_tokens = int(self._lengths.sum())

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        return self._lengths[np.asarray(ids, np.int64)]

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        return self.docs[doc][start:stop]

    def unigram_counts(self) -> np.ndarray:
        """How often each id occurs after a document's first token (BOS)."""
        if not self.docs:
            return np.zeros(1, np.int64)
        return np.bincount(np.concatenate([d[1:] for d in self.docs] + [np.zeros(0, np.int32)]))


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies `counts` [V]: the loss of the best context-free
    predictor, which a model that learned anything must beat."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1.0)
    return float(-(p * np.log(p)).sum())


class Split:
    """Held-out documents: the first `n_eval` of a seeded permutation of [0, n), at least one
    of each side when n >= 2 and eval_fraction > 0."""

    def __init__(self, n: int, eval_fraction: float, seed: int):
        if not 0 <= eval_fraction < 1:
            raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
        self.n_eval = 0 if eval_fraction == 0 or n < 2 else max(1, round(n * eval_fraction))
        self._perm = Permutation(max(n, 1), (seed, 1))

    def held(self) -> np.ndarray:
        """The held-out document ids, in eval order."""
        return self._perm(np.arange(self.n_eval))

    def is_held(self, ids: np.ndarray) -> np.ndarray:
        return self._perm.inverse(ids) < self.n_eval


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of T+1 tokens. tokens, segments, positions: [R, T+1] int32 (segment 0 = padding)."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def make_batch(rows: PackedRows, index: np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs for rows `index`: tokens / positions / segment_ids [B, T], targets and
    loss_mask [B, T] (1 where the next token belongs to the same document)."""
    tok, seg, pos = rows.tokens[index], rows.segments[index], rows.positions[index]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": tok[:, :-1],
        "targets": tok[:, 1:],
        "positions": pos[:, :-1],
        "segment_ids": seg[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }


def _rows(documents, rows: list[list[int]], width: int) -> PackedRows:
    return PackedRows(*row_arrays(rows, documents.read, width))


def pack(documents: list[np.ndarray], seq_len: int, seed: int) -> PackedRows:
    """Every row of one epoch of `documents` (in memory) in the seeded order: pieces of at most
    seq_len+1 tokens packed first-fit."""
    docs = Documents(documents)
    if not docs.num_docs:
        raise ConfigError("the data holds no document of 2 or more tokens")
    perm = Permutation(docs.num_docs, (seed, 0, 0))
    packer = Packer(
        lambda e, a, b: perm(np.arange(a, b)), docs.lengths, docs.num_docs, seq_len + 1, epochs=1
    )
    return _rows(docs, packer.take(1 << 62), seq_len + 1)


class BatchIterator:
    """Batches of `batch_size` rows of the training documents of `split`, epoch after epoch;
    `state` / `restore` resume it exactly.

    Args:
      documents: `Documents` or `shards.ShardSet`.
      split: which documents are held out (never trained on).
      batch_size, seq_len: B and T.
      seed: the run's seed (each epoch's order is keyed by it and the epoch).
    """

    def __init__(self, documents, split: Split, batch_size: int, seq_len: int, seed: int):
        if not documents.num_docs:
            raise ConfigError("the data holds no document")
        self.documents, self.batch_size, self.width = documents, batch_size, seq_len + 1
        held_tokens = int(documents.lengths(split.held()).sum())
        rows = -(-(documents.num_tokens - held_tokens) // self.width)
        if rows < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {rows} packed rows of {self.width} "
                "tokens the training data fills: use less batch or more data"
            )
        n = documents.num_docs
        perms: dict[int, Permutation] = {}

        def order(epoch: int, start: int, stop: int) -> np.ndarray:
            if epoch not in perms:
                perms.clear()
                perms[epoch] = Permutation(n, (seed, 0, epoch))
            ids = perms[epoch](np.arange(start, stop))
            return ids[~split.is_held(ids)]

        draws = int(np.random.default_rng((seed, 2)).integers(2**63))
        pool = min(POOL, max(1, rows // 4))  # a small corpus: within about one epoch
        self.packer = Packer(order, documents.lengths, n, self.width, pool=pool, key=draws)
        self.local: np.ndarray | None = None  # rows of each batch this process loads

    def select(self, local: np.ndarray | None) -> None:
        """From now on, load only rows `local` (positions 0..batch_size-1) of every batch: the
        rows of this process's devices in a multi-process run. None = every row."""
        if local is not None and (
            len(local) == 0 or local.min() < 0 or local.max() >= self.batch_size
        ):
            raise ValueError(f"selected rows must be in [0, batch_size={self.batch_size})")
        self.local = local

    @property
    def state(self) -> dict:
        return self.packer.state

    def restore(self, state: dict) -> None:
        try:
            self.packer.restore(state)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"the checkpoint's data position {str(state)[:80]} is not this data "
                "pipeline's (a checkpoint of an older version?)"
            ) from None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.packer.take(self.batch_size)
        if self.local is not None:
            rows = [rows[i] for i in self.local.tolist()]
        return make_batch(_rows(self.documents, rows, self.width), np.arange(len(rows)))


def eval_batches(documents, split: Split, batch_size: int, seq_len: int, max_batches: int) -> list:
    """Fixed held-out batches for eval loss and perplexity: the held-out documents in their
    split order, packed, at most `max_batches` full batches."""
    held = split.held()
    if not len(held):
        return []
    packer = Packer(lambda e, a, b: held[a:b], documents.lengths, len(held), seq_len + 1, epochs=1)
    rows = _rows(documents, packer.take(batch_size * max_batches), seq_len + 1)
    count = rows.num_rows // batch_size
    return [make_batch(rows, np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(count)]


class Prefetch:
    """Draws from `batches` up to `depth` batches ahead in a background thread.

    `state` is the iterator's position after the last batch handed out (not the last one
    drawn), so a checkpoint taken between steps resumes at the next batch. An error raised while
    drawing is raised by the `next` that would have returned that batch.
    """

    def __init__(self, batches, depth: int = 2):
        self.batches, self.state = batches, batches.state
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = (next(self.batches), self.batches.state)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] is None:
                return

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="data-prefetch", daemon=True)
            self._thread.start()
        batch, state = self._queue.get()
        if batch is None:
            raise state
        self.state = state
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
