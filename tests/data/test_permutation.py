"""The seeded permutation: a bijection of [0, n) at every size, its inverse, keyed."""

import numpy as np
import pytest

from mixtral_jax.data.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_every_position_maps_to_a_distinct_index_and_back(n):
    perm = Permutation(n, (0, 1))
    out = perm(np.arange(n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))  # the oracle: a sort
    np.testing.assert_array_equal(perm.inverse(out), np.arange(n))
    np.testing.assert_array_equal(perm(np.arange(n)[::-1]), out[::-1])  # any order of queries


def test_keys_give_different_orders_and_equal_keys_equal_ones():
    a, b = Permutation(1000, (3, 0, 0)), Permutation(1000, (3, 0, 1))
    assert not np.array_equal(a(np.arange(1000)), b(np.arange(1000)))
    np.testing.assert_array_equal(a(np.arange(1000)), Permutation(1000, (3, 0, 0))(np.arange(1000)))
    # a shuffle, not a shift: few positions keep their neighbour
    out = a(np.arange(1000))
    assert np.mean(np.abs(np.diff(out)) == 1) < 0.05


def test_a_large_domain_is_evaluated_without_an_array_of_n():
    perm = Permutation(10**12, (0,))
    positions = np.arange(10**12 - 5000, 10**12)
    out = perm(positions)
    assert len(np.unique(out)) == 5000 and out.max() < 10**12
    np.testing.assert_array_equal(perm.inverse(out), positions)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 1000000000000\)"):
        perm(np.array([10**12]))
