"""Keyed permutations (`fedspa_jax.permute`): every ordering equally likely for small n, uniform positions,
neighbours and parity for larger n, and uniform subsets for the masks built on them.

Each test draws many keys (vmapped) and rejects uniformity only at p < 1e-6, so a correct permutation fails none of
them by chance; the keys are fixed, so the outcome is deterministic.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedspa_jax.permute import permute, random_subset

SIGNIFICANCE = 1e-6


def orderings(n: int, num_keys: int, seed: int = 0) -> np.ndarray:
  """[num_keys, n]: the permutation of [0, n) under each of `num_keys` keys (n enters traced, as in `draw_batch`)."""
  keys = jax.random.split(jax.random.key(seed), num_keys)
  positions = jnp.arange(n, dtype=jnp.int32)
  fn = jax.jit(jax.vmap(lambda k, size: permute(positions, size, k), in_axes=(0, None)))
  return np.asarray(fn(keys, jnp.int32(n)))


def assert_counts_uniform(counts: np.ndarray, cells: int, what: str) -> None:
  """Chi-square of `counts` (observed cells; cells never seen count 0) against equal probabilities, p > 1e-6."""
  expected = counts.sum() / cells
  statistic = float(np.sum((counts - expected) ** 2 / expected) + (cells - counts.size) * expected)
  p = stats.chi2.sf(statistic, cells - 1)
  assert p > SIGNIFICANCE, f"{what}: chi-square p = {p:.3g} (max count {counts.max()}, expected {expected:.1f})"


def assert_rate(hits: int, trials: int, rate: float, what: str) -> None:
  """A two-sided test that `hits` of `trials` happen at `rate` (normal approximation), p > 1e-6."""
  z = (hits - trials * rate) / math.sqrt(trials * rate * (1 - rate))
  p = 2 * stats.norm.sf(abs(z))
  assert p > SIGNIFICANCE, f"{what}: {hits / trials:.4f} against {rate:.4f} (z = {z:.1f})"


@pytest.mark.parametrize("n", range(2, 9))
def test_every_ordering_is_equally_likely_for_small_n(n):
  cells = math.factorial(n)
  out = orderings(n, max(20_000, 10 * cells), seed=n)
  np.testing.assert_array_equal(np.sort(out, axis=1), np.broadcast_to(np.arange(n), out.shape))
  code = np.ravel_multi_index(out.T, (n,) * n)
  _, counts = np.unique(code, return_counts=True)
  assert_counts_uniform(counts, cells, f"orderings of {n}")


def parity(out: np.ndarray) -> np.ndarray:
  """[N] 0 for even permutations, 1 for odd (inversions mod 2)."""
  n = out.shape[1]
  inversions = sum((out[:, i : i + 1] > out[:, i + 1 :]).sum(axis=1) for i in range(n - 1))
  return inversions % 2


@pytest.mark.parametrize("n", [33, 64, 100])
def test_positions_neighbours_and_parity_are_uniform_for_larger_n(n):
  # n! orderings are too many to count; a uniform permutation also has: each position takes each value with
  # probability 1/n; consecutive positions map to neighbouring values with probability 2/n; half the orderings are
  # even. 64 = 4^3 is a whole Feistel domain, where every Feistel network is an even permutation.
  num_keys = 20_000
  out = orderings(n, num_keys, seed=n)
  np.testing.assert_array_equal(np.sort(out, axis=1), np.broadcast_to(np.arange(n), out.shape))
  table = np.stack([np.bincount(out[:, i], minlength=n) for i in range(n)])
  expected = num_keys / n
  p = stats.chi2.sf(float(np.sum((table - expected) ** 2 / expected)), (n - 1) ** 2)
  assert p > SIGNIFICANCE, f"positions of {n}: chi-square p = {p:.3g}"
  neighbours = int(np.sum(np.abs(np.diff(out, axis=1)) == 1))
  assert_rate(neighbours, num_keys * (n - 1), 2 / n, f"neighbouring images in {n}")
  assert_rate(int(np.sum(parity(out) == 0)), num_keys, 0.5, f"even orderings of {n}")


def test_a_batch_of_sizes_equals_each_size_alone():
  # Clients of different sizes share one vmapped call in a round: each lane is the permutation of its own size.
  sizes = jnp.array([1, 2, 7, 32, 33, 100, 5000], jnp.int32)
  keys = jax.random.split(jax.random.key(3), sizes.shape[0])
  positions = jnp.arange(40, dtype=jnp.int32)
  batched = jax.jit(jax.vmap(lambda p, n, k: permute(jnp.minimum(p, n - 1), n, k), in_axes=(None, 0, 0)))(
      positions, sizes, keys)
  for n, k, row in zip(sizes.tolist(), keys, np.asarray(batched)):
    alone = np.asarray(permute(jnp.minimum(positions, n - 1), jnp.int32(n), k))
    np.testing.assert_array_equal(row, alone)
    assert row.min() >= 0 and row.max() < n


@pytest.mark.parametrize("size, count", [(2, 1), (5, 2), (8, 4), (13, 4)])
def test_every_subset_is_equally_likely_for_small_sizes(size, count):
  cells = math.comb(size, count)
  keys = jax.random.split(jax.random.key(size), max(20_000, 20 * cells))
  chosen = np.asarray(jax.jit(jax.vmap(lambda k: random_subset(size, count, k)))(keys))
  assert (chosen.sum(axis=1) == count).all()
  _, counts = np.unique(chosen @ (1 << np.arange(size)), return_counts=True)
  assert_counts_uniform(counts, cells, f"subsets of {count} of {size}")


@pytest.mark.parametrize("size, count", [(40, 10), (300, 60)])
def test_subset_entries_and_neighbours_are_uniform_for_larger_sizes(size, count):
  num_keys = 20_000
  keys = jax.random.split(jax.random.key(size), num_keys)
  chosen = np.asarray(jax.jit(jax.vmap(lambda k: random_subset(size, count, k)))(keys))
  assert (chosen.sum(axis=1) == count).all()
  assert_counts_uniform(chosen.sum(axis=0), size, f"entries of {count} of {size}")
  together = int(np.sum(chosen[:, 1:] & chosen[:, :-1]))
  assert_rate(together, num_keys * (size - 1), count / size * (count - 1) / (size - 1), f"neighbours in {size}")
