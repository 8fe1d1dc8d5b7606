"""One client's local training as a pure function: masked optax steps in `lax.scan` over static shapes.

Written for ONE client; the round vmaps it. The client's data are padded to N_max samples with `count` valid ones
first. Batches are drawn in-graph from a per-epoch permutation that puts the valid samples first, so padding never
enters a loss: a partial last batch weighs its padding 0, and a step whose batch would start past `count` is a
no-op (params and optimizer state are left unchanged). Gradients and updated params are masked with `where`, so
coordinates outside the mask stay exactly 0 (sparse-to-sparse training).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedspa_jax.masks import apply_mask

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class ClientData(NamedTuple):
  """One client's padded samples: x [N_max, ...], y [N_max] int32, count [] int32 (valid samples come first)."""

  x: jax.Array
  y: jax.Array
  count: jax.Array


class TrainResult(NamedTuple):
  """Output of `local_train`: final params and per-client scalars (loss and accuracy over the samples seen)."""

  params: Params
  loss: jax.Array
  accuracy: jax.Array
  steps: jax.Array
  samples: jax.Array


def make_preprocess(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Callable[[jax.Array], jax.Array]:
  """Turns stored inputs into model inputs: uint8 images -> [0, 1] -> (x - mean) / std; floats pass through."""

  def preprocess(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255.0
      if mean is not None:
        channels = (1,) * (x.ndim - 1) + (-1,)  # explicit broadcast over [..., C]
        x = (x - jnp.asarray(mean, jnp.float32).reshape(channels)) / jnp.asarray(std, jnp.float32).reshape(channels)
      return x
    return x.astype(jnp.float32)

  return preprocess


def weighted_loss(
    apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy over samples with weight 1 (weight-0 samples are padding).

  Args:
    apply_fn: (params, x [B, ...]) -> logits [B, C] (inputs already preprocessed).
    params: model params.
    x: [B, ...] inputs.
    y: [B] int labels.
    weight: [B] 0/1 sample weights.

  Returns:
    (loss, number of correct weighted predictions).
  """
  logits = apply_fn(params, x)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  total = jnp.maximum(jnp.sum(weight), 1.0)
  correct = jnp.sum(weight * (jnp.argmax(logits, axis=-1) == y))
  return jnp.sum(weight * losses) / total, correct


def num_local_steps(max_count: int, batch_size: int, local_epochs: int | None, local_steps: int | None) -> int:
  """Static number of scan steps: `local_steps`, or `local_epochs` passes over the largest client's data."""
  if local_steps is not None:
    return int(local_steps)
  return int(local_epochs) * math.ceil(max_count / batch_size)


def draw_batch(
    data: ClientData, key: jax.Array, step: jax.Array, batch_size: int, steps_per_epoch: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The batch of local step `step`: a slice of epoch `step // steps_per_epoch`'s valid-first permutation.

  Returns:
    (x [B, ...], y [B], weight [B] float32 with 0 on padding, active: whether the batch holds any valid sample).
  """
  n_max = data.y.shape[0]
  epoch, index = step // steps_per_epoch, step % steps_per_epoch
  valid = jnp.arange(n_max) < data.count
  scores = jnp.where(valid, jax.random.uniform(jax.random.fold_in(key, epoch), (n_max,)), 2.0)
  perm = jnp.argsort(scores)
  pos = index * batch_size + jnp.arange(batch_size)
  # A slot past the client's data re-reads a valid sample with weight 0, so padding values (even nan) never
  # enter the computation.
  idx = perm[jnp.clip(jnp.minimum(pos, data.count - 1), 0, n_max - 1)]
  weight = (pos < data.count).astype(jnp.float32)
  return data.x[idx], data.y[idx], weight, index * batch_size < data.count


def local_train(
    params: Params,
    mask: Any | None,
    data: ClientData,
    key: jax.Array,
    *,
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
    trainable: Any | None = None,
    regularizer: Callable[[Params], jax.Array] | None = None,
) -> TrainResult:
  """Local SGD of one client from `params` over its own data; coordinates outside `mask` stay exactly 0.

  Args:
    params: starting params (already m ⊙ w for sparse training).
    mask: bool pytree like params, or None for dense training.
    data: the client's padded data.
    key: PRNG key for batch order.
    apply_fn: (params, x) -> logits.
    optimizer: optax transformation (its state starts fresh every round).
    batch_size: samples per step.
    local_epochs: passes over the client's own data (steps past its data are no-ops), if `local_steps` is None.
    local_steps: a fixed number of steps instead (cycling through the data epoch by epoch).
    preprocess: maps stored inputs to model inputs.
    trainable: bool pytree (per leaf: a bool or an array like the leaf); leaves or entries marked False are frozen
      (unchanged, though unlike masked entries not zeroed). None trains everything.
    regularizer: params -> scalar added to the loss (e.g. Ditto's proximal term); not part of the reported loss.

  Returns:
    A `TrainResult`.
  """
  n_max = data.y.shape[0]
  num_steps = num_local_steps(n_max, batch_size, local_epochs, local_steps)
  if local_steps is None:
    steps_per_epoch = jnp.asarray(math.ceil(n_max / batch_size), jnp.int32)
  else:
    steps_per_epoch = jnp.maximum((data.count + batch_size - 1) // batch_size, 1)
  def objective(p, x, y, w):
    loss, correct = weighted_loss(apply_fn, p, preprocess(x), y, w)
    penalty = regularizer(p) if regularizer is not None else 0.0
    return loss + penalty, (loss, correct)

  loss_and_grad = jax.value_and_grad(objective, has_aux=True)
  mask_tree = apply_mask if mask is not None else (lambda tree, _: tree)
  if trainable is None:
    freeze = lambda new, old: new
  else:
    freeze = lambda new, old: jax.tree.map(lambda n, o, t: jnp.where(t, n, o), new, old, trainable)

  def step(carry, s):
    p, opt_state = carry
    x, y, w, active = draw_batch(data, key, s, batch_size, steps_per_epoch)
    (_, (loss, correct)), grads = loss_and_grad(p, x, y, w)
    updates, new_opt_state = optimizer.update(mask_tree(grads, mask), opt_state, p)
    new_p = freeze(mask_tree(optax.apply_updates(p, updates), mask), p)
    keep = lambda new, old: jnp.where(active, new, old)
    carry = (jax.tree.map(keep, new_p, p), jax.tree.map(keep, new_opt_state, opt_state))
    seen = jnp.where(active, jnp.sum(w), 0.0)
    return carry, (loss * seen, correct * active, seen, active)

  (params, _), (losses, correct, seen, active) = jax.lax.scan(
      step, (params, optimizer.init(params)), jnp.arange(num_steps)
  )
  samples = jnp.sum(seen)
  denominator = jnp.maximum(samples, 1.0)
  return TrainResult(
      params=params,
      loss=jnp.sum(losses) / denominator,
      accuracy=jnp.sum(correct) / denominator,
      steps=jnp.sum(active, dtype=jnp.int32),
      samples=samples.astype(jnp.int32),
  )


def batch_gradient(
    params: Params,
    data: ClientData,
    key: jax.Array,
    *,
    apply_fn: ApplyFn,
    batch_size: int,
    preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
) -> Params:
  """Dense gradient (every coordinate, masked or not) of the loss on one random batch of the client's own data."""
  x, y, w, _ = draw_batch(data, key, jnp.zeros((), jnp.int32), batch_size, jnp.ones((), jnp.int32))
  return jax.grad(lambda p: weighted_loss(apply_fn, p, preprocess(x), y, w)[0])(params)
