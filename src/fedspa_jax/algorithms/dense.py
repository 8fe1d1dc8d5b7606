"""Dense baselines in the same engine: FedAvg, FedAvg with local fine-tuning, Local training, and Ditto.

- FedAvg: McMahan, Moore, Ramage, Hampson, Aguera y Arcas, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (AISTATS 2017). Every client is evaluated with the global model.
- FedAvg-FT: FedAvg, then each client fine-tunes the global model for `finetune_epochs` on its own data before it is
  evaluated (the fine-tuned model is not kept): FedAvg scored under the local-adaptation protocol
  (`evaluate(..., finetune_epochs=E)`), which every method offers.
- Local: every client trains its own model alone, with no communication (the sampled clients train each round).
- Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization" (ICML 2021).
  Clients run FedAvg's local update for the global model and, from the same round's global model w, train a
  personal model v_k on f_k(v) + lambda / 2 * ||v - w||^2.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax import accounting
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, dense_training_flops, make_apply_fn, stacked
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.evaluation import Personal
from fedspa_jax.round import ClientOutput


def train_metrics(result) -> dict[str, jax.Array]:
  return {"loss": result.loss, "accuracy": result.accuracy, "steps": result.steps, "samples": result.samples}


def dense_account(model: nn.Module, *, communicates: bool = True, keeps_model: bool = False):
  """Per-round accounting of a dense method: the whole model down and up per real client (or nothing), dense FLOPs.

  Args:
    model: the flax model (for FLOPs).
    communicates: False for methods that send nothing (Local).
    keeps_model: each client keeps a whole model as its state (Local, Ditto).
  """

  def account(params, metrics, real, round, sample_shape):
    del round
    sent = accounting.real_clients(metrics["cohort"], real) & communicates
    values = accounting.per_client(accounting.static_values(params), sent)
    kept = jax.tree.map(lambda _: keeps_model, params)
    return {
        "values_down": values,
        "values_up": values,
        "client_state_bytes": accounting.state_bytes(params, values=kept),
        **dense_training_flops(model, sample_shape, metrics),
    }

  return account


def no_client_state(key, params, ids):
  del key, params
  return jnp.zeros(ids.shape, jnp.int32)  # a placeholder leaf keeps the [K] client axis visible


def fedavg(*, model: nn.Module, finetune_epochs: int = 0, **common: Any) -> Algorithm:
  """FedAvg; with `finetune_epochs` > 0 every client fine-tunes the global model before evaluation (FedAvg-FT).

  Args:
    model: the flax model.
    finetune_epochs: local epochs of fine-tuning at evaluation time (0 = plain FedAvg).
    **common: the shared hyperparameters (`base.Common`).
  """
  common = Common.with_defaults(common, weighting="samples")  # FedAvg's rule: n_k / n
  if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
    raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
  apply_fn = make_apply_fn(model)

  def make_client_fn(preprocess):
    def client_update(w, state, data: ClientData, key, round):
      result = local_train(
          w, None, data, key, apply_fn=apply_fn, preprocess=preprocess, **common.train_kwargs(round)
      )
      update = jax.tree.map(jnp.subtract, w, result.params)
      return ClientOutput(update=update, coverage=None, state=state, metrics=train_metrics(result))

    return client_update

  return assemble(
      name="fedavg_ft" if finetune_epochs else "fedavg", hparams={"finetune_epochs": finetune_epochs},
      model=model, common=common, init_clients=no_client_state, make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, state, train_k, key: {"global": Personal(w)},
      account=dense_account(model), protocol="global", finetune_epochs=finetune_epochs,
  )


def local(*, model: nn.Module, **common: Any) -> Algorithm:
  """Local training: every client keeps and trains its own model; nothing is communicated.

  All clients start from the same initial params; each round the sampled clients train their own model.
  """
  common = Common.with_defaults(common, weighting="uniform")  # nothing is aggregated: the choice is moot
  apply_fn = make_apply_fn(model)

  def make_client_fn(preprocess):
    def client_update(w, params_k, data: ClientData, key, round):
      result = local_train(params_k, None, data, key, apply_fn=apply_fn, preprocess=preprocess,
                           **common.train_kwargs(round))
      update = jax.tree.map(jnp.zeros_like, w)
      return ClientOutput(update=update, coverage=None, state=result.params, metrics=train_metrics(result))

    return client_update

  return assemble(
      name="local", hparams={}, model=model, common=common,
      init_clients=lambda key, params, ids: stacked(params, ids),
      make_client_fn=make_client_fn,
      make_personalize=lambda preprocess: lambda w, params_k, train_k, key: {"own": Personal(params_k)},
      account=dense_account(model, communicates=False, keeps_model=True),
      dp_refusal="nothing is aggregated or released: each client keeps its own model",
  )


def ditto(
    *, model: nn.Module, ditto_lambda: float = 0.1, personal_epochs: int | None = None, **common: Any
) -> Algorithm:
  """Ditto: FedAvg for the global model plus a personal model pulled towards it with strength `ditto_lambda`.

  Args:
    model: the flax model.
    ditto_lambda: proximal strength lambda >= 0.
    personal_epochs: local epochs of the personal model per round (default: `local_epochs`).
    **common: the shared hyperparameters (`base.Common`).
  """
  common = Common.with_defaults(common, weighting="samples")  # the global model is FedAvg's
  if not isinstance(ditto_lambda, (int, float)) or ditto_lambda < 0:
    raise ValueError(f"ditto_lambda must be a number >= 0, got {ditto_lambda!r}")
  if personal_epochs is not None and (not isinstance(personal_epochs, int) or personal_epochs < 1):
    raise ValueError(f"personal_epochs must be an integer >= 1, got {personal_epochs!r}")
  apply_fn = make_apply_fn(model)
  personal_work = {} if personal_epochs is None else dict(local_epochs=personal_epochs, local_steps=None)

  def make_client_fn(preprocess):
    def client_update(w, v, data: ClientData, key, round):
      train_kwargs = common.train_kwargs(round)
      personal_kwargs = {**train_kwargs, **personal_work}
      k_global, k_personal = jax.random.split(key)
      result = local_train(w, None, data, k_global, apply_fn=apply_fn, preprocess=preprocess, **train_kwargs)

      def proximal(p):
        squares = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), p, w)
        return 0.5 * ditto_lambda * sum(jax.tree.leaves(squares))

      personal = local_train(
          v, None, data, k_personal, apply_fn=apply_fn, preprocess=preprocess, regularizer=proximal,
          **personal_kwargs,
      )
      update = jax.tree.map(jnp.subtract, w, result.params)
      metrics = {**train_metrics(personal), "global_loss": result.loss, "global_samples": result.samples}
      return ClientOutput(update=update, coverage=None, state=personal.params, metrics=metrics)

    return client_update

  return assemble(
      name="ditto", hparams={"ditto_lambda": ditto_lambda, "personal_epochs": personal_epochs}, model=model,
      common=common, init_clients=lambda key, params, ids: stacked(params, ids),
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: lambda w, v, train_k, key: {"own": Personal(v)},
      account=dense_account(model, keeps_model=True),
  )


def fedavg_ft(*, model: nn.Module, finetune_epochs: int = 1, **common: Any) -> Algorithm:
  """FedAvg-FT: FedAvg whose global model each client fine-tunes for `finetune_epochs` before evaluation."""
  if not isinstance(finetune_epochs, int) or finetune_epochs < 1:
    raise ValueError(f"finetune_epochs must be an integer >= 1, got {finetune_epochs!r}")
  return fedavg(model=model, finetune_epochs=finetune_epochs, **common)
