"""What a run records: its running totals, one metrics.jsonl line per evaluated round, summary.json, clients.npz.

A record holds the personalized accuracy distribution over the evaluated clients (`accuracy_mean`, `_std`, `_p10`,
`_median`, `_p90`, `_worst10`), `loss_mean`, the mean over participating clients, how many clients were evaluated,
had test data and took part, the last round's training loss and accuracy, cumulative bytes up and down, samples
(and FLOPs when the algorithm reports them), and wall time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from fedspa_jax import accounting, client_stats, distributed
from fedspa_jax import data as data_lib
from fedspa_jax.config import Config

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


def consume(metrics: dict[str, Any], first_round: int, totals: Totals, params: Any) -> dict[str, float]:
  """Adds a dispatch's round metrics [n, ...] (host) to `totals`; returns the last round's training loss and accuracy.

  Bytes are exact: the rounds report int32 value counts per client and leaf, multiplied out here in int64
  (`accounting.message_bytes`, with leaf sizes and dtypes from `params`).

  Raises:
    TrainingDiverged: a sampled client's training loss is not finite.
  """
  train = {}
  for j in range(metrics["weight"].shape[0]):
    real = metrics["weight"][j] > 0
    loss = metrics["loss"][j][real]
    if not np.all(np.isfinite(loss)):
      raise TrainingDiverged(f"training diverged in round {first_round + j + 1}: client training losses {loss}")
    totals.bytes_up += accounting.message_bytes(params, metrics["values_up"][j])
    totals.bytes_down += accounting.message_bytes(params, metrics["values_down"][j])
    for key in ("flops", "flops_dense"):
      if key in metrics:
        setattr(totals, key, (getattr(totals, key) or 0.0) + float(metrics[key][j]))
    if "samples" in metrics:
      totals.samples += int(np.sum(metrics["samples"][j][real]))
    train = {"train_loss": float(np.mean(loss)), "train_accuracy": float(np.mean(metrics["accuracy"][j][real]))}
  return train


def eval_record(round: int, ev: dict[str, Any], train: dict[str, float], totals: Totals) -> dict[str, Any]:
  """One line of metrics.jsonl: the evaluation's distribution over clients, training loss, totals, wall time."""
  record = {"round": round}
  record.update({f"accuracy_{k}": float(v) for k, v in ev["accuracy_summary"].items()})
  record["loss_mean"] = float(ev["loss_summary"]["mean"])
  record["accuracy_mean_participating"] = float(ev["accuracy_summary_participating"]["mean"])
  record.update(
      eval_clients=int(ev["evaluated"]), eval_with_test_data=int(ev["with_test_data"]),
      eval_participating=int(ev["participating"]),
  )
  record.update(train)
  record.update(bytes_up=totals.bytes_up, bytes_down=totals.bytes_down, samples=totals.samples)
  if totals.flops is not None:
    record.update(flops=totals.flops, flops_dense=totals.flops_dense)
  record["wall_time"] = round_time(totals.wall_time)
  return record


def round_time(seconds: float) -> float:
  return float(f"{seconds:.3f}")


def run_summary(config: Config, algo: Any, data: data_lib.FederatedData, ev: dict[str, Any],
                history: list[dict[str, Any]], totals: Totals, workdir: pathlib.Path) -> dict[str, Any]:
  """summary.json of a complete run: final and best accuracy, per-client final accuracies, totals, device."""
  best = max(history, key=lambda h: h["accuracy_mean"])
  final = {k: float(v) for k, v in ev["accuracy_summary"].items()}
  participating = {k: float(v) for k, v in ev["accuracy_summary_participating"].items()}
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
      "final_accuracy_mean": final["mean"],
      "final_accuracy": final,
      "final_accuracy_participating": participating,
      "clients_with_test_data": int(ev["with_test_data"]),
      "clients_participating": int(ev["participating"]),
      "final_loss_mean": float(ev["loss_summary"]["mean"]),
      "best_accuracy_mean": best["accuracy_mean"],
      "best_round": best["round"],
      "client_accuracy": [None if np.isnan(a) else float(a) for a in ev["accuracy"]],
      "bytes_up": totals.bytes_up,
      "bytes_down": totals.bytes_down,
      "bytes_total": totals.bytes_up + totals.bytes_down,
      "flops": totals.flops,
      "flops_dense": totals.flops_dense,
      "samples": totals.samples,
      "wall_time": round_time(totals.wall_time),
      "device": device(),
      "jax_version": jax.__version__,
      "run_dir": str(workdir),
  }


def client_arrays(algo: Any, state: Any, data: data_lib.FederatedData, ev: dict[str, Any]) -> dict[str, np.ndarray]:
  """What clients.npz holds: per-client accuracy, loss, test count, participation, labels, mask distances."""
  arrays = {
      "accuracy": np.asarray(ev["accuracy"]),
      "loss": np.asarray(ev["loss"]),
      "test_count": np.asarray(ev["count"]),
      "participation": distributed.to_host(state.participation)[: data.num_clients],
      "label_counts": data_lib.client_label_counts(data.train, data.num_classes),
  }
  if data.num_clients <= MAX_DISTANCE_CLIENTS:
    clients = algo.client_states(state, data)
    if client_stats.is_mask_store(clients):
      arrays["hamming"], arrays["active"] = client_stats.mask_distances(clients)
  return arrays


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
