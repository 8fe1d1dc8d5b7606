"""Server side of a round: aggregation rules over the cohort's updates and the server optimizer step.

Updates arrive stacked on a leading cohort axis [S, ...] with one weight per client; a padding client has weight 0
and so changes nothing. `mean` is the (sample-weighted or uniform) average of FedAvg and of FedSpa's convergence
analysis; `masked_mean` averages each coordinate over the clients whose mask covered it (DisPFL, Sub-FedAvg).

Client-level differential privacy (`DPSpec`) replaces the aggregation rule by the DP-FedAvg estimator (McMahan,
Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018): every reporting
client's update, exactly what it sends, is clipped to L2 norm C, the clipped updates are summed with weight 1 each,
Gaussian noise of std z * C is added to the sum, and the sum is divided by the expected number of reporting clients
(a number fixed before the round, so the division leaks nothing). With adaptive clipping (Andrew, Thakkar, McMahan,
Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021) the clients also report whether
their norm was at most C; the noisy share b of those moves C towards the target quantile gamma geometrically,
C <- C * exp(-eta_C * (b - gamma)), and the noise on the sum is z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, so that the
two releases together cost what one Gaussian release of multiplier z does. The accountant lives outside the round
(`fedspa_jax.privacy`).
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
  """The shared model w, the server optimizer's state, and with client-level DP the current clip norm (float32 [];
  () without DP)."""

  params: Params
  opt_state: Any
  clip: Any = ()


class DPSpec(NamedTuple):
  """Client-level DP of the aggregate (see the module docstring); hyperparameters, fixed for a run.

  Attributes:
    clip: the clip norm C (with adaptive clipping, its initial value).
    noise_multiplier: z: the released sum carries Gaussian noise of std z * C (in total, with adaptive clipping).
    quantile: adaptive clipping's target quantile gamma of the update norms; None: C stays fixed.
    clip_lr: adaptive clipping's geometric step eta_C.
    count_noise: adaptive clipping's sigma_b, the std of the noise on the count of clients at or below C (Andrew
      et al. recommend the expected number of reporting clients / 20); it must exceed z / 2.
    public: top-level keys of a dict update that DP does not cover: messages about the mask, not the model (FedDST's
      votes, PruneFL's importance), clipped and noised with nothing, aggregated by the method's own rule and sent
      in the clear like FedSpa's masks (docs/privacy.md). Empty: the whole update is private.
  """

  clip: float
  noise_multiplier: float
  quantile: float | None = None
  clip_lr: float = 0.2
  count_noise: float = 0.0
  public: tuple[str, ...] = ()


def dp_split(tree: Any, public: tuple[str, ...]) -> tuple[Any, Any]:
  """(the private part, the public part) of an update or coverage tree: a dict split by `public` keys; without
  them (or for a tree that is not a dict, e.g. None) (tree, None)."""
  if not public or not isinstance(tree, dict):
    return tree, None
  return ({k: v for k, v in tree.items() if k not in public}, {k: v for k, v in tree.items() if k in public})


def sum_noise_multiplier(spec: DPSpec) -> float:
  """The noise multiplier on the sum: z, or with adaptive clipping z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2."""
  z = spec.noise_multiplier
  if spec.quantile is None or z == 0:
    return z
  return (z ** -2.0 - (2.0 * spec.count_noise) ** -2.0) ** -0.5


def clip_update(update: Params, clip: Any) -> tuple[Params, jax.Array]:
  """(update scaled to L2 norm at most `clip`, its norm before clipping), over all leaves together (one client)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in jax.tree.leaves(update)))
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
  return jax.tree.map(lambda u: u * scale.astype(u.dtype), update), norm


def dp_parts(updates: Params, reporting: jax.Array, clip: Any) -> tuple[tuple[Params, jax.Array], jax.Array]:
  """The sums a DP release adds noise to, additive over clients (partial sums per device add up), and the norms.

  Args:
    updates: pytree with leaves [S, ...], what each client sends.
    reporting: [S] bool, the clients whose update reaches the server (not padding, not dropped, with data).
    clip: the clip norm C (a traced scalar with adaptive clipping).

  Returns:
    ((sum of the reporting clients' clipped updates, number of reporting clients with norm <= C), norms [S]).
  """
  clipped, norms = jax.vmap(clip_update, in_axes=(0, None))(updates, clip)
  weights = reporting.astype(jnp.float32)
  below = jnp.sum(jnp.where(reporting & (norms <= clip), 1.0, 0.0))
  return (_weighted_sum(clipped, weights), below), norms


def gaussian_like(key: jax.Array, tree: Params) -> Params:
  """Standard normal noise shaped like `tree`, one key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


def dp_release(
    total: Params, below: jax.Array, clip: Any, key: jax.Array, spec: DPSpec, expected: jax.Array
) -> tuple[Params, Any]:
  """The released aggregate and the next clip norm.

  Args:
    total: sum of the reporting clients' clipped updates (`dp_parts`).
    below: number of reporting clients with norm <= clip.
    clip: the clip norm used this round.
    key: this round's noise key (from the run's keys: resume and sweeps stay exact).
    spec: the DP hyperparameters.
    expected: the expected number of reporting clients (fixed before the round).

  Returns:
    ((total + N(0, (z_delta C)^2)) / expected, the next C).
  """
  k_sum, k_count = jax.random.split(key)
  std = sum_noise_multiplier(spec) * clip
  # A round where no client can report (an availability trace's column of zeros) releases nothing and keeps C: the
  # estimator's denominator would be 0 there.
  anyone = expected > 0
  denominator = jnp.where(anyone, expected, 1.0)
  noisy = jax.tree.map(lambda t, n: jnp.where(anyone, (t + std * n) / denominator.astype(t.dtype), 0.0).astype(t.dtype),
                       total, gaussian_like(k_sum, total))
  if spec.quantile is None:
    return noisy, clip
  share = (below + spec.count_noise * jax.random.normal(k_count, ())) / denominator
  return noisy, jnp.where(anyone, clip * jnp.exp(-spec.clip_lr * (share - spec.quantile)), clip)


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


def init_server(params: Params, optimizer: optax.GradientTransformation, dp: DPSpec | None = None) -> ServerState:
  clip = () if dp is None else jnp.float32(dp.clip)
  return ServerState(params=params, opt_state=optimizer.init(params), clip=clip)


def server_update(state: ServerState, delta: Params, optimizer: optax.GradientTransformation) -> ServerState:
  """Treats the aggregated update as a pseudo-gradient: with optax.sgd(lr), w <- w - lr * delta."""
  updates, opt_state = optimizer.update(delta, state.opt_state, state.params)
  return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
