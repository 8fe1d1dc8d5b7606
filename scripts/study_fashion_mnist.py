"""The seeded Fashion-MNIST study (issue 11): FedSpa against its baselines, each at its own learning rate.

    bash scripts/study_fashion_mnist.sh start      # in the background (nohup, nice), resumable
    bash scripts/study_fashion_mnist.sh status     # units done / left, selected learning rates, estimate
    python scripts/study_fashion_mnist.py run|status [--out DIR] [--lrs ...] [--seeds ...] ...

Setting: Fashion-MNIST, 100 clients, 10 per round, LeNet-5, SGD (momentum 0, batch 32), 2 local epochs, 100 rounds;
partitions pathological-2 (`fashion_mnist_pathological`) and Dirichlet(0.3) (`fashion_mnist_dirichlet`).

The study is a list of units, run in priority order. `--tier core` (default, ~2.4 h of one core): FedSpa (d=0.5),
FedAvg, Local, Ditto, FedRep on pathological, then the same but FedRep on Dirichlet. `--tier all` (~4.5 h; the same
folder continues): then Dirichlet's FedRep, FedAvg-FT, FedSpa with random regrowth, Sub-FedAvg, FedSpa at densities
0.2 and 0.8 (pathological only), then FedAvg-FT, random regrowth and Sub-FedAvg on Dirichlet, then a diagnostic
(FedSpa with uniform layer densities, pathological). Units:
  - lr unit: one algorithm, one partition, one learning rate of the grid, seed `search_seed` (0), `search_rounds`
    rounds (`experiment.run`);
  - final unit: one algorithm, one partition, the selected learning rate, seeds 1, 2, 3 as one vmapped program
    (`experiment.sweep`), `rounds` rounds.
The learning rate of a cell is the grid value with the highest final mean accuracy (all clients) of its lr units
(ties: the smaller lr; a diverged run ranks last). The final seeds differ from the search seed, so the reported
numbers are not the ones the selection was made on. FedSpa's ablations (random regrowth, densities 0.2 and 0.8) use
FedSpa's selected rate (`lr_from`), so they differ from it in one thing only.

Each finished unit writes `<out>/<unit dir>/unit.json` at once (atomically); a restart skips those and reruns an
interrupted unit from its start (a failed one is recorded in failed.txt and retried on the next start).
`<out>/plan.json` pins the plan (grid, seeds, rounds, epochs): a restart with other options is refused; the tier or
cells may change. Several drivers may share a folder (`start --jobs 2`, one per core): each unit runs under its
own lock, so no unit runs twice; `start` refuses while drivers already run on the folder.
Edge check (`python scripts/study_fashion_mnist.py edge`): for every cell whose selected lr sits at the grid's edge,
one more lr unit one step past it (x3 above the top, /3 below the bottom); the report shows it beside the grid, and
the selection does not change.
Protocol re-run (`--protocols`, issue 18; default folder runs/study_protocols): the cells of `TIERS["protocols"]`
(FedSpa, FedAvg, Ditto, FedRep, Local, Sub-FedAvg, FedSpa with random regrowth, both partitions interleaved), final
units only, each at the lr the study above selected (`SELECTED_LRS`); every run also scores every client after 1
epoch of local fine-tuning (`eval_finetune_epochs`), and FedSpa keeps its local models (`personal_model="local"`),
so one run gives every protocol's column. `scripts/protocol_report.py` reports it.
Bad options (a non-positive or repeated lr, no or repeated seeds, the search seed among the final seeds, fewer than
100 rounds or 2 epochs without --smoke) are one error line and exit status 2, before JAX is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import math
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Sequence

PARTITIONS = {"pathological": "fashion_mnist_pathological", "dirichlet": "fashion_mnist_dirichlet"}
DEFAULT_OUT = "runs/study_fashion_mnist"
PROTOCOLS_OUT = "runs/study_protocols"
SPARSE_OUT = "runs/study_sparse_family"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One column of the study: a registered algorithm, its own hyperparameters, and where its lr comes from."""

  algorithm: str
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  lr_from: str | None = None  # another variant whose selected lr this one uses (no search of its own)
  label: str = ""


VARIANTS = {
    "fedspa": Variant("fedspa", {"density": 0.5}, label="FedSpa (d=0.5)"),
    "fedavg": Variant("fedavg", label="FedAvg"),
    "local": Variant("local", label="Local"),
    "ditto": Variant("ditto", label="Ditto"),
    "fedrep": Variant("fedrep", label="FedRep"),
    "fedavg_ft": Variant("fedavg_ft", label="FedAvg-FT"),
    "fedspa_random": Variant("fedspa_random", {"density": 0.5}, lr_from="fedspa", label="FedSpa, random regrowth"),
    "subfedavg": Variant("subfedavg", {"density": 0.5}, label="Sub-FedAvg (d=0.5)"),
    "dispfl": Variant("dispfl", {"density": 0.5}, label="DisPFL (d=0.5)"),
    "feddst": Variant("feddst", {"density": 0.5}, label="FedDST (d=0.5)"),
    "prunefl": Variant("prunefl", label="PruneFL (adaptive density)"),
    "fedspa_d0.2": Variant("fedspa", {"density": 0.2}, lr_from="fedspa", label="FedSpa (d=0.2)"),
    "fedspa_d0.8": Variant("fedspa", {"density": 0.8}, lr_from="fedspa", label="FedSpa (d=0.8)"),
    # Not in the list: a diagnostic. Under ERK the small last layer (84 x 10) is dense, so every client shares
    # its whole classifier; uniform densities mask it too (d=0.5 in every kernel), so masks can personalize it.
    "fedspa_uniform": Variant("fedspa", {"density": 0.5, "density_rule": "uniform"}, lr_from="fedspa",
                              label="FedSpa (d=0.5, uniform layers)"),
}

CORE = ("fedspa", "fedavg", "local", "ditto", "fedrep")
# (partition, variant), most important first: the core methods on pathological, then on Dirichlet, then the rest.
# "core" is what fits ~2h15m of one core (~2h25m estimated; Dirichlet's FedRep, the most expensive cell, is the
# first one cut); "all" is the whole list (~4.5 hours), the core's units first.
TIERS = {
    "core": tuple([("pathological", v) for v in CORE] + [("dirichlet", v) for v in CORE if v != "fedrep"]),
}
# The protocol re-run (issue 18): the methods at the lrs the study above selected (SELECTED_LRS), every one scored
# as it scores itself and after 1 epoch of local fine-tuning, FedSpa also with its "local" model; most important
# first, the two partitions interleaved.
PROTOCOL_VARIANTS = ("fedspa", "fedavg", "ditto", "fedrep", "local", "subfedavg", "fedspa_random")
TIERS["protocols"] = tuple((p, v) for v in PROTOCOL_VARIANTS for p in PARTITIONS)
# The lrs the seeded study selected (docs/benchmarks.md, 2026-11-30: grid {0.01, 0.03, 0.1} on seed 0, 30 rounds).
SELECTED_LRS = {
    "pathological/fedspa": 0.1, "pathological/subfedavg": 0.1, "pathological/fedavg": 0.1,
    "pathological/fedavg_ft": 0.03, "pathological/local": 0.03, "pathological/ditto": 0.1, "pathological/fedrep": 0.03,
    "dirichlet/fedspa": 0.1, "dirichlet/subfedavg": 0.1, "dirichlet/fedavg": 0.1, "dirichlet/fedavg_ft": 0.1,
    "dirichlet/local": 0.03, "dirichlet/ditto": 0.1, "dirichlet/fedrep": 0.03,
}
# The sparse family (issue 29): DisPFL, FedDST and PruneFL on both partitions, each with its own lr search (grid and
# seeds as above); with `--sparse-family` the final runs also score every client after 1 epoch of local fine-tuning,
# so one run gives both of the protocol re-run's columns (default folder runs/study_sparse_family).
TIERS["sparse"] = tuple((p, v) for v in ("dispfl", "feddst", "prunefl") for p in PARTITIONS)
TIERS["all"] = TIERS["core"] + tuple(
    [("dirichlet", "fedrep")]
    + [("pathological", v) for v in ("fedavg_ft", "fedspa_random", "subfedavg", "fedspa_d0.2", "fedspa_d0.8")]
    + [("dirichlet", v) for v in ("fedavg_ft", "fedspa_random", "subfedavg")]
    + [("pathological", "fedspa_uniform")]  # the diagnostic, last
)

# Seconds per simulated round of one seed, measured on one pinned core of the 2-core AMD EPYC (5 rounds of 2
# local epochs, compilation excluded; 3 seeds vmapped in a sweep cost ~1.08x per seed); only for estimates.
SECONDS_PER_ROUND = {"fedspa": 1.43, "fedspa_random": 1.43, "fedavg": 1.42, "fedavg_ft": 1.44, "local": 1.50,
                     "ditto": 2.75, "fedrep": 3.83, "subfedavg": 1.71,
                     # scaled from docs/benchmarks.md's sparse-family line (1 epoch) by FedSpa's ratio
                     "dispfl": 1.43, "feddst": 1.23, "prunefl": 1.15}
SECONDS_PER_EVAL = {"fedavg_ft": 10.6}  # FedAvg-FT fine-tunes every client before it is evaluated
COMPILE_SECONDS = 20.0
SWEEP_FACTOR = 1.08


class StudyError(ValueError):
  """Bad input or a folder that holds another study; one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the study runs; written to plan.json and compared on every restart."""

  lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
  seeds: tuple[int, ...] = (1, 2, 3)
  search_seed: int = 0
  rounds: int = 100
  search_rounds: int = 30
  local_epochs: int = 2
  eval_every: int = 10
  cells: tuple[tuple[str, str], ...] = TIERS["core"]  # which cells, in order; not part of the folder's identity
  smoke: bool = False
  # The protocol re-run: lrs fixed per "partition/variant" (no lr units), the fine-tuned column, FedSpa's model.
  fixed_lrs: dict[str, float] | None = None
  eval_finetune_epochs: int = 0
  fedspa_personal_model: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Plan":
    d = dict(d)
    if "fixed_lrs" in d and d["fixed_lrs"] is not None:
      d["fixed_lrs"] = dict(d["fixed_lrs"])
    d["cells"] = tuple(tuple(c) for c in d["cells"])
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Unit:
  kind: str  # "lr" or "final"
  partition: str
  variant: str
  lr: float | None = None  # lr units only

  @property
  def path(self) -> str:
    if self.kind == "lr":
      return f"lr_search/{self.partition}/{self.variant}/lr_{self.lr:g}"
    return f"final/{self.partition}/{self.variant}"

  def __str__(self) -> str:
    return f"{self.kind:5s} {self.partition}/{self.variant}" + (f" lr={self.lr:g}" if self.lr is not None else "")


def check_plan(plan: Plan) -> Plan:
  """The plan with lrs and seeds normalised; raises StudyError with one line on bad input. Imports nothing heavy."""
  lrs = list(plan.lrs)
  if not lrs:
    raise StudyError("the learning-rate grid is empty")
  for lr in lrs:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
      raise StudyError(f"learning rates must be finite numbers > 0, got {lr!r}")
  if len({f"{lr:g}" for lr in lrs}) != len(lrs):  # an lr unit's folder is named by its lr to 6 significant digits
    raise StudyError(f"the learning-rate grid repeats a value (to 6 significant digits): {', '.join(map(repr, lrs))}")
  seeds = list(plan.seeds)
  if not seeds:
    raise StudyError("the study needs at least one seed for its final runs")
  for s in seeds + [plan.search_seed]:
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise StudyError(f"seeds must be integers >= 0, got {s!r}")
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise StudyError(f"seeds must be distinct; repeated: {', '.join(map(str, repeated))}")
  if plan.search_seed in seeds:
    raise StudyError(f"the lr-search seed {plan.search_seed} is also a final seed; the final seeds must differ from "
                     "it so the selection does not bias the reported numbers")
  for name in ("rounds", "search_rounds", "local_epochs", "eval_every"):
    value = getattr(plan, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise StudyError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
  if plan.search_rounds > plan.rounds:
    raise StudyError(f"search-rounds ({plan.search_rounds}) exceeds rounds ({plan.rounds})")
  if not plan.smoke and (plan.rounds < 100 or plan.local_epochs < 2):
    raise StudyError(f"the study's final runs need at least 100 rounds and 2 local epochs (got {plan.rounds} rounds, "
                     f"{plan.local_epochs} epochs); --smoke is for quick checks")
  seen = set()
  for partition, variant in plan.cells:
    if partition not in PARTITIONS or variant not in VARIANTS:
      raise StudyError(f"unknown cell {partition}/{variant}")
    source = VARIANTS[variant].lr_from
    if source is not None and (partition, source) not in seen:
      raise StudyError(f"{partition}/{variant} takes its lr from {partition}/{source}, which must come before it")
    seen.add((partition, variant))
  return dataclasses.replace(plan, lrs=tuple(float(lr) for lr in lrs), seeds=tuple(seeds),
                             cells=tuple(tuple(c) for c in plan.cells))


def lr_source(variant: str) -> str:
  return VARIANTS[variant].lr_from or variant


def plan_units(plan: Plan) -> list[Unit]:
  """Every unit of the study in run order: each cell's lr units (if it searches), then its final unit."""
  units = []
  for partition, variant in plan.cells:
    if VARIANTS[variant].lr_from is None and plan.fixed_lrs is None:
      units += [Unit("lr", partition, variant, lr) for lr in plan.lrs]
    units.append(Unit("final", partition, variant))
  return units


def edge_lr(plan: Plan, lr: float) -> float | None:
  """The rate one step past the grid's edge that `lr` sits on (x3 above the top, /3 below the bottom), else None."""
  if len(plan.lrs) < 2 or min(plan.lrs) < lr < max(plan.lrs):
    return None
  return float(f"{lr * 3 if lr == max(plan.lrs) else lr / 3:.6g}")


def edge_units(plan: Plan, out: pathlib.Path) -> list[Unit]:
  """The edge check: for every cell whose selected lr is at the grid's edge, an lr unit one step past it.

  It does not change the selection (plan.json pins the grid); the report shows whether the next rate would have won.
  """
  units = []
  for partition, variant in plan.cells:
    if VARIANTS[variant].lr_from is not None:
      continue
    try:
      lr, _ = select_lr(plan, out, partition, variant)
    except StudyError:
      continue
    beyond = None if lr is None else edge_lr(plan, lr)
    if beyond is not None:
      units.append(Unit("lr", partition, variant, beyond))
  return units


def estimate_seconds(plan: Plan, unit: Unit) -> float:
  """A rough single-core estimate of a unit's wall time (from `SECONDS_PER_ROUND`)."""
  algorithm = VARIANTS[unit.variant].algorithm
  per_round = SECONDS_PER_ROUND.get(algorithm, 2.0)
  if unit.kind == "lr":
    rounds, seeds, factor = plan.search_rounds, 1, 1.0
  else:
    rounds, seeds, factor = plan.rounds, len(plan.seeds), SWEEP_FACTOR
  evals = rounds // plan.eval_every + 1
  return COMPILE_SECONDS + seeds * (rounds * per_round * factor + evals * SECONDS_PER_EVAL.get(algorithm, 0.9))


# ---- the folder: results, state, selection ----------------------------------------------------------------------


def read_unit(out: pathlib.Path, unit: Unit) -> dict[str, Any] | None:
  """The unit's result record, or None while it is not finished."""
  path = out / unit.path / "unit.json"
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_json_atomic(path: pathlib.Path, record: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  os.replace(tmp, path)


def select_lr(plan: Plan, out: pathlib.Path, partition: str, variant: str) -> tuple[float | None, dict[str, Any]]:
  """The selected lr of a cell (None until all its lr units are done) and the search table {lr: accuracy or None}.

  Raises:
    StudyError: every lr of the grid diverged.
  """
  source = lr_source(variant)
  if plan.fixed_lrs is not None:
    key = f"{partition}/{source}"
    if key not in plan.fixed_lrs:
      raise StudyError(f"no fixed lr for {key}; the plan fixes {', '.join(sorted(plan.fixed_lrs))}")
    return plan.fixed_lrs[key], {}
  table = {}
  for lr in plan.lrs:
    record = read_unit(out, Unit("lr", partition, source, lr))
    if record is None:
      return None, table
    table[f"{lr:g}"] = record.get("final_accuracy_mean")
  ranked = [(acc, -lr) for lr, acc in zip(plan.lrs, table.values()) if acc is not None and math.isfinite(acc)]
  if not ranked:
    raise StudyError(f"every learning rate of {partition}/{source} diverged: {table}")
  return -max(ranked)[1], table


def unit_state(plan: Plan, out: pathlib.Path, unit: Unit) -> str:
  """"done", "failed" (last attempt raised; it is retried), "waiting" (final unit without a selected lr) or "todo"."""
  if (out / unit.path / "unit.json").exists():
    return "done"
  if (out / unit.path / "failed.txt").exists():
    return "failed"
  if unit.kind == "final":
    try:
      lr, _ = select_lr(plan, out, unit.partition, unit.variant)
    except StudyError:
      return "failed"
    if lr is None:
      return "waiting"
  return "todo"


def check_folder(plan: Plan, out: pathlib.Path, readonly: bool = False) -> None:
  """Refuses a folder whose plan.json holds another plan (cells aside); then (unless readonly) writes plan.json."""
  path = out / "plan.json"
  want = plan.to_dict()
  if path.exists():
    held = json.loads(path.read_text())
    diff = sorted(k for k in set(held) | set(want) if k != "cells" and held.get(k) != want.get(k))
    if diff:
      raise StudyError(f"{out} holds a study with another plan (differs in {', '.join(diff)}); rerun with the same "
                       f"options or choose another --out")
  if readonly:
    return
  write_json_atomic(path, want)  # the cells (which units, in what order) may change from one start to the next


# ---- running ----------------------------------------------------------------------------------------------------


def make_config(plan: Plan, unit: Unit, lr: float):
  """The `Config` of a unit (lr units: seed `search_seed` and `search_rounds`; final units: `rounds`)."""
  from fedspa_jax import compare
  from fedspa_jax import config as config_lib

  variant = VARIANTS[unit.variant]
  config = config_lib.load(PARTITIONS[unit.partition], smoke=plan.smoke)
  common = {"lr": lr, "momentum": 0.0}
  if not plan.smoke:
    common["local_epochs"] = plan.local_epochs
  config = config_lib.apply_overrides(config, {
      "rounds": plan.search_rounds if unit.kind == "lr" else plan.rounds,
      "seed": plan.search_seed if unit.kind == "lr" else plan.seeds[0],
      "eval_every": plan.eval_every, "eval_clients": None, "checkpoint_every": 0,
      "rounds_per_dispatch": plan.eval_every, **{f"hparams.{k}": v for k, v in common.items()},
      "eval_finetune_epochs": plan.eval_finetune_epochs if unit.kind == "final" else 0,
  })
  hparams = dict(variant.hparams)
  if plan.fedspa_personal_model is not None and variant.algorithm.startswith("fedspa"):
    hparams["personal_model"] = plan.fedspa_personal_model
  config, _ = compare.for_algorithm(config, variant.algorithm, hparams)
  return config


def default_runner(plan: Plan, unit: Unit, config, workdir: pathlib.Path) -> dict[str, Any]:
  """Runs a unit; returns the fields of its unit.json (a diverged run is a result, not an error)."""
  from fedspa_jax import experiment

  try:
    if unit.kind == "lr":
      summary = experiment.run(config, workdir, overwrite=True, progress=False, write_plots=False)
      return {"status": "complete", "final_accuracy_mean": summary["final_accuracy_mean"],
              "final_accuracy_mean_participating": summary["final_accuracy_participating"]["mean"],
              "wall_time_run": summary["wall_time"]}
    summary = experiment.sweep(config, plan.seeds, workdir, overwrite=True, progress=False)
    protocols = {key: summary[key]["mean"] for key in summary
                 if key.startswith("final_accuracy_") and isinstance(summary[key], dict) and "mean" in summary[key]
                 and isinstance(summary[key]["mean"], dict)}
    return {"status": "complete", "final_accuracy_mean": summary["final_accuracy_mean"]["mean"],
            "protocol": summary.get("protocol"), "protocols": protocols,
            "final_accuracy_mean_std": summary["final_accuracy_mean"]["std"],
            "final_accuracy_mean_per_seed": summary["final_accuracy_mean_per_seed"],
            "wall_time_run": summary["wall_time"]}
  except experiment.TrainingDiverged as e:
    return {"status": "diverged", "final_accuracy_mean": None, "error": str(e)}


def log(line: str) -> None:
  print(f"[study {datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {line}", flush=True)


def run_unit(plan: Plan, out: pathlib.Path, unit: Unit, runner: Callable) -> dict[str, Any]:
  lr = unit.lr
  search = None
  if unit.kind == "final":
    lr, search = select_lr(plan, out, unit.partition, unit.variant)
  config = make_config(plan, unit, lr)
  workdir = out / unit.path
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "failed.txt").unlink(missing_ok=True)
  start = time.time()
  result = runner(plan, unit, config, workdir)
  record = {
      "kind": unit.kind, "partition": unit.partition, "variant": unit.variant,
      "algorithm": VARIANTS[unit.variant].algorithm, "lr": lr, "lr_search": search,
      "lr_from": lr_source(unit.variant) if unit.kind == "final" else None,
      "seeds": [plan.search_seed] if unit.kind == "lr" else list(plan.seeds),
      "rounds": config.rounds, **result, "wall_time": round(time.time() - start, 1),
      "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  write_json_atomic(workdir / "unit.json", record)
  return record


class Lock:
  """An exclusive, non-blocking flock on one file; it goes with the process that holds it."""

  def __init__(self, path: pathlib.Path, unlink: bool = False):
    self.path = path
    self.unlink = unlink  # remove the file on release (a driver's own file, which no other process opens)
    self.file = None

  def acquire(self, note: str = "") -> bool:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.close()
      self.file = None
      return False
    self.file.seek(0)
    self.file.truncate()
    self.file.write(note or f"{os.getpid()}\n")
    self.file.flush()
    return True

  def held_elsewhere(self) -> bool:
    """Whether another process holds the lock now (a free lock is taken and given back at once)."""
    if not self.path.exists():
      return False
    if self.acquire():
      self.release()
      return False
    return True

  def release(self) -> None:
    if self.file is not None:
      if self.unlink:
        self.path.unlink(missing_ok=True)
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None


def driver_lock(out: pathlib.Path, pid: int | None = None) -> Lock:
  return Lock(out / "drivers" / f"{pid or os.getpid()}.lock", unlink=True)


def unit_lock(out: pathlib.Path, unit: Unit) -> Lock:
  return Lock(out / "locks" / (unit.path.replace("/", "__") + ".lock"))


def drivers(out: pathlib.Path) -> list[str]:
  """The pids of the drivers running on `out` (each holds <out>/drivers/<pid>.lock while it runs)."""
  found = []
  for path in sorted((out / "drivers").glob("*.lock")) if (out / "drivers").exists() else []:
    if Lock(path).held_elsewhere():
      found.append(path.stem)
  return found


def run_study(plan: Plan, out: pathlib.Path, runner: Callable = default_runner,
              max_units: int | None = None, poll_s: float = 20.0, units: list[Unit] | None = None) -> int:
  """Runs every unit not done yet, in order; returns 0 (all done) or 1 (some failed).

  Several drivers may run on one folder (`start --jobs N`): each unit is run under its own lock, so a unit held by
  another driver is skipped, and a driver whose remaining units all wait on another driver's (a final unit whose lr
  search is still running elsewhere) polls every `poll_s` seconds until they can run.
  """
  plan = check_plan(plan)
  me = driver_lock(out)
  me.acquire()
  try:
    check_folder(plan, out, readonly=units is not None)  # other units (the edge check) leave plan.json alone
    units = plan_units(plan) if units is None else units
    done = sum(unit_state(plan, out, u) == "done" for u in units)
    log(f"{out}: {done} of {len(units)} units done; running the rest (pid {os.getpid()})")
    failed, ran, tried, said = 0, 0, set(), set()
    while max_units is None or ran < max_units:
      ran_now, busy = False, False
      for unit in units:
        if max_units is not None and ran >= max_units:
          break
        state = unit_state(plan, out, unit)
        if state == "done" or unit in tried:
          continue
        if state == "waiting" or (state == "failed" and unit.kind == "final" and not _lr_ready(plan, out, unit)):
          if unit not in said:
            log(f"skip  {unit}: its lr search is not complete")
            said.add(unit)
          continue
        lock = unit_lock(out, unit)
        if not lock.acquire(f"{os.getpid()}\n"):
          busy = True  # another driver runs it
          continue
        try:
          if unit_state(plan, out, unit) == "done":  # finished by another driver since the check above
            continue
          ran, ran_now = ran + 1, True
          tried.add(unit)
          failed += not _run_logged(plan, out, unit, runner)
        finally:
          lock.release()
        break  # rescan from the top: a finished lr search may have made an earlier final unit ready
      if not ran_now:
        if not busy and not any(unit_lock(out, u).held_elsewhere() for u in units):
          break
        time.sleep(poll_s)  # units still running in another driver: their final units may become ready
    left = sum(unit_state(plan, out, u) != "done" for u in units)
    log(f"{len(units) - left} of {len(units)} units done" + (f", {failed} failed this time" if failed else ""))
    return 1 if failed else 0
  finally:
    (out / "running" / f"{os.getpid()}.json").unlink(missing_ok=True)
    me.release()


def _run_logged(plan: Plan, out: pathlib.Path, unit: Unit, runner: Callable) -> bool:
  """Runs one unit, logging it; a failure is recorded in failed.txt (retried on the next start). True if it ran."""
  write_json_atomic(out / "running" / f"{os.getpid()}.json",
                    {"unit": unit.path, "pid": os.getpid(),
                     "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
                     "estimate_s": round(estimate_seconds(plan, unit))})
  log(f"start {unit} (estimate {estimate_seconds(plan, unit) / 60:.1f} min on one core)")
  try:
    record = run_unit(plan, out, unit, runner)
  except Exception:  # noqa: BLE001  (recorded, retried on the next start; the other units go on)
    (out / "running" / f"{os.getpid()}.json").unlink(missing_ok=True)
    (out / unit.path).mkdir(parents=True, exist_ok=True)
    (out / unit.path / "failed.txt").write_text(traceback.format_exc())
    log(f"FAILED {unit}; traceback in {out / unit.path / 'failed.txt'}")
    traceback.print_exc()
    return False
  (out / "running" / f"{os.getpid()}.json").unlink(missing_ok=True)  # between units, `status` says so
  acc = record.get("final_accuracy_mean")
  log(f"done  {unit}: {record['status']}, accuracy {acc if acc is None else f'{acc:.4f}'}, "
      f"lr {record['lr']:g}, {record['wall_time']:.0f} s")
  return True


def _lr_ready(plan: Plan, out: pathlib.Path, unit: Unit) -> bool:
  try:
    return select_lr(plan, out, unit.partition, unit.variant)[0] is not None
  except StudyError:
    return False


# ---- status -----------------------------------------------------------------------------------------------------


def status_text(plan: Plan, out: pathlib.Path) -> str:
  """Units done / left, per cell the lr search and final state, the running unit, and a time estimate."""
  units = plan_units(plan)
  states = {u: unit_state(plan, out, u) for u in units}
  counts = {k: sum(1 for u in units if u.kind == k) for k in ("lr", "final")}
  done = {k: sum(1 for u in units if u.kind == k and states[u] == "done") for k in ("lr", "final")}
  lines = [f"study folder {out}",
           f"units done: {sum(done.values())} of {len(units)} (lr search {done['lr']}/{counts['lr']}, "
           f"final {done['final']}/{counts['final']}); left: {len(units) - sum(done.values())}"]
  pids = drivers(out) if out.exists() else []
  for pid in pids:
    path = out / "running" / f"{pid}.json"
    running = json.loads(path.read_text()) if path.exists() else None
    if running:
      lines.append(f"running: {running['unit']} since {running['started_at']} (pid {pid}, estimate "
                   f"{running['estimate_s'] / 60:.0f} min)")
    else:
      lines.append(f"running: driver pid {pid}, between units")
  if not pids:
    lines.append("running: no driver (start or continue with `bash scripts/study_fashion_mnist.sh start`)")
  # Estimate: the static per-unit estimates, scaled by the median of the finished units' actual/estimated ratios
  # (a median, so that a unit paused for a while does not skew it).
  spent = [(read_unit(out, u)["wall_time"], estimate_seconds(plan, u)) for u in units if states[u] == "done"]
  ratios = sorted(a / e for a, e in spent)
  scale = ratios[len(ratios) // 2] if ratios else 1.0
  left_s = sum(estimate_seconds(plan, u) for u in units if states[u] != "done") * scale
  lines.append(f"time spent on finished units: {sum(a for a, _ in spent) / 3600:.2f} h; estimated left: "
               f"{left_s / 3600:.2f} h of one core (static single-core estimates x {scale:.2f}, the finished units' "
               f"median ratio)" + (f", ~{left_s / 3600 / min(len(pids), os.cpu_count() or 1):.2f} h with {len(pids)} "
                                   f"drivers on {os.cpu_count()} cores" if len(pids) > 1 else ""))
  lines.append("")
  lines.append(f"{'partition':13s} {'variant':14s} {'lr search':22s} {'lr':>6s} {'final':9s} accuracy (seeds "
               f"{', '.join(map(str, plan.seeds))})")
  for partition, variant in plan.cells:
    lr_units = [Unit("lr", partition, variant, lr) for lr in plan.lrs] if VARIANTS[variant].lr_from is None else []
    if lr_units:
      search = " ".join(_short(states[u], read_unit(out, u)) for u in lr_units)
    else:
      search = f"(from {VARIANTS[variant].lr_from})"
    try:
      lr, _ = select_lr(plan, out, partition, variant)
    except StudyError:
      lr = None
    final = Unit("final", partition, variant)
    record = read_unit(out, final)
    acc = ""
    if record is not None and record.get("final_accuracy_mean") is not None:
      acc = f"{record['final_accuracy_mean']:.4f} ± {record.get('final_accuracy_mean_std', 0):.4f}"
    elif record is not None:
      acc = record["status"]
    lines.append(f"{partition:13s} {variant:14s} {search:22s} {'-' if lr is None else f'{lr:g}':>6s} "
                 f"{states[final]:9s} {acc}")
  return "\n".join(lines)


def _short(state: str, record: dict[str, Any] | None) -> str:
  if record is None:
    return {"todo": "....", "failed": "FAIL"}.get(state, "....")
  acc = record.get("final_accuracy_mean")
  return "div." if acc is None else f"{acc:.3f}"[1:]


# ---- command line -----------------------------------------------------------------------------------------------


def parse_plan(argv: Sequence[str] | None) -> tuple[str, Plan, pathlib.Path, int | None]:
  parser = argparse.ArgumentParser(prog="study_fashion_mnist", description=__doc__.split("\n\n")[0])
  parser.add_argument("command", nargs="?", default="run", choices=("run", "status", "plan", "check", "edge"),
                      help="edge: for every cell whose selected lr sits at the grid's edge, run the lr unit one step "
                      "past it (x3 or /3), which the report shows beside the grid (the selection does not change)")
  parser.add_argument("--out", default=None, help=f"study folder (default {DEFAULT_OUT}, or ...-smoke with --smoke)")
  parser.add_argument("--lrs", nargs="*", type=float, default=list(Plan.lrs), help="learning-rate grid")
  parser.add_argument("--seeds", nargs="*", type=int, default=list(Plan.seeds), help="seeds of the final runs")
  parser.add_argument("--search-seed", type=int, default=Plan.search_seed)
  parser.add_argument("--rounds", type=int, default=None, help=f"rounds of the final runs (default {Plan.rounds})")
  parser.add_argument("--search-rounds", type=int, default=None,
                      help=f"rounds of the lr-search runs (default {Plan.search_rounds})")
  parser.add_argument("--local-epochs", type=int, default=Plan.local_epochs)
  parser.add_argument("--eval-every", type=int, default=None, help=f"default {Plan.eval_every}")
  parser.add_argument("--tier", choices=sorted(TIERS), default="core",
                      help="core: FedSpa, FedAvg, Local, Ditto, FedRep on pathological, the same but FedRep on "
                      "Dirichlet (default); all: the issue's whole list (adds Dirichlet's FedRep, FedAvg-FT, FedSpa "
                      "random regrowth, Sub-FedAvg, densities 0.2/0.8)")
  parser.add_argument("--cells", nargs="*", default=None,
                      help="PARTITION/VARIANT cells to run, in this order (instead of --tier)")
  parser.add_argument("--max-units", type=int, default=None, help="stop after running this many units")
  parser.add_argument("--protocols", action="store_true",
                      help="the protocol re-run (issue 18): the methods at the lrs already selected (no lr search), "
                      "scored as they score themselves and after 1 fine-tuning epoch, FedSpa also with its local "
                      f"model; default folder {PROTOCOLS_OUT}")
  parser.add_argument("--sparse-family", action="store_true",
                      help="the sparse family (issue 29): DisPFL, FedDST, PruneFL on both partitions, lr search, "
                      f"final runs also scored after 1 fine-tuning epoch; default folder {SPARSE_OUT}")
  parser.add_argument("--smoke", action="store_true",
                      help="the configs' tiny variants (4 clients, local steps), 2 rounds: checks the plumbing only")
  args = parser.parse_args(argv)
  if args.protocols and args.sparse_family:
    raise StudyError("--protocols and --sparse-family are two different studies; give one")
  cells = TIERS["protocols"] if args.protocols else TIERS["sparse"] if args.sparse_family else TIERS[args.tier]
  if args.cells is not None:
    cells = tuple(tuple(c.split("/", 1)) if "/" in c else (c, "") for c in args.cells)
  small = args.smoke
  plan = Plan(
      lrs=tuple(args.lrs), seeds=tuple(args.seeds), search_seed=args.search_seed,
      rounds=args.rounds or (2 if small else Plan.rounds),
      search_rounds=args.search_rounds or (1 if small else Plan.search_rounds),
      local_epochs=args.local_epochs, eval_every=args.eval_every or (1 if small else Plan.eval_every),
      cells=cells, smoke=small,
  )
  if args.protocols:
    plan = dataclasses.replace(plan, fixed_lrs=dict(SELECTED_LRS), eval_finetune_epochs=1,
                               fedspa_personal_model="local")
  if args.sparse_family:
    plan = dataclasses.replace(plan, eval_finetune_epochs=1)
  base = PROTOCOLS_OUT if args.protocols else SPARSE_OUT if args.sparse_family else DEFAULT_OUT
  out = pathlib.Path(args.out or (base + ("-smoke" if small else "")))
  return args.command, plan, out, args.max_units


def main(argv: Sequence[str] | None = None, runner: Callable = default_runner) -> int:
  try:
    command, plan, out, max_units = parse_plan(argv)
    plan = check_plan(plan)
    if command in ("run", "check") and (out / "plan.json").exists():
      check_folder(plan, out, readonly=True)  # a mismatch is an input error: say it before anything is imported or compiled
  except StudyError as e:
    print(f"study_fashion_mnist: error: {e}", file=sys.stderr)
    return 2
  if command == "check":  # what `start` asks before it goes to the background
    pids = drivers(out) if out.exists() else []
    if pids:
      print(f"{len(pids)} driver(s) (pid {', '.join(pids)}) already running on {out}; see `status`")
      return 3
    return 0
  if command == "status":
    if (out / "plan.json").exists():  # the folder's own plan, whatever options were given
      plan = Plan.from_dict(json.loads((out / "plan.json").read_text()))
    print(status_text(plan, out))
    return 0
  if command == "plan":
    units = plan_units(plan)
    for u in units:
      print(f"{u}  ~{estimate_seconds(plan, u) / 60:.1f} min")
    print(f"{len(units)} units, ~{sum(estimate_seconds(plan, u) for u in units) / 3600:.2f} h on one core")
    return 0
  if command == "edge":
    if not (out / "plan.json").exists():
      print(f"study_fashion_mnist: error: {out} holds no study (no plan.json)", file=sys.stderr)
      return 2
    plan = Plan.from_dict(json.loads((out / "plan.json").read_text()))
    units = edge_units(plan, out)
    print("edge check: " + (", ".join(map(str, units)) if units else "no cell's selected lr is at the grid's edge"))
    return run_study(plan, out, runner, max_units, units=units) if units else 0
  try:
    return run_study(plan, out, runner, max_units)
  except StudyError as e:
    print(f"study_fashion_mnist: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
