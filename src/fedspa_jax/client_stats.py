"""Per-client analysis for reports: clients ordered by their label distribution, and mask distances between them.

FedSpa's claim is that clients with similar data grow similar masks; the heatmap of pairwise mask Hamming distances,
with clients ordered by their dominant labels, shows whether they do. The distance matrix is computed leaf by leaf
as |a| + |b| - 2 a·b with column-chunked matmuls, so memory stays at [K, chunk] per step even for large models
(`fedspa_jax.masks.pairwise_hamming` materializes [K, K, n]).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_CHUNK = 1 << 18  # columns per matmul: float32 sums of 0/1 products stay exact below 2**24


def is_mask_store(clients: Any) -> bool:
  """True when a client store is a (non-empty) pytree of bool leaves [K, ...], i.e. per-client masks."""
  leaves = jax.tree.leaves(clients)
  return bool(leaves) and all(getattr(a, "dtype", None) == jnp.bool_ for a in leaves)


@jax.jit
def _gram(block: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = block.astype(jnp.float32)
  return x @ x.T, jnp.sum(x, axis=1)


def mask_distances(masks: Any) -> tuple[np.ndarray, np.ndarray]:
  """Pairwise Hamming distances between K stacked masks, over the leaves that are not dense for every client.

  Args:
    masks: bool pytree with leaves [K, ...].

  Returns:
    (distance [K, K] int64, active [K] int64 active entries per client in the same leaves), so that
    `distance / (active[:, None] + active[None, :])` is the share of active weights two clients do not share.
  """
  leaves = [a.reshape(a.shape[0], -1) for a in jax.tree.leaves(masks)]
  k = leaves[0].shape[0]
  dot, active = np.zeros((k, k), np.int64), np.zeros((k,), np.int64)
  for leaf in leaves:
    if bool(jnp.all(leaf)):
      continue  # a dense leaf (bias, norm scale) adds no distance
    for start in range(0, leaf.shape[1], _CHUNK):
      g, s = jax.device_get(_gram(leaf[:, start : start + _CHUNK]))
      dot += np.rint(g).astype(np.int64)
      active += np.rint(s).astype(np.int64)
  return active[:, None] + active[None, :] - 2 * dot, active


def personal_models(clients: Any, params: Any) -> Any | None:
  """The per-client models [K, ...] a client store holds (FedSpa "local"'s local models, Sub-FedAvg's networks,
  Local's and Ditto's models), or None (masks only, heads only, no state)."""
  for name in ("local", "params"):
    if hasattr(clients, name) and jax.tree.structure(getattr(clients, name)) == jax.tree.structure(params):
      return getattr(clients, name)
  if jax.tree.structure(clients) == jax.tree.structure(params):
    return clients
  return None


def model_distances(models: Any) -> tuple[np.ndarray, np.ndarray]:
  """Pairwise Euclidean distances between K stacked models (float64 on the host), and each model's norm.

  Args:
    models: pytree with float leaves [K, ...].

  Returns:
    (distance [K, K], norm [K]); `distance / norm.mean()` is a scale-free spread of the clients' models.
  """
  leaves = [np.asarray(jax.device_get(a), np.float64).reshape(a.shape[0], -1) for a in jax.tree.leaves(models)]
  k = leaves[0].shape[0]
  gram = np.zeros((k, k))
  for leaf in leaves:
    gram += leaf @ leaf.T
  squares = np.diag(gram)
  distance = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0))
  np.fill_diagonal(distance, 0.0)
  return distance, np.sqrt(squares)


@jax.jit
def _cross(a: jax.Array, b: jax.Array) -> jax.Array:
  return a.astype(jnp.float32) @ b.astype(jnp.float32).T


def _blocks(num_clients: int, chunk: int) -> list[np.ndarray]:
  return [np.arange(start, min(start + chunk, num_clients), dtype=np.int32) for start in range(0, num_clients, chunk)]


def client_distances(client_states: Callable[[np.ndarray], Any], num_clients: int, params: Any,
                     chunk: int = 256) -> dict[str, np.ndarray]:
  """Pairwise distances between the K clients' masks and between their own models, `chunk` clients decoded at a time.

  Memory is the [K, K] results plus two chunks of decoded client state (and, for models, two chunks of float64 host
  copies), never the whole decoded store: the pairs of chunks are visited once each (i <= j).

  Args:
    client_states: ids [C] -> the decoded state of those clients, leaves [C, ...] (`Algorithm.client_states`).
    num_clients: K.
    params: the server's params (which leaves a personal model has).
    chunk: clients decoded at a time.

  Returns:
    What applies to the store: "hamming" [K, K] and "active" [K] as `mask_distances` gives them (over the leaves
    that are not dense for every client); "model_distance" [K, K] and "model_norm" [K] as `model_distances` gives
    them; "trained" [K] when the store records it. Empty for a store of neither masks nor models.
  """
  blocks = _blocks(num_clients, chunk)
  decoded = lambda ids: client_states(ids)
  masks_of = lambda clients: getattr(clients, "mask", clients)  # FedSpa "local", Sub-FedAvg: a mask beside models
  first = decoded(blocks[0])
  has_masks = is_mask_store(masks_of(first))
  has_models = personal_models(first, params) is not None
  out: dict[str, np.ndarray] = {}
  if not (has_masks or has_models):
    return out
  # First pass: which mask leaves are dense for every client, and the "trained" flags.
  sparse, trained = None, []
  for ids in blocks:
    clients = first if ids is blocks[0] else decoded(ids)
    if has_masks:
      leaves = [a.reshape(a.shape[0], -1) for a in jax.tree.leaves(masks_of(clients))]
      dense = [bool(jnp.all(leaf)) for leaf in leaves]
      sparse = [not d for d in dense] if sparse is None else [s or not d for s, d in zip(sparse, dense)]
    if hasattr(clients, "trained"):
      trained.append(np.asarray(jax.device_get(clients.trained)))
  dot = np.zeros((num_clients, num_clients), np.int64) if has_masks else None
  gram = np.zeros((num_clients, num_clients)) if has_models else None
  for i, rows in enumerate(blocks):
    a = first if i == 0 else decoded(rows)
    for cols in blocks[i:]:
      b = a if cols is rows else decoded(cols)
      if has_masks:
        for keep, x, y in zip(sparse, jax.tree.leaves(masks_of(a)), jax.tree.leaves(masks_of(b))):
          if not keep:
            continue  # a leaf dense for every client (bias, norm scale) adds no distance
          x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
          for start in range(0, x.shape[1], _CHUNK):
            block = np.rint(jax.device_get(_cross(x[:, start:start + _CHUNK], y[:, start:start + _CHUNK])))
            dot[np.ix_(rows, cols)] += block.astype(np.int64)
      if has_models:
        for x, y in zip(jax.tree.leaves(personal_models(a, params)), jax.tree.leaves(personal_models(b, params))):
          x = np.asarray(jax.device_get(x), np.float64).reshape(x.shape[0], -1)
          y = x if cols is rows else np.asarray(jax.device_get(y), np.float64).reshape(y.shape[0], -1)
          gram[np.ix_(rows, cols)] += x @ y.T
      if cols is not rows:
        for m in (dot, gram):
          if m is not None:
            m[np.ix_(cols, rows)] = m[np.ix_(rows, cols)].T
  if has_masks:
    active = np.diag(dot).copy()  # a mask's dot product with itself: its active entries
    out["hamming"], out["active"] = active[:, None] + active[None, :] - 2 * dot, active
  if has_models:
    squares = np.diag(gram).copy()
    distance = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0))
    np.fill_diagonal(distance, 0.0)
    out["model_distance"], out["model_norm"] = distance, np.sqrt(squares)
  if trained:
    out["trained"] = np.concatenate(trained)
  return out


def label_order(label_counts: np.ndarray) -> np.ndarray:
  """A client order that groups clients by label distribution: by dominant class, then second class, then share.

  Args:
    label_counts: [K, C] samples of each class per client.

  Returns:
    [K] permutation of client ids.
  """
  counts = np.asarray(label_counts, np.float64)
  shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
  ranked = np.argsort(-shares, axis=1, kind="stable")
  first = ranked[:, 0]
  second = ranked[:, 1] if shares.shape[1] > 1 else np.zeros_like(first)
  top = shares[np.arange(len(shares)), first]
  return np.lexsort((-top, second, first))
