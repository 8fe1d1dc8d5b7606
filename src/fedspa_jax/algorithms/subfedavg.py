"""Sub-FedAvg (unstructured): personal subnetworks found by iterative magnitude pruning, as its reference code does it.

Vahidian, Morafah, Lin, "Personalized Federated Learning by Structured and Unstructured Pruning under Data
Heterogeneity" (ICDCS workshops 2021); reference code github.com/MMorafah/Sub-FedAvg (unstructured: main_u.py,
src/client/client_u.py, src/sub_fedavg/sub_fedavg_u.py, src/pruning/unstructured.py). The rules, as that code runs
them:

1. Client k keeps a mask m_k (dense at first; only kernels are pruned, biases never, unless `masked_leaves="all"`) and its own network v_k (w_0
   at first), which is what it is evaluated with.
2. A sampled client starts from m_k ⊙ w and trains `local_epochs` with masked gradients.
3. Two pruning candidates, one from the weights after the first local epoch and one after the last: in every kernel,
   drop the active weights below the `prune_rate` percentile of the active magnitudes (`percentile_prune`). Their
   mask distance is the mean over kernels of the share of entries where they differ.
4. If that distance exceeds `distance_threshold` and the share of the client's parameters pruned so far is below the
   target 1 - `density` (one global target, over all parameters), the client prunes its trained network with the late
   candidate (within `prune_rate` of the target the step shrinks to min(gap / (1 - pruned), 5%) per kernel, as in the
   reference), zeroes the pruned weights and measures the pruned network's accuracy. Above `accuracy_threshold` it
   keeps the pruned network and mask; otherwise it reverts to the trained, unpruned network and its old mask.
5. Server: each weight becomes the average of the uploaded networks over the clients whose (new) mask keeps it;
   weights no sampled client keeps stay as they are; dense leaves (biases) are averaged over the cohort. That is
   `masked_mean` of U_k = m_k ⊙ w - v_k over the new masks with uniform weights (the reference's plain average).

Where this differs from the reference, and why:
- The accuracy after pruning is measured on the client's training data: the reference uses the client's test split,
  which a client update here does not see (and which a training decision should not see).
- The late candidate comes from the last local epoch (the reference takes epoch 5, its default `local_epochs`); with
  a single epoch or `local_steps`, the early candidate comes from the starting point m_k ⊙ w instead of epoch 1.
- Local training runs as two calls (first epoch, the rest), so the optimizer state restarts after the first epoch
  (identical for plain SGD, the default here; the reference's momentum carries over).
- The pruned share counts masked-out entries; the reference counts zeros among all parameters, which also includes
  weights that happen to be exactly zero.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, dense_training_flops, make_apply_fn, stacked
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.evaluation import Personal, evaluate_client
from fedspa_jax.mask_update import check_rate, prune_smallest
from fedspa_jax.models import flops
from fedspa_jax.round import ClientOutput

# Near the target the reference shrinks the pruning step to at most 5% of each kernel's active weights.
FINAL_STEP_CAP = 0.05


class SubFedAvgState(NamedTuple):
  """One client's persistent state (stacked [K, ...] in the store).

  Attributes:
    mask: bool pytree like the params (kernels pruned, other leaves all True).
    params: the client's own network v_k, as it last kept it (zero outside `mask`).
  """

  mask: Any
  params: Any


class PruneDecision(NamedTuple):
  """What a client keeps after the prune-or-revert rule.

  Attributes:
    mask: the new mask (the candidate if kept, else the old mask).
    params: the pruned network if kept, else the trained one.
    distance: mask distance between the early and the late candidate.
    tried: whether the distance and the target allowed pruning.
    kept: whether the pruned network was kept (tried and accurate enough).
    candidate: the candidate mask that was tried (or would have been).
  """

  mask: Any
  params: Any
  distance: jax.Array
  tried: jax.Array
  kept: jax.Array
  candidate: Any


def percentile_prune(mask: Any, params: Any, rate: Any, maskable: masks.Maskable = masks.is_maskable) -> Any:
  """In every maskable leaf, drops the active weights below the `rate` percentile of the active magnitudes.

  np.percentile's linear interpolation puts that percentile above exactly ceil(rate * (n - 1)) of n distinct active
  magnitudes, so that many are dropped (smallest |weight| first, ties by index); `rate` may be traced.
  """

  def leaf(path, m, p):
    if not maskable(path, m):
      return m
    active = jnp.sum(m, dtype=jnp.int32)
    count = jnp.ceil(rate * (active - 1).astype(jnp.float32)).astype(jnp.int32)
    return prune_smallest(m, p, jnp.maximum(count, 0))

  return jax.tree_util.tree_map_with_path(leaf, mask, params)


def mask_distance(mask_a: Any, mask_b: Any, maskable: masks.Maskable = masks.is_maskable) -> jax.Array:
  """Mean over the maskable leaves of the share of entries where two masks differ (0 with no maskable leaf)."""
  shares = [
      jnp.mean(a != b) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(mask_a)[0], jax.tree.leaves(mask_b))
      if maskable(path, a)
  ]
  return jnp.mean(jnp.stack(shares)) if shares else jnp.zeros((), jnp.float32)


def pruned_share(mask: Any) -> jax.Array:
  """Share of all parameter entries (every leaf) that `mask` removes."""
  leaves = jax.tree.leaves(mask)
  total = sum(m.size for m in leaves)
  active = sum(jnp.sum(m, dtype=jnp.int32).astype(jnp.float32) for m in leaves)
  return 1.0 - active / total


def decide_pruning(
    mask: Any,
    early: Any,
    late: Any,
    accuracy_of: Callable[[Any], jax.Array],
    *,
    rate: float,
    density: float,
    distance_threshold: float,
    accuracy_threshold: float,
    maskable: masks.Maskable = masks.is_maskable,
) -> PruneDecision:
  """The reference's prune-or-revert rule for one client.

  Args:
    mask: the client's mask during this round's training.
    early: the weights after the first local epoch (or the starting point).
    late: the weights after local training.
    accuracy_of: params -> accuracy of that network (on the client's own data).
    rate: share of each kernel's active weights one pruning step removes.
    density: target share of parameters kept (the pruning target is 1 - density, over all parameters).
    distance_threshold: prune only when the early and late candidates differ by more than this.
    accuracy_threshold: keep the pruned network only when its accuracy exceeds this.
    maskable: which leaves are pruned (default: kernels).
  """
  prune = lambda m, p, r: percentile_prune(m, p, r, maskable)
  distance = mask_distance(prune(mask, early, rate), prune(mask, late, rate), maskable)
  pruned = pruned_share(mask)
  gap = (1.0 - density) - pruned
  step = jnp.where(gap < rate, jnp.minimum(gap / (1.0 - pruned), FINAL_STEP_CAP), rate)
  candidate = prune(mask, late, step)
  pruned_params = masks.apply_mask(late, candidate)
  tried = (distance > distance_threshold) & (gap > 0)
  kept = tried & (accuracy_of(pruned_params) > accuracy_threshold)
  choose = lambda a, b: jax.tree.map(lambda x, y: jnp.where(kept, x, y), a, b)
  return PruneDecision(
      mask=choose(candidate, mask), params=choose(pruned_params, late), distance=distance, tried=tried, kept=kept,
      candidate=candidate,
  )


def _combined(results) -> dict[str, jax.Array]:
  """Training metrics over one or two consecutive `local_train` results."""
  samples = sum(r.samples for r in results)
  seen = jnp.maximum(samples, 1).astype(jnp.float32)
  return {
      "loss": sum(r.loss * r.samples for r in results) / seen,
      "accuracy": sum(r.accuracy * r.samples for r in results) / seen,
      "steps": sum(r.steps for r in results),
      "samples": samples,
  }


def subfedavg(
    *,
    model: nn.Module,
    density: float = 0.5,
    prune_rate: float = 0.1,
    distance_threshold: float = 1e-4,
    accuracy_threshold: float = 0.5,
    masked_leaves: str = "kernels",
    **common: Any,
) -> Algorithm:
  """Builds Sub-FedAvg (unstructured) as its reference code runs it (see the module docstring).

  Args:
    model: the flax model.
    density: share of the parameters a client keeps at most pruning: the target 1 - density is global, over all
      parameters (the reference's `pruning_target` 30 is density 0.7).
    prune_rate: share of each kernel's active weights one pruning step removes (reference: 10%).
    distance_threshold: the early/late candidate mask distance a client must exceed to prune (reference: 1e-4).
    accuracy_threshold: accuracy the pruned network must exceed to be kept (reference: 50%).
    masked_leaves: which leaves are pruned: "kernels" (the reference's "weight" tensors) or "all" (biases too).
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "uniform" (the reference's plain
      average).

  Returns:
    An `Algorithm` whose client state is a `SubFedAvgState` (mask and own network, leaves [K, ...]).
  """
  common = Common.with_defaults(common, weighting="uniform")
  masks.check_density(density)
  check_rate(prune_rate, "prune_rate")
  check_rate(accuracy_threshold, "accuracy_threshold")
  if not isinstance(distance_threshold, (int, float)) or not distance_threshold >= 0:
    raise ValueError(f"distance_threshold must be a number >= 0, got {distance_threshold!r}")
  maskable = masks.maskable_rule(masked_leaves)
  apply_fn = make_apply_fn(model)
  epochs = common.local_epochs if common.local_steps is None else None
  two_phase = epochs is not None and epochs >= 2
  forward_flops = functools.lru_cache(lambda sample_shape: flops.forward_flops(model, sample_shape))

  def init_clients(key, params, ids):
    del key
    return stacked(SubFedAvgState(mask=masks.dense_mask(params), params=params), ids)

  def make_client_fn(preprocess):
    def client_update(w, state: SubFedAvgState, data: ClientData, key, round):
      train_kwargs = common.train_kwargs(round)
      k_early, k_late = jax.random.split(key)
      x0 = masks.apply_mask(w, state.mask)
      train = functools.partial(local_train, apply_fn=apply_fn, preprocess=preprocess)
      if two_phase:
        first = train(x0, state.mask, data, k_early, **{**train_kwargs, "local_epochs": 1})
        rest = train(first.params, state.mask, data, k_late, **{**train_kwargs, "local_epochs": epochs - 1})
        results, early = (first, rest), first.params
      else:
        results, early = (train(x0, state.mask, data, k_late, **train_kwargs),), x0
      late = results[-1].params
      accuracy_of = lambda p: evaluate_client(apply_fn, p, data, preprocess=preprocess)["accuracy"]
      decision = decide_pruning(
          state.mask, early, late, accuracy_of, rate=prune_rate, density=density,
          distance_threshold=distance_threshold, accuracy_threshold=accuracy_threshold, maskable=maskable,
      )
      per_sample = functools.partial(accounting.mask_training_flops, forward_flops(data.x.shape[1:]))
      trained = _combined(results)
      # Training on the old mask, plus one forward pass over the client's data when it tries a pruned network.
      spent = per_sample(state.mask) * trained["samples"] + jnp.where(
          decision.tried, per_sample(decision.candidate) / 3.0 * data.count, 0.0
      )
      metrics = {
          **trained,
          "pruned": decision.kept.astype(jnp.int32),
          "mask_distance": decision.distance,
          "density": masks.overall_density(decision.mask),
          "flops": spent,
          # Per-client message sizes (account zeroes padding clients): m_k ⊙ w down, the kept network up.
          "values_down": accounting.count_values(state.mask),
          "values_up": accounting.count_values(decision.mask),
      }
      update = jax.tree.map(jnp.subtract, x0, decision.params)
      return ClientOutput(
          update=update, coverage=decision.mask, state=SubFedAvgState(decision.mask, decision.params), metrics=metrics
      )

    return client_update

  def account(params, metrics, real, round, sample_shape):
    del round
    clients = accounting.real_clients(metrics["cohort"], real)
    dense = dense_training_flops(model, sample_shape, metrics)
    every_leaf = jax.tree.map(lambda _: True, params)  # its own network, and a mask over every leaf
    return {
        "values_down": accounting.per_client(metrics["values_down"], clients),
        "values_up": accounting.per_client(metrics["values_up"], clients),
        "client_state_bytes": accounting.state_bytes(params, values=every_leaf, mask_bits=every_leaf),
        "flops": jnp.sum(jnp.where(accounting.trained_clients(metrics, real), metrics["flops"], 0.0)),
        "flops_dense": dense["flops_dense"],
    }

  hparams = dict(
      density=density, prune_rate=prune_rate, distance_threshold=distance_threshold,
      accuracy_threshold=accuracy_threshold, masked_leaves=masked_leaves,
  )
  return assemble(
      name="subfedavg", hparams=hparams, model=model, common=common, init_clients=init_clients,
      make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, state, train_k, key: {"own": Personal(state.params, state.mask)},
      account=account,
      aggregation="masked_mean",
  )
