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


def aggregate_parts(rule: str, updates: Params, coverage: Any | None, weights: jax.Array) -> tuple[Params, Any]:
  """The sums an aggregation divides: (numerator, denominator), each additive over clients.

  "mean": (sum_k w_k U_k, sum_k w_k); "masked_mean": per coordinate (sum_k w_k c_k U_k, sum_k w_k c_k). Partial
  sums over disjoint sets of clients (e.g. one per device) add up to the whole cohort's; `finish_aggregate` divides.

  Args:
    rule: "mean" or "masked_mean" (dense coverage when `coverage` is None).
    updates: pytree with leaves [S, ...].
    coverage: bool pytree with leaves [S, ...] (each client's mask during training), or None.
    weights: [S] non-negative weights (sample counts, or 1 per real client; 0 for padding).
  """
  if rule == "mean" or coverage is None:
    if rule not in AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {rule!r}")
    return _weighted_sum(updates, weights), jnp.sum(weights)
  if rule != "masked_mean":
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {rule!r}")

  def leaf(u, c):
    wc = jnp.where(c, weights.reshape((-1,) + (1,) * (u.ndim - 1)), 0.0).astype(u.dtype)
    return jnp.sum(wc * u, axis=0), jnp.sum(wc, axis=0)

  pairs = jax.tree.map(leaf, updates, coverage)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair), jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))


def finish_aggregate(numerator: Params, denominator: Any) -> Params:
  """numerator / denominator, 0 where nothing was aggregated.

  `denominator` is one scalar for every leaf ("mean") or a tree like `numerator` ("masked_mean").
  """
  if jax.tree.structure(denominator) != jax.tree.structure(numerator):
    scale = jnp.where(denominator > 0, 1.0 / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return jax.tree.map(lambda s: s * scale.astype(s.dtype), numerator)
  return jax.tree.map(lambda n, d: jnp.where(d > 0, n / jnp.where(d > 0, d, 1.0), 0.0), numerator, denominator)


def aggregate_mean(updates: Params, weights: jax.Array) -> Params:
  """sum_k weight_k U_k / sum_k weight_k (0 if every weight is 0).

  Args:
    updates: pytree with leaves [S, ...].
    weights: [S] non-negative weights (sample counts, or 1 per real client; 0 for padding).
  """
  return finish_aggregate(*aggregate_parts("mean", updates, None, weights))


def aggregate_masked_mean(updates: Params, coverage: Any, weights: jax.Array) -> Params:
  """Per coordinate, sum_k w_k c_k U_k / sum_k w_k c_k over the clients k whose mask c_k covers it; 0 if none.

  Args:
    updates: pytree with leaves [S, ...].
    coverage: bool pytree with leaves [S, ...] (each client's mask during training).
    weights: [S] non-negative weights.
  """
  return finish_aggregate(*aggregate_parts("masked_mean", updates, coverage, weights))


def aggregate(rule: str, updates: Params, coverage: Any | None, weights: jax.Array) -> Params:
  """Dispatches to `aggregate_mean` or `aggregate_masked_mean` (dense coverage when `coverage` is None)."""
  return finish_aggregate(*aggregate_parts(rule, updates, coverage, weights))


def init_server(params: Params, optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(params=params, opt_state=optimizer.init(params))


def server_update(state: ServerState, delta: Params, optimizer: optax.GradientTransformation) -> ServerState:
  """Treats the aggregated update as a pseudo-gradient: with optax.sgd(lr), w <- w - lr * delta."""
  updates, opt_state = optimizer.update(delta, state.opt_state, state.params)
  return ServerState(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
