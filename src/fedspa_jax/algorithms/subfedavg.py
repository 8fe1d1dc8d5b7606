"""Sub-FedAvg (unstructured): personalized masks found by iterative magnitude pruning.

Vahidian, Morafah, Lin, "Personalized Federated Learning by Structured and Unstructured Pruning under Data
Heterogeneity" (ICDCS workshops 2021). Every client starts dense and trains m_k ⊙ w; after local training, a client
whose training accuracy reaches `accuracy_threshold` prunes `prune_rate` of its active weights in every maskable
layer (smallest |weight| first, never below the layer's target count from `density`). The server averages each
coordinate over the clients whose mask covered it (masked mean). Masks only shrink: no regrowth, unlike FedSpa.
Message sizes vary by client: the round counts each client's active values per leaf, the host multiplies out.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, dense_training_flops, make_apply_fn, stacked
from fedspa_jax.algorithms.dense import train_metrics
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.mask_update import check_rate, prune_smallest
from fedspa_jax.models import flops
from fedspa_jax.round import ClientOutput


def subfedavg(
    *,
    model: nn.Module,
    density: float = 0.5,
    prune_rate: float = 0.1,
    accuracy_threshold: float = 0.5,
    **common: Any,
) -> Algorithm:
  """Builds Sub-FedAvg (unstructured).

  Args:
    model: the flax model.
    density: final (target) density of every maskable layer, in (0, 1].
    prune_rate: share of a layer's active weights pruned in one pruning step, in [0, 1].
    accuracy_threshold: a client prunes only once its local training accuracy reaches this.
    **common: the shared hyperparameters (`base.Common`).
  """
  common = Common.with_defaults(common, weighting="uniform")  # a plain average over the clients keeping a weight
  masks.check_density(density)
  check_rate(prune_rate, "prune_rate")
  check_rate(accuracy_threshold, "accuracy_threshold")
  apply_fn = make_apply_fn(model)
  train_kwargs = common.train_kwargs()
  forward_flops = functools.lru_cache(lambda sample_shape: flops.forward_flops(model, sample_shape))

  def init_clients(key, params, num_clients):
    del key
    return stacked(masks.dense_mask(params), num_clients)

  def make_client_fn(preprocess):
    def client_update(w, mask, data: ClientData, key, round):
      del round
      x0 = masks.apply_mask(w, mask)
      result = local_train(x0, mask, data, key, apply_fn=apply_fn, preprocess=preprocess, **train_kwargs)
      targets = masks.target_counts(w, masks.uniform_densities(w, density))
      prune = result.accuracy >= accuracy_threshold

      def next_leaf(path, m, p, target):
        if not masks.is_maskable(path, m):
          return m
        active = jnp.sum(m, dtype=jnp.int32)
        count = jnp.minimum(jnp.ceil(prune_rate * active).astype(jnp.int32), jnp.maximum(active - target, 0))
        return prune_smallest(m, p, jnp.where(prune, count, 0))

      new_mask = jax.tree_util.tree_map_with_path(next_leaf, mask, result.params, targets)
      update = jax.tree.map(jnp.subtract, x0, result.params)
      metrics = {
          **train_metrics(result),
          "values": accounting.count_values(mask),
          "density": masks.overall_density(new_mask),
          "flops": accounting.mask_training_flops(forward_flops(data.x.shape[1:]), mask) * result.samples,
      }
      return ClientOutput(update=update, coverage=mask, state=new_mask, metrics=metrics)

    return client_update

  def account(params, metrics, real, round, sample_shape):
    del round
    real_clients = accounting.real_clients(metrics["cohort"], real)
    sent = accounting.per_client(metrics["values"], real_clients)
    kernels = jax.tree_util.tree_map_with_path(masks.is_maskable, params)
    dense = dense_training_flops(model, sample_shape, metrics)
    return {
        "values_down": sent,
        "values_up": sent,
        "client_state_bytes": accounting.state_bytes(params, mask_bits=kernels),
        "flops": jnp.sum(jnp.where(real_clients, metrics["flops"], 0.0)),
        "flops_dense": dense["flops_dense"],
    }

  hparams = dict(density=density, prune_rate=prune_rate, accuracy_threshold=accuracy_threshold)
  return assemble(
      name="subfedavg", hparams=hparams, model=model, common=common, init_clients=init_clients,
      make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, m, train_k, key: masks.apply_mask(w, m),
      account=account,
      aggregation="masked_mean",
  )
