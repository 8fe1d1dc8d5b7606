"""FedSpa's mask evolution: a cosine-annealed prune rate, magnitude drop and gradient (or random) regrowth.

Drop-and-grow follows RigL (Evci et al., ICML 2020) as used per client by FedSpa (Huang et al., 2022): in every
masked leaf, the ceil(rate * active) active entries of smallest |param| are dropped, then as many entries are grown
among those inactive after the drop (the just-dropped ones included) by largest |grad| ("gradient", RigL) or
uniformly at random ("random", SET: Mocanu et al., 2018). Selections find their threshold by bisection over the
float bit patterns, so counts are exact and `rate` can be a traced value: one compiled program serves every round.
Drops break ties by index; growth breaks ties at random (from the client's mask key), since ties there are common
(zero gradients of dead units, a tiny batch, a client with no samples) and index order would pile the grown weights
into the first rows of a kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax.masks import Maskable, is_maskable

REGROW_RULES = ("gradient", "random")


def check_rate(rate: Any, name: str = "prune rate") -> None:
  """Raises ValueError if a concrete rate lies outside [0, 1] (traced rates are not checked)."""
  if isinstance(rate, jax.core.Tracer):
    return
  value = np.asarray(rate)
  if value.ndim != 0 or not np.isfinite(value) or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be a number in [0, 1], got {rate!r}")


def cosine_prune_rate(round: Any, alpha: float, t_end: Any) -> jax.Array:
  """alpha / 2 * (1 + cos(pi * round / t_end)) before t_end, 0 from t_end on (where the formula reaches 0).

  Args:
    round: the round index t (int or traced int32).
    alpha: initial prune rate, in [0, 1].
    t_end: last round at which masks change (> 0).

  Returns:
    A float32 scalar.
  """
  check_rate(alpha, "alpha")
  if not isinstance(t_end, jax.core.Tracer) and float(t_end) <= 0:
    raise ValueError(f"t_end must be > 0, got {t_end!r}")
  t = jnp.asarray(round, jnp.float32)
  rate = alpha / 2.0 * (1.0 + jnp.cos(jnp.pi * t / t_end))
  return jnp.where(t < t_end, rate, 0.0).astype(jnp.float32)  # exactly 0 from t_end on, whatever cos rounds to


_NO = np.iinfo(np.int32).max  # the key of an entry that must not be selected
_INF_BITS = 0x7F800000  # bit pattern of float32 +inf


def _magnitude_keys(x: jax.Array) -> jax.Array:
  """int32 keys ordered like |x| (the bits of a non-negative float32 sort as integers); nan counts as 0."""
  magnitude = jnp.abs(jnp.nan_to_num(x.astype(jnp.float32), nan=0.0))
  return jax.lax.bitcast_convert_type(magnitude, jnp.int32)


def _bisect(keys: list[jax.Array], counts: jax.Array) -> jax.Array:
  """Per array i, the smallest key t with at least counts[i] keys <= t.

  32 passes of compare-and-count over the int32 range, all arrays advanced together in one loop: the loop's fixed
  cost per pass (large beside a small layer's compares on CPU) is paid once for every leaf of a model.
  """

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    enough = jnp.stack([jnp.sum(k <= mid[i], dtype=jnp.int32) for i, k in enumerate(keys)]) >= counts
    return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

  n = len(keys)
  threshold, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros((n,), jnp.int32), jnp.full((n,), _NO, jnp.int32)))
  return threshold


def select_smallest_many(
    keys: list[jax.Array], counts: jax.Array, tie_keys: list[jax.Array] | None = None
) -> list[jax.Array]:
  """`select_smallest` of several arrays at once (one bisection loop for all): per i, counts[i] entries of keys[i]."""
  counts = jnp.asarray(counts, jnp.int32).reshape(-1)
  threshold = _bisect(keys, counts)
  below = [k < threshold[i] for i, k in enumerate(keys)]
  tied = [k == threshold[i] for i, k in enumerate(keys)]
  need = counts - jnp.stack([jnp.sum(b, dtype=jnp.int32) for b in below])
  if tie_keys is None:
    take_tied = [t & (jnp.cumsum(t, dtype=jnp.int32) <= need[i]) for i, t in enumerate(tied)]
  else:
    ties = jnp.stack([jnp.sum(t, dtype=jnp.int32) for t in tied])

    def take_all(_):  # every entry tied at the threshold is taken: nothing to break
      return [t for t in tied]

    def take_random(_):
      random_keys = []
      for t, tie_key in zip(tied, tie_keys):
        bits = jax.random.bits(tie_key, t.shape, jnp.uint32) >> 1
        random_keys.append(jnp.where(t, jnp.minimum(bits.astype(jnp.int32), _NO - 1), _NO))
      second = _bisect(random_keys, need)
      out = []
      for i, r in enumerate(random_keys):
        under = r < second[i]
        level = r == second[i]
        rest = need[i] - jnp.sum(under, dtype=jnp.int32)
        out.append(under | (level & (jnp.cumsum(level, dtype=jnp.int32) <= rest)))
      return out

    # Ties at the threshold are rare for float scores: the second bisection runs only when some leaf has more
    # tied entries than it needs (a real branch when unbatched, as the round runs clients on CPU).
    take_tied = jax.lax.cond(jnp.any(ties > need), take_random, take_all, None)
  return [(b | t) & (counts[i] > 0) for i, (b, t) in enumerate(zip(below, take_tied))]


def select_smallest(keys: jax.Array, count: jax.Array, tie_key: jax.Array | None = None) -> jax.Array:
  """Marks the `count` entries of smallest key; `count` may be traced.

  The count-th smallest key is found by bisection over the int32 range (32 passes of compare-and-count), not by
  sorting: on CPU this is about 14x faster than an argsort for a 0.5M-entry layer vmapped over 10 clients. Entries
  tied at that key are taken by lowest index, or, with `tie_key`, as a uniformly random subset of the tied ones (a
  second bisection over random 31-bit keys of the tied entries; the rare equal random keys fall back to index).

  Args:
    keys: int32 [N] non-negative keys; `_NO` (int32 max) marks entries that must not be selected.
    count: int32 scalar, at most the number of selectable entries.
    tie_key: optional PRNG key for random tie-breaking.

  Returns:
    bool [N] with exactly `count` True entries.
  """
  return select_smallest_many([keys], jnp.reshape(count, (1,)), None if tie_key is None else [tie_key])[0]


def drop_and_grow_many(
    masks: list[jax.Array],
    params: list[jax.Array],
    grow_scores: list[jax.Array],
    rate: jax.Array,
    tie_keys: list[jax.Array] | None = None,
) -> list[jax.Array]:
  """`drop_and_grow` of several leaves at once (each its own counts; one selection loop for all)."""
  shapes = [m.shape for m in masks]
  masks = [m.reshape(-1) for m in masks]
  params = [p.reshape(-1) for p in params]
  grow_scores = [g.reshape(-1) for g in grow_scores]
  active = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in masks])
  counts = jnp.clip(jnp.ceil(rate * active.astype(jnp.float32)).astype(jnp.int32), 0, active)
  dropped = select_smallest_many([jnp.where(m, _magnitude_keys(p), _NO) for m, p in zip(masks, params)], counts)
  kept = [m & ~d for m, d in zip(masks, dropped)]
  grow_keys = [jnp.where(~k, _INF_BITS - _magnitude_keys(g), _NO) for k, g in zip(kept, grow_scores)]
  grown = select_smallest_many(grow_keys, counts, tie_keys)
  return [(k | g).reshape(shape) for k, g, shape in zip(kept, grown, shapes)]


def drop_and_grow(
    mask: jax.Array, param: jax.Array, grow_score: jax.Array, rate: jax.Array, tie_key: jax.Array | None = None
) -> jax.Array:
  """One leaf's drop-and-grow.

  Args:
    mask: bool [...] current mask.
    param: [...] weights; the active ones of smallest |param| are dropped (ties: lowest index).
    grow_score: [...] non-negative scores; the largest among the inactive-after-drop entries are grown.
    rate: scalar prune rate in [0, 1].
    tie_key: PRNG key that breaks ties among equal grow scores at random (None: lowest index first).

  Returns:
    The new bool mask, with exactly as many active entries as `mask`.
  """
  return drop_and_grow_many([mask], [param], [grow_score], rate, None if tie_key is None else [tie_key])[0]


def prune_smallest(mask: jax.Array, param: jax.Array, count: jax.Array) -> jax.Array:
  """Drops the `count` active entries of smallest |param| (no regrowth); `count` may be traced."""
  count = jnp.clip(count, 0, jnp.sum(mask, dtype=jnp.int32))
  keys = jnp.where(mask, _magnitude_keys(param), _NO).reshape(-1)
  return mask & ~select_smallest(keys, count).reshape(mask.shape)


def prune_and_regrow(
    mask: Any,
    params: Any,
    grads: Any,
    rate: Any,
    key: jax.Array,
    regrow: str = "gradient",
    *,
    maskable: Maskable = is_maskable,
) -> Any:
  """FedSpa's next mask: per maskable leaf, drop ceil(rate * active) smallest-|param| weights, grow as many.

  Args:
    mask: bool pytree shaped like params.
    params: the weights after local training (m ⊙ x).
    grads: dense gradient at `params` (every coordinate), used by regrow="gradient"; may be None for "random".
    rate: prune rate in [0, 1] (float or traced scalar).
    key: the client's mask key: random tie-breaking among equal gradients (regrow="gradient"), or the random
      scores (regrow="random").
    regrow: "gradient" (RigL) or "random" (SET).
    maskable: which leaves are evolved; the others are returned unchanged.

  Returns:
    The new bool mask pytree; every leaf keeps its active count exactly.
  """
  if regrow not in REGROW_RULES:
    raise ValueError(f"regrow must be one of {REGROW_RULES}, got {regrow!r}")
  if regrow == "gradient" and grads is None:
    raise ValueError('regrow="gradient" needs grads')
  check_rate(rate)
  rate = jnp.asarray(rate, jnp.float32)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(mask)
  param_leaves = treedef.flatten_up_to(params)
  grad_leaves = treedef.flatten_up_to(grads) if grads is not None else [None] * len(leaves)
  keys = jax.random.split(key, len(leaves))
  chosen = [i for i, (path, m) in enumerate(leaves) if maskable(path, m)]
  out = [m for _, m in leaves]
  if chosen:
    if regrow == "gradient":
      scores = [jnp.abs(grad_leaves[i]) for i in chosen]
      tie_keys = [keys[i] for i in chosen]
    else:  # random scores need no tie-breaking of their own
      scores = [jax.random.uniform(keys[i], leaves[i][1].shape) for i in chosen]
      tie_keys = None
    new = drop_and_grow_many([leaves[i][1] for i in chosen], [param_leaves[i] for i in chosen], scores, rate,
                             tie_keys)
    for i, m in zip(chosen, new):
      out[i] = m
  return jax.tree_util.tree_unflatten(treedef, out)



def prune_to_counts(mask: Any, params: Any, counts: Any, *, maskable: Maskable = is_maskable) -> Any:
  """Magnitude pruning to per-leaf targets: every maskable leaf with more than counts[leaf] active entries drops its
  smallest |param| (ties: lowest index) down to that count; leaves at or below it are unchanged.

  FedDST's server re-sparsification and its initial global mask (`layer_prune` in bibikar/feddst models.py), and
  jaxpruner's magnitude pruning to a target.

  Args:
    mask: bool pytree shaped like params (all True: a dense start).
    params: the weights whose magnitudes rank the active entries.
    counts: pytree like params of int targets (Python ints or traced int32 scalars).
    maskable: which leaves are pruned; the others are returned unchanged.
  """

  def leaf(path, m, p, c):
    if not maskable(path, m):
      return m
    active = jnp.sum(m, dtype=jnp.int32)
    return prune_smallest(m, p, jnp.maximum(active - jnp.asarray(c, jnp.int32), 0))

  return jax.tree_util.tree_map_with_path(leaf, mask, params, counts)


def select_by_importance_per_cost(
    mask: Any,
    params: Any,
    importance: Any,
    decrease: Any,
    costs: Any,
    time_constant: Any,
    *,
    maskable: Maskable = is_maskable,
) -> Any:
  """PruneFL's readjusted mask: the set that greedily maximizes importance kept per unit of time.

  jiangyuang/PruneFL control/algorithm.py (`process_layer`, `architecture_search`): per maskable leaf, the
  int(`decrease` * active) active weights of smallest |param| become candidates beside the inactive ones; the rest
  are kept. With Q the importance kept (every non-maskable leaf's counted whole) and T = `time_constant` + the
  kept weights' costs, candidates are taken in order of importance / cost, largest first, while that ratio exceeds
  Q / T (each taken one adds its importance to Q and its cost to T); the first that does not ends the search.

  Args:
    mask: bool pytree shaped like params.
    params: the weights whose magnitudes rank the active ones for the decrease.
    importance: float pytree shaped like params (PruneFL: accumulated squared gradients).
    decrease: the share of each leaf's active weights that may leave (float or traced scalar in [0, 1]).
    costs: pytree shaped like params, a float per leaf (a leaf's cost per weight; any value for non-maskable leaves).
    time_constant: the cost every round pays whatever the mask (float or traced scalar).
    maskable: which leaves are readjusted; the others are returned unchanged.

  Returns:
    The new bool mask pytree. Ties in importance / cost are taken in leaf order, then in flat index order.
  """
  check_rate(decrease, "decrease")
  decrease = jnp.asarray(decrease, jnp.float32)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(mask)
  param_leaves = treedef.flatten_up_to(params)
  score_leaves = [jnp.asarray(s, jnp.float32) for s in treedef.flatten_up_to(importance)]
  cost_leaves = treedef.flatten_up_to(costs)
  kept_importance = jnp.zeros((), jnp.float32)
  time = jnp.asarray(time_constant, jnp.float32)
  out = [m for _, m in leaves]
  chosen, kept_of, candidate_scores, candidate_gains, candidate_costs = [], [], [], [], []
  for i, (path, m) in enumerate(leaves):
    if not maskable(path, m):
      kept_importance = kept_importance + jnp.sum(score_leaves[i])
      continue
    cost = jnp.asarray(cost_leaves[i], jnp.float32)
    drop = jnp.floor(decrease * jnp.sum(m, dtype=jnp.int32)).astype(jnp.int32)
    kept = prune_smallest(m, param_leaves[i], drop)
    kept_importance = kept_importance + jnp.sum(jnp.where(kept, score_leaves[i], 0.0))
    time = time + cost * jnp.sum(kept, dtype=jnp.float32)
    candidate = ~kept
    chosen.append(i)
    kept_of.append(kept)
    candidate_scores.append(jnp.where(candidate, score_leaves[i] / cost, -jnp.inf).reshape(-1))
    candidate_gains.append(score_leaves[i].reshape(-1))
    candidate_costs.append(jnp.broadcast_to(cost, (m.size,)))
  if not chosen:
    return jax.tree_util.tree_unflatten(treedef, out)
  scores = jnp.concatenate(candidate_scores)
  order = jnp.argsort(-scores, stable=True)
  ranked = scores[order]
  gains_before = jnp.cumsum(jnp.concatenate(candidate_gains)[order]) - jnp.concatenate(candidate_gains)[order]
  costs_before = jnp.cumsum(jnp.concatenate(candidate_costs)[order]) - jnp.concatenate(candidate_costs)[order]
  # Candidate j is taken when its ratio beats Q / T after all before it were taken, and so were they.
  beats = (ranked > -jnp.inf) & (ranked * (time + costs_before) > kept_importance + gains_before)
  taken_sorted = jnp.cumprod(beats.astype(jnp.int32)) > 0
  taken = jnp.zeros(scores.shape, bool).at[order].set(taken_sorted)
  start = 0
  for i, kept in zip(chosen, kept_of):
    size = kept.size
    out[i] = kept | taken[start:start + size].reshape(kept.shape)
    start += size
  return jax.tree_util.tree_unflatten(treedef, out)
