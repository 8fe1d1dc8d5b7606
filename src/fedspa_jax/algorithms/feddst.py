"""FedDST: one sparse global model whose mask the clients readjust and the server aggregates by vote.

Bibikar, Vikalo, Wang, Chen, "Federated Dynamic Sparse Training: Computing Less, Communicating Less, Yet Learning
Better" (AAAI 2022); reference code github.com/bibikar/feddst (dst.py: the round loop, `Client.train`; models.py:
`layer_prune`, `layer_grow`, `_decay`, `_weights_by_layer`). The rules, as that code runs them:

1. The global mask m starts as the magnitude-pruned random init: per layer the largest |w_0| at the ERK target
   count of `density` (the reference's `--sparsity` 1 - density); w is zero outside m.
2. A sampled client starts from w ⊙ m and trains `local_epochs` under m.
3. In a readjustment round (rounds 1, 1 + `readjust_interval`, ...; reference `--rounds-between-readjustments` 10)
   with ratio r_t = a * a / 2 * (1 + cos(pi t / `t_end`)) > 0 (a = `readjustment_ratio` 0.5, `t_end` the reference's
   `--rate-decay-end`, default rounds // 2; the reference multiplies a by its `_decay(t, alpha=a)`), the client
   drops the r_t share of its active weights of smallest |w| per layer and grows as many by largest |gradient| of
   one batch at its trained model, grown weights starting at 0 (`layer_prune`, `layer_grow`). Here: FedSpa's
   `prune_and_regrow` with rate r_t.
4. It uploads its weights (zero outside its new mask m_k) and m_k.
5. Server: each weight becomes the sample-weighted mean of the uploaded weights over the clients whose mask keeps
   it; the new mask is the weights at least one client kept (`--min-votes` 0); biases are the sample-weighted mean.
   If the new mask is denser than the round's target density d_t (linear from `density` to `final_density` by
   `t_end`), every layer above its target count is magnitude-pruned down to it (`layer_prune`); w is zeroed outside.

Every client is scored with the global model w ⊙ m (`evaluate_global`; protocol "global").

Where this differs from the reference, and why:
- Per-layer counts come from the library's ERK (the one FedSpa and DisPFL use; 1-D leaves dense), where the
  reference normalizes its own ERK over weights and biases without capping a layer at density 1; the readjustment
  drops ceil(r_t * active) per layer (FedSpa's rule) where the reference prunes to the ERK count at density
  d(1 - r_t) and grows back to the count at d_t. With `final_density` = `density` (the reference default) the
  clients' counts never change here; a sparser final density is reached by the server's re-pruning alone.
- Growth picks among the inactive weights (RigL); the reference's `layer_grow` takes the top |gradient| over all
  weights, active ones included, so it can grow fewer than it pruned.
- The readjustment happens after the last local epoch (the reference readjusts at its epoch counter's
  `pruning_begin` + k `pruning_interval`, which with its defaults of 10 epochs, 9 and 10 is the last epoch).
- The cohort is sampled without replacement (the reference's `rng.choice` draws with replacement).
- The global mask lives in the server optimizer's state (`FedDSTServer`); clients get (w, m) through the round's
  `server_view`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedspa_jax import accounting, masks
from fedspa_jax.algorithms.base import Algorithm, Common, assemble, check_positive_int, make_apply_fn
from fedspa_jax.algorithms.dense import no_client_state
from fedspa_jax.algorithms.fedspa import DENSITY_RULES, make_densities
from fedspa_jax.client import ClientData, batch_gradient, local_train
from fedspa_jax.evaluation import Personal
from fedspa_jax.mask_update import check_rate, cosine_prune_rate, prune_and_regrow, prune_to_counts
from fedspa_jax.models import flops
from fedspa_jax.round import ClientOutput


class FedDSTServer(NamedTuple):
  """The server's own state (the server optimizer's state in `SimState.server.opt_state`).

  Attributes:
    mask: the global mask m (bool, params structure; 1-D leaves all True).
    round: int32 [], rounds aggregated so far.
  """

  mask: Any
  round: jax.Array



def personalize_global(view, state, train_k, key):
  """What a global-sparse method scores every client with: the server's model under its global mask, w ⊙ m
  (`server_view` hands the pair (params, mask)); also PruneFL's."""
  del state, train_k, key
  params, mask = view
  return {"global": Personal(masks.apply_mask(params, mask), mask)}

def readjustment_rate(round: Any, ratio: float, t_end: int) -> jax.Array:
  """r_t = ratio * ratio / 2 * (1 + cos(pi t / t_end)) before t_end, 0 after (dst.py: ratio * `_decay(t, ratio)`)."""
  return jnp.float32(ratio) * cosine_prune_rate(round, ratio, t_end)


def readjusts(round: Any, interval: int) -> jax.Array:
  """Whether round t readjusts masks: t = 1, 1 + interval, 1 + 2 interval, ... (dst.py: (t - 1) % interval == 0)."""
  return (jnp.asarray(round, jnp.int32) - 1) % interval == 0


def round_counts(start: Any, final: Any, round: Any, t_end: int) -> Any:
  """Per-leaf target counts at round t: linear from `start` to `final` by t_end (the reference interpolates the
  sparsity linearly; ERK counts are linear in it while no layer is capped)."""
  share = jnp.minimum(jnp.asarray(round, jnp.float32), t_end) / t_end
  return jax.tree.map(lambda a, b: jnp.round(a + (b - a) * share).astype(jnp.int32), start, final)


def make_server(start_counts: Any, final_counts: Any, t_end: int) -> optax.GradientTransformation:
  """FedDST's server step as an optax transformation over the aggregated {"values", "votes"} (see the module).

  `values` is the sample-weighted masked mean of U_k = w ⊙ m - x_k over the clients whose new mask keeps each weight,
  `votes` the sample-weighted share of clients keeping it; the returned update moves w to the new global model.
  """

  def init(params):
    return FedDSTServer(prune_to_counts(masks.dense_mask(params), params, start_counts), jnp.zeros((), jnp.int32))

  def update(delta, state, params):
    x0 = masks.apply_mask(params, state.mask)
    voted = jax.tree_util.tree_map_with_path(
        lambda path, v: v > 0 if masks.is_maskable(path, v) else jnp.ones(v.shape, bool), delta["votes"])
    new = jax.tree.map(lambda m, x, u: jnp.where(m, x - u, 0.0), voted, x0, delta["values"])
    targets = round_counts(start_counts, final_counts, state.round, t_end)
    kernels = [(m, c) for (path, m), c in zip(jax.tree_util.tree_flatten_with_path(voted)[0], jax.tree.leaves(targets))
               if masks.is_maskable(path, m)]
    denser = sum(jnp.sum(m, dtype=jnp.int32) for m, _ in kernels) > sum(c for _, c in kernels)
    pruned = prune_to_counts(voted, new, targets)
    mask = jax.tree.map(lambda a, b: jnp.where(denser, a, b), pruned, voted)
    new = masks.apply_mask(new, mask)
    return jax.tree.map(jnp.subtract, new, params), FedDSTServer(mask, state.round + 1)

  return optax.GradientTransformation(init, update)


def feddst(
    *,
    model: nn.Module,
    density: float = 0.9,
    final_density: float | None = None,
    density_rule: str = "erk",
    readjustment_ratio: float = 0.5,
    readjust_interval: int = 10,
    t_end: int | None = None,
    **common: Any,
) -> Algorithm:
  """Builds FedDST as its reference code runs it (see the module docstring).

  Args:
    model: the flax model.
    density: the global model's density (reference `--sparsity` 0.1: density 0.9; its paper's runs use 0.2).
    final_density: the density d_t reaches at `t_end` (reference `--final-sparsity`, default the same).
    density_rule: "erk" (reference default) or "uniform".
    readjustment_ratio: a, the readjustment ratio's scale (reference 0.5).
    readjust_interval: rounds between readjustments (reference 10).
    t_end: the round the readjustment ratio reaches 0 and d_t its final value (default rounds // 2, at least 1).
    **common: the shared hyperparameters (`base.Common`); `weighting` defaults to "samples" (the reference weighs
      clients by their training samples). `server_lr` must stay 1: the server replaces w.

  Returns:
    An `Algorithm` with no client state; the global mask is in `state.server.opt_state`.
  """
  common = Common.with_defaults(common, weighting="samples")
  masks.check_density(density)
  final_density = density if final_density is None else final_density
  masks.check_density(final_density)
  if density_rule not in DENSITY_RULES:
    raise ValueError(f"density_rule must be one of {DENSITY_RULES}, got {density_rule!r}")
  check_rate(readjustment_ratio, "readjustment_ratio")
  check_positive_int("readjust_interval", readjust_interval)
  t_end = max(1, common.rounds // 2) if t_end is None else t_end
  check_positive_int("t_end", t_end)
  if common.server_lr != 1.0:
    raise ValueError(f"FedDST's server replaces the global model: server_lr must be 1, got {common.server_lr!r}")
  apply_fn = make_apply_fn(model)
  counts_at = lambda params, d: masks.target_counts(params, make_densities(params, d, density_rule))
  forward_of = functools.lru_cache(lambda sample_shape: flops.forward_flops(model, sample_shape))

  def server_for(params):
    # Counts depend on the params' shapes only, so the server step is built once they are known.
    return make_server(counts_at(params, density), counts_at(params, final_density), t_end)

  server = optax.GradientTransformation(lambda params: server_for(params).init(params),
                                        lambda delta, state, params: server_for(params).update(delta, state, params))

  def make_client_fn(preprocess):
    def client_update(view, state, data: ClientData, key, round):
      del state
      params, mask = view
      k_train, k_grad, k_mask = jax.random.split(key, 3)
      x0 = masks.apply_mask(params, mask)
      kwargs = common.train_kwargs(round)
      result = local_train(x0, mask, data, k_train, apply_fn=apply_fn, preprocess=preprocess, **kwargs)
      rate = readjustment_rate(round, readjustment_ratio, t_end)
      readjust = readjusts(round, readjust_interval) & (rate > 0)

      def readjusted(_):
        grads = batch_gradient(result.params, data, k_grad, apply_fn=apply_fn, batch_size=kwargs["batch_size"],
                               preprocess=preprocess)
        return prune_and_regrow(mask, result.params, grads, rate, k_mask, "gradient")

      # The condition depends on the round alone (the same for the whole cohort): a real branch under vmap too.
      new_mask = jax.lax.cond(readjust, readjusted, lambda _: mask, None)
      trained = masks.apply_mask(result.params, new_mask)  # pruned weights zeroed, grown ones start at 0
      forward = forward_of(data.x.shape[1:])
      per_sample = accounting.mask_training_flops(forward, mask)  # 3 x the sparse forward
      # The regrowth gradient, as FedSpa's is counted (models.flops): sparse forward and input gradients, dense
      # weight gradients, over one batch.
      regrowth = kwargs["batch_size"] * (2.0 * per_sample / 3.0 + sum(forward.values()))
      metrics = {
          "loss": result.loss, "accuracy": result.accuracy, "steps": result.steps, "samples": result.samples,
          "flops": per_sample * result.samples + jnp.where(readjust, regrowth, 0.0),
          "values_down": accounting.count_values(mask),
          "values_up": accounting.count_values(new_mask),
          "readjusted": readjust.astype(jnp.int32),
      }
      every = jax.tree.map(lambda m: jnp.ones(m.shape, bool), new_mask)
      return ClientOutput(
          update={"values": jax.tree.map(jnp.subtract, x0, trained),
                  "votes": jax.tree.map(lambda m: m.astype(jnp.float32), new_mask)},
          coverage={"values": new_mask, "votes": every}, state=jnp.zeros((), jnp.int32), metrics=metrics,
      )

    return client_update

  def account(params, metrics, real, round, sample_shape):
    del round
    clients = accounting.real_clients(metrics["cohort"], real)
    dense = 3.0 * sum(forward_of(sample_shape).values())
    seen = jnp.sum(metrics["samples"]).astype(jnp.float32)  # 0 for padding and unstarted clients
    return {
        "values_down": accounting.per_client(metrics["values_down"], clients),
        "values_up": accounting.per_client(metrics["values_up"], clients),
        "client_state_bytes": accounting.state_bytes(params),
        "flops": jnp.sum(jnp.where(accounting.trained_clients(metrics, real), metrics["flops"], 0.0)),
        "flops_dense": dense * seen,
    }

  personalize = personalize_global
  hparams = dict(
      density=density, final_density=final_density, density_rule=density_rule,
      readjustment_ratio=readjustment_ratio, readjust_interval=readjust_interval, t_end=t_end,
  )
  return assemble(
      name="feddst", hparams=hparams, model=model, common=common, init_clients=no_client_state,
      make_client_fn=make_client_fn, make_personalize=lambda preprocess: personalize, account=account,
      aggregation="masked_mean", protocol="global",
      server_optimizer=server,
      server_view=lambda server: (server.params, server.opt_state.mask),
      # Under DP the values are clipped and noised; the votes are the clients' new masks, sent as they are (like
      # FedSpa's masks: not covered, docs/privacy.md), so the server's voting still sees 0/1 votes.
      dp_public=("votes",),
  )
