"""An experiment from a flat config: data -> model -> algorithm -> rounds with evaluation and logging."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np

from fedspa_jax import algorithms, data as data_lib, models


@dataclasses.dataclass
class Config:
  """What one run needs. `hparams` go to the algorithm, `data_args` to the data source / partitioner."""

  algorithm: str = "fedspa"
  dataset: str = "synthetic"
  partition: str | None = None
  num_clients: int = 30
  model: str = "mlp"
  rounds: int = 30
  eval_every: int = 1
  seed: int = 0
  data_dir: str | None = None
  hparams: dict[str, Any] = dataclasses.field(
      default_factory=lambda: {"density": 0.5, "clients_per_round": 10, "lr": 0.05, "batch_size": 32}
  )
  data_args: dict[str, Any] = dataclasses.field(default_factory=lambda: {"alpha": 1.0, "beta": 1.0})
  model_args: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def load_data(config: Config) -> data_lib.FederatedData:
  """The federated dataset a config names."""
  if config.dataset == "synthetic" and not hasattr(data_lib, "load"):
    return data_lib.synthetic(num_clients=config.num_clients, seed=config.seed, **config.data_args)
  return data_lib.load(
      config.dataset, num_clients=config.num_clients, partition=config.partition, seed=config.seed,
      data_dir=config.data_dir, **config.data_args,
  )


def build(config: Config, data: data_lib.FederatedData):
  """(model, algorithm) for a config and its data; errors are raised here, before anything compiles."""
  model = models.get(config.model, num_classes=data.num_classes, **config.model_args)
  hparams = {"rounds": config.rounds, **config.hparams}
  return model, algorithms.get(config.algorithm, model=model, **hparams)


def run(config: Config, *, log: Callable[[dict[str, Any]], None] = print) -> dict[str, Any]:
  """Runs a config to the end and returns a summary; `log` gets one record per evaluated round."""
  data = load_data(config)
  _, algo = build(config, data)
  device_data = jax.device_put(data)
  state = algo.init(jax.random.key(config.seed), data)
  start = time.perf_counter()
  history = []
  for r in range(1, config.rounds + 1):
    state, metrics = algo.round(state, device_data)
    if r % config.eval_every == 0 or r == config.rounds:
      ev = algo.evaluate(state, device_data)
      summary = jax.device_get(ev["accuracy_summary"])
      loss = float(np.mean(jax.device_get(metrics["loss"])[np.asarray(metrics["weight"]) > 0]))
      if not np.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} at round {r}")
      record = {
          "round": r,
          "accuracy_mean": float(summary["mean"]),
          "accuracy_std": float(summary["std"]),
          "accuracy_p10": float(summary["p10"]),
          "accuracy_p90": float(summary["p90"]),
          "train_loss": loss,
          "wall_time": time.perf_counter() - start,
      }
      history.append(record)
      log(record)
  final = history[-1]
  return {
      "algorithm": config.algorithm,
      "dataset": data.name,
      "final_accuracy_mean": final["accuracy_mean"],
      "best_accuracy_mean": max(h["accuracy_mean"] for h in history),
      "wall_time": final["wall_time"],
      "config": config.to_dict(),
  }


def format_record(record: dict[str, Any]) -> str:
  return (
      f"round {record['round']:4d}  acc {record['accuracy_mean']:.4f} ± {record['accuracy_std']:.4f}  "
      f"(p10 {record['accuracy_p10']:.3f}, p90 {record['accuracy_p90']:.3f})  loss {record['train_loss']:.4f}  "
      f"{record['wall_time']:.1f}s"
  )


def summary_json(summary: dict[str, Any]) -> str:
  return json.dumps(summary, indent=2, sort_keys=True)
