"""Keyed pseudo-random permutations evaluated one position at a time, in O(1) work per position.

Used for each epoch's sample order (`client.draw_batch`) and for random masks with exact counts
(`masks.init_masks`): neither needs an O(n log n) shuffle or an O(n) buffer per client.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ODD = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)  # odd multipliers: bijections modulo 2^bits


def permute(position: jax.Array, size: jax.Array, key: jax.Array) -> jax.Array:
  """Entry `position` of a keyed pseudo-random permutation of [0, size), in O(1) work per position.

  A bijection of [0, 2^b) (b = bits of size - 1) built from keyed xor, odd multiplication and xor-shift rounds is
  cycle-walked until it lands below `size` (fewer than 2 walks per position on average), which makes it a
  bijection of [0, size). Different keys give different, well-mixed orders; the family is not all size!
  permutations, but every epoch sees every sample exactly once.

  Args:
    position: int32 [...] positions in [0, size).
    size: int32 scalar >= 1.
    key: PRNG key.

  Returns:
    int32 [...] permuted positions, all distinct for distinct positions.
  """
  size = jnp.maximum(jnp.asarray(size, jnp.uint32), 1)
  bits = 32 - jax.lax.clz(size - 1)  # bits of size - 1 (0 when size is 1)
  low = jnp.where(bits >= 32, jnp.uint32(0xFFFFFFFF), (jnp.uint32(1) << bits) - 1)
  shift = jnp.maximum(bits // 2, 1).astype(jnp.uint32)
  salts = jax.random.bits(key, (len(_ODD),), jnp.uint32)

  def mix(x):
    for i, odd in enumerate(_ODD):
      x = ((x ^ salts[i]) * jnp.uint32(odd)) & low
      x = x ^ (x >> shift)
    return x

  def walk(x):
    return jnp.where(x >= size, mix(x), x)

  x = jax.lax.while_loop(lambda x: jnp.any(x >= size), walk, mix(jnp.asarray(position, jnp.uint32)))
  return x.astype(jnp.int32)
