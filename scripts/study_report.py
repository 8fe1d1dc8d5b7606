"""Tables and figures of the Fashion-MNIST study from whatever units have finished (missing cells are marked).

    .venv/bin/python scripts/study_report.py                  # writes <out>/report.md and the figures
    .venv/bin/python scripts/study_report.py --update-docs    # also replaces the study section of docs/benchmarks.md

Reads only the study folder (`scripts/study_fashion_mnist.py` writes it): each final unit's seed_<s>/summary.json
and metrics.jsonl, each lr unit's unit.json. Accuracy is each client's own model on its own test data after the last
round, averaged over clients, then mean ± std (population std) over the final seeds; "participating" averages only
the clients sampled at least once. Bytes are per round (total / rounds), up and down, summed over the sampled
clients; training FLOPs are the whole run's (FedAvg-FT's fine-tuning at evaluation is not training and not counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import study_fashion_mnist as study  # noqa: E402

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
# Row order within a partition: FedSpa and its ablations, the other sparse method, then the dense baselines.
ROW_ORDER = ("fedspa", "fedspa_d0.2", "fedspa_d0.8", "fedspa_random", "fedspa_uniform", "subfedavg", "fedavg",
             "fedavg_ft", "local", "ditto", "fedrep")
PARTITION_TITLES = {"pathological": "Pathological, 2 classes per client", "dirichlet": "Dirichlet(0.3)"}
MISSING = "·"  # a cell whose unit has not finished


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std())


def load_cell(plan: study.Plan, out: pathlib.Path, partition: str, variant: str) -> dict[str, Any]:
  """A cell's selected lr, lr-search table and, when its final unit is done, its per-seed summaries and records."""
  try:
    lr, search = study.select_lr(plan, out, partition, variant)
  except study.StudyError:
    lr, search = None, {}
  unit = study.Unit("final", partition, variant)
  record = study.read_unit(out, unit)
  cell = {"partition": partition, "variant": variant, "lr": lr, "search": search, "record": record, "seeds": []}
  if record is not None and record.get("status") == "complete":
    for s in record["seeds"]:
      folder = out / unit.path / f"seed_{s}"
      cell["seeds"].append({"summary": read_json(folder / "summary.json"),
                            "records": read_jsonl(folder / "metrics.jsonl")})
  return cell


def cell_row(cell: dict[str, Any], fedavg_flops: float | None) -> dict[str, str]:
  """The table cells of one algorithm on one partition (strings; MISSING where nothing has finished)."""
  label = study.VARIANTS[cell["variant"]].label
  lr = MISSING if cell["lr"] is None else f"{cell['lr']:g}"
  if study.VARIANTS[cell["variant"]].lr_from and cell["lr"] is not None:
    lr += "ᶠ"
  row = {"algorithm": label, "lr": lr}
  keys = ("acc", "acc_part", "worst10", "part", "up", "down", "tflops", "rel")
  if cell["record"] is not None and cell["record"].get("status") != "complete":
    return {**row, **{k: cell["record"].get("status", "?") if k == "acc" else "" for k in keys}}
  summaries = [s["summary"] for s in cell["seeds"] if s["summary"] is not None]
  if not summaries:
    return {**row, **{k: MISSING for k in keys}}
  rounds = summaries[0]["rounds"]
  acc = mean_std([s["final_accuracy"]["mean"] for s in summaries])
  part = mean_std([s["final_accuracy_participating"]["mean"] for s in summaries])
  worst = mean_std([s["final_accuracy"]["worst10"] for s in summaries])
  flops = [s["flops"] for s in summaries if s.get("flops") is not None]
  tflops = float(np.mean(flops)) / 1e12 if flops else None
  return {
      **row,
      "acc": f"{acc[0]:.4f} ± {acc[1]:.4f}",
      "acc_part": f"{part[0]:.4f} ± {part[1]:.4f}",
      "worst10": f"{worst[0]:.3f}",
      "part": f"{np.mean([s['clients_participating'] for s in summaries]):.0f}",
      "up": f"{np.mean([s['bytes_up'] for s in summaries]) / rounds / 2**20:.2f}",
      "down": f"{np.mean([s['bytes_down'] for s in summaries]) / rounds / 2**20:.2f}",
      "tflops": "-" if tflops is None else f"{tflops:.3f}",
      "rel": "-" if tflops is None or not fedavg_flops else f"{tflops * 1e12 / fedavg_flops:.2f}",
  }


COLUMNS = (("algorithm", "algorithm"), ("lr", "lr"), ("acc", "accuracy, all clients"),
           ("acc_part", "accuracy, participating"), ("worst10", "worst 10%"), ("part", "clients taking part"),
           ("up", "MiB up / round"), ("down", "MiB down / round"), ("tflops", "train TFLOPs"),
           ("rel", "FLOPs / FedAvg's"))


def markdown_table(rows: list[dict[str, str]]) -> str:
  lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
           "| " + " | ".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + " |"]
  lines += ["| " + " | ".join(r[key] for key, _ in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def search_table(plan: study.Plan, out: pathlib.Path, cells: list[dict[str, Any]]) -> str:
  """Seed-`search_seed` mean accuracy after `search_rounds` rounds for every grid value; the selected one in bold."""
  edges = {(u.partition, u.variant): u for u in study.edge_units(plan, out)
           if study.read_unit(out, u) is not None}  # the edge check's finished units
  header = ["partition", "algorithm"] + [f"lr {lr:g}" for lr in plan.lrs] + (["one step past the edge"] if edges else [])
  lines = ["| " + " | ".join(header) + " |", "| :--- | :--- |" + " ---: |" * (len(plan.lrs) + bool(edges))]
  for cell in cells:
    if study.VARIANTS[cell["variant"]].lr_from:
      continue
    values = []
    for lr in plan.lrs:
      record = study.read_unit(out, study.Unit("lr", cell["partition"], cell["variant"], lr))
      if record is None:
        values.append(MISSING)
        continue
      acc = record.get("final_accuracy_mean")
      text = "diverged" if acc is None else f"{acc:.4f}"
      values.append(f"**{text}**" if cell["lr"] == lr else text)
    edge = cell["lr"] is not None and cell["lr"] in (min(plan.lrs), max(plan.lrs)) and len(plan.lrs) > 1
    label = study.VARIANTS[cell["variant"]].label + (" (at the grid's edge)" if edge else "")
    if edges:
      unit = edges.get((cell["partition"], cell["variant"]))
      acc = None if unit is None else study.read_unit(out, unit).get("final_accuracy_mean")
      values.append("" if unit is None else f"lr {unit.lr:g}: " + ("diverged" if acc is None else f"{acc:.4f}"))
    lines.append(f"| {cell['partition']} | {label} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def curves(cell: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """Rounds, mean and std over seeds of the mean client accuracy at every evaluated round."""
  runs = [s["records"] for s in cell["seeds"] if s["records"]]
  if not runs:
    return None
  rounds = sorted(set.intersection(*[{r["round"] for r in run} for run in runs]))
  acc = np.asarray([[next(r["accuracy_mean"] for r in run if r["round"] == t) for t in rounds] for run in runs])
  return np.asarray(rounds), acc.mean(0), acc.std(0)


def draw_figures(cells: list[dict[str, Any]], partitions: list[str], img: pathlib.Path, stem: str) -> list[pathlib.Path]:
  """accuracy vs rounds (mean ± std band over seeds) and final accuracy vs bytes, one panel per partition."""
  from matplotlib import colormaps
  from matplotlib.figure import Figure

  palette = list(colormaps["tab10"].colors) + ["black"]  # one color per variant: ROW_ORDER has 11
  assert len(palette) >= len(ROW_ORDER)
  colors = {v: {"color": c, "linestyle": "-" if v in ("fedspa", "fedavg", "local", "ditto", "fedrep") else "--"}
            for v, c in zip(ROW_ORDER, palette)}
  paths = []
  img.mkdir(parents=True, exist_ok=True)
  fig = Figure(figsize=(5.2 * len(partitions), 4.0), dpi=110, layout="constrained")
  axes = fig.subplots(1, len(partitions), squeeze=False)[0]
  for ax, partition in zip(axes, partitions):
    for cell in (c for c in cells if c["partition"] == partition):
      curve = curves(cell)
      if curve is None:
        continue
      rounds, mean, std = curve
      label = f"{study.VARIANTS[cell['variant']].label} (lr {cell['lr']:g})"
      ax.plot(rounds, mean, label=label, **colors[cell["variant"]])
      ax.fill_between(rounds, mean - std, mean + std, alpha=0.18, color=colors[cell["variant"]]["color"], lw=0)
    ax.set_title(PARTITION_TITLES[partition])
    ax.set_xlabel("round")
    ax.set_ylabel("mean client accuracy (all clients)")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7, loc="best")
  paths.append(img / f"{stem}_accuracy_vs_rounds.png")
  fig.savefig(paths[-1])

  fig = Figure(figsize=(5.2 * len(partitions), 4.0), dpi=110, layout="constrained")
  axes = fig.subplots(1, len(partitions), squeeze=False)[0]
  for ax, partition in zip(axes, partitions):
    for cell in (c for c in cells if c["partition"] == partition):
      summaries = [s["summary"] for s in cell["seeds"] if s["summary"] is not None]
      if not summaries:
        continue
      acc = mean_std([s["final_accuracy"]["mean"] for s in summaries])
      gib = np.mean([s["bytes_total"] for s in summaries]) / 2**30
      ax.errorbar([gib], [acc[0]], yerr=[acc[1]], fmt="o", capsize=3, color=colors[cell["variant"]]["color"],
                  label=study.VARIANTS[cell["variant"]].label)
    ax.set_title(PARTITION_TITLES[partition])
    ax.set_xlabel("GiB communicated in the run (up + down)")
    ax.set_ylabel("final mean client accuracy")
    ax.grid(alpha=0.3)
    if ax.lines or ax.containers:
      ax.legend(fontsize=7, loc="best")
  paths.append(img / f"{stem}_accuracy_vs_bytes.png")
  fig.savefig(paths[-1])
  return paths


def random_overlap(variant: str) -> float:
  """The share of a client's active weights that another client's independent random mask also holds, in expectation
  (LeNet-5 on 28x28x1, the variant's density rule), over the leaves that are sparse: sum n d^2 / sum n d."""
  import jax

  from fedspa_jax import masks, models

  hparams = study.VARIANTS[variant].hparams
  model = models.get("lenet5", num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"])
  rule = masks.erk_densities if hparams.get("density_rule", "erk") == "erk" else masks.uniform_densities
  densities = rule(params, hparams["density"])
  pairs = [(int(np.prod(p.shape)), d) for p, d in zip(jax.tree.leaves(params), jax.tree.leaves(densities))
           if masks.is_maskable((), p) and d < 1]
  n, d = np.array([a for a, _ in pairs], float), np.array([b for _, b in pairs], float)
  return float((n * d * d).sum() / (n * d).sum())


def mask_overlap_table(out: pathlib.Path, cells: list[dict[str, Any]]) -> str:
  """FedSpa's masks after the last round, pathological split: the share of active weights two clients hold in
  common, by how many of their 2 classes they share, mean over client pairs and seeds (clients.npz's Hamming
  distances), beside the same share for independent random masks of the same layer densities."""
  lines = ["| variant | pairs sharing 0 classes | sharing 1 | sharing 2 | random masks |",
           "| :--- | ---: | ---: | ---: | ---: |"]
  for cell in cells:
    if cell["partition"] != "pathological" or study.VARIANTS[cell["variant"]].algorithm not in (
        "fedspa", "fedspa_random") or not cell["seeds"]:
      continue
    by_shared: dict[int, list[float]] = {0: [], 1: [], 2: []}
    unit = study.Unit("final", cell["partition"], cell["variant"])
    for s in cell["record"]["seeds"]:
      path = out / unit.path / f"seed_{s}" / "clients.npz"
      z = np.load(path) if path.is_file() else None
      if z is None or "hamming" not in z.files:
        continue
      active = z["active"].astype(float)
      common = 1 - z["hamming"] / (active[:, None] + active[None, :])
      has = (z["label_counts"] > 0).astype(int)
      shared = has @ has.T
      iu = np.triu_indices(len(active), 1)
      for k in by_shared:
        chosen = shared[iu] == k
        if chosen.any():
          by_shared[k].append(float(common[iu][chosen].mean()))
    if not any(by_shared.values()):
      continue  # no clients.npz with masks
    values = [f"{np.mean(v):.3f}" if v else MISSING for v in by_shared.values()]
    lines.append(f"| {study.VARIANTS[cell['variant']].label} | " + " | ".join(values)
                 + f" | {random_overlap(cell['variant']):.3f} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def machine() -> str:
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    model = platform.processor() or "unknown CPU"
  import os

  return f"{os.cpu_count()}-core {platform.machine()} CPU (`{model}`), no accelerator"


def report(out: pathlib.Path, img: pathlib.Path, docs_img: str, stem: str = "study_fashion_mnist") -> str:
  """The study's markdown section (between the markers), drawing its figures into `img`."""
  plan_dict = read_json(out / "plan.json")
  plan = study.Plan.from_dict(plan_dict) if plan_dict else study.Plan()
  wanted = study.TIERS["all"]
  partitions = [p for p in study.PARTITIONS if any(c[0] == p for c in wanted)]
  cells = []
  for partition in partitions:
    for variant in ROW_ORDER:
      if (partition, variant) in wanted:
        cells.append(load_cell(plan, out, partition, variant))
  units = study.plan_units(study.Plan.from_dict({**plan.to_dict(), "cells": [list(c) for c in wanted]}))
  core_units = study.plan_units(study.Plan.from_dict({**plan.to_dict(), "cells": [list(c) for c in study.TIERS["core"]]}))
  core_set = set(core_units)
  done = sum(study.read_unit(out, u) is not None for u in units)
  finals = [study.read_unit(out, u) for u in units if u.kind == "final"]
  finished = [r["finished_at"] for r in (study.read_unit(out, u) for u in units) if r and "finished_at" in r]
  paths = draw_figures(cells, partitions, img, stem)
  import jax  # only for its version

  lines = [
      BEGIN,
      "## Seeded study: FedSpa against the baselines on Fashion-MNIST",
      "",
      "```bash",
      "bash scripts/study_fashion_mnist.sh start              # background (nohup, nice 10), resumable: rerun to continue",
      "bash scripts/study_fashion_mnist.sh status             # units done / left, the running unit, time left",
      "bash scripts/study_fashion_mnist.sh start --tier all   # then the rest of the issue's list, same folder",
      "bash scripts/study_fashion_mnist.sh start --tier all --jobs 2  # or both at once: one driver per core",
      ".venv/bin/python scripts/study_fashion_mnist.py edge    # lr one step past the grid, where the selection sat at its edge",
      ".venv/bin/python scripts/study_report.py --update-docs  # this section and its figures",
      "```",
      "",
      f"Machine: {machine()}, shared with other work (the study runs at nice 10); JAX {jax.__version__}. "
      f"Results as of {datetime.date.today().isoformat()}"
      + (f" (last unit finished {max(finished)})" if finished else "")
      + f": {done} of {len(units)} units (default tier `core`: "
      f"{sum(study.read_unit(out, u) is not None for u in core_units)} of {len(core_units)}), "
      f"{sum(r is not None for r in finals)} of {len(finals)} algorithm × partition cells; {MISSING} marks a cell not "
      "finished yet.",
      "",
      ("Setting (SMOKE: the configs' tiny variants, 4 clients, 2 per round, 2 local steps at batch 8): " if plan.smoke
       else f"Setting: real Fashion-MNIST, 100 clients, 10 sampled per round, LeNet-5, {plan.rounds} rounds of "
       f"{plan.local_epochs} local epochs at batch 32, ")
      + "SGD without momentum; every algorithm at its defaults otherwise "
      "(FedSpa: ERK, alpha 0.5, cosine schedule to the last round, gradient regrowth, uniform weighting; Ditto "
      "lambda 0.1; FedRep 10 head epochs; FedAvg-FT 1 fine-tuning epoch; Sub-FedAvg as its reference code, target "
      "density 0.5; docs/algorithms.md). Partitions: pathological with 2 classes per client "
      "(`fashion_mnist_pathological`) and Dirichlet(0.3) (`fashion_mnist_dirichlet`); each seed draws its own "
      "partition, model init, masks and cohorts.",
      "",
      f"Learning rates: each algorithm's from the grid {{{', '.join(f'{lr:g}' for lr in plan.lrs)}}}, on each "
      f"partition, by the final mean accuracy of one run with seed {plan.search_seed} after {plan.search_rounds} rounds "
      f"(shorter than the final runs, to fit the machine; short searches favour larger rates). The reported runs use "
      f"seeds {', '.join(map(str, plan.seeds))}, not the search seed, so the numbers below are not the ones the "
      "selection was made on. ᶠ: FedSpa's ablations (random regrowth, densities 0.2 and 0.8) take FedSpa's selected "
      "rate, so they differ from it in one thing only. Accuracy: mean over clients of each client's own model on its "
      f"own test data after round {plan.rounds}, then mean ± std over the {len(plan.seeds)} seeds; 'participating': "
      "only the clients sampled at least once (of 100). Bytes per round summed over the 10 sampled clients; training "
      "FLOPs of the whole run (FedAvg-FT's fine-tuning before evaluation is not counted).",
      "",
      "Sizing: the machine has 2 cores shared with other work, so the study was planned for one core (measured "
      "there: 1.4-1.5 s per round of one seed for FedSpa, FedAvg and Local, 1.7 for Sub-FedAvg, 2.75 for Ditto, 3.8 "
      "for FedRep with its 10 head epochs; 3 seeds vmapped in one sweep cost ~1.08x per seed on CPU). The default "
      f"tier `core` ({len(core_units)} units, ~{sum(study.estimate_seconds(plan, u) for u in core_units) / 3600:.1f} h "
      "of one core) holds FedSpa, FedAvg, Local, Ditto and FedRep on the pathological split, then the same without "
      "FedRep on Dirichlet. Cut from it, and run by `--tier all` in the same folder (another "
      f"~{sum(study.estimate_seconds(plan, u) for u in units if u not in core_set) / 3600:.1f} h): Dirichlet's "
      "FedRep, then FedAvg-FT, FedSpa with random regrowth, Sub-FedAvg and FedSpa at densities 0.2 and 0.8 "
      "(pathological only), then FedAvg-FT, random regrowth and Sub-FedAvg on Dirichlet, and last a diagnostic not "
      "in the issue's list: FedSpa with uniform layer densities on pathological (see the verdict). The lr search runs "
      f"{plan.search_rounds} rounds instead of {plan.rounds}; evaluations every {plan.eval_every} rounds cover all "
      "clients. Nothing else is reduced: the final runs have the full rounds, epochs and seeds. Several drivers may "
      "share the cores (`--jobs`), so a unit's wall time in unit.json is not a single-core time.",
      "",
  ]
  fedavg = {}
  for partition in partitions:
    base = next((c for c in cells if c["partition"] == partition and c["variant"] == "fedavg"), None)
    flops = [s["summary"]["flops"] for s in (base or {"seeds": []})["seeds"] if s["summary"] and s["summary"].get("flops")]
    fedavg[partition] = float(np.mean(flops)) if flops else None
  for partition in partitions:
    lines += [f"### {PARTITION_TITLES[partition]}", ""]
    lines.append(markdown_table([cell_row(c, fedavg[partition]) for c in cells if c["partition"] == partition]))
    lines.append("")
  lines += ["### Learning-rate search", "",
            f"Mean client accuracy, seed {plan.search_seed}, after {plan.search_rounds} rounds; the selected rate in "
            "bold. A rate selected at the grid's edge means the grid may not bracket that algorithm's best rate; the last "
            "column, where shown, is the edge check (`python scripts/study_fashion_mnist.py edge`): the same search run "
            "one step past the edge (x3), which did not take part in the selection.", "", search_table(plan, out, cells), ""]
  for path in paths:
    lines += [f"![{path.stem.replace('_', ' ')}]({docs_img}/{path.name})", ""]
  overlap = mask_overlap_table(out, cells)
  if overlap:
    lines += ["### FedSpa's masks: how personal are they?", "",
              "Share of active weights two clients' final masks hold in common (pathological split; mean over client "
              "pairs and the 3 seeds; from each seed's clients.npz), by how many of their 2 classes the two clients "
              "share, beside the expected share for independent random masks with the same layer densities. Only the "
              "leaves that are sparse count: ERK leaves LeNet-5's first convolution (150 weights) and its last layer "
              "(84 x 10) dense at every density of the study (and the 120 x 84 layer too at d = 0.8), so there every "
              "client holds every weight of the shared model.", "", overlap, ""]
  verdict = VERDICT.read_text().strip() if VERDICT.is_file() else (
      "> **Placeholder: no verdict yet.** The study is still running; the verdict on the paper's claim (FedSpa beats "
      "these baselines at lower cost: where it holds, where not, and why) will be written from the complete table.")
  lines += ["### Verdict", "", verdict, "", END]
  return "\n".join(lines)


# The verdict, written by hand from the tables (kept in its own file so that regenerating the section keeps it).
VERDICT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "study_verdict.md"


def update_docs(docs: pathlib.Path, section: str, before: str = "## FedSpa against the baselines on Fashion-MNIST") -> None:
  """Replaces the text between the study markers of `docs`; without markers, inserts the section before `before`."""
  text = docs.read_text()
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + section + tail
  elif before in text:
    head, tail = text.split(before, 1)
    text = head + section + "\n\n" + before + tail
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=study.DEFAULT_OUT, help="the study folder")
  parser.add_argument("--img", default="docs/img", help="where the figures go")
  parser.add_argument("--docs", default="docs/benchmarks.md")
  parser.add_argument("--update-docs", action="store_true", help="replace the study section of --docs")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if not (out / "plan.json").is_file():
    print(f"study_report: error: {out} holds no study (no plan.json); start it with scripts/study_fashion_mnist.sh",
          file=sys.stderr)
    return 2
  img = pathlib.Path(args.img)
  docs = pathlib.Path(args.docs)
  try:  # the figures' path as the markdown file sees it
    docs_img = img.resolve().relative_to(docs.resolve().parent).as_posix()
  except ValueError:
    docs_img = img.resolve().as_posix()
  section = report(out, img, docs_img)
  (out / "report.md").write_text(section + "\n")
  print(f"wrote {out / 'report.md'} and figures in {img}")
  if args.update_docs:
    update_docs(docs, section)
    print(f"updated {docs}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
