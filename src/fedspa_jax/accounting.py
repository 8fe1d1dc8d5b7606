"""Communication accounting: bytes a client downloads and uploads in one round, counted exactly.

Sparse messages carry the active values (in mask order) plus the mask, costed as the cheaper of a bitmap and a
list of indices. Values are sent for every active coordinate (a zero in U_k is not skipped, since skipping it would
need another index list); leaves that are never masked (biases, norm scales) travel dense.

Exact at any scale: inside the round, an algorithm reports only int32 counts, the number of values each client
sends per params leaf (`values_down`, `values_up`, [S, L] in `jax.tree.leaves(params)` order, 0 for padding clients
and for leaves not sent). A count per leaf and client fits int32 for any leaf below 2**31 entries; bytes, which do
not, are computed from the counts on the host in int64 (`message_bytes`, `round_bytes`), which is where the
experiment loop sums them. The same rule covers dense messages (count = leaf size, no mask) and sparse ones.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax.masks import target_counts

_INT32_MAX = int(np.iinfo(np.int32).max)


def dense_bytes(params: Any) -> int:
  """Bytes of every leaf of `params` sent densely."""
  return int(sum(np.size(p) * np.dtype(p.dtype).itemsize for p in jax.tree.leaves(params)))


def mask_bytes(size: int, active: Any) -> Any:
  """Bytes of one leaf's mask: min(bitmap ceil(size / 8), index list active * ceil(log2(size) / 8)); 0 if dense.

  `active` may be a Python int or numpy array (host accounting) or a traced array (in-graph).
  """
  index_bytes = max(1, math.ceil(math.log2(max(size, 2)) / 8))
  if isinstance(active, (int, np.integer)):
    return 0 if active >= size else min(-(-size // 8), active * index_bytes)
  xp = np if isinstance(active, np.ndarray) else jnp
  if xp is np:
    active = active.astype(np.int64)
  cost = xp.minimum(-(-size // 8), active * index_bytes)
  return xp.where(active >= size, 0, cost)


def check_leaf_sizes(params: Any) -> None:
  """Raises ValueError for a leaf too large for the int32 per-leaf counts (2**31 entries or more)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if int(np.size(leaf)) > _INT32_MAX:
      raise ValueError(
          f"params leaf {jax.tree_util.keystr(path)} has {int(np.size(leaf))} entries; message accounting counts "
          "values per leaf in int32 and supports leaves below 2**31 entries"
      )


def static_values(params: Any, densities: Any = None) -> np.ndarray:
  """int32 [L]: values one message carries per leaf; dense (`densities` None) or exact counts round(d_l * n_l)."""
  check_leaf_sizes(params)
  if densities is None:
    counts = [int(np.size(p)) for p in jax.tree.leaves(params)]
  else:
    counts = jax.tree.leaves(target_counts(params, densities))
  return np.asarray(counts, np.int32)


def count_values(mask: Any) -> jax.Array:
  """In-graph int32 [L]: active entries per leaf of one client's mask (the values a message over it carries)."""
  return jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(mask)])


def real_clients(cohort: jax.Array, real: jax.Array) -> jax.Array:
  """bool [S]: the cohort slots that hold real clients.

  Padding slots carry ids past every real client's id (the round marks them K), so the real clients are the `real`
  slots of smallest id, wherever they sit in the cohort.
  """
  ranks = jnp.argsort(jnp.argsort(cohort, stable=True), stable=True)
  return ranks < real


def per_client(values: Any, clients: jax.Array) -> jax.Array:
  """int32 [S, L]: a message's per-leaf `values` ([L], or [S, L] when they differ by client) for the clients
  flagged in `clients` [S], 0 for the others."""
  values = jnp.asarray(values, jnp.int32)
  values = jnp.broadcast_to(values, (clients.shape[0], values.shape[-1]))
  return jnp.where(clients[:, None], values, 0)


def message_bytes(params: Any, values: Any) -> int:
  """Exact bytes of the messages whose per-leaf value counts are `values`, on the host.

  Args:
    params: the params pytree (arrays or `jax.ShapeDtypeStruct`s): leaf sizes and value dtypes.
    values: int [..., L] counts in `jax.tree.leaves(params)` order (e.g. a round's `values_up` [S, L]); every
      leading axis is summed over.

  Returns:
    A Python int: sum of count * itemsize + mask_bytes(leaf size, count) over all messages and leaves.
  """
  leaves = jax.tree.leaves(params)
  values = np.asarray(values, np.int64)
  if values.shape[-1:] != (len(leaves),):
    raise ValueError(f"values must end in an axis of {len(leaves)} leaves, got shape {values.shape}")
  total = 0
  for i, leaf in enumerate(leaves):
    counts = values[..., i]
    size = int(np.size(leaf))
    total += int(np.sum(counts)) * np.dtype(leaf.dtype).itemsize + int(np.sum(mask_bytes(size, counts)))
  return total


def round_bytes(params: Any, metrics: dict[str, Any]) -> dict[str, int]:
  """{"bytes_down", "bytes_up"}: exact bytes of a round's (or a stack of rounds') `values_down` / `values_up`."""
  return {
      "bytes_down": message_bytes(params, jax.device_get(metrics["values_down"])),
      "bytes_up": message_bytes(params, jax.device_get(metrics["values_up"])),
  }


def state_bytes(params: Any, *, values: Any = None, mask_bits: Any = None) -> jax.Array:
  """int32 [L]: bytes per leaf of one client's persistent state as the client store holds it (sum on the host).

  Args:
    params: the params pytree (shapes and dtypes).
    values: bool pytree like params (or None): leaves whose values the client keeps.
    mask_bits: bool pytree like params (or None): leaves whose mask the client keeps. The store packs a mask leaf of
      n entries into ceil(n / 32) uint32 words (`store.StoreLayout`), so it costs 4 * ceil(n / 32) bytes; a mask
      over the whole params (dense leaves all True) costs its words for every leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keep_values = treedef.flatten_up_to(values) if values is not None else [False] * len(leaves)
  keep_bits = treedef.flatten_up_to(mask_bits) if mask_bits is not None else [False] * len(leaves)
  out = []
  for leaf, v, b in zip(leaves, keep_values, keep_bits):
    size = int(np.size(leaf))
    n = (size * np.dtype(leaf.dtype).itemsize if v else 0) + (4 * -(-size // 32) if b else 0)
    if n > _INT32_MAX:
      raise ValueError(f"one client's state of a leaf of {size} entries exceeds 2**31 bytes")
    out.append(n)
  return jnp.asarray(np.asarray(out, np.int32))


def sparse_bytes(params: Any, densities: Any) -> int:
  """Bytes of one sparse message: active values of every leaf plus its mask (dense leaves: values only)."""
  counts = target_counts(params, densities)
  total = 0
  for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(counts)):
    size = int(np.size(p))
    total += c * np.dtype(p.dtype).itemsize + int(mask_bytes(size, c))
  return int(total)


def kernel_at(tree: Any, path: str) -> Any:
  """The "kernel" leaf of the layer at a "/"-joined module path (as `models.flops` names layers)."""
  node = tree
  for name in path.split("/"):
    node = node[name]
  return node["kernel"]


def mask_training_flops(forward: dict[str, float], mask: Any) -> jax.Array:
  """In-graph training FLOPs per sample of one client's masked model: 3 x sum_l density_l x forward_l.

  Args:
    forward: dense forward FLOPs per layer, `models.flops.forward_flops(model, sample_shape)`.
    mask: the client's bool mask (params structure).
  """
  total = jnp.zeros((), jnp.float32)
  for path, flops in forward.items():
    total += flops * jnp.mean(kernel_at(mask, path).astype(jnp.float32))
  return 3.0 * total


# Per-client sample counts of the local training passes, as client metrics: every method's (the model it keeps),
# Ditto's global model, FedRep's head epochs. The summary's samples and a dense method's FLOPs both count them all.
TRAINING_PASSES = ("samples", "global_samples", "head_samples")


def trained_samples(metrics: dict[str, Any]) -> Any:
  """[...] samples trained on, over every training pass in `metrics` (`TRAINING_PASSES` that it holds)."""
  return sum(metrics[key] for key in TRAINING_PASSES if key in metrics)


def round_flops(per_sample: float, dense_per_sample: float, samples: jax.Array, extra: Any = 0.0
                ) -> dict[str, jax.Array]:
  """A round's training FLOPs and the dense-training reference, over the work the cohort did.

  Args:
    per_sample: training FLOPs per sample of the method's model.
    dense_per_sample: training FLOPs per sample of the dense model.
    samples: [S] samples each cohort slot trained on: 0 for padding and for a client that never started (the client
      loop counts the steps it ran); a dropped client whose update was lost did its work, and it counts.
    extra: FLOPs on top (e.g. FedSpa's regrowth gradient batches).
  """
  seen = jnp.sum(samples).astype(jnp.float32)
  return {"flops": per_sample * seen + extra, "flops_dense": dense_per_sample * seen}


def trained_clients(metrics: dict[str, jax.Array], real: jax.Array) -> jax.Array:
  """bool [S]: the cohort slots of real clients that started their round's work (all real ones without dropouts;
  with them, the round's "started" metric: a client lost after training counts, one that never started does not)."""
  clients = real_clients(metrics["cohort"], real)
  return clients & (metrics["started"] > 0) if "started" in metrics else clients


def without_unstarted(costs: dict[str, Any], started: jax.Array) -> dict[str, Any]:
  """`costs` with the messages of clients that never started (`started` [S] 0) zeroed: such a client was not there,
  so it received and sent nothing. A client whose update was lost keeps both: it downloaded, trained and sent."""
  out = dict(costs)
  for key in ("values_down", "values_up"):
    values = costs[key]
    out[key] = jnp.where((started > 0).reshape((-1,) + (1,) * (values.ndim - 1)), values, 0)
  return out
