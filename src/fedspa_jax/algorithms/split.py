"""Shared body, personal head: FedRep and FedPer.

- FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers" (2019).
  Body and head are trained jointly; only the body is aggregated.
- FedRep: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized Federated
  Learning" (ICML 2021). The head is trained first with the body frozen (`head_epochs`), then the body with the
  head frozen (`local_epochs`); only the body is aggregated.
The head is the model's top-level params entry named "head" (every model in `fedspa_jax.models` names its classifier
so); each client keeps its own head as persistent state.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax import accounting
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, dense_training_flops, make_apply_fn, stacked
from fedspa_jax.algorithms.dense import train_metrics
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.round import ClientOutput

HEAD = "head"


def check_head(params: Any) -> None:
  if not isinstance(params, dict) or HEAD not in params:
    keys = list(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f'FedRep/FedPer need a top-level params entry named "{HEAD}" (the classifier); got {keys}')


def with_head(w: Any, head: Any) -> Any:
  return {**w, HEAD: head}


def body_only(tree: Any) -> Any:
  """True on every leaf of the body, False on the head: which coordinates the server aggregates."""
  return {name: jax.tree.map(lambda _: name != HEAD, sub) for name, sub in tree.items()}


def _split_algorithm(name: str, model: nn.Module, head_epochs: int | None, common: Common) -> Algorithm:
  apply_fn = make_apply_fn(model)
  train_kwargs = common.train_kwargs()

  def init_clients(key, params, num_clients):
    check_head(params)
    return stacked(params[HEAD], num_clients)

  def make_client_fn(preprocess):
    def client_update(w, head, data: ClientData, key, round):
      del round
      k_head, k_body = jax.random.split(key)
      params = with_head(w, head)
      trains_body = body_only(params)
      if head_epochs is not None:  # FedRep: head first with the body frozen, then the body with the head frozen
        trains_head = jax.tree.map(jnp.logical_not, trains_body)
        head_kwargs = {**train_kwargs, "local_epochs": head_epochs, "local_steps": None}
        head_result = local_train(
            params, None, data, k_head, apply_fn=apply_fn, preprocess=preprocess, trainable=trains_head, **head_kwargs
        )
        params, head_samples = head_result.params, head_result.samples
        result = local_train(
            params, None, data, k_body, apply_fn=apply_fn, preprocess=preprocess, trainable=trains_body,
            **train_kwargs,
        )
      else:  # FedPer: body and head together
        result = local_train(params, None, data, k_body, apply_fn=apply_fn, preprocess=preprocess, **train_kwargs)
        head_samples = jnp.zeros((), jnp.int32)
      update = jax.tree.map(
          lambda a, b, body: jnp.where(body, a - b, 0.0), with_head(w, head), result.params, trains_body
      )
      metrics = {**train_metrics(result), "head_samples": head_samples}
      return ClientOutput(update=update, coverage=None, state=result.params[HEAD], metrics=metrics)

    return client_update

  def account(params, metrics, real, round, sample_shape):
    del round
    body = body_only(params)
    values = np.where(jax.tree.leaves(body), accounting.static_values(params), 0).astype(np.int32)
    values = accounting.per_client(values, accounting.real_clients(metrics["cohort"], real))
    return {
        "values_down": values,
        "values_up": values,
        "client_state_bytes": accounting.state_bytes(params, values=jax.tree.map(lambda b: not b, body)),
        # FedRep's head epochs still run full forward and backward passes in this implementation.
        **dense_training_flops(model, sample_shape, metrics, ("samples", "head_samples")),
    }

  return assemble(
      name=name, hparams={"head_epochs": head_epochs} if head_epochs is not None else {}, model=model,
      common=common, init_clients=init_clients, make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, head, train_k, key: with_head(w, head), account=account,
  )


def fedrep(*, model: nn.Module, head_epochs: int = 10, **common: Any) -> Algorithm:
  """FedRep: `head_epochs` epochs on the personal head (body frozen), then `local_epochs` on the shared body."""
  if not isinstance(head_epochs, int) or head_epochs < 1:
    raise ValueError(f"head_epochs must be an integer >= 1, got {head_epochs!r}")
  # FedRep's objective is the plain average of the clients' losses.
  return _split_algorithm("fedrep", model, head_epochs, Common.with_defaults(common, weighting="uniform"))


def fedper(*, model: nn.Module, **common: Any) -> Algorithm:
  """FedPer: body and personal head trained jointly; the body is averaged."""
  # FedPer aggregates the base layers as FedAvg does.
  return _split_algorithm("fedper", model, None, Common.with_defaults(common, weighting="samples"))
