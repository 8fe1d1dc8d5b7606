"""Keyed pseudo-random permutations evaluated one position at a time.

Used for each epoch's sample order (`client.draw_batch`, one position at a time) and for random masks with exact
counts (`masks.init_masks`, via `random_subset`): neither needs an O(n log n) shuffle, and batches need no O(n)
buffer per client.

Two constructions, chosen by the size n (which may be traced):
- n <= DIRECT_MAX: a direct shuffle. Position p goes to the rank of its random 32-bit word among the n words of
  the key (ties by index), so every ordering is equally likely (up to ties between 32-bit words, a bias below
  n^2 / 2^33). O(DIRECT_MAX) work per position.
- larger n: a balanced Feistel network of 8 rounds on [0, 4^h) (4^h < 4n) whose round function is the murmur3
  finaliser of (half xor a key-derived salt), cycle-walked down to [0, n) (fewer than 4 walks per position on
  average), then a keyed swap of the images 0 and 1. O(1) work per position.

Why both: a Feistel network on a small domain is far from uniform. With the 4 rounds used before, the most common
ordering of 5 items came 3x as often as it should (6x for 6), and even at n = 100 or 1000 consecutive positions
went to neighbouring values up to 27% more often than chance. 8 rounds bring positions and neighbours within
sampling error from n = 17 on (measured up to 1000), but not on the 4- and 16-point domains of n <= 16 (1 and 2
bits per half), which the direct shuffle covers, with a margin. Every Feistel network on 4^h points (h >= 2) is an even permutation; the keyed swap makes
even and odd orderings equally likely. Above DIRECT_MAX the permutation is pseudo-random, not exactly uniform:
tests/test_permute.py checks positions, neighbours and parity; and, as with any keyed shuffle, for large n the keys
reach only a small part of the n! orderings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIRECT_MAX = 32  # sizes up to this are shuffled directly
_ROUNDS = 8


def _fmix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: every output bit depends on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _feistel(half_bits: jax.Array, salts: jax.Array):
  """A keyed bijection of [0, 2^(2 * half_bits)) on uint32 values, one round per salt."""
  half_bits = jnp.asarray(half_bits, jnp.uint32)
  low = (jnp.uint32(1) << half_bits) - 1

  def mix(x):
    left, right = x >> half_bits, x & low
    for i in range(salts.shape[0]):
      left, right = right, left ^ (_fmix(right ^ salts[i]) & low)
    return (left << half_bits) | right

  return mix


def _half_bits(size):
  """h with 2^(2h) >= size: half the bits of size - 1, rounded up."""
  bits = 32 - jax.lax.clz(jnp.asarray(size, jnp.uint32) - 1)  # bits of size - 1 (0 when size is 1)
  return (bits + 1) // 2


def _direct(position: jax.Array, size: jax.Array, key: jax.Array) -> jax.Array:
  """Entry `position` of a uniformly random permutation of [0, size), size <= DIRECT_MAX: ranks of random words."""
  position = jnp.asarray(position, jnp.int32)
  words = jax.random.bits(key, (DIRECT_MAX,), jnp.uint32)
  mine = jnp.take(words, position, mode="clip")[..., None]
  lead = (1,) * position.ndim
  words, index = words.reshape(lead + (-1,)), jnp.arange(DIRECT_MAX, dtype=jnp.int32).reshape(lead + (-1,))
  before = (words < mine) | ((words == mine) & (index < position[..., None]))
  return jnp.sum(before & (index < size), axis=-1, dtype=jnp.int32)


def _walked(position: jax.Array, size: jax.Array, key: jax.Array) -> jax.Array:
  """Entry `position` of the Feistel permutation of [0, 4^h) cycle-walked to [0, size), then 0 and 1 swapped by key."""
  words = jax.random.bits(key, (_ROUNDS + 1,), jnp.uint32)
  size = jnp.asarray(size, jnp.uint32)
  mix = _feistel(_half_bits(size), words[:_ROUNDS])

  def walk(x):
    return jnp.where(x >= size, mix(x), x)

  x = jax.lax.while_loop(lambda x: jnp.any(x >= size), walk, mix(jnp.asarray(position, jnp.uint32)))
  x = x.astype(jnp.int32)
  return jnp.where((words[_ROUNDS] & 1 == 1) & (x < 2), 1 - x, x)  # the parity of the ordering, by key


def permute(position: jax.Array, size: jax.Array, key: jax.Array) -> jax.Array:
  """Entry `position` of a keyed pseudo-random permutation of [0, size) (see the module docstring).

  Args:
    position: int32 [...] positions in [0, size).
    size: int32 scalar >= 1 (may be traced).
    key: PRNG key.

  Returns:
    int32 [...] permuted positions, all distinct for distinct positions.
  """
  size = jnp.maximum(jnp.asarray(size, jnp.int32), 1)
  position = jnp.asarray(position, jnp.int32)
  # A real branch when the size is one value (one client); under vmap over sizes, both sides run.
  return jax.lax.cond(size <= DIRECT_MAX, _direct, _walked, position, size, key)


def random_subset(size: int, count: int, key: jax.Array) -> jax.Array:
  """bool [size] with exactly `count` True entries at pseudo-random places, in O(size) work and no sort.

  Up to DIRECT_MAX entries: the first `count` positions of a direct shuffle, every subset equally likely. Larger: the
  Feistel permutation of [0, 4^h) >= size is applied to every point of its domain once; the images below `size`,
  in the order of their preimages, form a permutation of [0, size), and its first `count` entries are chosen.

  Args:
    size: static number of entries.
    count: static number of entries to choose, in [0, size].
    key: PRNG key.
  """
  if size <= DIRECT_MAX:
    return _direct(jnp.arange(size, dtype=jnp.int32), size, key) < count
  half = (max(int(size) - 1, 0).bit_length() + 1) // 2
  salts = jax.random.bits(key, (_ROUNDS + 1,), jnp.uint32)[:_ROUNDS]
  image = _feistel(half, salts)(jnp.arange(4**half, dtype=jnp.uint32)).astype(jnp.int32)
  inside = image < size
  chosen = inside & (jnp.cumsum(inside, dtype=jnp.int32) <= count)
  return jnp.zeros((size,), bool).at[jnp.where(chosen, image, size)].set(True, mode="drop")
