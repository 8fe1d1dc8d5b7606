"""FedSpa: personalized sparse masks over one shared model.

Huang, Liu, Shen, He, Lin, Tao, "Achieving Personalized Federated Learning with Sparse Local Models" (2022).
Client k trains m_k ⊙ w sparse-to-sparse (a fixed number of active weights), evolves m_k by magnitude drop and
gradient (RigL) or random (SET) regrowth with a cosine-annealed prune rate, and uploads the sparse update
U_k = x_0 - x_final with its new mask; the server applies w <- w - lr_s * aggregate(U). Options cover the points where
reimplementations differ: aggregation rule, regrow rule, shared initial mask, alpha and t_end.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import (
    Algorithm,
    check_cohort,
    check_local_work,
    check_model_fits,
    check_positive_int,
    check_state_matches,
    init_params,
    make_apply_fn,
    make_optimizer,
)
from fedspa_jax.client import ClientData, batch_gradient, local_train, make_preprocess
from fedspa_jax.data.federated import FederatedData
from fedspa_jax.evaluation import make_evaluate
from fedspa_jax.mask_update import REGROW_RULES, check_rate, cosine_prune_rate, prune_and_regrow
from fedspa_jax.round import ClientOutput, SimState, check_aggregation, check_mesh, make_round
from fedspa_jax.server import init_server

DENSITY_RULES = ("erk", "uniform")


def make_client_update(
    *,
    apply_fn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    local_epochs: int | None,
    local_steps: int | None,
    preprocess,
    alpha: float,
    t_end: int,
    regrow: str,
    update_masks: bool,
):
  """One FedSpa client: (w, mask, data, key, round) -> ClientOutput(U_k, coverage=mask, state=new mask, metrics)."""

  def client_update(w, mask, data: ClientData, key: jax.Array, round: jax.Array) -> ClientOutput:
    k_train, k_grad, k_mask = jax.random.split(key, 3)
    x0 = masks.apply_mask(w, mask)
    result = local_train(
        x0,
        mask,
        data,
        k_train,
        apply_fn=apply_fn,
        optimizer=optimizer,
        batch_size=batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
        preprocess=preprocess,
    )
    new_mask = mask
    if update_masks:
      grads = None
      if regrow == "gradient":
        grads = batch_gradient(
            result.params, data, k_grad, apply_fn=apply_fn, batch_size=batch_size, preprocess=preprocess
        )
      rate = cosine_prune_rate(round, alpha, t_end)
      new_mask = prune_and_regrow(mask, result.params, grads, rate, k_mask, regrow)
    update = jax.tree.map(jnp.subtract, x0, result.params)
    metrics = {"loss": result.loss, "accuracy": result.accuracy, "steps": result.steps, "samples": result.samples}
    return ClientOutput(update=update, coverage=mask, state=new_mask, metrics=metrics)

  return client_update


def fedspa(
    *,
    model: nn.Module,
    density: float = 0.5,
    density_rule: str = "erk",
    clients_per_round: int = 10,
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: optax.GradientTransformation | None = None,
    rounds: int = 100,
    alpha: float = 0.5,
    t_end: int | None = None,
    regrow: str = "gradient",
    update_masks: bool = True,
    aggregation: str = "mean",
    weighting: str = "samples",
    server_lr: float = 1.0,
    shared_init_mask: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    eval_clients_per_batch: int = 16,
) -> Algorithm:
  """Builds FedSpa.

  Args:
    model: a flax module (params only, no mutable collections).
    density: overall density d of the maskable weights, in (0, 1].
    density_rule: "erk" (default) or "uniform" per-layer densities.
    clients_per_round: S, sampled without replacement each round.
    local_epochs: passes over each client's own data per round (ignored if `local_steps` is set).
    local_steps: a fixed number of local steps instead.
    batch_size: local batch size.
    lr, momentum, weight_decay: the clients' SGD (ignored if `optimizer` is given).
    optimizer: an optax transformation for local training.
    rounds: planned rounds T (the default t_end).
    alpha: initial prune rate of the cosine schedule, in [0, 1].
    t_end: last round at which masks change (default: `rounds`).
    regrow: "gradient" (RigL) or "random" (SET).
    update_masks: False keeps every client's initial mask fixed.
    aggregation: "mean" or "masked_mean".
    weighting: "samples" (weighted by client sample counts) or "uniform".
    server_lr: server learning rate eta_s.
    shared_init_mask: give every client the same initial mask.
    mesh: optional `jax.sharding.Mesh` with a "clients" axis to shard the cohort over.
    eval_clients_per_batch: clients evaluated together (memory bound of `evaluate`).

  Returns:
    An `Algorithm`; its client state is the mask store (bool leaves [K, ...]).
  """
  masks.check_density(density)
  if density_rule not in DENSITY_RULES:
    raise ValueError(f"density_rule must be one of {DENSITY_RULES}, got {density_rule!r}")
  check_local_work(batch_size, local_epochs, local_steps)
  check_positive_int("rounds", rounds)
  check_rate(alpha, "alpha (initial prune rate)")
  t_end = rounds if t_end is None else t_end
  check_positive_int("t_end", t_end)
  if regrow not in REGROW_RULES:
    raise ValueError(f"regrow must be one of {REGROW_RULES}, got {regrow!r}")
  check_aggregation(aggregation, weighting)
  check_mesh(mesh)
  check_positive_int("clients_per_round", clients_per_round)
  if not server_lr > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
  local_optimizer = make_optimizer(optimizer, lr, momentum, weight_decay)
  server_optimizer = optax.sgd(server_lr)
  apply_fn = make_apply_fn(model)
  densities_for = functools.partial(
      masks.erk_densities if density_rule == "erk" else masks.uniform_densities, density=density
  )

  def init(key: jax.Array, data: FederatedData) -> SimState:
    check_cohort(clients_per_round, data)
    k_params, k_masks, k_sim = jax.random.split(key, 3)
    params = init_params(model, k_params, data)
    client_masks = masks.init_client_masks(
        k_masks, params, densities_for(params), data.num_clients, shared=shared_init_mask
    )
    return SimState(
        server=init_server(params, server_optimizer),
        clients=client_masks,
        round=jnp.zeros((), jnp.int32),
        key=k_sim,
    )

  def round_fn(state: SimState, data: FederatedData):
    # Runs at trace time: shape errors surface here, before compilation.
    check_model_fits(model, data)
    check_cohort(clients_per_round, data)
    check_state_matches(state, data)
    client_update = make_client_update(
        apply_fn=apply_fn,
        optimizer=local_optimizer,
        batch_size=batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
        preprocess=make_preprocess(data.mean, data.std),
        alpha=alpha,
        t_end=t_end,
        regrow=regrow,
        update_masks=update_masks,
    )
    run = make_round(
        client_update,
        num_clients=data.num_clients,
        cohort_size=clients_per_round,
        aggregation=aggregation,
        weighting=weighting,
        server_optimizer=server_optimizer,
        mesh=mesh,
    )
    state, metrics = run(state, data.train)
    message = accounting.sparse_bytes(state.server.params, densities_for(state.server.params))
    real = jnp.sum(metrics["cohort"] < data.num_clients)
    metrics["bytes_down"] = real * message
    metrics["bytes_up"] = real * message
    metrics["prune_rate"] = cosine_prune_rate(state.round - 1, alpha, t_end) if update_masks else jnp.zeros(())
    return state, metrics

  personalize = lambda w, mask, train_k, key: masks.apply_mask(w, mask)
  evaluate_clients = make_evaluate(personalize, apply_fn, clients_per_batch=eval_clients_per_batch)

  def evaluate_fn(state: SimState, data: FederatedData):
    check_model_fits(model, data)
    check_state_matches(state, data)
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2)  # 0: cohort, 1: clients
    return evaluate_clients(
        state.server.params, state.clients, data.train, data.test, key, make_preprocess(data.mean, data.std)
    )

  hparams = dict(
      density=density, density_rule=density_rule, clients_per_round=clients_per_round, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
      rounds=rounds, alpha=alpha, t_end=t_end, regrow=regrow, update_masks=update_masks, aggregation=aggregation,
      weighting=weighting, server_lr=server_lr, shared_init_mask=shared_init_mask,
  )
  return Algorithm(
      name="fedspa",
      hparams=hparams,
      init=init,
      round=jax.jit(round_fn),
      evaluate=jax.jit(evaluate_fn),
      round_fn=round_fn,
  )
