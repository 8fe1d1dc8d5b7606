"""PruneFL: one sparse global model whose mask the server readjusts from the clients' squared gradients.

Jiang, Wang, Valls, Ko, Lee, Leung, Tassiulas, "Model Pruning Enables Efficient Federated Learning on Edge Devices"
(IEEE TNNLS 2022); reference code github.com/jiangyuang/PruneFL (bases/fl/simulation/adaptive.py: `AdaptiveClient.main`,
`AdaptiveServer.main`, `AdaptiveFL.check_adj_round`; control/algorithm.py: `process_layer`, `architecture_search`;
configs/femnist.py: ADJ_INTERVAL 50, MAX_DEC_DIFF 0.3, ADJ_HALF_LIFE 10000). The rules, as that code runs them:

1. The server holds dense weights w and one global mask m (here: all True at init, the reference without its
   initial pruning, `--no-init-pruning`).
2. A sampled client trains m ⊙ w for its local steps; it sums the dense gradient of every step (pruned weights
   included) and adds (Σ_steps g)^2 · (its samples this round) to its importance.
3. Server: w ← w + Σ_k n_k / N (x_k − m ⊙ w) (the sample-weighted mean over the active weights; pruned weights keep
   their stale values, and come back with them when regrown).
4. In a readjustment round (rounds `readjust_interval`, 2 `readjust_interval`, ...: the reference's first
   readjustment comes ADJ_INTERVAL rounds in, then one every ADJ_INTERVAL), with importance summed over the clients
   since the last one, the mask becomes `mask_update.select_by_importance_per_cost` at decrease
   `max_decrease` · 0.5^(t / `decrease_half_life`); the importance restarts from 0.

Every client is scored with the global model m ⊙ w (protocol "global").

Where this differs from the reference, and why:
- Costs: the reference weighs each layer's weights by times measured on its authors' devices (COMP_COEFFICIENTS per
  layer + COMM_COEFFICIENT, TIME_CONSTANT). Those numbers describe that hardware, so here they are options
  (`layer_costs`, `comm_cost`, `time_constant`); the default, which needs no measurement, is that every weight costs
  the same (`comm_cost` 1, no computation cost per layer) and no fixed cost (`time_constant` 0): the mask then keeps
  what has more importance per weight than the mean of what it keeps.
- The initial pruning on one client's data (`AdaptiveServer.initial_pruning`) is not built: the run starts dense.
- Importance is summed at the server every round (the sample-weighted mean of (Σ g)^2, i.e. Σ_k n_k (Σ g_k)^2 / N),
  not on the clients until a readjustment round: with every client taking part and equal N per round (the
  reference's setting: all clients, fixed local steps) the two differ by one factor, which the selection ignores.
  The bytes are counted as the reference sends them: the dense importance goes up in readjustment rounds only.
- `max_density` (the reference's optional `-m` density limit) is not built.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, check_positive_int, make_apply_fn
from fedspa_jax.algorithms.dense import no_client_state
from fedspa_jax.client import ClientData, draw_batch, num_local_steps, weighted_loss
from fedspa_jax.evaluation import Personal
from fedspa_jax.mask_update import check_rate, select_by_importance_per_cost
from fedspa_jax.models import flops
from fedspa_jax.round import ClientOutput


class PruneFLServer(NamedTuple):
  """The server's own state (the server optimizer's state in `SimState.server.opt_state`).

  Attributes:
    mask: the global mask m (bool, params structure; 1-D leaves all True).
    importance: float32, params structure: the squared gradients summed since the last readjustment.
    round: int32 [], rounds aggregated so far.
  """

  mask: Any
  importance: Any
  round: jax.Array


def readjusts(round: Any, interval: int) -> jax.Array:
  """Whether the server readjusts after round t (0-based): t = interval, 2 interval, ... (`check_adj_round`)."""
  round = jnp.asarray(round, jnp.int32)
  return (round > 0) & (round % interval == 0)


def decrease_at(round: Any, max_decrease: float, half_life: float) -> jax.Array:
  """The share of active weights a readjustment may drop: max_decrease * 0.5^(t / half_life) (adaptive.py)."""
  return jnp.float32(max_decrease) * jnp.float32(0.5) ** (jnp.asarray(round, jnp.float32) / half_life)


def layer_cost_tree(params: Any, layer_costs: Sequence[float] | None, comm_cost: float) -> Any:
  """Per-leaf cost of one weight: comm_cost + the maskable leaf's computation cost (in flattening order)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  maskable = [i for i, (path, leaf) in enumerate(leaves) if masks.is_maskable(path, leaf)]
  comp = [0.0] * len(maskable) if layer_costs is None else list(layer_costs)
  if len(comp) != len(maskable):
    raise ValueError(f"layer_costs needs one cost per maskable leaf ({len(maskable)}), got {len(comp)}")
  costs = [float(comm_cost)] * len(leaves)
  for i, c in zip(maskable, comp):
    costs[i] = float(comm_cost) + float(c)
  return jax.tree_util.tree_unflatten(treedef, costs)


def make_server(costs: Any, time_constant: float, readjust_interval: int, max_decrease: float,
                half_life: float) -> optax.GradientTransformation:
  """PruneFL's server step over the aggregated {"values", "importance"} (see the module)."""

  def init(params):
    return PruneFLServer(masks.dense_mask(params), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                         jnp.zeros((), jnp.int32))

  def update(delta, state, params):
    new = jax.tree.map(jnp.subtract, params, delta["values"])
    importance = jax.tree.map(jnp.add, state.importance, delta["importance"])
    readjust = readjusts(state.round, readjust_interval)

    def readjusted(_):
      return select_by_importance_per_cost(state.mask, new, importance, decrease_at(state.round, max_decrease,
                                                                                    half_life), costs, time_constant)

    mask = jax.lax.cond(readjust, readjusted, lambda _: state.mask, None)
    importance = jax.tree.map(lambda s: jnp.where(readjust, 0.0, s), importance)
    return jax.tree.map(jnp.subtract, new, params), PruneFLServer(mask, importance, state.round + 1)

  return optax.GradientTransformation(init, update)


def train_with_gradient_sum(params, mask, data: ClientData, key, *, apply_fn, optimizer, batch_size, local_epochs,
                            local_steps, preprocess):
  """`client.local_train` under `mask` that also returns the sum of every step's dense gradient (PruneFL's client).

  Returns:
    (params, gradient sum (params structure), loss, accuracy, steps, samples).
  """
  num_steps = num_local_steps(data.count, batch_size, local_epochs, local_steps)

  def objective(p, x, y, w):
    loss, correct, labels = weighted_loss(apply_fn, p, preprocess(x), y, w)
    return loss, (correct, labels)

  def step(s, carry):
    p, opt_state, grad_sum, loss_sum, correct_sum, labels_sum, seen_sum = carry
    x, y, w = draw_batch(data, key, s, batch_size)
    (loss, (correct, labels)), grads = jax.value_and_grad(objective, has_aux=True)(p, x, y, w)
    updates, opt_state = optimizer.update(masks.apply_mask(grads, mask), opt_state, p)
    p = masks.apply_mask(optax.apply_updates(p, updates), mask)
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (p, opt_state, grad_sum, loss_sum + loss * labels, correct_sum + correct, labels_sum + labels,
            seen_sum + jnp.sum(w))

  zero = jnp.zeros((), jnp.float32)
  grad_zero = jax.tree.map(jnp.zeros_like, params)
  params, _, grad_sum, loss_sum, correct_sum, labels, samples = jax.lax.fori_loop(
      0, num_steps, step, (params, optimizer.init(params), grad_zero, zero, zero, zero, zero))
  denominator = jnp.maximum(labels, 1.0)
  return params, grad_sum, loss_sum / denominator, correct_sum / denominator, num_steps, samples.astype(jnp.int32)


def prunefl(
    *,
    model: nn.Module,
    readjust_interval: int = 50,
    max_decrease: float = 0.3,
    decrease_half_life: float = 10000.0,
    comm_cost: float = 1.0,
    layer_costs: tuple[float, ...] | None = None,
    time_constant: float = 0.0,
    **common: Any,
) -> Algorithm:
  """Builds PruneFL's adaptive pruning as its reference code runs it (see the module docstring).

  Args:
    model: the flax model.
    readjust_interval: rounds between readjustments (reference ADJ_INTERVAL 50).
    max_decrease: the largest share of a layer's active weights one readjustment may drop (MAX_DEC_DIFF 0.3).
    decrease_half_life: rounds over which that share halves (ADJ_HALF_LIFE 10000).
    comm_cost: the cost of one weight's communication (COMM_COEFFICIENT; default 1: costs in units of it).
    layer_costs: each maskable leaf's computation cost per weight, in flattening order (COMP_COEFFICIENTS);
      default none.
    time_constant: the cost of a round whatever the mask (TIME_CONSTANT; default 0).
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "samples" (the reference weighs
      clients by the samples they processed). `server_lr` must stay 1: the server replaces w.

  Returns:
    An `Algorithm` with no client state; the global mask is in `state.server.opt_state`.
  """
  common = Common.with_defaults(common, weighting="samples")
  check_positive_int("readjust_interval", readjust_interval)
  check_rate(max_decrease, "max_decrease")
  if not decrease_half_life > 0:
    raise ValueError(f"decrease_half_life must be > 0, got {decrease_half_life!r}")
  if not comm_cost > 0 or not time_constant >= 0 or any(not c >= 0 for c in (layer_costs or ())):
    raise ValueError(f"costs must be comm_cost > 0, layer_costs >= 0, time_constant >= 0; got {comm_cost!r}, "
                     f"{layer_costs!r}, {time_constant!r}")
  if common.server_lr != 1.0:
    raise ValueError(f"PruneFL's server replaces the global model: server_lr must be 1, got {common.server_lr!r}")
  layer_costs = None if layer_costs is None else tuple(float(c) for c in layer_costs)
  apply_fn = make_apply_fn(model)
  forward_of = functools.lru_cache(lambda sample_shape: flops.forward_flops(model, sample_shape))

  def server_for(params):
    return make_server(layer_cost_tree(params, layer_costs, comm_cost), time_constant, readjust_interval,
                       max_decrease, decrease_half_life)

  server = optax.GradientTransformation(lambda params: server_for(params).init(params),
                                        lambda delta, state, params: server_for(params).update(delta, state, params))

  def make_client_fn(preprocess):
    def client_update(view, state, data: ClientData, key, round):
      del state
      params, mask = view
      x0 = masks.apply_mask(params, mask)
      trained, grad_sum, loss, accuracy, steps, samples = train_with_gradient_sum(
          x0, mask, data, key, apply_fn=apply_fn, preprocess=preprocess, **common.train_kwargs(round))
      forward = forward_of(data.x.shape[1:])
      per_sample = accounting.mask_training_flops(forward, mask)  # 3 x the sparse forward
      # The dense gradient of every step: sparse forward and input gradients, dense weight gradients.
      per_sample_dense_grad = 2.0 * per_sample / 3.0 + sum(forward.values())
      readjust = readjusts(round, readjust_interval)
      dense_values = accounting.count_values(jax.tree.map(lambda m: jnp.ones(m.shape, bool), mask))
      metrics = {
          "loss": loss, "accuracy": accuracy, "steps": steps, "samples": samples,
          "flops": per_sample_dense_grad * samples,
          "values_down": accounting.count_values(mask),
          "values_up": accounting.count_values(mask) + jnp.where(readjust, dense_values, 0),
      }
      every = jax.tree.map(lambda m: jnp.ones(m.shape, bool), mask)
      return ClientOutput(
          update={"values": jax.tree.map(jnp.subtract, x0, trained),
                  "importance": jax.tree.map(lambda g: jnp.square(g).astype(jnp.float32), grad_sum)},
          coverage={"values": every, "importance": every}, state=jnp.zeros((), jnp.int32), metrics=metrics,
      )

    return client_update

  def account(params, metrics, real, round, sample_shape):
    del round
    clients = accounting.real_clients(metrics["cohort"], real)
    dense = 3.0 * sum(forward_of(sample_shape).values())
    seen = jnp.sum(jnp.where(metrics["weight"] > 0, metrics["samples"], 0)).astype(jnp.float32)
    return {
        "values_down": accounting.per_client(metrics["values_down"], clients),
        "values_up": accounting.per_client(metrics["values_up"], clients),
        "client_state_bytes": accounting.state_bytes(params),
        "flops": jnp.sum(jnp.where(clients, metrics["flops"], 0.0)),
        "flops_dense": dense * seen,
    }

  def personalize(view, state, train_k, key):
    del state, train_k, key
    params, mask = view
    return {"global": Personal(masks.apply_mask(params, mask), mask)}

  hparams = dict(
      readjust_interval=readjust_interval, max_decrease=max_decrease, decrease_half_life=decrease_half_life,
      comm_cost=comm_cost, layer_costs=layer_costs, time_constant=time_constant,
  )
  return assemble(
      name="prunefl", hparams=hparams, model=model, common=common, init_clients=no_client_state,
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: personalize, account=account,
      aggregation="mean", protocol="global",
      server_optimizer=server,
      server_view=lambda server: (server.params, server.opt_state.mask),
  )
