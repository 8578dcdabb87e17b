"""The host-side allocator of the paged KV cache's blocks (`model/paged_kv_cache.py`).

Rows take blocks one at a time as their tokens fill them, so KV memory grows with each row's
length. To never run out halfway through a request, a request is admitted only when the pool can
promise it every block it may still need (prompt + max_tokens); blocks it does not end up using
(an early EOS, a cancel) and the blocks it holds return to the pool the moment it leaves.
"""

from __future__ import annotations

from mixtral_jax.model.paged_kv_cache import SINK_BLOCK


class BlockPool:
    """Free blocks 1..P-1 of a pool of P (block 0 is the sink) and the blocks promised to rows.

    Attributes:
      total: usable blocks, P - 1.
    """

    def __init__(self, num_blocks: int):
        self.total = num_blocks - 1
        self._free = [b for b in range(num_blocks - 1, 0, -1) if b != SINK_BLOCK]  # pop: lowest
        self._promised = 0

    @property
    def free(self) -> int:
        """Blocks not held by any row (some may be promised)."""
        return len(self._free)

    @property
    def available(self) -> int:
        """Blocks neither held nor promised: what a new request may be promised."""
        return len(self._free) - self._promised

    def promise(self, blocks: int) -> bool:
        """Promises `blocks` to a new row if available; False (nothing changes) otherwise."""
        if blocks > self.available:
            return False
        self._promised += blocks
        return True

    def take(self) -> int:
        """One of a row's promised blocks, now held by it."""
        if self._promised <= 0:
            raise RuntimeError("BlockPool.take without a promise")
        self._promised -= 1
        return self._free.pop()

    def release(self, held: list[int], unused_promise: int) -> None:
        """A row leaves: its held blocks and the rest of its promise return at once."""
        self._free.extend(reversed(held))
        self._promised -= unused_promise
