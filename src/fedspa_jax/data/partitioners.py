"""Partitioners: split a labelled dataset's sample indices among K clients (host-side numpy, seeded).

- `iid`: a uniform random split into K near-equal parts.
- `pathological`: each client holds exactly `classes_per_client` classes (McMahan et al., "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017): the samples, sorted by label, are cut into
  K * classes_per_client shards and each client gets shards of distinct classes. Shard boundaries respect class
  boundaries (a class's samples are cut into its own shards, in number proportional to its size), so no shard
  straddles two classes and "exactly n classes" holds.
- `dirichlet`: each class's samples are spread over the clients with proportions ~ Dir(alpha) (Hsu, Qi, Brown,
  "Measuring the Effects of Non-Identical Data Distribution", 2019; with the balancing of Li et al.'s NIID-Bench,
  "Federated Learning on Non-IID Data Silos", ICDE 2022, a client that already holds N/K samples gets no more).
  Drawn up to `max_tries` times until every client has `min_samples`; then the best draw is repaired
  deterministically, moving samples from the largest clients to the ones short of the minimum.
- `dirichlet_balanced`: each client draws its own class mix ~ Dir(alpha) over the classes and gets an equal share
  N / K of the samples, dealt one at a time in a random order from its mix (a class that has run out is redrawn
  among those left), as rong-dai/DisPFL's `fedml_api/data_preprocessing/cifar10/data_loader.py` ("dir") does.
  With `test_mode="global"` each client's test set follows its own label mix (`holdout.draw_global`), equal in
  size up to rounding when the classes' test/train ratios are equal (the group draws M / K test samples per client
  by its label mix, with overlaps between clients; here the test sets are disjoint).

Every partitioner returns one sorted int64 index array per client; each sample goes to at most one client (iid
and the Dirichlet split use every sample; pathological too, unless a class is too small to get a shard).
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np


def make_rng(seed: int, stream: int) -> np.random.Generator:
  """An independent generator per (seed, stream), so partitioning and test drawing never share draws."""
  return np.random.default_rng([stream, seed])


def apportion(total: int, weights: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
  """Splits `total` into integers proportional to `weights` (largest remainder), each at most `cap`.

  Args:
    total: the sum to split.
    weights: [n] non-negative weights, not all zero.
    cap: [n] optional upper bounds.

  Returns:
    [n] int64 counts summing to `total`.

  Raises:
    ValueError: the caps sum to less than `total`.
  """
  weights = np.asarray(weights, dtype=np.float64)
  cap = np.full(len(weights), total, dtype=np.int64) if cap is None else np.asarray(cap, dtype=np.int64)
  if cap.sum() < total:
    raise ValueError(f"cannot split {total} into parts capped at {cap.tolist()}")
  target = total * weights / weights.sum()
  counts = np.minimum(np.floor(target).astype(np.int64), cap)
  for _ in range(total - int(counts.sum())):
    gap = np.where(counts < cap, target - counts, -np.inf)
    counts[np.argmax(gap)] += 1
  return counts


def _check_common(labels: np.ndarray, num_clients: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got {labels.min()}")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if num_clients > len(labels):
    raise ValueError(f"more clients than samples: {num_clients} clients but {len(labels)} samples")
  return labels


def group_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Sample -> client assignment [N] (-1 = unused) into K sorted index arrays."""
  order = np.argsort(owner, kind="stable")
  sizes = np.bincount(owner[owner >= 0], minlength=num_clients)
  start = int(np.sum(owner < 0))
  return [part.astype(np.int64) for part in np.split(order[start:], np.cumsum(sizes)[:-1])]


def iid(labels: np.ndarray, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
  """Uniformly random split into `num_clients` parts whose sizes differ by at most one.

  Args:
    labels: [N] integer labels (only their number matters).
    num_clients: K.
    seed: numpy seed.

  Returns:
    K sorted int64 index arrays that together hold every index once.
  """
  labels = _check_common(labels, num_clients)
  perm = make_rng(seed, 0).permutation(len(labels))
  return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def _deal_classes(shards: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> np.ndarray:
  """Gives each client `per_client` distinct classes, class c to exactly `shards[c]` clients.

  Lays the classes out in runs (class c repeated shards[c] <= K times) and fills a [K, per_client] grid column
  by column, so a run never puts a class twice in one row; then mixes the grid with random swaps that keep
  every row's classes distinct.

  Returns:
    [K, per_client] class positions (indices into `shards`).
  """
  order = rng.permutation(len(shards))
  grid = np.repeat(order, shards[order]).reshape(per_client, num_clients).T.tolist()
  if num_clients > 1:
    n = 20 * num_clients * per_client
    rows = rng.integers(num_clients, size=(n, 2)).tolist()
    cols = rng.integers(per_client, size=(n, 2)).tolist()
    for (k1, k2), (j1, j2) in zip(rows, cols):
      a, b = grid[k1][j1], grid[k2][j2]
      if k1 == k2 or a == b or b in grid[k1] or a in grid[k2]:
        continue
      grid[k1][j1], grid[k2][j2] = b, a
  return np.array(grid, dtype=np.int64)


def pathological(
    labels: np.ndarray, num_clients: int, *, classes_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
  """FedAvg's pathological non-IID split: each client gets exactly `classes_per_client` classes.

  Args:
    labels: [N] integer labels.
    num_clients: K.
    classes_per_client: n, the number of distinct classes each client holds.
    seed: numpy seed.

  Returns:
    K sorted int64 index arrays; client k's labels take exactly n distinct values; every index is used at most
    once (all of them unless a class is so small that its share rounds to no shard).

  Raises:
    ValueError: n exceeds the classes present, K * n exceeds the samples, or the classes are too unbalanced to
      give every client n distinct ones (a class would have to go to more than K clients).
  """
  labels = _check_common(labels, num_clients)
  classes, sizes = np.unique(labels, return_counts=True)
  if not 1 <= classes_per_client <= len(classes):
    raise ValueError(
        f"classes_per_client={classes_per_client} must be between 1 and the {len(classes)} classes present"
    )
  total = num_clients * classes_per_client
  if total > len(labels):
    raise ValueError(
        f"more clients than samples allow: {num_clients} clients x {classes_per_client} classes need {total} "
        f"shards but there are only {len(labels)} samples"
    )
  try:
    shards = apportion(total, sizes, cap=np.minimum(sizes, num_clients))
  except ValueError:
    raise ValueError(
        f"cannot give {num_clients} clients {classes_per_client} distinct classes each: the class sizes "
        f"{sizes.tolist()} do not allow {total} shards with at most one per client and class"
    ) from None
  rng = make_rng(seed, 0)
  grid = _deal_classes(shards, num_clients, classes_per_client, rng)
  pieces = [
      np.array_split(rng.permutation(np.flatnonzero(labels == c)), s) if s else []
      for c, s in zip(classes, shards)
  ]
  owner = np.full(len(labels), -1, dtype=np.int64)
  for k, row in enumerate(grid):
    for c in row:
      owner[pieces[c].pop()] = k
  return group_by_owner(owner, num_clients)


def _dirichlet_owner(
    class_indices: list[np.ndarray], num_clients: int, alpha: float, balance: bool, rng: np.random.Generator
) -> np.ndarray:
  """One Dirichlet draw: sample -> client [N]."""
  n = sum(len(i) for i in class_indices)
  owner = np.empty(n, dtype=np.int64)
  sizes = np.zeros(num_clients, dtype=np.int64)
  for idx in class_indices:
    p = rng.dirichlet(np.full(num_clients, alpha))
    if balance:
      p = np.where(sizes < n / num_clients, p, 0.0)
    if not np.isfinite(p).all() or p.sum() <= 0:
      p = np.ones(num_clients)
    counts = np.diff(np.floor(np.cumsum(p / p.sum()) * len(idx)).astype(np.int64), prepend=0)
    counts[-1] += len(idx) - counts.sum()  # rounding dust of the cumulative sum
    owner[rng.permutation(idx)] = np.repeat(np.arange(num_clients), counts)
    sizes += counts
  return owner


def _repair(owner: np.ndarray, labels: np.ndarray, num_clients: int, min_samples: int) -> np.ndarray:
  """Moves samples from the largest clients to those below `min_samples` until none is (deterministic).

  The donor gives samples of its own most frequent class, which keeps the label skew of both clients.
  Terminates because N >= K * min_samples: while a client is short, the largest has samples to spare, and each
  move either fills the short client or brings the donor down to the minimum.
  """
  owner = owner.copy()
  sizes = np.bincount(owner, minlength=num_clients)
  while sizes.min() < min_samples:
    short, donor = int(np.argmin(sizes)), int(np.argmax(sizes))
    move = min(min_samples - sizes[short], sizes[donor] - min_samples)
    held = np.flatnonzero(owner == donor)
    held_labels = labels[held]
    major = np.bincount(held_labels).argmax()
    held = np.concatenate([held[held_labels == major], held[held_labels != major]])
    owner[held[:move]] = short
    sizes[short] += move
    sizes[donor] -= move
  return owner


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float = 0.5,
    min_samples: int = 10,
    max_tries: int = 100,
    balance: bool = True,
    seed: int = 0,
) -> list[np.ndarray]:
  """Label-skewed split: client k's share of class c follows Dir(alpha) over the clients.

  Args:
    labels: [N] integer labels.
    num_clients: K.
    alpha: concentration (> 0); small alpha (0.1) = few classes per client, large (100) = nearly IID.
    min_samples: every client ends with at least this many samples.
    max_tries: Dirichlet draws before the best one is repaired (see the module docstring).
    balance: stop giving samples to clients that already hold N / K (NIID-Bench's rule).
    seed: numpy seed.

  Returns:
    K sorted int64 index arrays that together hold every index once, each at least `min_samples` long.

  Raises:
    ValueError: alpha <= 0, min_samples < 0, or K * min_samples exceeds the samples.
  """
  labels = _check_common(labels, num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  if min_samples < 0 or max_tries < 1:
    raise ValueError(f"need min_samples >= 0 and max_tries >= 1, got {min_samples} and {max_tries}")
  if num_clients * min_samples > len(labels):
    raise ValueError(
        f"more clients than samples allow: {num_clients} clients x min_samples={min_samples} exceeds the "
        f"{len(labels)} samples"
    )
  rng = make_rng(seed, 0)
  class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  best, best_deficit = None, None
  for _ in range(max_tries):
    owner = _dirichlet_owner(class_indices, num_clients, alpha, balance, rng)
    deficit = int(np.maximum(min_samples - np.bincount(owner, minlength=num_clients), 0).sum())
    if best is None or deficit < best_deficit:
      best, best_deficit = owner, deficit
    if deficit == 0:
      break
  return group_by_owner(_repair(best, labels, num_clients, min_samples), num_clients)


def dirichlet_balanced(labels: np.ndarray, num_clients: int, *, alpha: float = 0.3, seed: int = 0) -> list[np.ndarray]:
  """Equal-sized clients, each with its own class mix ~ Dir(alpha) (the DisPFL group's "dir" split).

  Args:
    labels: [N] integer labels.
    num_clients: K.
    alpha: concentration (> 0) of each client's class mix.
    seed: numpy seed.

  Returns:
    K sorted int64 index arrays that together hold every index once, their sizes N // K or N // K + 1.

  Raises:
    ValueError: alpha <= 0, or more clients than samples.
  """
  labels = _check_common(labels, num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  if num_clients > len(labels):
    raise ValueError(f"more clients ({num_clients}) than samples ({len(labels)})")
  rng = make_rng(seed, 0)
  classes = np.unique(labels)
  left = np.array([np.sum(labels == c) for c in classes], dtype=np.int64)
  mix = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)  # [K, C]
  slots = rng.permutation(np.repeat(np.arange(num_clients), apportion(len(labels), np.ones(num_clients))))
  drawn = np.empty(len(slots), dtype=np.int64)
  u = rng.random(len(slots))
  start = 0
  while start < len(slots):  # one pass per class that runs out: at most C + 1
    p = mix[slots[start:]] * (left > 0)
    empty = p.sum(axis=1) <= 0  # a mix all on classes that ran out (or underflowed): the classes left, uniformly
    p[empty] = (left > 0).astype(np.float64)
    cdf = np.cumsum(p, axis=1) / p.sum(axis=1, keepdims=True)
    c = np.minimum((u[start:, None] > cdf).sum(axis=1), len(classes) - 1)
    taken = np.cumsum(np.eye(len(classes), dtype=np.int64)[c], axis=0)  # [n, C] running counts
    over = np.flatnonzero((taken > left).any(axis=1))
    stop = len(c) if not len(over) else int(over[0])  # the first draw from a class that has run out is redrawn
    drawn[start:start + stop] = c[:stop]
    left -= taken[stop - 1] if stop else 0
    start += stop
  owner = np.empty(len(labels), dtype=np.int64)
  for i, cls in enumerate(classes):
    owner[rng.permutation(np.flatnonzero(labels == cls))] = slots[drawn == i]
  return group_by_owner(owner, num_clients)


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "pathological": pathological,
    "dirichlet": dirichlet,
    "dirichlet_balanced": dirichlet_balanced,
}


def partition_defaults(method: str) -> dict:
  """The options `method` takes (besides labels, num_clients and seed) with their defaults.

  Raises:
    ValueError: unknown method (the message lists the known ones).
  """
  if method not in PARTITIONERS:
    raise ValueError(f"unknown partition {method!r}; known: {', '.join(PARTITIONERS)}")
  params = inspect.signature(PARTITIONERS[method]).parameters.values()
  return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed"}


def resolve_partition_args(method: str, args: dict) -> dict:
  """`args` completed with `method`'s defaults.

  Raises:
    ValueError: unknown method, or an option `method` does not take (the message lists those it takes).
  """
  defaults = partition_defaults(method)
  unknown = sorted(set(args) - set(defaults))
  if unknown:
    raise ValueError(
        f"partition {method!r} takes no option {', '.join(unknown)}; its options: {', '.join(defaults) or 'none'}"
    )
  return {**defaults, **args}


def partition(labels: np.ndarray, num_clients: int, method: str, *, seed: int = 0, **args) -> list[np.ndarray]:
  """Splits sample indices among clients with the named partitioner.

  Args:
    labels: [N] integer labels.
    num_clients: K.
    method: `iid`, `pathological`, `dirichlet` or `dirichlet_balanced`.
    seed: numpy seed.
    **args: the method's options (`classes_per_client`; `alpha`, `min_samples`, `max_tries`, `balance`).

  Returns:
    K sorted int64 index arrays into `labels`, disjoint.
  """
  args = resolve_partition_args(method, args)
  return PARTITIONERS[method](labels, num_clients, seed=seed, **args)
