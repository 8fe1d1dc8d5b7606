"""Personalized evaluation: every client's own model on its own test data, vmapped over all clients.

Personalized FL is judged by the distribution over clients, not one pooled number, so `summarize` reports the mean,
std, p10, median, p90 and the mean of the worst 10% of clients.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedspa_jax.client import ApplyFn, ClientData

# (server params, client state, train data, key) -> the params client k is evaluated with
PersonalizeFn = Callable[[Any, Any, ClientData, jax.Array], Any]


def evaluate_client(
    apply_fn: ApplyFn,
    params: Any,
    data: ClientData,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    chunk_size: int = 256,
) -> dict[str, jax.Array]:
  """Loss and accuracy of `params` on the valid samples of one client's data (padding never counts).

  Args:
    apply_fn: (params, x) -> logits.
    params: the client's model.
    data: x [N_max, ...], y [N_max], count [].
    preprocess: maps stored inputs to model inputs.
    chunk_size: samples per forward pass (bounds memory).

  Returns:
    {"loss": [], "accuracy": [], "count": []}.
  """
  n_max = data.y.shape[0]
  chunk = min(chunk_size, n_max)
  chunks = math.ceil(n_max / chunk)
  pad = chunks * chunk - n_max
  x = jnp.pad(data.x, [(0, pad)] + [(0, 0)] * (data.x.ndim - 1)).reshape((chunks, chunk) + data.x.shape[1:])
  y = jnp.pad(data.y, (0, pad)).reshape((chunks, chunk))
  valid = (jnp.arange(chunks * chunk) < data.count).reshape((chunks, chunk))

  def one_chunk(args):
    xc, yc, vc = args
    logits = apply_fn(params, preprocess(xc))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, yc)
    return jnp.sum(jnp.where(vc, losses, 0.0)), jnp.sum(vc & (jnp.argmax(logits, -1) == yc))

  losses, correct = jax.lax.map(one_chunk, (x, y, valid))
  count = jnp.maximum(data.count, 1).astype(jnp.float32)
  return {"loss": jnp.sum(losses) / count, "accuracy": jnp.sum(correct) / count, "count": data.count}


def summarize(values: jax.Array) -> dict[str, jax.Array]:
  """Distribution of a per-client metric [K]: mean, std, p10, median, p90, worst10 (mean of the lowest 10%)."""
  k = values.shape[0]
  worst = max(1, math.ceil(0.1 * k))
  return {
      "mean": jnp.mean(values),
      "std": jnp.std(values),
      "p10": jnp.percentile(values, 10),
      "median": jnp.median(values),
      "p90": jnp.percentile(values, 90),
      "worst10": jnp.mean(jnp.sort(values)[:worst]),
  }


def make_evaluate(
    personalize: PersonalizeFn,
    apply_fn: ApplyFn,
    *,
    clients_per_batch: int = 16,
    chunk_size: int = 256,
) -> Callable[[Any, Any, Any, Any, Callable], dict[str, Any]]:
  """Builds evaluate(server_params, clients, train, test, key, preprocess) over all K clients.

  Clients are processed `clients_per_batch` at a time (vmapped within a batch, `lax.map` across batches) so that
  memory stays bounded for large K.

  Returns:
    A function returning {"accuracy": [K], "loss": [K], "count": [K], "accuracy_summary": {...},
    "loss_summary": {...}}.
  """

  def evaluate(server_params, clients, train, test, key, preprocess):
    num_clients = test.y.shape[0]

    def one(args):
      client_state, train_k, test_k, k = args
      params = personalize(server_params, client_state, ClientData(*train_k), jax.random.fold_in(key, k))
      return evaluate_client(apply_fn, params, ClientData(*test_k), preprocess=preprocess, chunk_size=chunk_size)

    ids = jnp.arange(num_clients, dtype=jnp.int32)
    args = (clients, (train.x, train.y, train.count), (test.x, test.y, test.count), ids)
    out = jax.lax.map(one, args, batch_size=min(clients_per_batch, num_clients))
    return {
        **out,
        "accuracy_summary": summarize(out["accuracy"]),
        "loss_summary": summarize(out["loss"]),
    }

  return evaluate
