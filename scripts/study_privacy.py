"""Privacy and unreliable clients (issue 30): personalized accuracy against epsilon, and against dropout.

    python scripts/study_privacy.py run & python scripts/study_privacy.py run; wait   # the full study, one per core
    python scripts/study_privacy.py report --update-docs     # results file, figures, the tables in benchmarks.md
    python scripts/study_privacy.py check                    # exit 1 if benchmarks.md's tables and the file disagree
    python scripts/study_privacy.py run --tier tiny --out /tmp/privacy_tiny && \
      python scripts/study_privacy.py report --tier tiny --out /tmp/privacy_tiny --docs /tmp/privacy_tiny  # check

Setting ("full"): Fashion-MNIST, Dirichlet(0.3) split (`fashion_mnist_dirichlet`), 100 clients, 10 per round,
LeNet-5, SGD (momentum 0, batch 32), 2 local epochs, 40 rounds (`FASHION_ROUNDS`: the seeded study's 100 rounds
would need ~4.3 h of the whole 2-core machine, more than a session), evaluation every 10 rounds; seeds 1, 2, 3 as
one vmapped program per cell (`experiment.sweep`); each method at the learning rate the seeded Fashion-MNIST study
selected for it on this split (`study_fashion_mnist.SELECTED_LRS`). Methods: FedSpa (d=0.5), FedAvg, Ditto and
Sub-FedAvg (d=0.5). Settings of each method:
- no DP, no dropouts (the reference);
- client-level DP at epsilon 8, 4 and 1 (delta 1e-5, after the 40 rounds): adaptive clipping to the median update
  norm (initial clip 0.5, `dp_quantile` 0.5), the noise multiplier z of `NOISE` (found with the accountant,
  `fedspa_jax.privacy`, by bisection: the smallest z, to 3 decimals, whose epsilon after the run's rounds is at most
  the target; `report` takes every epsilon from the runs' summaries), count noise sigma_b = z (Andrew et al.'s
  S / 20 = 0.5 is below the z / 2 they need here);
- dropout 0.3 and 0.6 (a dropped client's update is lost), no DP.
The adaptive clip's DP runs diverge within a few rounds (the noise on the weights grows with the clip); the
"fashion_mnist_clip0.05" group runs the four methods once more at epsilon 8 with a fixed clip C = 0.05 (no
`dp_quantile`): noise of std z C / S = 0.011 per coordinate a round, which leaves the weights finite.
With 100 clients and 10 per round, epsilon 8 already needs z = 2.125: noise of std 0.21 C on every coordinate of the
mean update, whose own norm is at most C; over LeNet-5's 61,706 weights that noise has norm ~53 C. Realistic epsilons
need far more clients, which the "synthetic_iid" group shows: Synthetic-IID (one shared softmax-regression model
labels every client's inputs) with 10,000 clients, 100 per round, the MLP, 1 local epoch at lr 0.05, 100 rounds,
FedSpa and FedAvg without DP and at epsilon 4 (z = 1.348: noise of std 0.013 C per coordinate).

Cells: (group, method, setting); 2 x 2 Synthetic cells, 4 x 6 Fashion-MNIST ones and 4 with the fixed clip, 32 in
all, 96 runs. Each `run` process takes the next cell no other live process holds (a lock on `<cell>/claim`), so one
process per core shares the work as it comes. Each cell writes `<out>/<group>/<method>/<setting>/` (the sweep's
folder) and `cell.json` when it finishes; `run` skips cells with a cell.json and continues a cell stopped part-way
from its last checkpoint (every 10 rounds). Cost, measured 2026-12-07 with two processes on the 2-core AMD EPYC of
docs/benchmarks.md: ~10 s per round of 3 vmapped seeds for FedSpa and for FedAvg in each process (so Ditto ~19 s,
Sub-FedAvg ~12 s from the seeded study's ratios), ~25 s of the whole machine per round of the four methods, so ~17
min per Fashion-MNIST setting at 40 rounds, ~1.7 h for the six, plus the Synthetic cells. The whole study ran in 2 h
(18:19-20:18 UTC that day; its DP cells diverged within minutes, the test suite ran beside it for 50 min).
`report` writes `<docs>/study_privacy.json` (every cell's hyperparameters, per-seed final accuracy, epsilon and
dropped clients), the figures `<docs>/img/study_privacy_epsilon.png` and `study_privacy_dropout.png`, and prints the
tables (`section`: each setting against the method's no-DP run and each method against FedAvg, by Welch's t-test);
`--update-docs` writes them into docs/benchmarks.md's study_privacy block, which `check` holds to the file.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol_report  # noqa: E402  (numpy at import; the Welch test's scipy when called)
from study_fashion_mnist import SELECTED_LRS  # noqa: E402  (stdlib only at import)

DELTA = 1e-5
FASHION_ROUNDS = 40  # sized to finish in one session's ~2 h of the 2-core machine (100 rounds needs ~4.3 h of it)
SYNTHETIC_ROUNDS = 100
# Noise multipliers for epsilon 8, 4, 1 at delta 1e-5 after the group's rounds: sampling 10 of 100 over 40 rounds, and
# 100 of 10,000 over 100 rounds (fedspa_jax.privacy.epsilon, replace-one neighbours; computed 2026-12-07 by
# `noise_for`'s search: the smallest z to 3 decimals whose epsilon is at most the target; tests/test_study_privacy.py
# checks each against dp-accounting). Keys: (clients, per round, rounds).
NOISE = {(100, 10, FASHION_ROUNDS): {8: 2.125, 4: 3.456, 1: 10.74},
         (10000, 100, SYNTHETIC_ROUNDS): {8: 1.091, 4: 1.348, 1: 2.419}}
METHODS = {"fedspa": {"density": 0.5}, "fedavg": {}, "ditto": {}, "subfedavg": {"density": 0.5}}
LABELS = {"fedspa": "FedSpa (d=0.5)", "fedavg": "FedAvg", "ditto": "Ditto", "subfedavg": "Sub-FedAvg (d=0.5)"}
FASHION_SETTINGS = ("none", "eps8", "eps4", "eps1", "drop0.3", "drop0.6")


def tiers() -> dict[str, dict[str, Any]]:
  """Each tier's groups: {group: dict(config, overrides, methods, settings, lrs, seeds)}."""
  fashion = dict(config="fashion_mnist_dirichlet", smoke=False, seeds=[1, 2, 3], methods=list(METHODS),
                 settings=list(FASHION_SETTINGS), population=(100, 10),
                 lrs={m: SELECTED_LRS[f"dirichlet/{m}"] for m in METHODS},
                 overrides={"rounds": FASHION_ROUNDS, "eval_every": 10, "rounds_per_dispatch": 10,
                            "checkpoint_every": 10, "eval_clients": None, "hparams.local_epochs": 2,
                            "hparams.momentum": 0.0,
                            "hparams.clients_per_round": 10, "hparams.batch_size": 32})
  # The adaptive clip's DP runs diverge within a few rounds at 100 clients (see the docs): the same runs at epsilon 8
  # with a small fixed clip, whose noise (std z C / S = 0.011 per coordinate a round) leaves the weights finite, show
  # what is left of each method's personalized model when the shared model cannot learn.
  fixed = {**fashion, "settings": ["eps8"], "fixed_clip": 0.05, "baseline": "fashion_mnist"}
  synthetic = dict(config="default", smoke=False, seeds=[1, 2, 3], methods=["fedspa", "fedavg"],
                   settings=["none", "eps4"], population=(10000, 100), lrs={"fedspa": 0.05, "fedavg": 0.05},
                   overrides={"num_clients": 10000, "data_args.iid": True, "rounds": SYNTHETIC_ROUNDS,
                              "eval_every": 10, "rounds_per_dispatch": 10,
                              "checkpoint_every": 10, "eval_clients": 1000, "hparams.clients_per_round": 100,
                              "hparams.local_epochs": 1})
  tiny = dict(config="default", smoke=True, seeds=[1, 2], methods=["fedspa", "fedavg"],
              settings=["none", "eps8", "drop0.3"], population=(20, 4), lrs={"fedspa": 0.05, "fedavg": 0.05},
              overrides={"num_clients": 20, "rounds": 4, "eval_every": 2, "rounds_per_dispatch": 2,
                         "checkpoint_every": 0, "hparams.clients_per_round": 4})
  # Synthetic first: its four cells are the cheap ones, and the one point at realistic epsilon.
  return {"full": {"synthetic_iid": synthetic, "fashion_mnist": fashion, "fashion_mnist_clip0.05": fixed},
          "tiny": {"tiny": tiny}}


def noise_for(population: tuple[int, int], target: float, rounds: int) -> float:
  """z for `target` epsilon: the pinned value for the full study, else found now by bisection."""
  pinned = NOISE.get((*population, rounds), {}).get(target)
  if pinned is not None:
    return pinned
  from fedspa_jax import privacy

  fits = lambda z: privacy.epsilon(*population, z, rounds, DELTA) <= target
  low, high = 0.1, 1000.0
  while high - low > 1e-3:
    mid = (low + high) / 2
    low, high = (low, mid) if fits(mid) else (mid, high)
  z = math.ceil(high * 1000) / 1000  # fits (epsilon falls as z grows); then the smallest such on the 0.001 grid
  while fits(round(z - 0.001, 3)):
    z = round(z - 0.001, 3)
  return z


def setting_hparams(setting: str, population: tuple[int, int], rounds: int, fixed_clip: float | None = None
                    ) -> dict[str, Any]:
  """The hyperparameters of a setting ("none", "eps<E>", "drop<p>"); DP clips adaptively unless `fixed_clip`."""
  if setting == "none":
    return {}
  if setting.startswith("drop"):
    return {"dropout": float(setting[4:])}
  z = noise_for(population, float(setting[3:]), rounds)
  if fixed_clip is not None:
    return {"dp_clip": fixed_clip, "dp_noise_multiplier": z, "dp_delta": DELTA}
  return {"dp_clip": 0.5, "dp_quantile": 0.5, "dp_noise_multiplier": z, "dp_delta": DELTA,
          "dp_count_noise": max(population[1] / 20.0, z)}


def cells(tier: str, group: str | None = None) -> list[tuple[str, str, str]]:
  groups = tiers()[tier]
  return [(g, m, s) for g, spec in groups.items() if group in (None, g)
          for s in spec["settings"] for m in spec["methods"]]


def make_config(tier: str, group: str, method: str, setting: str):
  from fedspa_jax import compare
  from fedspa_jax import config as config_lib

  spec = tiers()[tier][group]
  config = config_lib.load(spec["config"], smoke=spec["smoke"])
  config = config_lib.apply_overrides(config, {**spec["overrides"], "seed": spec["seeds"][0],
                                               "hparams.lr": spec["lrs"][method]})
  hparams = {**METHODS[method], **setting_hparams(setting, spec["population"], config.rounds, spec.get("fixed_clip"))}
  config, _ = compare.for_algorithm(config, method, hparams)
  return config


def log(line: str) -> None:
  print(f"[privacy study {datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {line}", flush=True)


_CLAIMS: list[Any] = []  # the open claim files: their locks last as long as this process


def claim(folder: pathlib.Path) -> bool:
  """Take `folder`'s cell for this process: True unless another live process holds it.

  The claim is an exclusive lock (flock) on `folder/claim`, held until this process ends; the system releases the
  lock of a process that ended (a session's end), so its cell is taken by the next run and continues from its
  checkpoint.
  """
  folder.mkdir(parents=True, exist_ok=True)
  f = open(folder / "claim", "a")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    return False
  _CLAIMS.append(f)
  return True


def run(args) -> None:
  from fedspa_jax import experiment

  out = pathlib.Path(args.out)
  # Each process takes the next cell nobody holds: start one per core and they share the work as it comes.
  for group, method, setting in cells(args.tier, args.group):
    folder = out / group / method / setting
    if (folder / "cell.json").exists() or not claim(folder):
      continue
    config = make_config(args.tier, group, method, setting)
    seeds = tiers()[args.tier][group]["seeds"]
    log(f"{group}/{method}/{setting}: seeds {seeds}, {config.rounds} rounds, hparams {config.hparams}")
    start = time.time()
    try:
      # a cell stopped part-way (a session's end) continues from its last checkpoint, every 10 rounds, bit for bit
      summary = experiment.sweep(config, seeds, folder / "runs", resume=True, progress=False)
      cell = {"status": "complete", "per_seed": summary["final_accuracy_mean_per_seed"]}
    except experiment.TrainingDiverged as e:
      cell = {"status": "diverged", "error": str(e)}
    cell.update(group=group, method=method, setting=setting, seeds=seeds, hparams=config.hparams,
                wall_time=round(time.time() - start, 1), finished=datetime.datetime.now().isoformat(timespec="seconds"))
    (folder / "cell.json").write_text(json.dumps(cell, indent=2) + "\n")
    log(f"{group}/{method}/{setting}: {cell['status']} in {cell['wall_time']:.0f} s")


def seed_summaries(folder: pathlib.Path) -> list[dict[str, Any]]:
  """Each finished seed's summary.json, with `clients_dropped` from its metrics.jsonl's last record (the running
  total is written there, not in the summary)."""
  found = []
  for path in sorted(folder.glob("runs/**/summary.json")):
    summary = json.loads(path.read_text())
    if summary.get("status") != "complete" or "seed" not in summary:
      continue
    records = (path.parent / "metrics.jsonl").read_text().splitlines()
    last = json.loads(records[-1]) if records else {}
    history = [[r["round"], round(r["accuracy_mean"], 4), round(r["train_loss"], 4)]
               for r in map(json.loads, records) if "accuracy_mean" in r]
    found.append({**summary, "clients_dropped": last.get("clients_dropped", 0), "history": history})
  return found


def config_rounds(tier: str, group: str) -> int:
  return int(tiers()[tier][group]["overrides"]["rounds"])


def diverged_at(error: str) -> dict[str, int] | None:
  """{"seed", "round"} of the first seed whose training diverged, from a diverged cell's error (else None)."""
  found = re.search(r"seed (\d+): training diverged in round (\d+)", error)
  return None if found is None else {"seed": int(found.group(1)), "round": int(found.group(2))}


def report(args) -> None:
  import numpy as np

  out, docs = pathlib.Path(args.out), pathlib.Path(args.docs)
  results = []
  for group, method, setting in cells(args.tier):
    folder = out / group / method / setting
    if not (folder / "cell.json").exists():
      continue
    cell = json.loads((folder / "cell.json").read_text())
    runs = seed_summaries(folder)
    accuracy = [r["final_accuracy_mean"] for r in runs]
    results.append({
        "group": group, "method": method, "setting": setting, "status": cell["status"], "seeds": cell["seeds"],
        "hparams": cell["hparams"], "final_accuracy_mean_per_seed": accuracy,
        "final_accuracy_mean": float(np.mean(accuracy)) if accuracy else None,
        "final_accuracy_std": float(np.std(accuracy)) if accuracy else None,
        "dp_epsilon": runs[0].get("dp_epsilon") if runs else None,
        "dp_epsilon_per_seed": [r.get("dp_epsilon") for r in runs],
        "dp_delta": runs[0].get("dp_delta") if runs else None,
        "clients_dropped_per_seed": [r.get("clients_dropped", 0) for r in runs],
        "history_per_seed": [r["history"] for r in runs],  # [round, mean client accuracy, training loss] per evaluation
        "rounds": config_rounds(args.tier, group),
        "baseline_group": tiers()[args.tier][group].get("baseline", group),  # where its no-DP runs are
        "diverged": diverged_at(cell.get("error", "")),
        "wall_time": cell["wall_time"],
    })
  docs.mkdir(parents=True, exist_ok=True)
  stamp = {"command": f"python scripts/study_privacy.py run --tier {args.tier}",
           "date": datetime.date.today().isoformat()}
  document = {**stamp, "cells": results}
  (docs / "study_privacy.json").write_text(json.dumps(document, indent=2) + "\n")
  plot(results, docs / "img")
  text = section(document)
  print(text)
  if args.update_docs:
    update_docs(pathlib.Path(args.benchmarks), text)


SETTING_NAMES = {"none": "no DP", "eps8": "epsilon 8", "eps4": "epsilon 4", "eps1": "epsilon 1",
                 "drop0.3": "dropout 0.3", "drop0.6": "dropout 0.6"}
BEGIN, END = "<!-- study_privacy:begin -->", "<!-- study_privacy:end -->"


def section(document: dict[str, Any]) -> str:
  """The tables of docs/benchmarks.md, derived from the results file alone.

  Per group, each method's final personalized accuracy (mean ± std over the seeds) in each setting, with the
  setting's verdict against the method's own no-DP run ("lower" or "higher" only where a two-sided Welch t-test over
  the seeds gives p < 0.05, else "tied"); then each method against FedAvg in each setting, by the same test.
  """
  cells = document["cells"]
  find = lambda g, m, s: next((c for c in cells if (c["group"], c["method"], c["setting"]) == (g, m, s)), None)
  seeds = lambda c: {"values": c["final_accuracy_mean_per_seed"]}
  scored = lambda c: c is not None and bool(c["final_accuracy_mean_per_seed"])

  def against(a, b):
    """a against b: the verdict ("ahead of" / "behind" / "tied with", p < P_LEVEL) and p, from one Welch test."""
    p = protocol_report.welch_p(seeds(a), seeds(b))
    mean = lambda c: protocol_report.cell_stats(seeds(c))[0]
    return ("tied with" if not p < protocol_report.P_LEVEL else "ahead of" if mean(a) > mean(b) else "behind"), p

  def short(c):
    if c is None:
      return "-"
    if c["final_accuracy_mean_per_seed"]:
      return protocol_report.short(seeds(c))
    at = c.get("diverged")
    return f"diverged (round {at['round']}, seed {at['seed']})" if at else c["status"]

  words = {"ahead of": "higher", "behind": "lower", "tied with": "tied"}
  lines = [f"Derived by `scripts/study_privacy.py report` from `docs/study_privacy.json` ({document['date']}; do not "
           "edit by hand: `study_privacy.py check` fails when this block and the file disagree). Final personalized "
           "accuracy, "
           "mean ± std over the seeds' mean client accuracies; in brackets, against the method's own no-DP run: "
           f"\"lower\" or \"higher\" only where a two-sided Welch t-test gives p < {protocol_report.P_LEVEL} "
           "(p shown), "
           "else \"tied\". Epsilon at delta 1e-5 after the last round, as the runs recorded it. \"Diverged\": a "
           "seed's training loss became NaN or infinite in that round, which stops the cell's runs (no accuracy)."]
  for group in dict.fromkeys(c["group"] for c in cells):
    settings = list(dict.fromkeys(c["setting"] for c in cells if c["group"] == group))
    methods = list(dict.fromkeys(c["method"] for c in cells if c["group"] == group))
    first = next(c for c in cells if c["group"] == group)
    baseline = first.get("baseline_group", group)
    shown = settings if baseline == group else ["none", *settings]  # another group's no-DP runs, shown beside
    lines += ["", f"**{group}** ({first['rounds']} rounds, seeds {', '.join(map(str, first['seeds']))}"
              + ("" if baseline == group else f"; no DP: {baseline}'s runs") + "):", "",
              "| method | " + " | ".join(SETTING_NAMES.get(s, s) for s in shown) + " |",
              "| --- |" + " ---: |" * len(shown)]
    for method in methods:
      base, row = find(baseline, method, "none"), []
      if baseline != group:
        row.append(short(base))
      for setting in settings:
        cell = find(group, method, setting)
        text = short(cell)
        if setting != "none" and scored(cell) and scored(base):
          verdict, p = against(cell, base)
          text += f" ({words[verdict]}" + ("" if verdict == "tied with" else f", p = {p:.2g}") + ")"
        row.append(text)
      lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(row) + " |")
    spent = [[e for c in cells if (c["group"], c["setting"]) == (group, s) for e in c["dp_epsilon_per_seed"]
              if e is not None] for s in settings]
    lines.append("| epsilon (largest run's) | " + "- | " * (len(shown) - len(settings))
                 + " | ".join(f"{max(e):.3f}" if e else "-" for e in spent) + " |")
    if "fedavg" in methods and len(methods) > 1:
      lines += ["", f"Against FedAvg, {group} (same test):", "",
                "| setting | " + " | ".join(LABELS.get(m, m) for m in methods if m != "fedavg") + " |",
                "| --- |" + " --- |" * (len(methods) - 1)]
      for setting in settings:
        fedavg, row = find(group, "fedavg", setting), []
        for method in methods:
          if method == "fedavg":
            continue
          cell = find(group, method, setting)
          if not (scored(cell) and scored(fedavg)):
            row.append("-")
            continue
          verdict, p = against(cell, fedavg)
          row.append(verdict.split()[0] + ("" if verdict == "tied with" else f" (p = {p:.2g})"))
        lines.append(f"| {SETTING_NAMES.get(setting, setting)} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def update_docs(path: pathlib.Path, text: str) -> None:
  doc = path.read_text()
  if BEGIN not in doc or END not in doc:
    raise SystemExit(f"study_privacy: error: {path} has no {BEGIN} ... {END} block to write the tables into")
  head, rest = doc.split(BEGIN, 1)
  path.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def check(args) -> int:
  """0 when docs/benchmarks.md's block is what the committed results file gives, else 1 (and says so)."""
  document = json.loads((pathlib.Path(args.docs) / "study_privacy.json").read_text())
  doc = pathlib.Path(args.benchmarks).read_text()
  found = doc.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n") if BEGIN in doc and END in doc else None
  if found == section(document):
    return 0
  print(f"study_privacy: {args.benchmarks}'s block differs from `report` on {args.docs}/study_privacy.json; run "
        "`python scripts/study_privacy.py report --update-docs`", file=sys.stderr)
  return 1


GROUP_STYLES = {"fashion_mnist": ("o", "-"), "fashion_mnist_clip0.05": ("s", ":"), "synthetic_iid": ("^", "--")}


def plot(results: list[dict[str, Any]], folder: pathlib.Path) -> None:
  """Accuracy against epsilon (no DP drawn at the right) and against dropout, one line per method and group."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folder.mkdir(parents=True, exist_ok=True)
  for kind, axis_label, name in (("eps", "epsilon at delta 1e-5 (no DP at the right)", "epsilon"),
                                 ("drop", "dropout", "dropout")):
    fig, ax = plt.subplots(figsize=(9, 4))
    for group in sorted({r["group"] for r in results if r["setting"].startswith(kind)}):  # groups that vary it
      for method in METHODS:
        rows = [r for r in results if r["group"] == group and r["method"] == method
                and r["final_accuracy_mean"] is not None and (r["setting"] == "none" or r["setting"].startswith(kind))]
        if not rows:
          continue
        if kind == "eps":
          xs = [float(r["setting"][3:]) if r["setting"] != "none" else 16.0 for r in rows]
        else:
          xs = [float(r["setting"][4:]) if r["setting"] != "none" else 0.0 for r in rows]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        # a method's colour in every group, a group's marker and line; methods side by side at each setting
        shift = list(METHODS).index(method) - (len(METHODS) - 1) / 2
        xs = [x * 1.04 ** shift if kind == "eps" else x + 0.008 * shift for x in xs]
        style = GROUP_STYLES.get(group, ("o", "-"))
        line = ax.errorbar([xs[i] for i in order], [rows[i]["final_accuracy_mean"] for i in order],
                           yerr=[rows[i]["final_accuracy_std"] for i in order], marker=style[0], linestyle=style[1],
                           color=f"C{list(METHODS).index(method)}", capsize=3, label=f"{LABELS[method]} ({group})")
        lost = [r for r in results if (r["group"], r["method"]) == (group, method) and r.get("diverged")
                and r["setting"].startswith(kind)]
        if lost:  # no model to score: a cross on the floor of the axis
          # side by side: each method's cross a little apart from the others' at the same setting
          shift = list(METHODS).index(method) - (len(METHODS) - 1) / 2
          xs_lost = [float(r["setting"][3:]) * 1.06 ** shift if kind == "eps"
                     else float(r["setting"][4:]) + 0.012 * shift for r in lost]
          ax.scatter(xs_lost, [0.0] * len(lost), marker="x", color=line[0].get_color(), clip_on=False, zorder=3)
    if kind == "eps":
      ax.set_xscale("log", base=2)
      ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "no DP"])
    ax.set_xlabel(axis_label)
    ax.set_ylim(bottom=0.0)
    if any(r.get("diverged") and r["setting"].startswith(kind) for r in results):
      ax.set_title("x at 0: training diverged (NaN loss), no model", fontsize=8)
    ax.set_ylabel("final personalized accuracy (mean over clients)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    fig.tight_layout()
    fig.savefig(folder / f"study_privacy_{name}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=("run", "report", "check"))
  parser.add_argument("--tier", choices=("full", "tiny"), default="full")
  parser.add_argument("--out", default="runs/study_privacy")
  parser.add_argument("--docs", default="docs", help="report: where study_privacy.json and img/ go")
  parser.add_argument("--benchmarks", default="docs/benchmarks.md", help="the page that holds the tables' block")
  parser.add_argument("--update-docs", action="store_true", help="report: write the tables into --benchmarks")
  parser.add_argument("--group", help="run: only this group's cells (default: every group of the tier)")
  args = parser.parse_args(argv)
  if args.group is not None and args.group not in tiers()[args.tier]:
    parser.error(f"--group must be one of {sorted(tiers()[args.tier])} for tier {args.tier!r}, got {args.group!r}")
  if args.command == "check":
    raise SystemExit(check(args))
  run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
  main()
