"""Personalized sparse masks: per-layer densities, initialisation, application and statistics.

A mask is a bool pytree with exactly the structure of the params (True = active). Leaves that are not maskable
(biases, norm scales: every leaf with fewer than two dimensions) are all True, so `jax.tree.map` over params, masks
and densities always lines up. Densities are computed on the host from shapes alone (as in jaxpruner and RigL);
counts are exact: a layer with density d and n entries has exactly round(d * n) active entries.

ERK densities: Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets Winners" (ICML 2020).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax.permute import random_subset

Params = Any
Mask = Any
Densities = Any
Maskable = Callable[[tuple, Any], bool]


def is_maskable(path: tuple, leaf: Any) -> bool:
  """The library's one rule for which leaves are sparsified: kernels (ndim >= 2) are, biases and scales are not."""
  del path
  return np.ndim(leaf) >= 2


def is_parameter(path: tuple, leaf: Any) -> bool:
  """Every parameter with at least one dimension is sparsified, biases and norm scales included (as rong-dai/DisPFL
  masks and applies ERK over all of a model's parameters, `my_model_trainer.py`)."""
  del path
  return np.ndim(leaf) >= 1


# Which leaves a sparse method masks (`masked_leaves`): "kernels" (`is_maskable`, the default) or "all" (`is_parameter`).
MASKED_LEAVES = {"kernels": is_maskable, "all": is_parameter}


def maskable_rule(masked_leaves: str) -> Maskable:
  """The `Maskable` rule named by `masked_leaves` ("kernels" or "all"); ValueError for any other name."""
  if masked_leaves not in MASKED_LEAVES:
    raise ValueError(f"masked_leaves must be one of {tuple(MASKED_LEAVES)}, got {masked_leaves!r}")
  return MASKED_LEAVES[masked_leaves]


def check_density(density: float) -> None:
  """Raises ValueError unless 0 < density <= 1."""
  if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
    raise ValueError(f"density must be a number in (0, 1], got {density!r}")


def uniform_densities(params: Params, density: float, *, maskable: Maskable = is_maskable) -> Densities:
  """Every maskable leaf gets `density`; the others 1.0. Returns a pytree of Python floats shaped like `params`."""
  check_density(density)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: float(density) if maskable(path, leaf) else 1.0, params
  )


def erk_densities(
    params: Params, density: float, *, maskable: Maskable = is_maskable, power_scale: float = 1.0
) -> Densities:
  """Erdos-Renyi-Kernel densities whose maskable leaves hold `density` of their entries in total.

  A layer's density is proportional to (sum of its dims / product of its dims) ** power_scale; layers that would
  exceed density 1 are made dense and the rest rescaled, as in RigL.

  Args:
    params: a params pytree (arrays or shape-dtype structs).
    density: overall density of the maskable leaves, in (0, 1].
    maskable: which leaves are sparsified.
    power_scale: 1.0 is ERK; 0.0 gives uniform densities.

  Returns:
    A pytree of Python floats shaped like `params` (1.0 on non-maskable leaves).
  """
  check_density(density)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  masked = [i for i, (path, leaf) in enumerate(leaves) if maskable(path, leaf)]
  sizes = {i: int(np.prod(np.shape(leaves[i][1]))) for i in masked}
  raw = {i: (sum(np.shape(leaves[i][1])) / sizes[i]) ** power_scale for i in masked}
  dense: set[int] = set()
  while True:
    budget = density * sum(sizes.values()) - sum(sizes[i] for i in dense)
    sparse = [i for i in masked if i not in dense]
    denominator = sum(raw[i] * sizes[i] for i in sparse)
    eps = budget / denominator if denominator > 0 else 0.0
    too_dense = [i for i in sparse if eps * raw[i] > 1.0]
    if not too_dense:
      break
    dense.update(too_dense)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if i not in sizes or i in dense:
      out.append(1.0)
    else:
      out.append(float(eps * raw[i]))
  return jax.tree_util.tree_unflatten(treedef, out)


def target_counts(params: Params, densities: Densities) -> Any:
  """Exact active count per leaf, round(d * n), as a pytree of Python ints (at least 1 where d > 0)."""
  return jax.tree.map(
      lambda leaf, d: max(1, int(round(d * int(np.prod(np.shape(leaf)))))) if d < 1.0 else int(np.size(leaf)),
      params,
      densities,
  )


def _random_leaf_mask(key: jax.Array, shape: tuple[int, ...], count: int) -> jax.Array:
  # Exact count, O(size) work, no sort (see `permute.random_subset`).
  size = int(np.prod(shape))
  if count >= size:
    return jnp.ones(shape, dtype=bool)
  return random_subset(size, count, key).reshape(shape)


def init_masks(key: jax.Array, params: Params, densities: Densities) -> Mask:
  """Draws one random mask with exactly round(d_l * n_l) active entries in every leaf.

  Args:
    key: a PRNG key.
    params: params pytree (only shapes are read).
    densities: per-leaf densities, e.g. from `erk_densities`.

  Returns:
    A bool pytree shaped like `params`.
  """
  counts = target_counts(params, densities)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  count_leaves = treedef.flatten_up_to(counts)
  out = [_random_leaf_mask(k, np.shape(leaf), c) for k, leaf, c in zip(keys, leaves, count_leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


def init_client_masks(
    key: jax.Array, params: Params, densities: Densities, num_clients: int | None = None, *, shared: bool = False,
    ids: jax.Array | None = None,
) -> Mask:
  """Masks for a set of clients, stacked as [clients, ...] leaves.

  Args:
    key: a PRNG key; client k's mask is drawn from `fold_in(key, k)` (independent per client).
    params: params pytree.
    densities: per-leaf densities.
    num_clients: K, for clients 0..K-1 (or give `ids`).
    shared: give every client the same initial mask (the one drawn for client 0).
    ids: int32 [C] the clients to draw masks for (the engine draws a large population in chunks).

  Returns:
    A bool pytree with leaves [C, *leaf.shape].
  """
  if (num_clients is None) == (ids is None):
    raise ValueError("give num_clients or ids")
  ids = jnp.arange(num_clients, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
  if shared:
    ids = jnp.zeros_like(ids)
  return jax.vmap(lambda k: init_masks(jax.random.fold_in(key, k), params, densities))(ids)


def dense_mask(params: Params) -> Mask:
  """An all-True mask shaped like `params`."""
  return jax.tree.map(lambda p: jnp.ones(np.shape(p), dtype=bool), params)


def apply_mask(params: Params, mask: Mask) -> Params:
  """m ⊙ w, written with `where` so that inactive entries are exactly 0 even when w holds inf or nan."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, mask)


def count_active(mask: Mask, *, stacked: bool = False) -> Any:
  """Number of active entries per leaf: int32 scalars, or [K] per client when `stacked` (leaves [K, ...])."""
  start = 1 if stacked else 0
  return jax.tree.map(lambda m: jnp.sum(m, axis=tuple(range(start, m.ndim)), dtype=jnp.int32), mask)


def density_report(mask: Mask) -> dict[str, dict[str, float]]:
  """Host-side table {leaf path: {"active", "size", "density"}} for one (unstacked) mask."""
  report = {}
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    m = np.asarray(m)
    report[jax.tree_util.keystr(path)] = {
        "active": int(m.sum()),
        "size": int(m.size),
        "density": float(m.mean()) if m.size else 1.0,
    }
  return report


def overall_density(mask: Mask, *, maskable: Maskable = is_maskable) -> jax.Array:
  """Fraction of maskable entries that are active (one client's mask)."""
  pairs = [m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if maskable(path, m)]
  if not pairs:
    return jnp.ones(())
  active = sum(jnp.sum(m, dtype=jnp.int32) for m in pairs)
  size = sum(m.size for m in pairs)
  return active / size


def hamming_distance(mask_a: Mask, mask_b: Mask) -> jax.Array:
  """Number of entries where two masks differ (int32 scalar)."""
  diffs = jax.tree.map(lambda a, b: jnp.sum(a != b, dtype=jnp.int32), mask_a, mask_b)
  return sum(jax.tree.leaves(diffs), jnp.zeros((), jnp.int32))


def pairwise_hamming(masks: Mask) -> jax.Array:
  """[K, K] Hamming distances between the K stacked masks (leaves [K, ...])."""
  return jax.vmap(lambda a: jax.vmap(lambda b: hamming_distance(a, b))(masks))(masks)


def pack_words(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Packs bool [..., *shape] into uint32 words [..., ceil(n / 32)] (n = prod(shape); bit i of word j is entry 32j+i).

  The form masks are stored in between rounds: 1 bit per weight per client.
  """
  shape = tuple(shape)
  lead = mask.shape[: mask.ndim - len(shape)]
  n = int(np.prod(shape))
  words = -(-n // 32)
  flat = mask.reshape(lead + (n,))
  flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, words * 32 - n)]).reshape(lead + (words, 32))
  shifts = jnp.arange(32, dtype=jnp.uint32).reshape((1,) * (len(lead) + 1) + (32,))
  return jnp.sum(flat.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)  # distinct bits: sum == or


def unpack_words(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_words`: uint32 [..., W] -> bool [..., *shape]."""
  shape = tuple(shape)
  n = int(np.prod(shape))
  lead = words.shape[:-1]
  shifts = jnp.arange(32, dtype=jnp.uint32).reshape((1,) * words.ndim + (32,))
  bits = (words[..., None] >> shifts) & jnp.uint32(1)
  return bits.reshape(lead + (words.shape[-1] * 32,))[..., :n].astype(bool).reshape(lead + shape)


def __getattr__(name: str):
  # The mask-update functions live in mask_update.py; re-exported here as the public API names them
  # (fj.masks.prune_and_regrow, fj.masks.cosine_prune_rate) without an import cycle.
  if name in ("prune_and_regrow", "cosine_prune_rate"):
    from fedspa_jax import mask_update

    return getattr(mask_update, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
