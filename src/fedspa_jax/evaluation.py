"""Personalized evaluation: every client's own model on its own test data, in memory-bounded groups of clients.

Personalized FL is judged by the distribution over clients, not one pooled number, so `summarize` reports the mean,
std, p10, median, p90 and the mean of the worst 10% of clients. Clients without test samples have no accuracy: they
get NaN in the per-client arrays, are left out of every summary, and are counted (`with_test_data`). So are
diverged clients: a client with test data whose model scores a non-finite loss gets NaN accuracy and loss, is left
out of the summaries and counted (`diverged`); the run loop stops on it. Each evaluation also reports
participation (clients sampled in at least one round) and the summaries over the participating clients beside
those over all evaluated clients, so short runs do not hide clients that never trained.

The protocol (DESIGN.md, "Evaluation"): each algorithm says which model(s) a client is scored with (`Personal`,
by name: FedSpa's "masked_global" m_k ⊙ w, FedAvg's "global" w, Ditto's and Local's "own" models, ...); the first
is the method's protocol ("accuracy", "loss"), any others are reported beside it ("accuracy_<name>"). With
`finetune_epochs` E > 0, each evaluated client first trains E local epochs from each of those models on its own
training data (its own optimizer and batch size; a sparse model keeps its mask, so zeros stay zero), and is scored
on the result: local adaptation, the same for every method. The evaluation's FLOPs (fine-tuning at 3x forward per
sample, plus the test forward passes) are reported as "flops", apart from training's.

Sequence data (y [N, L], token 0 = padding) are scored per non-padding position (`evaluate_client`); "count" stays
the number of test samples (sequences), and the FLOPs count whole sequences, padding included (it is computed).

Cost follows the test samples: clients are sorted by test size and evaluated `clients_per_batch` at a time
(vmapped within a group, `lax.map` across groups); a client's samples are read from the flat test split in chunks,
exactly as many chunks as its own data need.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedspa_jax.client import ApplyFn, ClientData, label_weights


class Personal(NamedTuple):
  """A model a client is scored with, and the mask that stays fixed if it is fine-tuned (None: dense).

  `trained_round` (int32 [], optional): for a model a client trained and kept (FedSpa's "local"), the number of
  rounds done when it was trained (0: never; such a client is scored with another model); the evaluation reports
  the models' ages from it (`staleness`).
  """

  params: Any
  mask: Any | None = None
  trained_round: Any | None = None


# (server params, client state, train data, key) -> {protocol name: Personal}, the method's own protocol first
PersonalizeFn = Callable[[Any, Any, ClientData, jax.Array], dict[str, Personal]]
# (Personal, train data, key) -> (fine-tuned params, samples trained on)
FinetuneFn = Callable[[Personal, ClientData, jax.Array], tuple[Any, jax.Array]]
# Personal -> forward FLOPs of one sample through it
ForwardFlopsFn = Callable[[Personal], jax.Array]


def evaluate_client(
    apply_fn: ApplyFn,
    params: Any,
    data: ClientData,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    chunk_size: int = 256,
) -> dict[str, jax.Array]:
  """Loss and accuracy of `params` on one client's samples (NaN when it has none).

  Sequence labels (y [N_total, L], token 0 = padding) are scored per position: the loss is the mean over the
  client's non-padding positions and the accuracy is correct positions / non-padding positions (next-token
  accuracy), so every position of the client weighs the same whichever sequence holds it.

  Args:
    apply_fn: (params, x) -> logits.
    params: the client's model.
    data: the client's view of a flat split (x [N_total, ...], y [N_total] or [N_total, L], offset [], count []).
    preprocess: maps stored inputs to model inputs.
    chunk_size: samples per forward pass (bounds memory); ceil(count / chunk_size) passes are run.

  Returns:
    {"loss": [], "accuracy": [], "count": []}; count is the number of samples (sequences), not positions.
  """
  last = data.y.shape[0] - 1
  sequences = data.y.ndim > 1

  def one_chunk(c, totals):
    loss_sum, correct_sum, labels_sum = totals
    pos = c * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
    valid = pos < data.count
    rows = jnp.clip(data.offset + jnp.minimum(pos, jnp.maximum(data.count - 1, 0)), 0, last)
    y = jnp.take(data.y, rows, axis=0)
    logits = apply_fn(params, preprocess(jnp.take(data.x, rows, axis=0)))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if sequences:
      scored = label_weights(y, valid.astype(jnp.float32)) > 0
      labels_sum = labels_sum + jnp.sum(scored, dtype=jnp.int32)
    else:
      scored = valid
    correct = scored & (jnp.argmax(logits, -1) == y)
    return (loss_sum + jnp.sum(jnp.where(scored, losses, 0.0)), correct_sum + jnp.sum(correct, dtype=jnp.int32),
            labels_sum)

  chunks = (data.count + chunk_size - 1) // chunk_size
  zero = jnp.zeros((), jnp.int32)
  loss_sum, correct, labels = jax.lax.fori_loop(0, chunks, one_chunk, (jnp.zeros((), jnp.float32), zero, zero))
  count = (labels if sequences else data.count).astype(jnp.float32)
  nan = jnp.full((), jnp.nan, jnp.float32)
  return {
      "loss": jnp.where(data.count > 0, loss_sum / jnp.maximum(count, 1.0), nan),
      "accuracy": jnp.where(data.count > 0, correct / jnp.maximum(count, 1.0), nan),
      "count": data.count,
  }


def summarize(values: jax.Array, valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Distribution over the valid clients of a per-client metric [C]: mean, std, p10, median, p90, worst10.

  Args:
    values: [C] per-client values.
    valid: [C] bool, which clients count (default: those whose value is not NaN).

  Returns:
    Scalars; worst10 is the mean of the lowest ceil(10%) of the valid values. All NaN when no client is valid.
  """
  valid = ~jnp.isnan(values) if valid is None else valid & ~jnp.isnan(values)
  kept = jnp.where(valid, values, jnp.nan)
  n = jnp.sum(valid)
  worst = jnp.maximum(1, jnp.ceil(0.1 * n).astype(jnp.int32))
  lowest_first = jnp.sort(jnp.where(valid, values, jnp.inf))
  in_worst = jnp.arange(values.shape[0]) < worst
  nan = jnp.full((), jnp.nan, jnp.float32)
  return {
      "mean": jnp.nanmean(kept),
      "std": jnp.nanstd(kept),
      "p10": jnp.nanpercentile(kept, 10),
      "median": jnp.nanmedian(kept),
      "p90": jnp.nanpercentile(kept, 90),
      "worst10": jnp.where(n > 0, jnp.sum(jnp.where(in_worst, lowest_first, 0.0)) / worst, nan),
  }


def make_evaluate_clients(
    personalize: PersonalizeFn,
    apply_fn: ApplyFn,
    *,
    clients_per_batch: int = 16,
    chunk_size: int = 256,
    finetune: FinetuneFn | None = None,
    forward_flops: ForwardFlopsFn | None = None,
) -> Callable[..., dict[str, jax.Array]]:
  """Builds evaluate_clients(server_params, gather_state, rows, ids, held, train, test, key, preprocess).

  Evaluates the clients at `rows` [C] of the given splits and store (`gather_state(rows [G])` decodes one group's
  state at a time); `ids` [C] are their global ids (client k personalizes and fine-tunes with `fold_in(key, k)`);
  clients not `held` [C] (bool) here are treated as having no data (no steps, NaN), so a device can run a list of
  clients of which it holds only some. `finetune` (None: score as personalized) adapts each model first;
  `forward_flops` (None: no "flops") costs it.

  Returns:
    {"loss", "accuracy" (NaN without test data or diverged), "count", "client_diverged" (bool), "flops" (with
    `forward_flops`), "loss_<name>" and "accuracy_<name>" for every further protocol}, each [C] in the order of
    `rows`.
  """

  def evaluate_clients(server_params, gather_state, rows, ids, held, train, test, key, preprocess):
    num = rows.shape[0]
    group = min(clients_per_batch, num)
    groups = -(-num // group)
    chunk = max(1, min(chunk_size, test.max_count))
    test_count = jnp.where(held, jnp.take(test.count, rows, mode="clip"), 0)
    # Largest test sets first, so a group's lanes need similar numbers of chunks; padding slots hold nothing.
    order = jnp.argsort(-test_count, stable=True)
    pad = lambda a, v: jnp.concatenate([a[order], jnp.full((groups * group - num,), v, a.dtype)])
    lanes = (pad(rows, 0), pad(ids, 0), pad(held, False))

    def one(state_k, row, k, here):
      def view(split):
        return ClientData(split.x, split.y, jnp.take(split.offset, row, mode="clip"),
                          jnp.where(here, jnp.take(split.count, row, mode="clip"), 0))

      train_k, test_k, key_k = view(train), view(test), jax.random.fold_in(key, k)
      out, flops = {}, jnp.zeros((), jnp.float32)
      for i, (name, personal) in enumerate(personalize(server_params, state_k, train_k, key_k).items()):
        params, tuned = personal.params, jnp.zeros((), jnp.int32)
        if finetune is not None:
          params, tuned = finetune(personal, train_k, key_k)
        scored = evaluate_client(apply_fn, params, test_k, preprocess=preprocess, chunk_size=chunk)
        diverged = (test_k.count > 0) & ~jnp.isfinite(scored["loss"])
        nan = jnp.full((), jnp.nan, jnp.float32)
        suffix = "" if i == 0 else f"_{name}"
        out[f"loss{suffix}"] = jnp.where(diverged, nan, scored["loss"])
        out[f"accuracy{suffix}"] = jnp.where(diverged, nan, scored["accuracy"])
        if i == 0:
          out.update(count=scored["count"], client_diverged=diverged)
          if personal.trained_round is not None:
            out["trained_round"] = jnp.asarray(personal.trained_round, jnp.int32)
        if forward_flops is not None:
          flops += forward_flops(personal) * (test_k.count + 3 * tuned).astype(jnp.float32)
      if forward_flops is not None:
        out["flops"] = flops
      return out

    def run_group(lane):
      rows_g, ids_g, held_g = lane
      return jax.vmap(one)(gather_state(rows_g), rows_g, ids_g, held_g)

    out = jax.lax.map(run_group, jax.tree.map(lambda a: a.reshape(groups, group), lanes))
    unsort = jnp.argsort(order)
    return jax.tree.map(lambda a: a.reshape((groups * group,) + a.shape[2:])[:num][unsort], out)

  return evaluate_clients


def protocol_names(out: dict[str, Any]) -> list[str]:
  """The further protocols per-client results `out` hold ("accuracy_<name>" [C] beside "accuracy")."""
  return [k[len("accuracy_"):] for k in out if k.startswith("accuracy_") and not k.endswith("summary")
          and not k.endswith("_participating")]


def summaries(ids: jax.Array, out: dict[str, jax.Array], participated: jax.Array) -> dict[str, Any]:
  """The evaluation's result from per-client `out` (loss, accuracy, count, client_diverged [C], further protocols' loss
  and accuracy, flops) and participation [C] (bool)."""
  result = {
      "clients": ids,
      **{k: v for k, v in out.items() if k != "flops"},
      "participated": participated,
      "accuracy_summary": summarize(out["accuracy"]),
      "loss_summary": summarize(out["loss"]),
      "accuracy_summary_participating": summarize(out["accuracy"], participated),
      "loss_summary_participating": summarize(out["loss"], participated),
      "evaluated": jnp.int32(ids.shape[0]),
      "with_test_data": jnp.sum(out["count"] > 0, dtype=jnp.int32),
      "diverged": jnp.sum(out["client_diverged"], dtype=jnp.int32),
      "participating": jnp.sum(participated, dtype=jnp.int32),
  }
  for name in protocol_names(out):
    result[f"accuracy_{name}_summary"] = summarize(out[f"accuracy_{name}"])
    result[f"loss_{name}_summary"] = summarize(out[f"loss_{name}"])
  if "flops" in out:
    result["flops"] = jnp.sum(out["flops"])
  return result


def staleness(trained_round: jax.Array, round: jax.Array) -> dict[str, jax.Array]:
  """Ages in rounds of the kept models an evaluation after `round` rounds scores (`Personal.trained_round`).

  A model trained in the last round done has age 0. With partial participation a client's kept model is as old as
  the rounds since it was last sampled (about K / S - 1 on average at S of K per round), while a method whose
  clients all train every round (as in rong-dai/DisPFL) scores models of age 0: compare such methods knowing that.

  Args:
    trained_round: int32 [C] per evaluated client, 0 for a client that never trained (left out: it is scored with
      another model).
    round: the rounds done (the state's round counter).

  Returns:
    {"mean": float32 (NaN when no client trained), "max": int32 (0 then), "scored": int32, the clients counted}.
  """
  scored = trained_round > 0
  age = jnp.asarray(round, jnp.int32) - trained_round
  n = jnp.sum(scored, dtype=jnp.int32)
  total = jnp.sum(jnp.where(scored, age, 0)).astype(jnp.float32)
  return {
      "mean": jnp.where(n > 0, total / jnp.maximum(n, 1).astype(jnp.float32), jnp.nan),
      "max": jnp.max(jnp.where(scored, age, 0)),
      "scored": n,
  }


def with_staleness(result: dict[str, Any], round: jax.Array) -> dict[str, Any]:
  """`result` with its "staleness" (`staleness`) when its clients' models carry `trained_round`."""
  if "trained_round" not in result:
    return result
  return {**result, "staleness": staleness(result["trained_round"], round)}


def make_evaluate(
    personalize: PersonalizeFn,
    apply_fn: ApplyFn,
    *,
    clients_per_batch: int = 16,
    chunk_size: int = 256,
    finetune: FinetuneFn | None = None,
    forward_flops: ForwardFlopsFn | None = None,
) -> Callable[..., dict[str, Any]]:
  """Builds evaluate(server_params, gather_state, ids, participation, train, test, key, preprocess) on one device.

  `gather_state(ids [G])` returns those clients' decoded state; only one group's state is decoded at a time.

  Returns:
    A function returning, for the clients `ids` [C] (in that order): "clients" [C], "accuracy" [C], "loss" [C]
    (NaN without test data or diverged), "count" [C], "client_diverged" [C] bool, "participated" [C] bool;
    "accuracy_summary" / "loss_summary" over the clients with test data that did not diverge;
    "accuracy_summary_participating" / "loss_summary_participating" over those that also took part in a round;
    the numbers "evaluated", "with_test_data", "diverged", "participating"; "flops" (with `forward_flops`); and for
    every further protocol, "accuracy_<name>", "loss_<name>" [C] and their summaries "accuracy_<name>_summary",
    "loss_<name>_summary".
  """
  evaluate_clients = make_evaluate_clients(
      personalize, apply_fn, clients_per_batch=clients_per_batch, chunk_size=chunk_size, finetune=finetune,
      forward_flops=forward_flops,
  )

  def evaluate(server_params, gather_state, ids, participation, train, test, key, preprocess):
    held = jnp.ones(ids.shape, bool)
    out = evaluate_clients(server_params, gather_state, ids, ids, held, train, test, key, preprocess)
    return summaries(ids, out, jnp.take(participation, ids) > 0)

  return evaluate
