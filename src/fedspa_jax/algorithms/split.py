"""Shared body, personal head: FedRep and FedPer.

- FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers" (2019).
  Body and head are trained jointly; only the body is aggregated.
- FedRep: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized Federated
  Learning" (ICML 2021). The head is trained first with the body frozen (`head_epochs`), then the body with the
  head frozen (`local_epochs`); only the body is aggregated.
The head is a set of top-level params entries (`head=`): by default the entry named "head" (every model in
`fedspa_jax.models` names its classifier so) or, for a model without one, its last top-level entry in flax's
(creation) order, e.g. `Dense_1` of a two-layer MLP. Each client keeps its own head as persistent state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax import accounting
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, dense_training_flops, make_apply_fn, stacked
from fedspa_jax.algorithms.dense import train_metrics
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.evaluation import Personal
from fedspa_jax.round import ClientOutput

DEFAULT_HEAD = "head"


def check_head_names(head: Any) -> tuple[str, ...] | None:
  """The `head=` argument as a tuple of names (None: the default rule); ValueError for anything else."""
  if head is None:
    return None
  names = (head,) if isinstance(head, str) else head
  if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"head must be a top-level params entry name or a non-empty list of them, got {head!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"head names an entry twice: {list(names)}")
  return tuple(names)


def resolve_head(params: Any, head: tuple[str, ...] | None) -> tuple[str, ...]:
  """The top-level entries of `params` that form the personal head.

  Args:
    params: the model's params (a dict of top-level entries, in flax's creation order).
    head: names from `check_head_names`, or None for the default: "head" if there is such an entry, else the last
      entry.

  Raises:
    ValueError: an unknown name, or a head that takes every entry (no body left to share).
  """
  if not isinstance(params, dict) or not params:
    raise ValueError(f"FedRep/FedPer need params that are a dict of top-level entries, got {type(params).__name__}")
  entries = list(params)
  if head is None:
    return (DEFAULT_HEAD,) if DEFAULT_HEAD in params else (entries[-1],)
  unknown = [n for n in head if n not in params]
  if unknown:
    raise ValueError(f"head names unknown params entries {unknown}; the model's top-level entries are {entries}")
  if len(head) == len(entries):
    raise ValueError(f"head {list(head)} takes every top-level params entry; nothing is left for the shared body")
  return head


def _split_algorithm(
    name: str, model: nn.Module, head_epochs: int | None, head: Any, common: Common
) -> Algorithm:
  apply_fn = make_apply_fn(model)
  head_names = check_head_names(head)

  def head_of(params):
    return {n: params[n] for n in resolve_head(params, head_names)}

  def body_only(params):
    """True on every leaf of the body, False on the head: which coordinates the server aggregates."""
    names = resolve_head(params, head_names)
    return {n: jax.tree.map(lambda _: n not in names, sub) for n, sub in params.items()}

  def init_clients(key, params, ids):
    del key
    return stacked(head_of(params), ids)

  def make_client_fn(preprocess):
    def client_update(w, head_k, data: ClientData, key, round):
      train_kwargs = common.train_kwargs(round)
      k_head, k_body = jax.random.split(key)
      params = {**w, **head_k}
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
          lambda a, b, body: jnp.where(body, a - b, 0.0), {**w, **head_k}, result.params, trains_body
      )
      metrics = {**train_metrics(result), "head_samples": head_samples}
      return ClientOutput(update=update, coverage=None, state=head_of(result.params), metrics=metrics)

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
        **dense_training_flops(model, sample_shape, metrics),
    }

  hparams = {"head": None if head_names is None else list(head_names)}
  if head_epochs is not None:
    hparams["head_epochs"] = head_epochs
  algo = assemble(
      name=name, hparams=hparams, model=model, common=common, init_clients=init_clients,
      make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, head_k, train_k, key: {"head_body": Personal({**w, **head_k})},
      account=account, protocol="head_body",
  )

  def init(key, data):
    state = algo.init(key, data)
    # The default head depends on the model's params, first seen here: record the choice (config.json and
    # summary.json show the algorithm's hparams).
    algo.hparams["head"] = list(resolve_head(state.server.params, head_names))
    return state

  return dataclasses.replace(algo, init=init)  # shares `hparams`, so the record reaches every copy


def fedrep(*, model: nn.Module, head_epochs: int = 10, head: str | Sequence[str] | None = None,
           **common: Any) -> Algorithm:
  """FedRep: `head_epochs` epochs on the personal head (body frozen), then `local_epochs` on the shared body.

  Args:
    model: the flax model.
    head_epochs: local epochs on the head per round.
    head: the top-level params entries that form the personal head (default: "head" if the model has it, else its
      last top-level entry); the choice is recorded in `hparams["head"]` at `init`.
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "uniform" (FedRep's objective is
      the plain average of the clients' losses).
  """
  if not isinstance(head_epochs, int) or head_epochs < 1:
    raise ValueError(f"head_epochs must be an integer >= 1, got {head_epochs!r}")
  return _split_algorithm("fedrep", model, head_epochs, head, Common.with_defaults(common, weighting="uniform"))


def fedper(*, model: nn.Module, head: str | Sequence[str] | None = None, **common: Any) -> Algorithm:
  """FedPer: body and personal head trained jointly; the body is averaged.

  Args:
    model: the flax model.
    head: the personal head's top-level params entries (as in `fedrep`).
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "samples" (FedPer aggregates
      the body as FedAvg does).
  """
  return _split_algorithm("fedper", model, None, head, Common.with_defaults(common, weighting="samples"))
