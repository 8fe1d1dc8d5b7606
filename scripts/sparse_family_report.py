"""The sparse family's rows of the Fashion-MNIST study (issue 29): DisPFL, FedDST and PruneFL beside FedSpa and Sub-FedAvg.

    bash scripts/study_fashion_mnist.sh start --sparse-family --jobs 2     # background, resumable; runs/study_sparse_family
    .venv/bin/python scripts/study_fashion_mnist.py edge --out runs/study_sparse_family  # then the edge check
    .venv/bin/python scripts/sparse_family_report.py collect               # the run folder -> the committed results file
    .venv/bin/python scripts/sparse_family_report.py                       # prints the section and the verdict rows
    .venv/bin/python scripts/sparse_family_report.py --update-docs         # writes both into the docs
    .venv/bin/python scripts/sparse_family_report.py --check               # exit 1 if the docs and the file disagree

`collect` reads each finished final unit of the study folder (its seeds' summary.json: the mean client accuracy as the
method scores itself and after 1 epoch of local fine-tuning, each run's worst-10% mean, bytes, FLOPs, wall time) and
its lr search, and writes scripts/results/sparse_family_study.json with per-seed values: every table and verdict row
below is derived from that file (and, for FedSpa and Sub-FedAvg, from the protocol re-run's results file,
scripts/results/protocol_study_2026-12-02.json: same setting, same seeds, the lr its study selected).

The verdict rows hold each method against FedSpa scored with its local model, per split and protocol: "ahead" or
"behind" only where a two-sided Welch t-test over the seeds' mean client accuracies gives p < 0.05, else "tied"
(`protocol_report.compare`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol_report  # noqa: E402
import study_fashion_mnist as study  # noqa: E402
import study_report  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results" / "sparse_family_study.json"
BESIDE = protocol_report.RESULTS  # FedSpa's and Sub-FedAvg's cells of the protocol re-run
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
VERDICT = protocol_report.VERDICT
SECTION = ("<!-- sparse_family:begin -->", "<!-- sparse_family:end -->")
ROWS_MARK = ("<!-- sparse_verdict:begin -->", "<!-- sparse_verdict:end -->")
METHODS = {"dispfl": "DisPFL", "feddst": "FedDST", "prunefl": "PruneFL"}
SCORED_AS = {"dispfl": "its own sparse model (`local`)", "feddst": "the global sparse model (`global`)",
             "prunefl": "the global sparse model (`global`)"}
# The protocol re-run's methods shown beside the family, and its cost columns (docs/benchmarks.md, "The protocol
# re-run", 2026-12-02: the same runs as that results file's accuracies).
BESIDE_ROWS = ("FedSpa, its local model", "FedSpa, m_k ⊙ w", "Sub-FedAvg")
SUBJECT = "FedSpa, its local model"
PROTOCOLS = {"as_scored": "as scored", "finetuned": "after 1 fine-tuning epoch"}


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.is_file() else None


# ---- collect: the run folder -> the results file -----------------------------------------------------------------


def collect(out: pathlib.Path) -> dict[str, Any]:
  plan = read_json(out / "plan.json")
  if plan is None:
    raise SystemExit(f"sparse_family_report: error: {out} holds no study (no plan.json); run "
                     "`bash scripts/study_fashion_mnist.sh start --sparse-family --jobs 2` first")
  cells, shape = [], "?"
  for partition, variant in study.TIERS["sparse"]:
    unit_dir = out / study.Unit("final", partition, variant).path
    unit = read_json(unit_dir / "unit.json")
    if unit is None or unit.get("status") != "complete":
      continue
    seeds = [read_json(unit_dir / f"seed_{s}" / "summary.json") for s in unit["seeds"]]
    edge = study.edge_lr(study.Plan(lrs=tuple(plan["lrs"])), unit["lr"])  # the edge check's rate, if at an edge
    edge_unit = None if edge is None else read_json(out / study.Unit("lr", partition, variant, edge).path / "unit.json")
    rounds, h = seeds[0]["rounds"], seeds[0]["hparams"]
    shape = (f"{seeds[0]['num_clients']} clients, {h['clients_per_round']} per round, {seeds[0]['model']}, "
             + (f"{rounds} rounds of {h['local_epochs']} local epochs" if h["local_epochs"] else
                f"{rounds} rounds of {h['local_steps']} local steps") + f" at batch {h['batch_size']}")
    cells.append({
        "split": partition, "method": METHODS[variant], "algorithm": variant, "scored_with": SCORED_AS[variant],
        "hparams": seeds[0]["hparams"], "lr": unit["lr"], "lr_search": unit["lr_search"],
        # one step past the grid's edge (`study_fashion_mnist.py edge`): shown, not used for the selection
        "lr_edge": None if edge_unit is None else {f"{edge:g}": edge_unit.get("final_accuracy_mean")},
        "seeds": unit["seeds"],
        "rounds": rounds,
        "as_scored": [s["final_accuracy"]["mean"] for s in seeds],
        "finetuned": [s["final_accuracy_finetuned"]["mean"] for s in seeds],
        "worst10": [s["final_accuracy"]["worst10"] for s in seeds],
        "worst10_finetuned": [s["final_accuracy_finetuned"]["worst10"] for s in seeds],
        "mib_up_per_round": float(np.mean([s["bytes_up"] for s in seeds])) / rounds / 2**20,
        "mib_down_per_round": float(np.mean([s["bytes_down"] for s in seeds])) / rounds / 2**20,
        "train_tflops": float(np.mean([s["flops"] for s in seeds])) / 1e12,
        "eval_tflops": float(np.mean([s["eval_flops"] for s in seeds])) / 1e12,
        "client_store_bytes_per_client": seeds[0].get("client_store_bytes_per_client"),
        "seconds_per_round": unit["wall_time_run"] / rounds,  # the 3 seeds vmapped in one sweep
        "finished_at": unit["finished_at"], "device": seeds[0]["device"], "jax_version": seeds[0]["jax_version"],
    })
  return {
      "study": f"the sparse family on the Fashion-MNIST study's splits (issue 29): {shape}, SGD without momentum, seeds "
               f"{', '.join(map(str, plan['seeds']))}; lr from the grid {plan['lrs']} on seed {plan['search_seed']} "
               f"over {plan['search_rounds']} rounds; every run scored as the method scores itself and after 1 epoch "
               "of local fine-tuning",
      "command": "bash scripts/study_fashion_mnist.sh start --sparse-family --jobs 2; "
                 "python scripts/sparse_family_report.py collect",
      "machine": study_report.machine() + " (where `collect` ran)",
      "cells": cells,
  }


# ---- derived text -------------------------------------------------------------------------------------------------


def beside_cells() -> list[dict[str, Any]]:
  return json.loads(BESIDE.read_text())["cells"]


def find(cells: list[dict[str, Any]], split: str, protocol: str, method: str) -> dict[str, Any] | None:
  return next((c for c in cells if (c["split"], c["protocol"], c["method"]) == (split, protocol, method)), None)


def as_protocol_cell(cell: dict[str, Any], protocol: str) -> dict[str, Any]:
  return {"values": cell[protocol], "worst10_values": cell["worst10" if protocol == "as_scored" else "worst10_finetuned"]}


def mean_std(cell: dict[str, Any]) -> str:
  if "values" in cell:
    return f"{np.mean(cell['values']):.4f} ± {np.std(cell['values']):.4f}"
  return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def tables(results: dict[str, Any]) -> str:
  """Per split: FedSpa and Sub-FedAvg (the protocol re-run) above the three methods of this study."""
  beside = beside_cells()
  costs = json.loads(BESIDE.read_text()).get("costs", {})
  header = ("| method, scored with | lr | as scored | after 1 fine-tuning epoch | worst 10%, as scored / fine-tuned | "
            "MiB up / round | MiB down / round | train TFLOPs | s/round in the study (3 seeds vmapped) |\n"
            "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  parts = []
  for split, title in (("pathological", "Pathological, 2 classes per client"), ("dirichlet", "Dirichlet(0.3)")):
    lines = [f"#### {title}", "", header]
    for method in BESIDE_ROWS:
      scored, tuned = find(beside, split, "as_scored", method), find(beside, split, "finetuned", method)
      if scored is None:
        continue
      cost = costs.get(method, {}).get(split, {})
      lines.append(f"| {method} (protocol re-run) | {cost.get('lr', '')} | {mean_std(scored)} | "
                   f"{mean_std(tuned) if tuned else '·'} | {scored['worst10']:.3f} / "
                   f"{tuned['worst10'] if tuned else float('nan'):.3f} | {cost.get('mib_up_per_round', '')} | | "
                   f"{cost.get('train_tflops', '')} | |")
    for c in results["cells"]:
      if c["split"] != split:
        continue
      edge = ""
      for lr, acc in (c.get("lr_edge") or {}).items():
        chosen = c["lr_search"][f"{c['lr']:g}"]
        edge = f" (edge check: {lr} {'diverged' if acc is None else f'{acc:.3f}'} against {chosen:.3f})"
      lines.append(
          f"| {c['method']}, {c['scored_with']} | {c['lr']:g}{edge} | {mean_std({'values': c['as_scored']})} | "
          f"{mean_std({'values': c['finetuned']})} | {np.mean(c['worst10']):.3f} / "
          f"{np.mean(c['worst10_finetuned']):.3f} | {c['mib_up_per_round']:.2f} | "
          f"{c['mib_down_per_round']:.2f} | {c['train_tflops']:.3f} | "
          f"{c['seconds_per_round']:.2f} |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def verdict_rows(results: dict[str, Any]) -> str:
  """One row per method: against FedSpa's local model, per split and protocol, by Welch's t-test over seeds."""
  beside = beside_cells()
  columns = [(split, protocol) for split in ("pathological", "dirichlet") for protocol in PROTOCOLS]
  names = {"pathological": "pathological", "dirichlet": "Dirichlet(0.3)"}
  lines = [
      "**The sparse family** (issue 29: DisPFL, FedDST, PruneFL; tables in [benchmarks.md](benchmarks.md), \"The "
      "sparse family on the study's splits\").",
      "",
      f"Derived by `scripts/sparse_family_report.py` from `scripts/results/{RESULTS.name}` and "
      f"`scripts/results/{BESIDE.name}` (do not edit by hand; `--check` fails when this block and the files "
      f"disagree). Each method against {SUBJECT}: \"ahead\" or \"behind\" only where a two-sided Welch t-test "
      "over the 3 seeds' mean client accuracies gives p < 0.05, else \"tied\".",
      "",
      "| method | " + " | ".join(f"{names[s]}, {PROTOCOLS[p]}" for s, p in columns) + " |",
      "| --- |" + " --- |" * len(columns),
  ]
  word = {"ahead of": "ahead", "behind": "behind", "tied with": "tied"}
  for method in METHODS.values():
    row = []
    for split, protocol in columns:
      mine = next((c for c in results["cells"] if (c["split"], c["method"]) == (split, method)), None)
      subject = find(beside, split, protocol, SUBJECT)
      if mine is None or subject is None:
        row.append("·")
        continue
      cell = as_protocol_cell(mine, protocol)
      p = protocol_report.welch_p(cell, subject)
      row.append(f"{protocol_report.short(cell)}: {word[protocol_report.compare(cell, subject)]} (p = {p:.2g})")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  subject_row = [protocol_report.short(find(beside, s, p, SUBJECT)) for s, p in columns]
  lines.append(f"| *{SUBJECT}* | " + " | ".join(subject_row) + " |")
  return "\n".join(lines) + "\n"


def section(results: dict[str, Any]) -> str:
  done = len(results["cells"])
  last = max((c["finished_at"] for c in results["cells"]), default="not yet")
  return "\n".join([
      "## The sparse family on the study's splits (issue 29)", "",
      "```bash",
      "bash scripts/study_fashion_mnist.sh start --sparse-family --jobs 2   # background, resumable",
      ".venv/bin/python scripts/study_fashion_mnist.py edge --out runs/study_sparse_family  # lr one step past the grid",
      ".venv/bin/python scripts/sparse_family_report.py collect            # scripts/results/sparse_family_study.json",
      ".venv/bin/python scripts/sparse_family_report.py --update-docs      # this section and the verdict rows",
      "```", "",
      f"Machine: {results['machine']}; JAX {results['cells'][0]['jax_version'] if done else '?'}. {done} of "
      f"{len(study.TIERS['sparse'])} cells finished (last {last}).", "",
      f"Setting: {results['study']}. Each method at its defaults otherwise (DisPFL: density 0.5, random neighbours; "
      "FedDST: density 0.5; PruneFL: its adaptive density). FedSpa and Sub-FedAvg are the protocol re-run's runs "
      "(above; same setting and seeds, their accuracies from its results file, their costs from its table, which "
      "gives bytes up only). "
      "Accuracy: mean over all clients, then mean ± std (population) over the 3 seeds. Bytes per round summed "
      "over the sampled clients (DisPFL's down: each sampled client receives its neighbours' sparse models); training FLOPs of the whole run. s/round: the final run's wall time over its "
      "rounds, 3 seeds vmapped, with the other driver on the second core (one device; evaluations included).", "",
      tables(results), "",
      "Each method against FedSpa's local model, by Welch's t-test over the seeds: the verdict's rows \"The sparse "
      "family\" ([protocol_verdict.md](protocol_verdict.md), also in the protocol re-run's section above).",
  ]) + "\n"


def replace_between(text: str, marks: tuple[str, str], block: str, where: str) -> str:
  begin, end = marks
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    return head + f"{begin}\n{block}{end}" + rest.split(end, 1)[1]
  if where not in text:
    raise SystemExit(f"sparse_family_report: error: no place for the block (looked for {where!r})")
  head, rest = text.split(where, 1)
  return head + f"{begin}\n{block}{end}\n\n" + where + rest


def docs_text(results: dict[str, Any]) -> tuple[str, str]:
  """(docs/benchmarks.md, docs/protocol_verdict.md) with their blocks written from `results`."""
  old_verdict = VERDICT.read_text()
  verdict = replace_between(old_verdict, ROWS_MARK, verdict_rows(results), "FedSpa with random regrowth")
  benchmarks = BENCHMARKS.read_text()
  if old_verdict.strip() in benchmarks:  # the protocol re-run's section includes the verdict as it is
    benchmarks = benchmarks.replace(old_verdict.strip(), verdict.strip())
  benchmarks = replace_between(benchmarks, SECTION, section(results), "## Privacy and unreliable clients")
  return benchmarks, verdict


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("command", nargs="?", default="report", choices=("collect", "report"))
  parser.add_argument("--out", default=study.SPARSE_OUT, help="collect: the study folder")
  parser.add_argument("--results", default=str(RESULTS))
  parser.add_argument("--update-docs", action="store_true")
  parser.add_argument("--check", action="store_true", help="exit 1 if the docs' blocks and the results disagree")
  args = parser.parse_args(argv)
  path = pathlib.Path(args.results)
  if args.command == "collect":
    results = collect(pathlib.Path(args.out))
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"{path}: {len(results['cells'])} cells", file=sys.stderr)
    return 0
  results = read_json(path)
  if results is None:
    print(f"sparse_family_report: error: no results file {path}; run `collect` first", file=sys.stderr)
    return 2
  benchmarks, verdict = docs_text(results)
  if args.check:
    if benchmarks != BENCHMARKS.read_text() or verdict != VERDICT.read_text():
      print(f"docs disagree with {path}: run scripts/sparse_family_report.py --update-docs", file=sys.stderr)
      return 1
    return 0
  if args.update_docs:
    BENCHMARKS.write_text(benchmarks)
    VERDICT.write_text(verdict)
  print(section(results))
  print(f"[{datetime.datetime.now():%H:%M:%S}] report of {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
