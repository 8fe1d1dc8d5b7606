"""What a run records: its running totals, one metrics.jsonl line per evaluated round, summary.json, clients.npz.

A record holds the personalized accuracy distribution over the evaluated clients (`accuracy_mean`, `_std`, `_p10`,
`_median`, `_p90`, `_worst10`), `loss_mean`, the mean over participating clients, how many clients were evaluated,
had test data, diverged and took part, the last round's training loss and accuracy, cumulative bytes up and down,
samples (and FLOPs when the algorithm reports them), and wall time; every value is a number (the evaluations' FLOPs,
which depend on how often a run evaluates, are summed in summary.json's `eval_flops`). The
accuracy is of the method's own protocol (the model each client is scored with, named by summary.json's
`protocol`); further protocols of the same evaluation come as
`accuracy_<name>_<stat>` (FedSpa "local"'s `accuracy_masked_global_mean`), and the local-adaptation protocol of the
final evaluation (`eval_finetune_epochs`) as `finetuned_accuracy_<stat>`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from fedspa_jax import accounting, client_stats, distributed, paths
from fedspa_jax import data as data_lib
from fedspa_jax.config import Config
from fedspa_jax.evaluation import protocol_names

# Pairwise mask distances are written for populations up to this size ([K, K] int64 entries).
MAX_DISTANCE_CLIENTS = 2000


class TrainingDiverged(FloatingPointError):
  """A loss or a parameter became NaN or infinite."""


@dataclasses.dataclass
class Totals:
  """Running totals over all rounds so far (carried in checkpoints)."""

  bytes_up: int = 0
  bytes_down: int = 0
  flops: float | None = None
  flops_dense: float | None = None
  samples: int = 0
  wall_time: float = 0.0
  eval_flops: float = 0.0
  dropped: int | None = None  # sampled clients dropped out, and stragglers, so far (with dropouts or stragglers)
  stragglers: int | None = None


def consume(metrics: dict[str, Any], first_round: int, totals: Totals, params: Any) -> dict[str, float]:
  """Adds a dispatch's round metrics [n, ...] (host) to `totals`; returns the last round's training loss and accuracy.

  Bytes are exact: the rounds report int32 value counts per client and leaf, multiplied out here in int64
  (`accounting.message_bytes`, with leaf sizes and dtypes from `params`).

  Raises:
    TrainingDiverged: a sampled client's training loss is not finite.
  """
  train = {}
  for j in range(metrics["weight"].shape[0]):
    # The clients that trained: those with samples (a dropped client whose update was lost trained; its loss counts
    # and a NaN in it is caught, since it keeps the state it trained); without "samples", the reporting ones.
    real = metrics["samples"][j] > 0 if "samples" in metrics else metrics["weight"][j] > 0
    loss = metrics["loss"][j][real]
    if not np.all(np.isfinite(loss)):
      raise TrainingDiverged(f"training diverged in round {first_round + j + 1}: client training losses {loss}")
    totals.bytes_up += accounting.message_bytes(params, metrics["values_up"][j])
    totals.bytes_down += accounting.message_bytes(params, metrics["values_down"][j])
    for key in ("flops", "flops_dense"):
      if key in metrics:
        setattr(totals, key, (getattr(totals, key) or 0.0) + float(metrics[key][j]))
    # The work done, every training pass (as the FLOPs count them): a lost client's too, 0 for padding and clients
    # that never started.
    totals.samples += sum(int(np.sum(metrics[key][j])) for key in accounting.TRAINING_PASSES if key in metrics)
    for key, total in (("dropped", "dropped"), ("straggler", "stragglers")):
      if key in metrics:
        setattr(totals, total, (getattr(totals, total) or 0) + int(np.sum(metrics[key][j])))
    train = {"train_loss": float(np.mean(loss)), "train_accuracy": float(np.mean(metrics["accuracy"][j][real]))}
  return train


def add_eval_flops(totals: Totals, ev: dict[str, Any]) -> None:
  """Counts an evaluation's FLOPs (test forward passes, and fine-tuning when `ev` holds "finetuned") apart from
  training's."""
  for one in (ev, ev.get("finetuned")):
    if one is not None and "flops" in one:
      totals.eval_flops += float(one["flops"])


def protocol_record(ev: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """The record entries of one evaluation's protocols: `<prefix>accuracy_<stat>` of the method's own, and
  `<prefix>accuracy_<name>_<stat>` of each further one (FedSpa's "masked_global" beside "local")."""
  record = {f"{prefix}accuracy_{k}": float(v) for k, v in ev["accuracy_summary"].items()}
  record[f"{prefix}loss_mean"] = float(ev["loss_summary"]["mean"])
  for name in protocol_names(ev):
    record.update({f"{prefix}accuracy_{name}_{k}": float(v) for k, v in ev[f"accuracy_{name}_summary"].items()})
  return record


def eval_record(round: int, ev: dict[str, Any], train: dict[str, float], totals: Totals, *,
                finetune_epochs: int = 0) -> dict[str, Any]:
  """One line of metrics.jsonl: the evaluation's distribution over clients (every protocol it holds; "finetuned":
  the local-adaptation protocol's), training loss, totals, wall time."""
  record = {"round": round}
  record.update(protocol_record(ev))
  record["accuracy_mean_participating"] = float(ev["accuracy_summary_participating"]["mean"])
  record.update(
      eval_clients=int(ev["evaluated"]), eval_with_test_data=int(ev["with_test_data"]),
      eval_diverged=int(ev["diverged"]), eval_participating=int(ev["participating"]),
  )
  if "staleness" in ev:  # the age in rounds of the kept models scored (FedSpa "local"; evaluation.staleness)
    record.update(staleness_mean=float(ev["staleness"]["mean"]), staleness_max=int(ev["staleness"]["max"]))
  if ev.get("finetuned") is not None:
    record["finetune_epochs"] = finetune_epochs
    record.update(protocol_record(ev["finetuned"], "finetuned_"))
    record["finetuned_eval_diverged"] = int(ev["finetuned"]["diverged"])
  record.update(train)
  record.update(bytes_up=totals.bytes_up, bytes_down=totals.bytes_down, samples=totals.samples)
  if totals.flops is not None:
    record.update(flops=totals.flops, flops_dense=totals.flops_dense)
  if totals.dropped is not None:
    record.update(clients_dropped=totals.dropped, clients_straggling=totals.stragglers)
  record["wall_time"] = round_time(totals.wall_time)
  return record


def check_diverged(record: dict[str, Any]) -> None:
  """Raises TrainingDiverged when an evaluated client's model, as the method scores it, has a non-finite loss.

  A model that diverges only when fine-tuned for the evaluation is a result of that protocol, not of training: it is
  counted (`finetuned_eval_diverged`) and the run goes on.
  """
  if record["eval_diverged"]:
    raise TrainingDiverged(
        f"training diverged by round {record['round']}: {record['eval_diverged']} of "
        f"{record['eval_with_test_data']} clients' models score a non-finite loss"
    )


def round_time(seconds: float) -> float:
  return float(f"{seconds:.3f}")


def run_summary(config: Config, algo: Any, data: data_lib.FederatedData, ev: dict[str, Any],
                history: list[dict[str, Any]], totals: Totals, workdir: paths.PathLike, state: Any = None
                ) -> dict[str, Any]:
  """summary.json of a complete run: final and best accuracy (of every protocol evaluated), per-client final
  accuracies, totals, the client store's size, device."""
  best = max(history, key=lambda h: h["accuracy_mean"])
  final = {k: float(v) for k, v in ev["accuracy_summary"].items()}
  participating = {k: float(v) for k, v in ev["accuracy_summary_participating"].items()}
  stats = lambda summary: {k: float(v) for k, v in summary.items()}
  protocols = {"protocol": algo.protocol}
  protocols.update({f"final_accuracy_{name}": stats(ev[f"accuracy_{name}_summary"]) for name in protocol_names(ev)})
  finetuned = ev.get("finetuned")
  if finetuned is not None:
    protocols["finetune_epochs"] = config.eval_finetune_epochs
    protocols["final_accuracy_finetuned"] = stats(finetuned["accuracy_summary"])
    protocols.update({f"final_accuracy_finetuned_{name}": stats(finetuned[f"accuracy_{name}_summary"])
                      for name in protocol_names(finetuned)})
  if state is not None:  # the [K, ...] client store as held (padded over a mesh), and per client
    store = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state.clients))
    protocols.update(client_store_bytes=store, client_store_bytes_per_client=store / state.participation.shape[0])
  return {
      "status": "complete",
      "algorithm": algo.name,
      "dataset": data.name,
      "partition": config.partition,
      "model": config.model,
      "num_clients": data.num_clients,
      "rounds": config.rounds,
      "seed": config.seed,
      "hparams": jsonable(algo.hparams),
      **protocols,
      "final_accuracy_mean": final["mean"],
      "final_accuracy": final,
      "final_accuracy_participating": participating,
      "clients_with_test_data": int(ev["with_test_data"]),
      "clients_diverged": int(ev["diverged"]),
      "clients_participating": int(ev["participating"]),
      **({"staleness": {k: float(v) for k, v in ev["staleness"].items()}} if "staleness" in ev else {}),
      "final_loss_mean": float(ev["loss_summary"]["mean"]),
      "best_accuracy_mean": best["accuracy_mean"],
      "best_round": best["round"],
      "client_accuracy": [None if np.isnan(a) else float(a) for a in ev["accuracy"]],
      "bytes_up": totals.bytes_up,
      "bytes_down": totals.bytes_down,
      "bytes_total": totals.bytes_up + totals.bytes_down,
      "flops": totals.flops,
      "flops_dense": totals.flops_dense,
      "eval_flops": totals.eval_flops,
      "samples": totals.samples,
      "wall_time": round_time(totals.wall_time),
      "device": device(),
      "jax_version": jax.__version__,
      "run_dir": str(workdir),
  }


def client_arrays(algo: Any, state: Any, data: data_lib.FederatedData, ev: dict[str, Any]) -> dict[str, np.ndarray]:
  """What clients.npz holds before the analysis (`client_analysis`): per-client accuracy and loss (of every protocol
  evaluated), test count, participation, labels."""
  protocols = {f"accuracy_{name}": np.asarray(ev[f"accuracy_{name}"]) for name in protocol_names(ev)}
  finetuned = ev.get("finetuned")
  if finetuned is not None:
    protocols["accuracy_finetuned"] = np.asarray(finetuned["accuracy"])
    protocols.update({f"accuracy_finetuned_{name}": np.asarray(finetuned[f"accuracy_{name}"])
                      for name in protocol_names(finetuned)})
  arrays = {
      "accuracy": np.asarray(ev["accuracy"]),
      **protocols,
      "loss": np.asarray(ev["loss"]),
      "test_count": np.asarray(ev["count"]),
      "participation": distributed.to_host(state.participation)[: data.num_clients],
      "label_counts": data_lib.client_label_counts(data.train, data.num_classes),
  }
  return arrays


def client_analysis(algo: Any, state: Any, data: data_lib.FederatedData) -> dict[str, np.ndarray]:
  """The rest of clients.npz, for populations up to `MAX_DISTANCE_CLIENTS`: pairwise mask distances and distances
  between the clients' own models (`client_stats.client_distances`: in bounded memory, chunks of clients)."""
  if data.num_clients > MAX_DISTANCE_CLIENTS:
    return {}
  return client_stats.client_distances(lambda ids: algo.client_states(state, data, ids), data.num_clients,
                                       state.server.params)


def jsonable(value: Any) -> Any:
  """`value` as JSON values: as it is when it serializes, else dicts key by key and anything else as its repr."""
  try:
    return json.loads(json.dumps(value))
  except TypeError:
    if isinstance(value, dict):
      return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def device() -> str:
  devices = jax.devices()
  return f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind}"
