"""The protocol re-run of the Fashion-MNIST study (issue 18): every method under each protocol, from the study folder.

    .venv/bin/python scripts/protocol_report.py                  # prints the section (and writes <out>/report.md)
    .venv/bin/python scripts/protocol_report.py --update-docs    # also replaces its section of docs/benchmarks.md
    .venv/bin/python scripts/protocol_report.py --verdict        # the verdict's wording, from the results file
    .venv/bin/python scripts/protocol_report.py --write-verdict  # ... written into docs/protocol_verdict.md
    .venv/bin/python scripts/protocol_report.py --check          # exit 1 if docs/protocol_verdict.md disagrees
    # the same for the study under the group's recipe (its own block, with the costs and what is not run yet):
    .venv/bin/python scripts/protocol_report.py --results scripts/results/recipe_study.json --write-verdict

The verdict's comparisons are derived, not written by hand (`verdict_block`): two methods are "tied" unless a
two-sided Welch t-test over seeds separates their mean client accuracies at p < 0.05, and every "ahead"/"behind"
names the test, its p and the split; worst-10% claims are made per split. The results file (`--results`, default
`RESULTS`) holds per-seed values (`"values"`) or, where only those were kept, each cell's mean, population std and
number of seeds.

Reads what `bash scripts/study_fashion_mnist.sh start --protocols --jobs 2` writes (runs/study_protocols): each
final unit's summary.json (mean ± std over seeds of every protocol's final accuracy) and its seeds' clients.npz
(the clients' own models and masks after the last round). Cells not finished yet are marked ·. The verdict is
written by hand in docs/protocol_verdict.md and included as it is.
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
import study_fashion_mnist as study  # noqa: E402
import study_recipe  # noqa: E402
import study_report  # noqa: E402

BEGIN, END = "<!-- protocols:begin -->", "<!-- protocols:end -->"
VERDICT_BEGIN, VERDICT_END = "<!-- verdict:begin -->", "<!-- verdict:end -->"
# The study under the group's recipe (scripts/study_recipe.py, per-seed "records") has its own block.
RECIPE_BEGIN, RECIPE_END = "<!-- recipe_verdict:begin -->", "<!-- recipe_verdict:end -->"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "protocol_study_2026-12-02.json"
RECIPE_RESULTS = RESULTS.parent / "recipe_study.json"
P_LEVEL = 0.05
MISSING = "·"
VERDICT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol_verdict.md"
# (variant, the protocol's summary key without the fine-tuning, the row's label)
ROWS = (
    ("fedspa", "final_accuracy_masked_global", "FedSpa (d=0.5), m_k ⊙ w (`masked_global`, as the old study)"),
    ("fedspa", "final_accuracy", "FedSpa (d=0.5), its local model (`local`)"),
    ("fedspa_random", "final_accuracy_masked_global", "FedSpa, random regrowth, m_k ⊙ w"),
    ("fedspa_random", "final_accuracy", "FedSpa, random regrowth, local model"),
    ("subfedavg", "final_accuracy", "Sub-FedAvg (d=0.5), own network"),
    ("fedavg", "final_accuracy", "FedAvg, w (fine-tuned: FedAvg-FT)"),
    ("local", "final_accuracy", "Local, own model"),
    ("ditto", "final_accuracy", "Ditto, personal model"),
    ("fedrep", "final_accuracy", "FedRep, head + body"),
)
# The old study's numbers (docs/benchmarks.md, seeded study, 2026-11-30), scored as each method scores itself.
OLD = {
    "pathological": {"fedspa": 0.9403, "fedspa_random": 0.9540, "subfedavg": 0.9657, "fedavg": 0.8256,
                     "fedavg_ft": 0.9628, "local": 0.9641, "ditto": 0.9702, "fedrep": 0.9717},
    "dirichlet": {"fedspa": 0.8968, "fedspa_random": 0.8992, "subfedavg": 0.9075, "fedavg": 0.8720,
                  "fedavg_ft": 0.9195, "local": 0.8668, "ditto": 0.9182, "fedrep": 0.9276},
}


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.is_file() else None


def unit_dir(out: pathlib.Path, partition: str, variant: str) -> pathlib.Path:
  return out / study.Unit("final", partition, variant).path


def mean_std(stats: dict[str, Any] | None, stat: str = "mean") -> str:
  if not stats or stats.get(stat) is None:
    return MISSING
  return f"{stats[stat]['mean']:.4f} ± {stats[stat]['std']:.4f}"


def accuracy_table(out: pathlib.Path, partition: str) -> str:
  """One row per (method, protocol): as scored, and after 1 epoch of local fine-tuning; cost columns."""
  lines = ["| method, scored with | lr | as scored | after 1 fine-tuning epoch | worst 10%, as scored / fine-tuned "
           "| old study (as scored) | MiB up / round | train TFLOPs | eval TFLOPs (all evaluations, fine-tuning included) |",
           "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for variant, key, label in ROWS:
    summary = read_json(unit_dir(out, partition, variant) / "summary.json")
    unit = read_json(unit_dir(out, partition, variant) / "unit.json")
    if summary is None or summary.get("status") != "complete":
      status = "diverged" if summary else MISSING
      lines.append(f"| {label} | {MISSING} | {status} | {MISSING} | {MISSING} | {MISSING} | {MISSING} | {MISSING} "
                   f"| {MISSING} |")
      continue
    tuned_key = "final_accuracy_finetuned" + key[len("final_accuracy"):]
    scored, tuned = summary.get(key), summary.get(tuned_key)
    worst = f"{scored['worst10']['mean']:.3f} / {tuned['worst10']['mean']:.3f}" if scored and tuned else MISSING
    old = OLD[partition].get(variant) if key == "final_accuracy_masked_global" or not variant.startswith(
        "fedspa") else None
    rounds = summary["rounds"]
    lines.append(
        f"| {label} | {unit['lr']:g} | {mean_std(scored)} | {mean_std(tuned)} | {worst} | "
        f"{'' if old is None else f'{old:.4f}'} | {summary['bytes_up']['mean'] / rounds / 2**20:.2f} | "
        f"{summary['flops']['mean'] / 1e12:.3f} | {summary['eval_flops']['mean'] / 1e12:.3f} |")
  return "\n".join(lines)


def model_spread(out: pathlib.Path, partition: str) -> str:
  """How far apart the clients' own models are after the last round: pairwise Euclidean distance over the mean model
  norm, for pairs of trained clients, all pairs and (pathological) by classes shared; FedSpa's masks beside."""
  groups = (0, 1, 2) if partition == "pathological" else ()
  columns = ["method", "all pairs", *(f"sharing {k} classes" for k in groups), "masks: share of active weights in common"]
  lines = ["| " + " | ".join(columns) + " |", "| :--- |" + " ---: |" * (len(columns) - 1)]
  for variant, label in (("fedspa", "FedSpa local models"), ("fedspa_random", "FedSpa (random regrowth) local models"),
                         ("subfedavg", "Sub-FedAvg networks"), ("local", "Local models"), ("ditto", "Ditto models")):
    unit = read_json(unit_dir(out, partition, variant) / "unit.json")
    if unit is None or unit.get("status") != "complete":
      continue
    spread: dict[Any, list[float]] = {"all": [], **{k: [] for k in groups}}
    overlap: list[float] = []
    for s in unit["seeds"]:
      path = unit_dir(out, partition, variant) / f"seed_{s}" / "clients.npz"
      if not path.is_file():
        continue
      z = np.load(path)
      if "model_distance" not in z.files:
        continue
      trained = z["trained"] if "trained" in z.files else z["participation"] > 0
      relative = z["model_distance"] / z["model_norm"][trained].mean()
      ids = np.flatnonzero(trained)
      iu = np.triu_indices(len(ids), 1)
      pairs = relative[np.ix_(ids, ids)][iu]
      spread["all"].append(float(pairs.mean()))
      has = (z["label_counts"][ids] > 0).astype(int)
      shared = (has @ has.T)[iu]
      for k in groups:
        if (shared == k).any():
          spread[k].append(float(pairs[shared == k].mean()))
      if "hamming" in z.files and variant.startswith("fedspa"):
        active = z["active"].astype(float)
        common = 1 - z["hamming"] / (active[:, None] + active[None, :])
        overlap.append(float(common[np.ix_(ids, ids)][iu].mean()))
    if not spread["all"]:
      continue
    cells = [f"{np.mean(v):.3f}" if v else MISSING for v in spread.values()]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {f'{np.mean(overlap):.3f}' if overlap else ''} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def report(out: pathlib.Path) -> str:
  plan = read_json(out / "plan.json") or {}
  units = [read_json(p) for p in sorted(out.glob("final/*/*/unit.json"))]
  done = [u for u in units if u]
  last = max((u["finished_at"] for u in done), default="not yet")
  cells = len(study.TIERS["protocols"])
  parts = [
      "## The protocol re-run: every method scored the same ways (issue 18)",
      "",
      "```bash",
      "bash scripts/study_fashion_mnist.sh start --protocols --jobs 2   # background, resumable; runs/study_protocols",
      ".venv/bin/python scripts/protocol_report.py --update-docs        # this section",
      "```",
      "",
      f"Machine: {study_report.machine()}, shared with other work; JAX {jax_version(done)}. "
      f"{len(done)} of {cells} cells finished (last {last}). The runs of 2026-12-02 used the code of commit b5b5c33, "
      "from before the uniform shuffles of issue 17 (which change batch orders and initial masks): today's code gives "
      "the same numbers statistically, not bit for bit, and a resumed study should restart the unfinished cells only.",
      "",
      "Setting: as the seeded study below (real Fashion-MNIST, 100 clients, 10 per round, LeNet-5, 100 rounds of 2 "
      f"local epochs at batch 32, SGD without momentum, seeds {', '.join(map(str, plan.get('seeds', [1, 2, 3])))}), "
      "each method at the learning rate that study selected for it on that partition (the lr search is not redone: "
      "training is exactly the old study's, only what is scored is added, so the selection carries over; FedAvg-FT's "
      "lr is no longer used, its column is FedAvg's fine-tuned one). Every run is scored at the end in three ways: "
      "as the method scores itself (`as scored`), after 1 local epoch of fine-tuning from that model on the "
      "client's own training data with its own optimizer, mask fixed for sparse models (`after 1 fine-tuning "
      "epoch`, the same local adaptation for every method), and for FedSpa also with its local model "
      "(`personal_model=\"local\"`: the sparse model each client ended its last local training with). Accuracy: "
      "mean over all 100 clients, then mean ± std over the 3 seeds. FedAvg's fine-tuned column is FedAvg-FT. Bytes per "
      "round summed over the 10 sampled clients; training FLOPs of the whole run; evaluation FLOPs of all its "
      "evaluations (every 10 rounds; test forward passes of every protocol, plus the final fine-tuning).",
  ]
  for partition in study.PARTITIONS:
    parts += ["", f"### {study_report.PARTITION_TITLES[partition]}", "", accuracy_table(out, partition)]
  spreads = [(p, model_spread(out, p)) for p in study.PARTITIONS]
  if any(table for _, table in spreads):
    parts += ["", "### How far apart are the clients' own models?", "",
              "After the last round, pairs of clients that trained at least once: the Euclidean distance between "
              "their own models over the mean norm of those models (0: the same model), mean over pairs, then over "
              "seeds; on the pathological split also by how many of their 2 classes the two clients share. FedSpa's "
              "last column is the share of active weights their current masks hold in common (random masks of "
              "the same densities: 0.53)."]
    for partition, table in spreads:
      if table:
        parts += ["", f"{study_report.PARTITION_TITLES[partition]}:", "", table]
  if VERDICT.is_file():
    parts += ["", VERDICT.read_text().strip()]
  return "\n".join(parts) + "\n"


def cell_stats(cell: dict[str, Any]) -> tuple[float, float, int]:
  """(mean, sample std (ddof 1), n) of a results cell: from its per-seed "values", or its mean and population std."""
  if "values" in cell:
    a = np.asarray(cell["values"], np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)
  n = int(cell["n"])
  return float(cell["mean"]), float(cell["std"]) * (n / (n - 1)) ** 0.5, n


def welch_p(a: dict[str, Any], b: dict[str, Any]) -> float:
  """Two-sided p of Welch's t-test between two cells' seeds (NaN with fewer than 2 seeds on a side: no test; 1.0 or
  0.0 when neither varies)."""
  from scipy import stats

  (ma, sa, na), (mb, sb, nb) = cell_stats(a), cell_stats(b)
  if na < 2 or nb < 2:
    return float("nan")
  if sa == 0 and sb == 0:
    return 1.0 if ma == mb else 0.0
  return float(stats.ttest_ind_from_stats(ma, sa, na, mb, sb, nb, equal_var=False).pvalue)


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
  """"ahead of", "behind" or "tied with": a against b, at p < `P_LEVEL`."""
  p = welch_p(a, b)
  if not p < P_LEVEL:  # NaN (no test) too
    return "tied with"
  return "ahead of" if cell_stats(a)[0] > cell_stats(b)[0] else "behind"


def short(cell: dict[str, Any]) -> str:
  mean, _, _ = cell_stats(cell)
  std = float(np.std(cell["values"])) if "values" in cell else float(cell["std"])
  return f"{mean:.3f} ± {std:.3f}"


def verdict_block(results: dict[str, Any]) -> str:
  """The verdict's derived part: the subject against every method, per split and protocol, and worst-10% per split."""
  cells = results["cells"]
  subject, against = results["subject"], results["worst10_against"]
  find = lambda split, protocol, method: next(
      (c for c in cells if (c["split"], c["protocol"], c["method"]) == (split, protocol, method)), None)
  n = sorted({cell_stats(c)[2] for c in cells})
  lines = [
      f"Derived by `scripts/protocol_report.py` from `{results.get('file', RESULTS.name)}` (do not edit by hand; "
      f"`--check` fails when this block and the file disagree). {subject} against each method: \"ahead of\" or "
      f"\"behind\" only where a two-sided Welch t-test over the {'/'.join(map(str, n))} seeds' mean client accuracies "
      f"gives p < {P_LEVEL} (p in parentheses), else \"tied with\".",
      "",
      "| split | protocol | " + subject + " | ahead of | tied with | behind |",
      "| --- | --- | ---: | --- | --- | --- |",
  ]
  for split, split_name in results["splits"].items():
    for protocol, protocol_name in results["protocols"].items():
      me = find(split, protocol, subject)
      if me is None:
        continue
      groups: dict[str, list[str]] = {"ahead of": [], "tied with": [], "behind": []}
      for c in cells:
        if (c["split"], c["protocol"]) == (split, protocol) and c["method"] != subject:
          p = welch_p(me, c)
          groups[compare(me, c)].append(f"{c['method']} {short(c)} (p = {p:.2g})" if p == p else
                                        f"{c['method']} {short(c)} (one seed: no test)")
      cols = " | ".join("; ".join(groups[k]) or "none" for k in ("ahead of", "tied with", "behind"))
      lines.append(f"| {split_name} | {protocol_name} | {short(me)} | {cols} |")
  per_seed = all("worst10_values" in c for c in cells)
  how = ("a Welch t-test over seeds as above: \"rises\"/\"falls\" only at p < 0.05, else \"tied\"" if per_seed else
         "per-seed values were not kept, so no test, and the direction is stated per split")
  lines += ["", f"Worst 10% of clients, {subject} against {against} (the mean over seeds of each run's worst-10% "
                f"mean; {how}):", ""]
  for protocol, protocol_name in results["protocols"].items():
    parts = []
    for split, split_name in results["splits"].items():
      me, other = find(split, protocol, subject), find(split, protocol, against)
      if me is None or other is None or me.get("worst10") is None or other.get("worst10") is None:
        continue
      a, b = other["worst10"], me["worst10"]
      if per_seed:
        word = compare({"values": me["worst10_values"]}, {"values": other["worst10_values"]})
        p = welch_p({"values": me["worst10_values"]}, {"values": other["worst10_values"]})
        word = {"ahead of": "rises", "behind": "falls", "tied with": "tied"}[word]
        parts.append(f"{split_name} {a:.3f} -> {b:.3f} ({word}, " + (f"p = {p:.2g})" if p == p else "one seed: no test)"))
      else:
        parts.append(f"{split_name} {a:.3f} -> {b:.3f} ({'rises' if b > a else 'falls' if b < a else 'unchanged'})")
    if parts:
      lines.append(f"- {protocol_name}: " + "; ".join(parts) + ".")
  return "\n".join(lines) + "\n"


def cells_of_records(results: dict[str, Any]) -> dict[str, Any]:
  """A per-seed results file of `scripts/study_recipe.py` ("records") as cells of per-seed values (of its longest
  runs, when it holds runs of several lengths)."""
  rounds = max((r.get("rounds", 0) for r in results["records"]), default=0)
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in results["records"]:
    if r.get("rounds", 0) == rounds:
      groups.setdefault((r["split"], r["method"]), []).append(r)
  cells = [{"split": split, "protocol": "as_scored", "method": method, "values": [r["accuracy"] for r in rs],
            "seeds": [r["seed"] for r in rs], "worst10": float(np.mean([r["worst10"] for r in rs])),
            "worst10_values": [r["worst10"] for r in rs]}
           for (split, method), rs in sorted(groups.items())]
  return {**results, "cells": cells, "subject": "FedSpa, its local model", "worst10_against": "FedSpa, m_k ⊙ w",
          "splits": {"balanced": "the group's split (dirichlet_balanced, alpha 0.3)", "dirichlet": "Dirichlet(0.3)"},
          "protocols": {"as_scored": "as each method scores itself (FedAvg-FT: after its 5 fine-tuning epochs)"}}


def recipe_runs(results: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
  """The recipe study's runs per (split, study method): the records of each run's first protocol (the others, e.g.
  FedAvg-FT beside FedAvg's w, come from the same runs and share their costs)."""
  rounds = max((r.get("rounds", 0) for r in results["records"]), default=0)
  return {(split, method): sorted((r for r in results["records"] if (r["split"], r["method"], r.get("rounds", 0))
                                   == (split, protocols[0][0], rounds)), key=lambda r: r["seed"])
          for split in study_recipe.SPLITS for method, protocols in study_recipe.PROTOCOLS.items()}


def recipe_costs(results: dict[str, Any]) -> str:
  """The recipe study's costs per split and run, from its records: communication per round (up + down, all sampled
  clients), training FLOPs per seed, FedSpa's share of each, and the age of the local models FedSpa scored."""
  runs = recipe_runs(results)
  lines = ["Costs at the group's recipes, per seed (the mean over the seeds in the file; \"FedSpa's share\": FedSpa's "
           "cost over the method's on the same split; evaluation: every 10 rounds and the final one, FedAvg-FT's 5 "
           "fine-tuning epochs per client included). Staleness: the age in rounds of the local models scored at the "
           "final evaluation, mean and max.", "",
           "| split | run (what it scores) | seeds | MiB per round, up + down | FedSpa's share of bytes | training "
           "TFLOPs | FedSpa's share of FLOPs | evaluation TFLOPs | staleness, mean / max |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for split, split_name in results["splits"].items():
    mine = runs[(split, "fedspa")]
    for method, protocols in study_recipe.PROTOCOLS.items():
      rs = runs[(split, method)]
      if not rs:
        continue
      mib = float(np.mean([r["bytes_total"] / r["rounds"] for r in rs])) / 2**20
      tflops = float(np.mean([r["flops"] for r in rs])) / 1e12
      share = lambda key: ("·" if not mine else "no bytes" if not np.mean([r[key] for r in rs]) else
                           f"{np.mean([r[key] for r in mine]) / np.mean([r[key] for r in rs]):.2f}x")
      ages = [r for r in rs if r.get("staleness_mean") is not None]
      age = (f"{np.mean([r['staleness_mean'] for r in ages]):.1f} / {max(r['staleness_max'] for r in ages):.0f}"
             if ages else "")
      label = " / ".join(name for name, _ in protocols)
      evals = [r.get("eval_flops") for r in rs]
      evaluation = "·" if None in evals else f"{np.mean(evals) / 1e12:.2f}"
      lines.append(f"| {split_name} | {label} | {len(rs)} | {mib:.2f} | {share('bytes_total')} | {tflops:.2f} | "
                   f"{share('flops')} | {evaluation} | {age} |")
  return "\n".join(lines) + "\n"


def recipe_missing(results: dict[str, Any]) -> str:
  """What the recipe study's file does not hold yet (`scripts/study_recipe.py --list`), per split."""
  runs = recipe_runs(results)
  seeds = study_recipe.TIERS["full"]["seeds"]
  parts = []
  for split, split_name in results["splits"].items():
    gaps = []
    for method, protocols in study_recipe.PROTOCOLS.items():
      have = {r["seed"] for r in runs[(split, method)]}
      left = [s for s in seeds if s not in have]
      if left:
        gaps.append(f"{protocols[0][0].split(',')[0]} seed{'s' if len(left) > 1 else ''} "
                    f"{', '.join(map(str, left))}")
    if gaps:
      parts.append(f"{split_name}: " + "; ".join(gaps))
  if not parts:
    return "\nEvery unit of the study (every method, both splits, seeds " + ", ".join(map(str, seeds)) + ") is in the file.\n"
  return ("\n**Not in the file yet** (`scripts/study_recipe.py --list`; the rows above hold what is): " +
          ". ".join(parts) + ".\n")


def read_results(path: pathlib.Path) -> dict[str, Any]:
  results = json.loads(path.read_text())
  if "records" in results:
    results = cells_of_records(results)
  results["file"] = f"scripts/results/{path.name}"
  return results


def derived_block(results: dict[str, Any]) -> tuple[str, tuple[str, str]]:
  """The block a results file derives and the markers it goes between: the recipe study's (per-seed records: the
  verdict, its costs and what is not in the file yet) or the protocol re-run's (cells: the verdict)."""
  if "records" in results:
    return verdict_block(results) + "\n" + recipe_costs(results) + recipe_missing(results), (RECIPE_BEGIN, RECIPE_END)
  return verdict_block(results), (VERDICT_BEGIN, VERDICT_END)


def replace_block(text: str, block: str, markers: tuple[str, str] = (VERDICT_BEGIN, VERDICT_END)) -> str:
  begin, end = markers
  if begin not in text or end not in text:
    raise SystemExit(f"{VERDICT} has no {begin} ... {end} block")
  head, rest = text.split(begin, 1)
  return head + f"{begin}\n{block}{end}" + rest.split(end, 1)[1]


def check_verdict(docs: pathlib.Path, block: str, markers: tuple[str, str] = (VERDICT_BEGIN, VERDICT_END)) -> bool:
  """Whether `docs` holds exactly `block` between `markers`, and docs/benchmarks.md's protocol section (which
  includes the verdict, `report`) holds the verdict as it is."""
  text = docs.read_text()
  benchmarks = docs.parent / "benchmarks.md"
  copied = not benchmarks.is_file() or BEGIN not in benchmarks.read_text() or text.strip() in benchmarks.read_text()
  return replace_block(text, block, markers) == text and copied


def jax_version(units: list[dict[str, Any]]) -> str:
  try:
    import jax

    return jax.__version__
  except ImportError:
    return "?"


def update_docs(docs: pathlib.Path, section: str) -> None:
  text = docs.read_text()
  block = f"{BEGIN}\n{section}{END}"
  if BEGIN in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:  # before the old study's section, which it re-judges
    marker = study_report.BEGIN
    head, rest = text.split(marker, 1)
    text = head + block + "\n\n" + marker + rest
  docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=study.PROTOCOLS_OUT)
  parser.add_argument("--update-docs", action="store_true")
  parser.add_argument("--results", default=str(RESULTS), help="the per-seed (or per-cell) results file")
  parser.add_argument("--verdict", action="store_true", help="print the verdict's derived block")
  parser.add_argument("--write-verdict", action="store_true", help="write it into docs/protocol_verdict.md")
  parser.add_argument("--check", action="store_true", help="exit 1 if docs/protocol_verdict.md and the file disagree")
  args = parser.parse_args(argv)
  if args.verdict or args.write_verdict or args.check:
    block, markers = derived_block(read_results(pathlib.Path(args.results).resolve()))
    if args.write_verdict:
      old = VERDICT.read_text()
      VERDICT.write_text(replace_block(old, block, markers))
      benchmarks = VERDICT.parent / "benchmarks.md"  # its copy in the protocol section too
      if benchmarks.is_file() and old.strip() in benchmarks.read_text():
        benchmarks.write_text(benchmarks.read_text().replace(old.strip(), VERDICT.read_text().strip()))
    if args.check and not check_verdict(VERDICT, block, markers):
      print(f"{VERDICT} disagrees with {args.results}: run scripts/protocol_report.py --write-verdict", file=sys.stderr)
      return 1
    if args.verdict:
      print(block)
    return 0
  out = pathlib.Path(args.out)
  section = report(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(section)
  print(section)
  if args.update_docs:
    update_docs(pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", section)
  print(f"[{datetime.datetime.now():%H:%M:%S}] report of {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
