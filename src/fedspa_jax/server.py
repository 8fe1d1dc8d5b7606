"""Server side of a round: aggregation rules over the cohort's updates and the server optimizer step.

Updates arrive stacked on a leading cohort axis [S, ...] with one weight per client; a padding client has weight 0
and so changes nothing. `mean` is the (sample-weighted or uniform) average of FedAvg and of FedSpa's convergence
analysis; `masked_mean` averages each coordinate over the clients whose mask covered it (DisPFL, Sub-FedAvg).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
AGGREGATIONS = ("mean", "masked_mean")
WEIGHTINGS = ("samples", "uniform")


class ServerState(NamedTuple):
  """The shared model w and the server optimizer's state."""

  params: Params
  opt_state: Any


def _weighted_sum(tree: Any, weights: jax.Array) -> Any:
  return jax.tree.map(lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=1), tree)


def aggregate_mean(updates: Params, weights: jax.Array) -> Params:
  """sum_k weight_k U_k / sum_k weight_k (0 if every weight is 0).

  Args:
    updates: pytree with leaves [S, ...].
    weights: [S] non-negative weights (sample counts, or 1 per real client; 0 for padding).
  """
  total = jnp.sum(weights)
  scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  return jax.tree.map(lambda s: s * scale.astype(s.dtype), _weighted_sum(updates, weights))


def aggregate_masked_mean(updates: Params, coverage: Any, weights: jax.Array) -> Params:
  """Per coordinate, sum_k w_k c_k U_k / sum_k w_k c_k over the clients k whose mask c_k covers it; 0 if none.

  Args:
    updates: pytree with leaves [S, ...].
    coverage: bool pytree with leaves [S, ...] (each client's mask during training).
    weights: [S] non-negative weights.
  """

  def leaf(u, c):
    wc = jnp.where(c, weights.reshape((-1,) + (1,) * (u.ndim - 1)), 0.0).astype(u.dtype)
    numerator = jnp.sum(wc * u, axis=0)
    denominator = jnp.sum(wc, axis=0)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)

  return jax.tree.map(leaf, updates, coverage)


def aggregate(rule: str, updates: Params, coverage: Any | None, weights: jax.Array) -> Params:
  """Dispatches to `aggregate_mean` or `aggregate_masked_mean` (dense coverage when `coverage` is None)."""
  if rule == "mean" or coverage is None:
    return aggregate_mean(updates, weights)
  if rule == "masked_mean":
    return aggregate_masked_mean(updates, coverage, weights)
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {rule!r}")


def init_server(params: Params, optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(params=params, opt_state=optimizer.init(params))


def server_update(state: ServerState, delta: Params, optimizer: optax.GradientTransformation) -> ServerState:
  """Treats the aggregated update as a pseudo-gradient: with optax.sgd(lr), w <- w - lr * delta."""
  updates, opt_state = optimizer.update(delta, state.opt_state, state.params)
  return ServerState(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
