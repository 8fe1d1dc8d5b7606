"""The study under the DisPFL group's recipe (issue 28): every method with `--recipe dispfl`, per seed, resumable.

    PYTHONPATH=$PWD/src .venv/bin/python scripts/study_recipe.py                  # the full study (hours; resumable)
    PYTHONPATH=$PWD/src .venv/bin/python scripts/study_recipe.py --tier tiny      # a minute: checks the pipeline
    PYTHONPATH=$PWD/src .venv/bin/python scripts/study_recipe.py --list           # the units and which are done
    # two jobs side by side on a 2-core machine (each unit is written to the results file under a lock):
    ... study_recipe.py --only local fedrep &  ... study_recipe.py --only fedspa fedavg ditto subfedavg &
    # or one method's units split between them (every 2nd unit each; two jobs must never share a unit):
    ... study_recipe.py --only local --shard 0/2 &  ... study_recipe.py --only local --shard 1/2 &

Fashion-MNIST, LeNet-5, 100 clients, 10 per round, 100 rounds, seeds 1, 2, 3, on the group's partition
(`dirichlet_balanced`, alpha 0.3) and today's Dirichlet(0.3); every method at `recipes.DISPFL`'s settings:
FedSpa (scored with its local model and with m_k ⊙ w, from one run), FedAvg and FedAvg-FT (one run: FedAvg's w, and
5 epochs of fine-tuning at the recipe's fine-tuning lr at the final evaluation), Ditto, Sub-FedAvg, FedRep and Local
(every client every round, as the group's script runs it).

Each unit (split, method, seed) is one run folder under `--out`; a stopped study continues where it stopped (a unit
in progress resumes from its checkpoint, bit for bit). After each unit its per-seed numbers are added to the results
file (`--results`; the full tier's is committed: scripts/results/recipe_study.json), from which
`scripts/protocol_report.py --results ... --verdict` derives the wording.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results" / "recipe_study.json"
SPLITS = {"balanced": ("dirichlet_balanced", {"alpha": 0.3}), "dirichlet": ("dirichlet", {"alpha": 0.3})}
# method -> (algorithm, recipe entry, extra config fields, extra hparams)
METHODS = {
    "fedspa": ("fedspa", "fedspa", {}, {}),
    "fedavg": ("fedavg", "fedavg", {"eval_finetune_epochs": 5}, {"finetune_lr": 0.1 / 0.998}),  # + FedAvg-FT
    "ditto": ("ditto", "ditto", {}, {}),
    "subfedavg": ("subfedavg", "subfedavg", {}, {}),
    "fedrep": ("fedrep", "fedrep", {}, {}),
    "local": ("local", "local", {}, {}),
}
# method -> [(protocol name in the results, summary.json key)]
PROTOCOLS = {
    "fedspa": [("FedSpa, its local model", "final_accuracy"), ("FedSpa, m_k ⊙ w", "final_accuracy_masked_global")],
    "fedavg": [("FedAvg, w", "final_accuracy"), ("FedAvg-FT", "final_accuracy_finetuned")],
    "ditto": [("Ditto", "final_accuracy")],
    "subfedavg": [("Sub-FedAvg", "final_accuracy")],
    "fedrep": [("FedRep", "final_accuracy")],
    "local": [("Local", "final_accuracy")],
}
TIERS = {
    "full": dict(seeds=(1, 2, 3), rounds=100, num_clients=100, eval_every=10),
    # Checks the pipeline only: 10 clients, 2 rounds of 2 local steps at batch 16, 2 clients per round, and a small
    # MLP for LeNet-5 (whose CPU compilation would dominate).
    "tiny": dict(seeds=(1,), rounds=2, num_clients=10, eval_every=2),
}


@dataclasses.dataclass(frozen=True)
class Unit:
  split: str
  method: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.split}/{self.method}/seed{self.seed}"


def units(tier: str) -> list[Unit]:
  return [Unit(s, m, seed) for s in SPLITS for m in METHODS for seed in TIERS[tier]["seeds"]]


def unit_config(unit: Unit, tier: str):
  from fedspa_jax import config as config_lib
  from fedspa_jax import recipes

  algorithm, entry, fields, extra = METHODS[unit.method]
  t = TIERS[tier]
  partition, data_args = SPLITS[unit.split]
  config = config_lib.Config(algorithm=algorithm, dataset="fashion_mnist", model="lenet5", num_clients=100, rounds=1)
  config = config_lib.apply_overrides(config, recipes.get("dispfl").overrides(entry))
  changes = {"partition": partition, **{f"data.{k}": v for k, v in data_args.items()}, "rounds": t["rounds"],
             "num_clients": t["num_clients"], "seed": unit.seed, "eval_every": t["eval_every"],
             "rounds_per_dispatch": t["eval_every"], "checkpoint_every": t["eval_every"], **fields,
             **{f"hparams.{k}": v for k, v in extra.items()}}
  if tier == "tiny":
    per_round = t["num_clients"] if unit.method == "local" else 2
    changes.update({"hparams.clients_per_round": per_round, "hparams.local_epochs": None, "hparams.local_steps": 2,
                    "hparams.batch_size": 16, "data.min_samples": 1} if partition == "dirichlet" else
                   {"hparams.clients_per_round": per_round, "hparams.local_epochs": None, "hparams.local_steps": 2,
                    "hparams.batch_size": 16})
    changes.update({"model": "mlp", "model.hidden": [16]})
    if unit.method == "ditto":
      changes["hparams.personal_epochs"] = 1
    if unit.method == "fedrep":
      changes["hparams.head_epochs"] = 1
    if unit.method == "fedavg":
      changes["eval_finetune_epochs"] = 1
  return config_lib.apply_overrides(config, changes)


def records_of(unit: Unit, summary: dict[str, Any]) -> list[dict[str, Any]]:
  """The per-seed records of one finished unit, one per protocol it scores."""
  out = []
  for protocol, key in PROTOCOLS[unit.method]:
    stats = summary[key]
    out.append({
        "split": unit.split, "method": protocol, "seed": unit.seed, "rounds": summary["rounds"],
        "accuracy": stats["mean"],
        "worst10": stats["worst10"], "bytes_total": summary["bytes_total"], "flops": summary["flops"],
        "eval_flops": summary.get("eval_flops"),  # evaluation, FedAvg-FT's fine-tuning epochs included
        "staleness_mean": summary.get("staleness", {}).get("mean"),
        "staleness_max": summary.get("staleness", {}).get("max"), "wall_time": summary["wall_time"],
    })
  return out


def read_results(path: pathlib.Path) -> dict[str, Any]:
  if path.is_file():
    return json.loads(path.read_text())
  return {"study": "Fashion-MNIST under recipes.DISPFL (scripts/study_recipe.py)", "records": []}


@contextlib.contextmanager
def locked(path: pathlib.Path):
  """Holds an exclusive lock beside the results file (jobs of one study running side by side)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def add_records(path: pathlib.Path, unit: Unit, records: list[dict[str, Any]]) -> None:
  """Replaces `unit`'s records in the results file by `records` (read, merged and replaced under the lock)."""
  with locked(path):
    results = read_results(path)
    mine = {p for p, _ in PROTOCOLS[unit.method]}
    results["records"] = [r for r in results["records"]
                          if not ((r["split"], r["seed"]) == (unit.split, unit.seed) and r["method"] in mine)]
    results["records"] += records
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a stop mid-write leaves the old file


def done(results: dict[str, Any], unit: Unit, rounds: int) -> bool:
  return any((r["split"], r["seed"], r.get("rounds")) == (unit.split, unit.seed, rounds)
             and r["method"] == PROTOCOLS[unit.method][0][0] for r in results["records"])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tier", choices=sorted(TIERS), default="full")
  parser.add_argument("--out", help="run folders (default: runs/study_recipe[_tiny])")
  parser.add_argument("--results", help=f"the per-seed results file (default, full tier: {RESULTS.relative_to(ROOT)})")
  parser.add_argument("--list", action="store_true", help="list the units and whether each is done")
  parser.add_argument("--only", nargs="+", metavar="METHOD", choices=sorted(METHODS), help="these methods only")
  parser.add_argument("--rounds", type=int, help="rounds per run instead of the tier's (e.g. 500, the group's)")
  parser.add_argument("--shard", default="0/1", help="I/N: every N-th of the selected units, starting with the I-th")
  parser.add_argument("--refresh", action="store_true",
                      help="rewrite the finished units' records from their run folders' summary.json (runs nothing)")
  args = parser.parse_args(argv)
  if args.rounds:
    TIERS[args.tier] = {**TIERS[args.tier], "rounds": args.rounds}
  out = pathlib.Path(args.out or ROOT / "runs" / ("study_recipe" if args.tier == "full" else "study_recipe_tiny"))
  path = pathlib.Path(args.results) if args.results else (RESULTS if args.tier == "full" else out / "results.json")
  results = read_results(path)
  index, _, count = args.shard.partition("/")
  if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
    parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
  todo = [u for u in units(args.tier) if not args.only or u.method in args.only][int(index)::int(count)]
  if args.list:
    for u in todo:
      print(f"{'done' if done(results, u, TIERS[args.tier]['rounds']) else 'todo'}  {u.name}")
    return 0
  if args.refresh:
    n = 0
    for unit in todo:
      summary = out / f"rounds{TIERS[args.tier]['rounds']}" / unit.name / "summary.json"
      if summary.is_file() and json.loads(summary.read_text()).get("status") == "complete":
        add_records(path, unit, records_of(unit, json.loads(summary.read_text())))
        n += 1
    print(f"{n} units' records rewritten from {out} -> {path}")
    return 0
  from fedspa_jax import experiment

  for unit in todo:
    if done(results, unit, TIERS[args.tier]["rounds"]):
      continue
    print(f"[{datetime.datetime.now():%H:%M:%S}] {unit.name}", flush=True)
    folder = out / f"rounds{TIERS[args.tier]['rounds']}" / unit.name  # a longer study is another run
    summary = experiment.run(unit_config(unit, args.tier), folder, resume=True, echo=None,
                             write_plots=False)
    add_records(path, unit, records_of(unit, summary))
  print(f"[{datetime.datetime.now():%H:%M:%S}] {len(todo)} units done -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
