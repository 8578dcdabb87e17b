"""The host side of the paged KV cache (`model/paged_kv_cache.py`): the block table of every row
and the pool's free blocks.

A row takes blocks one at a time as its tokens fill them, so KV memory grows with its length;
nothing is reserved ahead. When the pool runs short the engine preempts a row (`release`: its
blocks return at once) and recomputes it later. With a sliding window W, a row's blocks whose
every token is older than what its next query may see (key index <= query - W) are freed as it
advances (`slide`), and their table entries point at the sink again: attention never reads a
freed block (the sink holds finite padding and is masked out like every key outside the
window), and a row holds about W / Z blocks however long it runs.
"""

from __future__ import annotations

import math

import numpy as np

from mixtral_jax.model.paged_kv_cache import SINK_BLOCK


def blocks_at_once(tokens: int, block_size: int, window: int | None) -> int:
    """The most blocks a row of `tokens` tokens (those fed to the model: prompt + max_tokens -
    1) holds at one time, one new token per step: all of them, or with a window W those covering
    the W - 1 keys before a query and the query itself."""
    every = math.ceil(tokens / block_size)
    if window is None:
        return every
    return min(every, math.ceil((window - 1) / block_size) + 1)


class BlockTables:
    """Free blocks 1..P-1 of a pool of P (block 0 is the sink) and each row's table entries.

    Row i's held blocks are the table entries first[i] .. entries[i] - 1 (token order); entries
    before first[i] left the window (sink again), entries from entries[i] on are not taken yet.

    Attributes:
      table: [B, R] int32 host block table (0: the sink).
      total: usable blocks, P - 1.
      block_size: Z, tokens per block.
    """

    def __init__(self, num_blocks: int, rows: int, entries_per_row: int, block_size: int):
        self.total = num_blocks - 1
        self.block_size = block_size
        self.table = np.zeros((rows, entries_per_row), np.int32)
        self._free = [b for b in range(num_blocks - 1, 0, -1) if b != SINK_BLOCK]  # pop: lowest
        self._first = [0] * rows
        self._entries = [0] * rows

    @property
    def free(self) -> int:
        """Blocks no row holds."""
        return len(self._free)

    def held(self, i: int) -> int:
        """Blocks row i holds."""
        return self._entries[i] - self._first[i]

    def covered(self, i: int) -> int:
        """Tokens row i's taken entries address (index 0 .. covered - 1, freed ones included)."""
        return self._entries[i] * self.block_size

    def short(self, i: int, tokens: int) -> int:
        """Blocks row i must still take so its table covers tokens 0 .. tokens - 1."""
        return max(0, math.ceil(tokens / self.block_size) - self._entries[i])

    def cover(self, i: int, tokens: int) -> None:
        """Row i takes blocks until its table covers `tokens` tokens (the caller checked
        `short(i, tokens) <= free`)."""
        need = self.short(i, tokens)
        if need > len(self._free):
            raise RuntimeError(f"BlockTables.cover: {need} blocks short, {self.free} free")
        for _ in range(need):
            self.table[i, self._entries[i]] = self._free.pop()
            self._entries[i] += 1

    def slide(self, i: int, first_key: int) -> None:
        """Frees row i's blocks wholly before key index `first_key` (the oldest key its next
        query may see); their entries point at the sink again."""
        end = min(max(first_key, 0) // self.block_size, self._entries[i])
        for entry in range(self._first[i], end):
            self._free.append(int(self.table[i, entry]))
            self.table[i, entry] = SINK_BLOCK
        self._first[i] = max(self._first[i], end)

    def release(self, i: int) -> None:
        """Row i leaves (or is preempted): every block it holds returns at once."""
        held = self.table[i, self._first[i] : self._entries[i]]
        self._free.extend(int(b) for b in reversed(held))
        self.table[i] = SINK_BLOCK
        self._first[i] = self._entries[i] = 0
