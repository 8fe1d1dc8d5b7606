"""PruneFL: one sparse global model whose mask the server readjusts from the clients' squared gradients.

Jiang, Wang, Valls, Ko, Lee, Leung, Tassiulas, "Model Pruning Enables Efficient Federated Learning on Edge Devices"
(IEEE TNNLS 2022); reference code github.com/jiangyuang/PruneFL (bases/fl/simulation/adaptive.py: `AdaptiveClient.main`,
`AdaptiveServer.main`, `AdaptiveFL.check_adj_round`; control/algorithm.py: `process_layer`, `architecture_search`;
configs/femnist.py: ADJ_INTERVAL 50, MAX_DEC_DIFF 0.3, ADJ_HALF_LIFE 10000). The rules, as that code runs them:

1. The server holds dense weights w and one global mask m, all True; with `initial_pruning_rounds` > 0 (the
   reference's `-i`; its adaptive runs allow IP_MAX_ROUNDS 1000) init then runs the initial pruning on client 0's
   first `initial_pruning_batches` batches (`initial_pruning`, one compiled program) and starts from its w and m.
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
- The initial pruning is off by default (`initial_pruning_rounds` 0, the reference's `-ni`): it needs client 0 to
  hold `initial_pruning_batches` x `batch_size` samples and FederatedData on the host, which not every setting has.
  Its batches are the first of a keyed shuffle of client 0's data (the reference's shuffled loader), its gradients
  are dense (the reference's dense layers mask in the forward pass, so their gradients outside m may be masked;
  its sparse layers' are dense, as here), and its density counts every leaf.
- Importance is summed at the server every round (the sample-weighted mean of (Σ g)^2, i.e. Σ_k n_k (Σ g_k)^2 / N),
  not on the clients until a readjustment round: with every client taking part and equal N per round (the
  reference's setting: all clients, fixed local steps) the two differ by one factor, which the selection ignores.
  The bytes are counted as the reference sends them: the dense importance goes up in readjustment rounds only, as a
  second message (`values_up` [S, 2, L]).
- `max_density` (the reference's optional `-m` density limit) is not built.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, check_positive_int, make_apply_fn
from fedspa_jax.algorithms.dense import no_client_state
from fedspa_jax.algorithms.feddst import personalize_global
from fedspa_jax.client import ClientData, draw_batch, make_preprocess, num_local_steps, scale_steps, weighted_loss
from fedspa_jax.data.federated import FederatedData
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
                            local_steps, preprocess, dense_clip_norm=None):
  """`client.local_train` under `mask` that also returns the sum of every step's dense gradient (PruneFL's client).

  As `local_train`: a straggler (`data.work`) runs its share of the steps, and `dense_clip_norm` clips each step's
  dense gradient before it is masked (`clip_mode="dense"`); the importance sums the gradients as computed.

  Returns:
    (params, gradient sum (params structure), loss, accuracy, steps, samples).
  """
  num_steps = scale_steps(num_local_steps(data.count, batch_size, local_epochs, local_steps), data.work)
  clip = (lambda g: g) if dense_clip_norm is None else (
      lambda g: optax.clip_by_global_norm(dense_clip_norm).update(g, optax.EmptyState())[0])

  def objective(p, x, y, w):
    loss, correct, labels = weighted_loss(apply_fn, p, preprocess(x), y, w)
    return loss, (correct, labels)

  def step(s, carry):
    p, opt_state, grad_sum, loss_sum, correct_sum, labels_sum, seen_sum = carry
    x, y, w = draw_batch(data, key, s, batch_size)
    (loss, (correct, labels)), grads = jax.value_and_grad(objective, has_aux=True)(p, x, y, w)
    updates, opt_state = optimizer.update(masks.apply_mask(clip(grads), mask), opt_state, p)
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


def initial_pruning(params, mask, data: ClientData, key, *, apply_fn, optimizer, batch_size, batches, max_rounds,
                    adjust_interval, max_decrease, costs, time_constant, threshold_accuracy, eval_interval=10,
                    stable_share=0.1, stable_count=5, preprocess):
  """PruneFL's initial pruning on one client's data (adaptive.py `AdaptiveServer.initial_pruning`), one program.

  The client's first `batches` batches (fixed for the phase) are trained over once per round, for at most
  `max_rounds` rounds, summing every step's squared dense gradient. Every `eval_interval` rounds (rounds 1, 11, ...,
  before training) the accuracy on those batches is measured; from the first round it reaches `threshold_accuracy`,
  every `adjust_interval` rounds the mask is readjusted (`select_by_importance_per_cost` at `max_decrease`) and the
  importance restarts. The phase ends early when `stable_count` readjustments in a row changed the overall density
  by at most `stable_share` of the one before.

  Returns:
    (params, mask, rounds run).
  """
  steps = jnp.arange(batches, dtype=jnp.int32)
  xs, ys, ws = jax.vmap(lambda s: draw_batch(data, key, s, batch_size))(steps)
  maskable_total = sum(m.size for m in jax.tree.leaves(mask))
  density = lambda m: sum(jnp.sum(a, dtype=jnp.float32) for a in jax.tree.leaves(m)) / maskable_total

  def objective(p, x, y, w):
    loss, correct, labels = weighted_loss(apply_fn, p, preprocess(x), y, w)
    return loss, (correct, labels)

  def train_accuracy(p):
    _, correct, labels = jax.vmap(lambda x, y, w: weighted_loss(apply_fn, p, preprocess(x), y, w))(xs, ys, ws)
    return jnp.sum(correct) / jnp.maximum(jnp.sum(labels), 1.0)

  def one_round(carry):
    i, p, opt_state, m, importance, start, previous, streak, done = carry
    i = i + 1
    evaluate = (i - 1) % eval_interval == 0
    start = jnp.where((start < 0) & evaluate & (train_accuracy(p) >= threshold_accuracy), i, start)

    def step(inner, batch):
      p, opt_state, importance = inner
      x, y, w = batch
      (_, _), grads = jax.value_and_grad(objective, has_aux=True)(p, x, y, w)
      updates, opt_state = optimizer.update(masks.apply_mask(grads, m), opt_state, p)
      p = masks.apply_mask(optax.apply_updates(p, updates), m)
      importance = jax.tree.map(lambda s, g: s + jnp.square(g).astype(jnp.float32), importance, grads)
      return (p, opt_state, importance), None

    (p, opt_state, importance), _ = jax.lax.scan(step, (p, opt_state, importance), (xs, ys, ws))
    adjust = (start >= 0) & ((i - start) % adjust_interval == 0)
    m = jax.lax.cond(adjust, lambda _: select_by_importance_per_cost(m, p, importance, max_decrease, costs,
                                                                      time_constant), lambda _: m, None)
    importance = jax.tree.map(lambda s: jnp.where(adjust, 0.0, s), importance)
    p = masks.apply_mask(p, m)  # the reference's layers apply the mask in their forward pass
    current = density(m)
    stable = (previous > 0) & (jnp.abs(current / jnp.where(previous > 0, previous, 1.0) - 1.0) <= stable_share)
    streak = jnp.where(adjust, jnp.where(stable, streak + 1, 0), streak)
    previous = jnp.where(adjust, current, previous)
    done = streak >= stable_count
    return i, p, opt_state, m, importance, start, previous, streak, done

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)
  carry = (jnp.zeros((), jnp.int32), masks.apply_mask(params, mask), optimizer.init(params), mask, zeros,
           jnp.int32(-1), jnp.float32(-1.0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  out = jax.lax.while_loop(lambda c: (c[0] < max_rounds) & ~c[-1], one_round, carry)
  return out[1], out[3], out[0]


def prunefl(
    *,
    model: nn.Module,
    readjust_interval: int = 50,
    max_decrease: float = 0.3,
    decrease_half_life: float = 10000.0,
    comm_cost: float = 1.0,
    layer_costs: tuple[float, ...] | None = None,
    time_constant: float = 0.0,
    initial_pruning_rounds: int = 0,
    initial_pruning_batches: int = 10,
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
    initial_pruning_rounds: the most rounds of the initial pruning on client 0's data at init (`initial_pruning`;
      the reference's adaptive runs use IP_MAX_ROUNDS 1000 and stop early; 0: none, the run starts dense).
    initial_pruning_batches: the batches of client 0's data the initial pruning trains on (IP_DATA_BATCH 10).
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
  check_positive_int("initial_pruning_batches", initial_pruning_batches)
  if not (isinstance(initial_pruning_rounds, int) and initial_pruning_rounds >= 0):
    raise ValueError(f"initial_pruning_rounds must be an integer >= 0, got {initial_pruning_rounds!r}")
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
          # Two messages: the trained values under m (with m), and the dense importance in a readjustment round.
          "values_up": jnp.stack([accounting.count_values(mask), jnp.where(readjust, dense_values, 0)]),
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
    seen = jnp.sum(metrics["samples"]).astype(jnp.float32)  # 0 for padding and unstarted clients
    return {
        "values_down": accounting.per_client(metrics["values_down"], clients),
        "values_up": jnp.where(clients[:, None, None], metrics["values_up"], 0),  # [S, 2, L]
        "client_state_bytes": accounting.state_bytes(params),
        "flops": jnp.sum(jnp.where(accounting.trained_clients(metrics, real), metrics["flops"], 0.0)),
        "flops_dense": dense * seen,
    }

  personalize = personalize_global
  hparams = dict(
      readjust_interval=readjust_interval, max_decrease=max_decrease, decrease_half_life=decrease_half_life,
      comm_cost=comm_cost, layer_costs=layer_costs, time_constant=time_constant,
      initial_pruning_rounds=initial_pruning_rounds, initial_pruning_batches=initial_pruning_batches,
  )
  algo = assemble(
      name="prunefl", hparams=hparams, model=model, common=common, init_clients=no_client_state,
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: personalize, account=account,
      aggregation="mean", protocol="global",
      server_optimizer=server,
      server_view=lambda server: (server.params, server.opt_state.mask),
      # Under DP the values are clipped and noised; the importance (squared gradient sums, the mask's input) is sent
      # as it is: not covered (docs/privacy.md), like FedSpa's masks.
      dp_public=("importance",),
      dp_refusal=None if initial_pruning_rounds == 0 else (
          "the initial pruning trains the released model on client 0's data with neither clipping nor noise "
          "(set initial_pruning_rounds=0)"),
  )
  if initial_pruning_rounds == 0:
    return algo

  def prune_at_init(state, key, x, y, count, *, preprocess, num_classes):
    params, opt_state = state.server.params, state.server.opt_state
    params, mask, _ = initial_pruning(
        params, opt_state.mask, ClientData(x, y, jnp.int32(0), count), key,
        apply_fn=apply_fn, optimizer=common.train_kwargs(0)["optimizer"], batch_size=common.batch_size,
        batches=initial_pruning_batches, max_rounds=initial_pruning_rounds, adjust_interval=readjust_interval,
        max_decrease=max_decrease, costs=layer_cost_tree(params, layer_costs, comm_cost), time_constant=time_constant,
        threshold_accuracy=1.5 / num_classes, preprocess=preprocess)
    return state._replace(server=state.server._replace(params=params, opt_state=opt_state._replace(mask=mask)))

  def init(key, data):
    if not isinstance(data, FederatedData):
      raise ValueError("PruneFL's initial pruning reads client 0's data from the host: pass FederatedData to init "
                       "(with a mesh, set initial_pruning_rounds=0)")
    need = initial_pruning_batches * common.batch_size
    count = int(data.train.count[0])
    if count < need:
      raise ValueError(f"PruneFL's initial pruning needs {need} samples on client 0 (initial_pruning_batches x "
                       f"batch_size), it has {count}")
    first = int(data.train.offset[0])
    state = algo.init(key, data)
    program = jax.jit(functools.partial(prune_at_init, preprocess=make_preprocess(data.mean, data.std),
                                        num_classes=data.num_classes))
    # Its batch order: a stream of its own (the init's other keys come from split(key, 3)).
    return program(state, jax.random.fold_in(key, 1), data.train.x[first:first + count], data.train.y[first:first + count], jnp.int32(count))

  return dataclasses.replace(algo, init=init)
