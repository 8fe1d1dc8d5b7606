"""Communication accounting: bytes a client downloads and uploads in one round.

Sparse messages carry the active values (in mask order) plus the mask, costed as the cheaper of a bitmap and a
list of indices. Values are sent for every active coordinate (a zero in U_k is not skipped, since skipping it would
need another index list); leaves that are never masked (biases, norm scales) travel dense. Because FedSpa keeps
every layer's active count exact, these numbers are static: they are computed on the host from shapes and
densities, and cost nothing inside the round.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax.masks import target_counts


def dense_bytes(params: Any) -> int:
  """Bytes of every leaf of `params` sent densely."""
  return int(sum(np.size(p) * np.dtype(p.dtype).itemsize for p in jax.tree.leaves(params)))


def mask_bytes(size: int, active: Any) -> Any:
  """Bytes of one leaf's mask: min(bitmap ceil(size / 8), index list active * ceil(log2(size) / 8)); 0 if dense.

  `active` may be a Python int (host accounting) or a traced array (per-client masks of varying density).
  """
  index_bytes = max(1, math.ceil(math.log2(max(size, 2)) / 8))
  xp = np if isinstance(active, (int, np.integer)) else jnp  # host ints stay host ints inside a trace
  cost = xp.minimum(math.ceil(size / 8), active * index_bytes)
  return xp.where(active >= size, 0, cost)


def mask_message_bytes(mask: Any, itemsize: int = 4) -> jax.Array:
  """In-graph bytes of a sparse message over one client's `mask`: active values plus each leaf's mask."""
  total = jnp.zeros((), jnp.float32)
  for m in jax.tree.leaves(mask):
    active = jnp.sum(m, dtype=jnp.int32)
    total += (active * itemsize + mask_bytes(int(m.size), active)).astype(jnp.float32)
  return total


def sparse_bytes(params: Any, densities: Any) -> int:
  """Bytes of one sparse message: active values of every leaf plus its mask (dense leaves: values only)."""
  counts = target_counts(params, densities)
  total = 0
  for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(counts)):
    size = int(np.size(p))
    total += c * np.dtype(p.dtype).itemsize + int(mask_bytes(size, c))
  return int(total)


def mask_state_bytes(params: Any, densities: Any) -> int:
  """Persistent client state of FedSpa: one bit per maskable weight (dense leaves need none)."""
  total = 0
  for p, d in zip(jax.tree.leaves(params), jax.tree.leaves(densities)):
    if d < 1.0:
      total += math.ceil(np.size(p) / 8)
  return total


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


def round_flops(per_sample: float, dense_per_sample: float, samples: jax.Array, weights: jax.Array,
                extra: Any = 0.0) -> dict[str, jax.Array]:
  """A round's training FLOPs over the real clients (weight > 0) and the dense-training reference.

  Args:
    per_sample: training FLOPs per sample of the method's model.
    dense_per_sample: training FLOPs per sample of the dense model.
    samples: [S] samples each client trained on.
    weights: [S] aggregation weights (0 marks padding).
    extra: FLOPs on top (e.g. FedSpa's regrowth gradient batches).
  """
  seen = jnp.sum(jnp.where(weights > 0, samples, 0)).astype(jnp.float32)
  return {"flops": per_sample * seen + extra, "flops_dense": dense_per_sample * seen}
