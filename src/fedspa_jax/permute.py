"""Keyed pseudo-random permutations evaluated one position at a time, in O(1) work per position.

Used for each epoch's sample order (`client.draw_batch`, one position at a time) and for random masks with exact
counts (`masks.init_masks`, via `random_subset`): neither needs an O(n log n) shuffle, and batches need no O(n)
buffer per client.

The permutation of [0, 2^(2h)) is a balanced Feistel network of 4 rounds whose round function is the murmur3
finaliser of (half xor a key-derived salt); by Luby-Rackoff such a network is a pseudo-random permutation when its
round function is pseudo-random. A permutation of [0, n) is obtained from it by cycle-walking (`permute`) or by
keeping the images below n in preimage order (`random_subset`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ROUNDS = 4


def _fmix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: every output bit depends on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _feistel(half_bits: jax.Array, key: jax.Array):
  """A keyed bijection of [0, 2^(2 * half_bits)) on uint32 values."""
  half_bits = jnp.asarray(half_bits, jnp.uint32)
  low = (jnp.uint32(1) << half_bits) - 1
  salts = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

  def mix(x):
    left, right = x >> half_bits, x & low
    for i in range(_ROUNDS):
      left, right = right, left ^ (_fmix(right ^ salts[i]) & low)
    return (left << half_bits) | right

  return mix


def _half_bits(size):
  """h with 2^(2h) >= size: half the bits of size - 1, rounded up."""
  bits = 32 - jax.lax.clz(jnp.asarray(size, jnp.uint32) - 1)  # bits of size - 1 (0 when size is 1)
  return (bits + 1) // 2


def permute(position: jax.Array, size: jax.Array, key: jax.Array) -> jax.Array:
  """Entry `position` of a keyed pseudo-random permutation of [0, size).

  The Feistel permutation of [0, 4^h) (4^h < 4 * size) is cycle-walked until it lands below `size`, which makes it
  a permutation of [0, size) (fewer than 4 walks per position on average).

  Args:
    position: int32 [...] positions in [0, size).
    size: int32 scalar >= 1 (may be traced).
    key: PRNG key.

  Returns:
    int32 [...] permuted positions, all distinct for distinct positions.
  """
  size = jnp.maximum(jnp.asarray(size, jnp.uint32), 1)
  mix = _feistel(_half_bits(size), key)

  def walk(x):
    return jnp.where(x >= size, mix(x), x)

  x = jax.lax.while_loop(lambda x: jnp.any(x >= size), walk, mix(jnp.asarray(position, jnp.uint32)))
  return x.astype(jnp.int32)


def random_subset(size: int, count: int, key: jax.Array) -> jax.Array:
  """bool [size] with exactly `count` True entries at pseudo-random places, in O(size) work and no loop.

  The Feistel permutation of [0, 4^h) >= size is applied to every point of its domain once; the images below
  `size`, in the order of their preimages, form a permutation of [0, size), and its first `count` entries are chosen.

  Args:
    size: static number of entries.
    count: static number of entries to choose, in [0, size].
    key: PRNG key.
  """
  half = (max(int(size) - 1, 0).bit_length() + 1) // 2
  image = _feistel(half, key)(jnp.arange(4**half, dtype=jnp.uint32)).astype(jnp.int32)
  inside = image < size
  chosen = inside & (jnp.cumsum(inside, dtype=jnp.int32) <= count)
  return jnp.zeros((size,), bool).at[jnp.where(chosen, image, size)].set(True, mode="drop")
