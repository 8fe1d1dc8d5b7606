"""FedSpa: personalized sparse masks over one shared model.

Huang, Liu, Shen, He, Lin, Tao, "Achieving Personalized Federated Learning with Sparse Local Models" (2022).
Client k trains m_k ⊙ w sparse-to-sparse (a fixed number of active weights), evolves m_k by magnitude drop and
gradient (RigL) or random (SET) regrowth with a cosine-annealed prune rate, and uploads the sparse update
U_k = x_0 - x_final with its new mask; the server applies w <- w - lr_s * aggregate(U). Options cover the points where
reimplementations differ: aggregation rule, regrow rule, shared initial mask, alpha and t_end.

What a client is scored with (`personal_model`) is a protocol choice, named in every result:
- "masked_global" (default): m_k ⊙ w, the shared model seen through the client's current mask. The client state is
  the mask alone: 1 bit per weight per client.
- "local": the sparse model the client ended its last local training with, under the mask it trained with (as the
  authors' group's DisPFL code scores its clients). The client state then also holds that model's values, the mask
  it was trained under and whether it was ever trained (a client never trained is scored with m_k ⊙ w and shows
  in `participating`); every evaluation reports "masked_global" beside it (`accuracy_masked_global`). Training
  does not change: both protocols come from one run.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, check_positive_int
from fedspa_jax.client import ClientData, batch_gradient, local_train
from fedspa_jax.evaluation import Personal
from fedspa_jax.models import flops
from fedspa_jax.mask_update import REGROW_RULES, check_rate, cosine_prune_rate, prune_and_regrow
from fedspa_jax.round import ClientOutput

DENSITY_RULES = ("erk", "uniform")
PERSONAL_MODELS = ("masked_global", "local")


class LocalModelState(NamedTuple):
  """A client's state with personal_model="local" (leaves [K, ...] in the store).

  Attributes:
    mask: the mask it trains with next (bool, params structure).
    local_mask: the mask its local model was trained under.
    local: the sparse model it ended its last local training with (zeros before it first trains).
    trained: bool []: it has trained at least once.
    trained_round: int32 []: the number of rounds done when it last trained (round index + 1; 0: never), so an
      evaluation after t rounds scores a local model t - trained_round rounds old (its staleness).
  """

  mask: Any
  local_mask: Any
  local: Any
  trained: jax.Array
  trained_round: jax.Array


# FedSpa's objective is (1/K) sum_k f_k(m_k ⊙ w). Uniform sampling, and stratified sampling (equal strata only,
# `population.check_strata`), put every client in a cohort with probability S / K, so (1/S) sum_k U_k estimates its
# update unbiasedly.
DEFAULT_WEIGHTING = "uniform"


def make_densities(params: Any, density: float, rule: str, maskable: masks.Maskable = masks.is_maskable) -> Any:
  """Per-leaf densities by rule ("erk" or "uniform") over the leaves `maskable` picks."""
  if rule not in DENSITY_RULES:
    raise ValueError(f"density_rule must be one of {DENSITY_RULES}, got {rule!r}")
  return (masks.erk_densities if rule == "erk" else masks.uniform_densities)(params, density, maskable=maskable)


def check_mask_schedule(density, density_rule, alpha, t_end, regrow, rounds) -> int:
  """Checks the mask hyperparameters FedSpa and DisPFL share (ValueError naming the bad one); returns t_end (default:
  all rounds)."""
  masks.check_density(density)
  if density_rule not in DENSITY_RULES:
    raise ValueError(f"density_rule must be one of {DENSITY_RULES}, got {density_rule!r}")
  check_rate(alpha, "alpha (initial prune rate)")
  t_end = rounds if t_end is None else t_end
  check_positive_int("t_end", t_end)
  if regrow not in REGROW_RULES:
    raise ValueError(f"regrow must be one of {REGROW_RULES}, got {regrow!r}")
  return t_end


def make_client_update(
    *, apply_fn, preprocess, train_kwargs: dict | Callable[[jax.Array], dict], alpha: float, t_end: int, regrow: str,
    update_masks: bool, keep_local: bool = False, maskable: masks.Maskable = masks.is_maskable,
):
  """One FedSpa client: (w, mask, data, key, round) -> ClientOutput(U_k, coverage=mask, state=new mask, metrics).

  With `keep_local` the client state is a `LocalModelState` instead of the mask: the trained model is kept.
  """

  def client_update(w, state, data: ClientData, key: jax.Array, round: jax.Array) -> ClientOutput:
    mask = state.mask if keep_local else state
    k_train, k_grad, k_mask = jax.random.split(key, 3)
    x0 = masks.apply_mask(w, mask)
    kwargs = train_kwargs(round) if callable(train_kwargs) else train_kwargs  # per round (lr decay), or fixed
    result = local_train(x0, mask, data, k_train, apply_fn=apply_fn, preprocess=preprocess, **kwargs)
    new_mask = mask
    if update_masks:
      rate = cosine_prune_rate(round, alpha, t_end)

      def next_mask(_):
        grads = None
        if regrow == "gradient":
          grads = batch_gradient(
              result.params, data, k_grad, apply_fn=apply_fn, batch_size=kwargs["batch_size"],
              preprocess=preprocess,
          )
        return prune_and_regrow(mask, result.params, grads, rate, k_mask, regrow, maskable=maskable)

      # The rate depends on the round alone, which the round passes unbatched (the same for the whole cohort), so
      # this stays a real branch under vmap: after t_end no regrowth gradient is computed.
      new_mask = jax.lax.cond(rate > 0, next_mask, lambda _: mask, None)
    update = jax.tree.map(jnp.subtract, x0, result.params)
    metrics = {"loss": result.loss, "accuracy": result.accuracy, "steps": result.steps, "samples": result.samples}
    if keep_local:
      done = jnp.asarray(round, jnp.int32) + 1
      new_state = LocalModelState(new_mask, mask, result.params, jnp.ones((), bool), done)
    else:
      new_state = new_mask
    return ClientOutput(update=update, coverage=mask, state=new_state, metrics=metrics)

  return client_update


def fedspa(
    *,
    model: nn.Module,
    density: float = 0.5,
    density_rule: str = "erk",
    alpha: float = 0.5,
    t_end: int | None = None,
    regrow: str = "gradient",
    update_masks: bool = True,
    aggregation: str = "mean",
    shared_init_mask: bool = False,
    personal_model: str = "masked_global",
    masked_leaves: str = "kernels",
    **common: Any,
) -> Algorithm:
  """Builds FedSpa.

  Args:
    model: a flax module (params only, no mutable collections).
    density: overall density d of the maskable weights, in (0, 1].
    density_rule: "erk" (default) or "uniform" per-layer densities.
    alpha: initial prune rate of the cosine schedule, in [0, 1].
    t_end: last round at which masks change (default: `rounds`).
    regrow: "gradient" (RigL) or "random" (SET).
    update_masks: False keeps every client's initial mask fixed.
    aggregation: "mean" or "masked_mean".
    shared_init_mask: give every client the same initial mask.
    personal_model: what a client is scored with: "masked_global" (m_k ⊙ w) or "local" (the model it ended its last
      local training with; costs the model's values per client); see the module docstring.
    masked_leaves: which leaves are sparse: "kernels" (ndim >= 2; biases and scales stay dense) or "all" (every
      parameter, biases included, with the density rule over all of them, as rong-dai/DisPFL does).
    **common: the hyperparameters every algorithm shares (`base.Common`): clients_per_round, local_epochs,
      local_steps, batch_size, lr, momentum, weight_decay, optimizer, rounds, weighting (default "uniform": the
      objective's (1/K) sum_k f_k), server_lr, mesh, ...

  Returns:
    An `Algorithm`; its client state is the masks (bool, stored as uint32 bit words [K, W] per leaf).
  """
  common = Common.with_defaults(common, weighting=DEFAULT_WEIGHTING)
  t_end = check_mask_schedule(density, density_rule, alpha, t_end, regrow, common.rounds)
  if personal_model not in PERSONAL_MODELS:
    raise ValueError(f"personal_model must be one of {PERSONAL_MODELS}, got {personal_model!r}")
  keep_local = personal_model == "local"
  maskable = masks.maskable_rule(masked_leaves)
  densities_of = lambda params: make_densities(params, density, density_rule, maskable)
  apply_fn = lambda params, x: model.apply({"params": params}, x)

  def init_clients(key, params, ids):
    client_masks = masks.init_client_masks(key, params, densities_of(params), ids=ids, shared=shared_init_mask)
    if not keep_local:
      return client_masks
    zeros = jax.tree.map(lambda a: jnp.zeros((ids.shape[0], *a.shape), a.dtype), params)
    return LocalModelState(client_masks, client_masks, zeros, jnp.zeros(ids.shape, bool), jnp.zeros(ids.shape, jnp.int32))

  def make_client_fn(preprocess):
    return make_client_update(
        apply_fn=apply_fn, preprocess=preprocess, train_kwargs=common.train_kwargs, alpha=alpha, t_end=t_end,
        regrow=regrow, update_masks=update_masks, keep_local=keep_local, maskable=maskable,
    )

  def personalize(w, state, train_k, key):
    mask = state.mask if keep_local else state
    masked_global = Personal(masks.apply_mask(w, mask), mask)
    if not keep_local:
      return {"masked_global": masked_global}
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(state.trained, x, y), a, b)
    local = Personal(pick(state.local, masked_global.params), pick(state.local_mask, mask), state.trained_round)
    return {"local": local, "masked_global": masked_global}

  def client_state_bytes(params):
    """Bytes per leaf of one client's stored state: its mask (the store keeps the whole mask, dense leaves
    included); with "local" a second mask, the local model's values, the `trained` flag's word and `trained_round`
    (on leaf 0)."""
    every_leaf = jax.tree.map(lambda _: True, params)
    mask = accounting.state_bytes(params, mask_bits=every_leaf)
    if not keep_local:
      return mask
    return (2 * mask + accounting.state_bytes(params, values=every_leaf)).at[0].add(8)

  def account(params, metrics, real, round, sample_shape):
    densities = densities_of(params)
    # Every layer's active count is exact, so both messages (m_k ⊙ w down, U_k and the new mask up) carry the
    # static target counts; bytes follow on the host (accounting.round_bytes).
    values = accounting.per_client(
        accounting.static_values(params, densities), accounting.real_clients(metrics["cohort"], real)
    )
    regrow_batch = common.batch_size if update_masks and regrow == "gradient" else 0
    # Host-side arithmetic on shapes, also while the round is traced: the model is traced once, nothing runs.
    cost = flops.training_flops(model, sample_shape, densities, regrow_batch=regrow_batch)
    rate = cosine_prune_rate(round, alpha, t_end) if update_masks else jnp.zeros((), jnp.float32)
    regrowing = jnp.sum(accounting.trained_clients(metrics, real)).astype(jnp.float32)
    regrowth = jnp.where(rate > 0, regrowing * cost.regrow, 0.0)  # no mask update after t_end
    return {
        "values_down": values,
        "values_up": values,
        "client_state_bytes": client_state_bytes(params),
        "prune_rate": rate,
        **accounting.round_flops(
            cost.per_sample, cost.dense_per_sample, metrics["samples"], extra=regrowth
        ),
    }

  hparams = dict(
      density=density, density_rule=density_rule, alpha=alpha, t_end=t_end, regrow=regrow,
      update_masks=update_masks, shared_init_mask=shared_init_mask, personal_model=personal_model,
      masked_leaves=masked_leaves,
  )
  return assemble(
      name="fedspa", hparams=hparams, model=model, common=common, init_clients=init_clients,
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: personalize, account=account,
      aggregation=aggregation, protocol=personal_model,
  )
