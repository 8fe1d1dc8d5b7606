"""One client's local training as a pure function: masked optax steps over exactly the client's own samples.

Written for ONE client; the round vmaps it. A client's data are rows `offset : offset + count` of the flat
[N_total, ...] arrays (see `fedspa_jax.data.federated`). Every epoch visits each of the client's samples exactly
once, in an order given by a keyed pseudo-random permutation of [0, count) evaluated per position (`permute`): a
step costs O(batch) index work, never O(client size). The loop runs exactly `local_epochs * ceil(count / B)` steps
(or `local_steps`), a traced trip count: no step is computed past the client's data, and under vmap the lanes run
to the group's largest client only. Gradients and updated params are masked with `where`, so coordinates outside
the mask stay exactly 0 (sparse-to-sparse training).

Sequence data (y [N_total, L] next-token ids, token PAD = 0 padding, e.g. Shakespeare): a sample is one sequence.
Batches, epochs, step counts and the sample counts that weight aggregation count sequences, so a client's cost
follows its number of sequences as an image client's follows its images; the loss and the accuracy are taken over
the non-padding positions of those sequences (`weighted_loss`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedspa_jax.masks import apply_mask
from fedspa_jax.permute import permute

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class ClientData(NamedTuple):
  """One client's view of a flat split: x [N_total, ...] and y [N_total] (or [N_total, L] sequence labels) shared,
  offset [] and count [] its own; `work` [] (float32, optional) the share of its local steps it runs this round
  (a straggler's < 1, a client that never starts 0; None: all of them)."""

  x: jax.Array
  y: jax.Array
  offset: jax.Array
  count: jax.Array
  work: jax.Array | None = None


# How `ClientData` is vmapped over clients: the flat sample arrays are shared, offsets, counts and work per client.
CLIENT_DATA_AXES = ClientData(None, None, 0, 0, 0)


class TrainResult(NamedTuple):
  """Output of `local_train`: final params and per-client scalars (loss and accuracy over the labels seen: the
  samples, or for sequences their non-padding positions; `samples` counts samples, i.e. sequences)."""

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


PAD = 0  # the token id of padding in sequence labels: padded positions count in neither loss nor accuracy


def label_weights(y: jax.Array, weight: jax.Array) -> jax.Array:
  """Per-label weights: `weight` [B] for labels y [B]; for sequence labels y [B, L], weight x (y != PAD) [B, L]."""
  if y.ndim == 1:
    return weight
  return weight.reshape(weight.shape + (1,) * (y.ndim - 1)) * (y != PAD).astype(weight.dtype)


def weighted_loss(
    apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean softmax cross-entropy over the labels of samples with weight 1 (weight-0 samples are padding).

  For sequence labels y [B, L] every non-padding position (y != PAD) of a weight-1 sample is one label: the loss is
  their mean and `correct` counts the positions predicted right (next-token accuracy); padding positions count in
  neither.

  Args:
    apply_fn: (params, x [B, ...]) -> logits [B, C], or [B, L, C] for sequence labels.
    params: model params.
    x: [B, ...] inputs.
    y: [B] int labels, or [B, L] int token ids (PAD = 0 is padding).
    weight: [B] 0/1 sample weights.

  Returns:
    (loss, number of correct weighted labels, number of weighted labels) — for y [B] the last is sum(weight).
  """
  logits = apply_fn(params, x)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  scored = label_weights(y, weight)
  labels = jnp.sum(scored)
  correct = jnp.sum(scored * (jnp.argmax(logits, axis=-1) == y))
  return jnp.sum(scored * losses) / jnp.maximum(labels, 1.0), correct, labels


def steps_per_epoch(count: jax.Array, batch_size: int) -> jax.Array:
  """ceil(count / batch_size): a partial last batch is a step of its own."""
  return (count + batch_size - 1) // batch_size


def num_local_steps(
    count: jax.Array, batch_size: int, local_epochs: int | None, local_steps: int | None
) -> jax.Array:
  """A client's number of local steps: `local_epochs` passes over its own data, or `local_steps` (0 without data)."""
  count = jnp.asarray(count, jnp.int32)
  if local_steps is not None:
    return jnp.where(count > 0, jnp.int32(local_steps), 0)
  return jnp.int32(local_epochs) * steps_per_epoch(count, batch_size)


def scale_steps(steps: jax.Array, work: jax.Array | None) -> jax.Array:
  """round(work * steps): the steps a client that does the share `work` of its local work runs (None: all).

  A straggler's shorter loop is the same compiled loop with a smaller traced trip count: under vmap the lanes past
  their own count are masked, and a group of one stops early.
  """
  if work is None:
    return steps
  return jnp.round(jnp.asarray(work, jnp.float32) * steps.astype(jnp.float32)).astype(jnp.int32)


def draw_batch(
    data: ClientData, key: jax.Array, step: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The batch of local step `step`: positions of epoch `step // steps_per_epoch`'s permutation of the client's data.

  Returns:
    (x [B, ...], y [B] (or [B, L]), weight [B] float32: 1 for the batch's samples, 0 for the slots of a partial
    last batch, which re-read one of the client's samples so that no other client's or unused row enters the loss).
  """
  per_epoch = jnp.maximum(steps_per_epoch(data.count, batch_size), 1)
  epoch, index = step // per_epoch, step % per_epoch
  pos = index * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  weight = (pos < data.count).astype(jnp.float32)
  count = jnp.maximum(data.count, 1)
  local = permute(jnp.minimum(pos, count - 1), count, jax.random.fold_in(key, epoch))
  rows = jnp.clip(data.offset + local, 0, data.y.shape[0] - 1)
  return jnp.take(data.x, rows, axis=0), jnp.take(data.y, rows, axis=0), weight


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
    dense_clip_norm: float | None = None,
) -> TrainResult:
  """Local SGD of one client from `params` over its own data; coordinates outside `mask` stay exactly 0.

  Args:
    params: starting params (already m ⊙ w for sparse training).
    mask: bool pytree like params, or None for dense training.
    data: the client's view of the flat training split.
    key: PRNG key for batch order.
    apply_fn: (params, x) -> logits.
    optimizer: optax transformation (its state starts fresh every round).
    batch_size: samples per step.
    local_epochs: passes over the client's own data, if `local_steps` is None.
    local_steps: a fixed number of steps instead (cycling through the data epoch by epoch; 0 without data).
    preprocess: maps stored inputs to model inputs.
    trainable: bool pytree (per leaf: a bool or an array like the leaf); leaves or entries marked False are frozen
      (unchanged, though unlike masked entries not zeroed). None trains everything.
    regularizer: params -> scalar added to the loss (e.g. Ditto's proximal term); not part of the reported loss.
    dense_clip_norm: clip each step's gradient of every coordinate, the inactive ones included, to this global norm
      before it is masked (`Common.clip_mode="dense"`, as rong-dai/DisPFL's trainer does); None: no such clipping
      (a `clip_norm` in `optimizer` clips the masked gradient).

  Returns:
    A `TrainResult`; `steps` and `samples` count exactly the work done.
  """
  num_steps = scale_steps(num_local_steps(data.count, batch_size, local_epochs, local_steps), data.work)

  def objective(p, x, y, w):
    loss, correct, labels = weighted_loss(apply_fn, p, preprocess(x), y, w)
    penalty = regularizer(p) if regularizer is not None else 0.0
    return loss + penalty, (loss, correct, labels)

  loss_and_grad = jax.value_and_grad(objective, has_aux=True)
  mask_tree = apply_mask if mask is not None else (lambda tree, _: tree)
  if dense_clip_norm is None:
    clip = lambda grads: grads
  else:
    clip = lambda grads: optax.clip_by_global_norm(dense_clip_norm).update(grads, optax.EmptyState())[0]
  if trainable is None:
    freeze = lambda new, old: new
  else:
    freeze = lambda new, old: jax.tree.map(lambda n, o, t: jnp.where(t, n, o), new, old, trainable)

  def step(s, carry):
    p, opt_state, loss_sum, correct_sum, labels_sum, seen_sum = carry
    x, y, w = draw_batch(data, key, s, batch_size)
    (_, (loss, correct, labels)), grads = loss_and_grad(p, x, y, w)
    updates, opt_state = optimizer.update(mask_tree(clip(grads), mask), opt_state, p)
    p = freeze(mask_tree(optax.apply_updates(p, updates), mask), p)
    seen = jnp.sum(w)
    return p, opt_state, loss_sum + loss * labels, correct_sum + correct, labels_sum + labels, seen_sum + seen

  zero = jnp.zeros((), jnp.float32)
  params, _, loss_sum, correct_sum, labels, samples = jax.lax.fori_loop(
      0, num_steps, step, (params, optimizer.init(params), zero, zero, zero, zero)
  )
  denominator = jnp.maximum(labels, 1.0)
  return TrainResult(
      params=params,
      loss=loss_sum / denominator,
      accuracy=correct_sum / denominator,
      steps=num_steps,
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
  x, y, w = draw_batch(data, key, jnp.zeros((), jnp.int32), batch_size)
  return jax.grad(lambda p: weighted_loss(apply_fn, p, preprocess(x), y, w)[0])(params)
