"""Streaming first-fit packing of documents into rows of W = T+1 tokens, with a JSON state.

Documents come in a seeded order (one pass per epoch); each is cut into pieces of at most W
tokens (a piece of 1 token predicts nothing and is dropped), and each piece goes into the first
of up to `window` open rows with room for it, else into a new row. A row is ready when fewer
than 2 slots are left, or when it is the oldest and the window overflows; at the end of an epoch
the open rows are ready too. Rows are lists of pieces (document, start, length): the packer reads
only document lengths, so every process of a run packs the same rows and then reads the tokens
of its own rows alone.

Ready rows wait in a pool of `pool` rows, from which a seeded draw picks each row handed out:
consecutive rows are often consecutive pieces of one long document, and without the pool a batch
would hold one document many times over (the default tiny run ended 0.2 nats worse in eval loss
when batches came straight from the packer).

The packer's whole position is `state` (epoch, cursor in the epoch's order, the open rows, the
pool and the draws made: tens of KB at most), saved with every checkpoint; `restore(state)`
continues exactly there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.data.permutation import draw

WINDOW = 64  # open rows searched by first fit: bounds the work per piece on large data
CHUNK = 256  # documents ordered and measured per vectorised call


class Packer:
    """Rows of pieces from documents in `order`.

    Args:
      order: (epoch, start, stop) -> the document ids at positions [start, stop) of that epoch's
        order (documents left out, e.g. held-out ones, may be skipped: fewer ids).
      lengths: document ids [M] -> their token counts [M].
      positions: positions per epoch (the `stop` of the last chunk).
      width: tokens per row (W = T+1).
      epochs: passes before the packer runs dry (None: forever).
      pool: rows shuffled by the seeded draws (0: rows in packing order).
      key: the draws' seed.
    """

    def __init__(
        self,
        order: Callable[[int, int, int], np.ndarray],
        lengths: Callable[[np.ndarray], np.ndarray],
        positions: int,
        width: int,
        epochs: int | None = None,
        pool: int = 0,
        key: int = 0,
    ):
        self.order, self.lengths = order, lengths
        self.positions, self.width, self.epochs = positions, width, epochs
        self.pool, self.key = pool, key
        self.restore({"epoch": 0, "cursor": 0, "placed": 0, "open": [], "ready": [], "drawn": 0})

    @property
    def state(self) -> dict:
        """The position as plain JSON values (a copy)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "placed": self.placed,
            "open": [list(r) for r in self.open],
            "ready": [list(r) for r in self.ready],
            "drawn": self.drawn,
        }

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.placed = int(state["placed"])  # pieces placed this epoch (0 at its end: no data)
        self.open = [list(map(int, r)) for r in state["open"]]
        self.ready = [list(map(int, r)) for r in state["ready"]]  # the pool
        self.drawn = int(state["drawn"])
        self.room = [self.width - sum(r[2::3]) for r in self.open]

    def take(self, count: int) -> list[list[int]]:
        """The next `count` rows (fewer once a finite number of epochs is spent), each a flat
        list [document, start, length, document, start, length, ...]."""
        rows: list[list[int]] = []
        while len(rows) < count:
            while len(self.ready) < max(self.pool, count - len(rows)) and not self._spent():
                self._advance()
            if not self.ready:
                break
            if not self.pool:
                take = self.ready[: count - len(rows)]
                rows += take
                del self.ready[: len(take)]
                continue
            i = draw(self.key, self.drawn, len(self.ready))
            self.drawn += 1
            rows.append(self.ready[i])
            self.ready[i] = self.ready[-1]  # swap-remove: O(1), deterministic
            self.ready.pop()
        return rows

    def _advance(self) -> None:
        """Packs the next chunk of documents (or ends the epoch)."""
        if self.cursor >= self.positions:
            self._end_epoch()
            return
        stop = min(self.cursor + CHUNK, self.positions)
        docs = np.asarray(self.order(self.epoch, self.cursor, stop))
        for doc, n in zip(docs.tolist(), np.asarray(self.lengths(docs)).tolist()):
            self._place(doc, n)
        self.cursor = stop

    def _spent(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def _end_epoch(self) -> None:
        if not self.placed:
            raise ConfigError("the data holds no document of 2 or more tokens")
        self.ready.extend(self.open)
        self.open, self.room = [], []
        self.epoch, self.cursor, self.placed = self.epoch + 1, 0, 0

    def _place(self, doc: int, n: int) -> None:
        """Cuts document `doc` of `n` tokens into pieces and places them first-fit."""
        for start in range(0, n, self.width):
            length = min(self.width, n - start)
            if length < 2:  # a 1-token piece predicts nothing
                continue
            r = next((i for i, room in enumerate(self.room) if room >= length), None)
            if r is None:
                self.open.append([])
                self.room.append(self.width)
                r = len(self.open) - 1
                if len(self.open) > WINDOW:  # the oldest row leaves the search
                    self.ready.append(self.open.pop(0))
                    self.room.pop(0)
                    r -= 1
            self.open[r] += (doc, start, length)
            self.room[r] -= length
            self.placed += 1
            if self.room[r] < 2:
                self.ready.append(self.open.pop(r))
                self.room.pop(r)


def row_arrays(rows: list[list[int]], read, width: int) -> tuple[np.ndarray, ...]:
    """tokens, segments, positions [R, W] int32 of `rows` (segment 0 = padding, id 0).

    Args:
      rows: rows as `Packer.take` gives them.
      read: (document, start, stop) -> int token ids of that slice of the document.
    """
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(range(0, len(row), 3), 1):
            doc, start, length = row[i : i + 3]
            tokens[r, at : at + length] = read(doc, start, start + length)
            segments[r, at : at + length] = s
            positions[r, at : at + length] = np.arange(length)
            at += length
    return tokens, segments, positions
