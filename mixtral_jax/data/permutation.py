"""A seeded permutation of [0, n) evaluated at any index, in O(1) memory.

`np.random.permutation(n)` holds n int64s: 800 MB for 10^8 documents, per epoch. Here the
position -> index map is a keyed Feistel network on the smallest even-bit domain 4^h >= n,
restricted to [0, n) by cycle walking (an index that lands outside is permuted again until it
falls inside; the domain is < 4n, so a few rounds on average). Both directions are vectorised over
numpy arrays of positions. The round function is splitmix64's finaliser on (half, round key).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def draw(key: int, counter: int, n: int) -> int:
    """A number in [0, n) from (key, counter): a counter-based draw, so no generator state."""
    with np.errstate(over="ignore"):
        x = mix64(np.array([key ^ mix64(np.array([counter], np.uint64))[0]], np.uint64))
    return int(x[0] % np.uint64(n))


class Permutation:
    """A bijection of [0, n) keyed by `key` (e.g. (seed, epoch)).

    `self(positions)` is the index at each position; `self.inverse(indices)` the position of
    each index. Equal keys give equal permutations on every machine (numpy's seeded generator
    draws the round keys).
    """

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self._bits = np.uint64(half_bits)
        self._mask = np.uint64((1 << half_bits) - 1)
        rng = np.random.default_rng([int(k) for k in key])
        self._keys = rng.integers(0, 2**63, ROUNDS, dtype=np.uint64)

    def _rounds(self, x: np.ndarray, forward: bool) -> np.ndarray:
        left, right = x >> self._bits, x & self._mask
        keys = self._keys if forward else self._keys[::-1]
        with np.errstate(over="ignore"):
            for k in keys:
                if forward:
                    left, right = right, left ^ (mix64(right ^ k) & self._mask)
                else:
                    left, right = right ^ (mix64(left ^ k) & self._mask), left
        return (left << self._bits) | right

    def _walk(self, positions, forward: bool) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions must be in [0, {self.n})")
        out = self._rounds(x.astype(np.uint64).reshape(-1), forward)
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while outside.size:  # cycle walking: stays a bijection of [0, n)
            out[outside] = self._rounds(out[outside], forward)
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64).reshape(x.shape)

    def __call__(self, positions) -> np.ndarray:
        """The indices at `positions` (an int array, each in [0, n))."""
        return self._walk(positions, forward=True)

    def inverse(self, indices) -> np.ndarray:
        """The positions of `indices` (each in [0, n)): self(self.inverse(i)) == i."""
        return self._walk(indices, forward=False)
