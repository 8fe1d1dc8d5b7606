"""DisPFL: decentralized personalized sparse training, as its reference code runs it.

Dai, Shen, He, Tian, Tao, "DisPFL: Towards Communication-Efficient Personalized Federated Learning via
Decentralized Sparse Training" (ICML 2022); reference code github.com/rong-dai/DisPFL
(fedml_api/standalone/DisPFL/dispfl_api.py: `train`, `_benefit_choose`, `_aggregate_func`; client.py: `train`,
`fire_mask`, `regrow_mask`; my_model_trainer.py: `init_masks`, `calculate_sparsities`, `screen_gradients`, `train`;
fedml_experiments/standalone/DisPFL/main_dispfl.py and cifar10.sh for the defaults). There is no global model:

1. Client k keeps a sparse model v_k, the mask it was trained under (m'_k, the reference's `mask_pers_shared`) and
   its current mask m_k (`mask_pers_local`). At first v_k = w_0 ⊙ m_k and m'_k = m_k, with ERK densities and a
   different random mask per client (the published script's `--different_initial`; `shared_init_mask` gives the
   code's default of one mask for all).
2. Each round client k picks its neighbours: `neighbours` clients uniformly from the K - 1 others ("random", the
   script's `--cs random`, N = frac * K) or its two ring neighbours k - 1, k + 1 ("ring"). It reads their models
   and masks as they were at the start of the round, with its own.
3. Coordinate-wise masked average over itself and its neighbours: each weight is the plain mean of the models
   whose mask m' covers it (0 where none does), then restricted to m_k (`_aggregate_func`).
4. Local training from there under m_k (masked gradients here; the reference multiplies the weights by the mask
   after each step, the same for plain SGD).
5. Next mask (`fire_mask`, `regrow_mask`): drop ceil(rate * active) smallest |weight| per masked leaf, grow as many
   among the inactive (just dropped included) by largest |dense gradient| of one batch at the trained model (the
   code's default) or uniformly at random (the published script's `--dis_gradient_check`, `regrow="random"`), with
   rate = alpha / 2 * (1 + cos(pi * t / T)) (`anneal_factor` alpha = 0.5, T = the rounds). These are FedSpa's rules,
   `mask_update.prune_and_regrow` and `cosine_prune_rate`.
6. Store: v_k = the trained model, m'_k = the mask it trained under, m_k = the new mask.

Scored as the reference scores its clients (`old_mask_test_acc`, "after local training"): each client's trained
model v_k under m'_k (protocol "local"). Before it first trains, that is w_0 ⊙ m_k.

Where this differs from the reference, and why:
- Who trains: the reference trains all K clients every round (its `active` flag only stops a client from
  aggregating). Here the round trains the `clients_per_round` it samples; with clients_per_round = K every client
  trains every round, as in the reference. A sampled client's neighbours are drawn from all K clients, sampled or
  not, and a neighbour is read through its stored model: the model it trained last (or w_0 ⊙ m if never), under the
  mask it trained it with, exactly what the reference reads from a client in its round-start snapshot.
- The reference's `client_num_per_round` = K case (everyone is a neighbour) is `neighbours = K - 1`.
- Masks leave 1-D leaves (biases, norm scales) dense, as for FedSpa; the reference's ERK covers biases too, where
  their raw ERK probability (1 for a vector) almost always makes them dense anyway.
- Local training uses the library's optimizer settings; the reference's trainer always clips the gradient norm to
  10, so that is DisPFL's default `clip_norm` here.

Communication (exact, in the library's message model): each sampled client receives its N neighbours' sparse models
(values under m' plus the mask), `values_down` [S, N, L], and publishes its trained model once (values under the mask
it trained with, plus that mask), `values_up` [S, L].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, check_positive_int
from fedspa_jax.algorithms.fedspa import check_mask_schedule, make_densities
from fedspa_jax.client import ClientData, batch_gradient, local_train
from fedspa_jax.evaluation import Personal
from fedspa_jax.mask_update import cosine_prune_rate, prune_and_regrow
from fedspa_jax.models import flops
from fedspa_jax.population import sample_cohort
from fedspa_jax.round import ClientOutput
from fedspa_jax.server import aggregate_masked_mean

TOPOLOGIES = ("random", "ring")
# The reference's neighbour count is frac * K with frac = 0.1 (main_dispfl.py, cifar10.sh).
DEFAULT_NEIGHBOUR_SHARE = 0.1
# The reference's trainer clips every step's gradient to this norm (my_model_trainer.py).
REFERENCE_CLIP_NORM = 10.0


class DisPFLState(NamedTuple):
  """One client's persistent state (leaves [K, ...] in the store).

  Attributes:
    mask: m_k, the mask it trains with next (bool, params structure).
    trained_mask: m'_k, the mask its model was trained under (what its neighbours' averages count).
    local: v_k, its sparse model (zero outside `trained_mask`; the name `client_stats` reads local models by).
  """

  mask: Any
  trained_mask: Any
  local: Any


def resolve_neighbours(neighbours: int | None, topology: str, num_clients: int) -> int:
  """N, the neighbours each client reads: 2 on a ring, else `neighbours` (default: 10% of K, at least 1)."""
  if topology == "ring":
    return 2
  if neighbours is None:
    return min(max(1, int(DEFAULT_NEIGHBOUR_SHARE * num_clients)), num_clients - 1)
  return neighbours


def make_neighbours(num_clients: int, neighbours: int, topology: str):
  """(key, ids [L]) -> int32 [L, N]: each client's neighbours (never itself), client k's drawn from fold_in(key, k).

  "random": N distinct clients uniformly from the K - 1 others (the reference's `_benefit_choose` with
  cs="random"); "ring": k - 1 and k + 1 modulo K (cs="ring"; with K = 2 both are the other client, counted twice
  as in the reference).
  """

  def of(key, k):
    if topology == "ring":
      return jnp.stack([(k - 1) % num_clients, (k + 1) % num_clients]).astype(jnp.int32)
    others = sample_cohort(jax.random.fold_in(key, k), num_clients - 1, neighbours)
    return others + (others >= k).astype(jnp.int32)  # skip k itself

  return lambda key, ids: jax.vmap(of, in_axes=(None, 0))(key, ids)


def neighbourhood_average(own: DisPFLState, peers: DisPFLState) -> Any:
  """The reference's `_aggregate_func`: per weight, the plain mean of the models (own and neighbours') whose
  trained mask covers it (0 where none does), restricted to the client's current mask.

  Args:
    own: the client's state (leaves [...]).
    peers: its neighbours' states (leaves [N, ...]).
  """
  stack = lambda a, b: jnp.concatenate([a[None], b], axis=0)
  models = jax.tree.map(stack, own.local, peers.local)
  covers = jax.tree.map(stack, own.trained_mask, peers.trained_mask)
  ones = jnp.ones((jax.tree.leaves(covers)[0].shape[0],), jnp.float32)
  return masks.apply_mask(aggregate_masked_mean(models, covers, ones), own.mask)


def dispfl(
    *,
    model: nn.Module,
    density: float = 0.5,
    density_rule: str = "erk",
    alpha: float = 0.5,
    t_end: int | None = None,
    regrow: str = "gradient",
    neighbours: int | None = None,
    topology: str = "random",
    update_masks: bool = True,
    shared_init_mask: bool = False,
    **common: Any,
) -> Algorithm:
  """Builds DisPFL as its reference code runs it (see the module docstring).

  Args:
    model: the flax model.
    density: each client's density (the reference's `dense_ratio`, 0.5).
    density_rule: "erk" (reference default) or "uniform" (its `--uniform`).
    alpha: initial prune rate of the cosine schedule (`anneal_factor`, 0.5).
    t_end: the round the prune rate reaches 0 (default: `rounds`, the reference's `comm_round`).
    regrow: "gradient" (the code's default) or "random" (the published script's `--dis_gradient_check`).
    neighbours: N for topology "random" (default: 10% of K, the reference's frac 0.1; at most K - 1).
    topology: "random" or "ring" (the reference's `--cs`).
    update_masks: False keeps every client's mask fixed (the reference's `--static`).
    shared_init_mask: one initial mask for every client (the code's default; the script draws different ones).
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "uniform" (the average is
      unweighted) and `clip_norm` to 10 (the reference's trainer).

  Returns:
    An `Algorithm` whose client state is a `DisPFLState`; the server model is w_0 and never changes.
  """
  common = Common.with_defaults(common, weighting="uniform", clip_norm=REFERENCE_CLIP_NORM)
  t_end = check_mask_schedule(density, density_rule, alpha, t_end, regrow, common.rounds)
  if topology not in TOPOLOGIES:
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
  if neighbours is not None:
    if topology == "ring":
      raise ValueError('neighbours is fixed at 2 for topology="ring"; leave it unset')
    check_positive_int("neighbours", neighbours)
  densities_of = lambda params: make_densities(params, density, density_rule)
  apply_fn = lambda params, x: model.apply({"params": params}, x)

  def make_peers(num_clients):
    if num_clients < 2:
      raise ValueError(f"DisPFL needs at least 2 clients to have neighbours, got {num_clients}")
    n = resolve_neighbours(neighbours, topology, num_clients)
    if n > num_clients - 1:
      raise ValueError(f"neighbours must be at most K - 1 = {num_clients - 1}, got {n}")
    return make_neighbours(num_clients, n, topology)

  def init_clients(key, params, ids):
    client_masks = masks.init_client_masks(key, params, densities_of(params), ids=ids, shared=shared_init_mask)
    models = jax.vmap(masks.apply_mask, in_axes=(None, 0))(params, client_masks)
    return DisPFLState(mask=client_masks, trained_mask=client_masks, local=models)

  def make_client_fn(preprocess):
    def client_update(w, state, data: ClientData, key, round):
      own, peers = state
      k_train, k_grad, k_mask = jax.random.split(key, 3)
      x0 = neighbourhood_average(own, peers)
      kwargs = common.train_kwargs(round)
      result = local_train(x0, own.mask, data, k_train, apply_fn=apply_fn, preprocess=preprocess, **kwargs)
      new_mask = own.mask
      rate = cosine_prune_rate(round, alpha, t_end) if update_masks else jnp.zeros((), jnp.float32)
      if update_masks:

        def next_mask(_):
          grads = None
          if regrow == "gradient":
            grads = batch_gradient(result.params, data, k_grad, apply_fn=apply_fn, batch_size=kwargs["batch_size"],
                                   preprocess=preprocess)
          return prune_and_regrow(own.mask, result.params, grads, rate, k_mask, regrow)

        # The rate depends on the round alone (the same for the whole cohort): a real branch under vmap too.
        new_mask = jax.lax.cond(rate > 0, next_mask, lambda _: own.mask, None)
      metrics = {
          "loss": result.loss, "accuracy": result.accuracy, "steps": result.steps, "samples": result.samples,
          # Each neighbour's model (values under its trained mask, plus that mask); its own model published once.
          "values_down": jax.vmap(accounting.count_values)(peers.trained_mask),
          "values_up": accounting.count_values(own.mask),
      }
      return ClientOutput(
          update=jax.tree.map(jnp.zeros_like, w), coverage=None,
          state=DisPFLState(mask=new_mask, trained_mask=own.mask, local=result.params), metrics=metrics,
      )

    return client_update

  def client_state_bytes(params):
    """Bytes per leaf of one client's stored state: two masks over every leaf and the model's values."""
    every_leaf = jax.tree.map(lambda _: True, params)
    return 2 * accounting.state_bytes(params, mask_bits=every_leaf) + accounting.state_bytes(params, values=every_leaf)

  def account(params, metrics, real, round, sample_shape):
    clients = accounting.real_clients(metrics["cohort"], real)
    densities = densities_of(params)
    regrow_batch = common.batch_size if update_masks and regrow == "gradient" else 0
    # Host-side arithmetic on shapes, also while the round is traced: the model is traced once, nothing runs.
    cost = flops.training_flops(model, sample_shape, densities, regrow_batch=regrow_batch)
    rate = cosine_prune_rate(round, alpha, t_end) if update_masks else jnp.zeros((), jnp.float32)
    regrowing = jnp.sum(accounting.trained_clients(metrics, real)).astype(jnp.float32)
    regrowth = jnp.where(rate > 0, regrowing * cost.regrow, 0.0)
    down = jnp.where(clients[:, None, None], metrics["values_down"], 0)
    return {
        "values_down": down,
        "values_up": accounting.per_client(metrics["values_up"], clients),
        "client_state_bytes": client_state_bytes(params),
        "prune_rate": rate,
        **accounting.round_flops(
            cost.per_sample, cost.dense_per_sample, metrics["samples"], extra=regrowth
        ),
    }

  def personalize(w, state, train_k, key):
    del w, train_k, key
    return {"local": Personal(state.local, state.trained_mask)}

  hparams = dict(
      density=density, density_rule=density_rule, alpha=alpha, t_end=t_end, regrow=regrow, neighbours=neighbours,
      topology=topology, update_masks=update_masks, shared_init_mask=shared_init_mask,
  )
  return assemble(
      name="dispfl", hparams=hparams, model=model, common=common, init_clients=init_clients,
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: personalize, account=account,
      protocol="local", make_peers=make_peers,
      dp_refusal="its clients read their neighbours' own models, with no aggregate between them to clip and noise "
                 "(DP would need noise on every client's model: local DP, not built)",
  )
