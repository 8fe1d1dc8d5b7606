"""Several algorithms on the same data, partition and seed, ending in one table (terminal, Markdown, CSV).

    summaries = compare.run(config, ["fedspa", "fedavg"], "runs/cmp")

Each algorithm runs in `<out>/<algorithm>/` (a normal run folder). The config's hyperparameters go to every
algorithm that takes them (the others are skipped, with a note: `density` means nothing to FedAvg);
`per_algorithm={"fedspa": {"density": 0.3}}` sets one algorithm's own. `<out>/config.json` records the shared
config with "algorithms" and "per_algorithm" (`saved`), so that `compare --resume --out DIR` alone continues it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Callable

import json

from fedspa_jax import algorithms, distributed, experiment, paths, plots, runner
from fedspa_jax.config import Config, ConfigError

# What <out>/config.json holds beside the shared config's fields.
RECORD_KEYS = ("algorithms", "per_algorithm")

COLUMNS = (
    ("algorithm", "algorithm", "{}"),
    ("acc_mean", "final acc (mean)", "{:.4f}"),
    ("acc_std", "std", "{:.4f}"),
    ("acc_p10", "p10", "{:.4f}"),
    ("acc_p90", "p90", "{:.4f}"),
    ("acc_worst10", "worst 10%", "{:.4f}"),
    ("acc_best", "best mean", "{:.4f}"),
    ("comm_mib", "comm (MiB)", "{:.2f}"),
    ("train_tflops", "train TFLOPs", "{:.4g}"),
    ("wall_s", "wall (s)", "{:.1f}"),
)


def for_algorithm(config: Config, name: str, own: dict[str, Any] | None = None) -> tuple[Config, list[str]]:
  """`config` for algorithm `name`: shared hyperparameters it takes, then its own; also the names skipped."""
  if name not in algorithms.names():
    raise ConfigError(f"unknown algorithm {name!r}; known algorithms: {', '.join(algorithms.names())}")
  known = set(algorithms.known_hparams(name))
  hparams = {k: v for k, v in config.hparams.items() if k in known}
  skipped = sorted(set(config.hparams) - known)
  hparams.update(own or {})
  return dataclasses.replace(config, algorithm=name, hparams=hparams), skipped


def saved(out: paths.PathLike) -> tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]] | None:
  """The comparison in `out`, as its config.json records it: (the shared config's fields, the algorithms, the
  per-algorithm settings); None when there is none."""
  path = paths.as_path(out) / "config.json"
  if not path.is_file():
    return None
  record = json.loads(path.read_text())
  if "algorithms" not in record:
    return None  # a run folder, not a comparison
  fields = {k: v for k, v in record.items() if k not in RECORD_KEYS}
  return fields, list(record["algorithms"]), record.get("per_algorithm") or {}


def skipped_note(name: str, skipped: list[str]) -> str:
  """The line that says which hyperparameters `for_algorithm` dropped for algorithm `name`."""
  return f"{name}: not its hyperparameters, skipped: {', '.join(skipped)}"


def row(summary: dict[str, Any]) -> dict[str, Any]:
  """One table row from a run summary."""
  acc = summary["final_accuracy"]
  return {
      "algorithm": summary["algorithm"],
      "acc_mean": acc["mean"],
      "acc_std": acc["std"],
      "acc_p10": acc["p10"],
      "acc_p90": acc["p90"],
      "acc_worst10": acc["worst10"],
      "acc_best": summary["best_accuracy_mean"],
      "comm_mib": summary["bytes_total"] / 2**20,
      "train_tflops": None if summary.get("flops") is None else summary["flops"] / 1e12,
      "wall_s": summary["wall_time"],
  }


def _cells(r: dict[str, Any]) -> list[str]:
  return ["-" if r[key] is None else fmt.format(r[key]) for key, _, fmt in COLUMNS]


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
  """Aligned text (terminal) or a Markdown table."""
  header = [title for _, title, _ in COLUMNS]
  body = [_cells(r) for r in rows]
  widths = [max(len(c) for c in col) for col in zip(header, *body)]
  align = lambda cells: [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
  if markdown:
    lines = ["| " + " | ".join(align(header)) + " |",
             "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"]
    lines += ["| " + " | ".join(align(cells)) + " |" for cells in body]
  else:
    lines = ["  ".join(align(header)), "  ".join("-" * w for w in widths)] + ["  ".join(align(c)) for c in body]
  return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=[key for key, _, _ in COLUMNS], lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def run(
    config: Config,
    names: list[str],
    out: paths.PathLike,
    *,
    per_algorithm: dict[str, dict[str, Any]] | None = None,
    echo: Callable[[str], None] | None = print,
    **run_kwargs,
) -> list[dict[str, Any]]:
  """Runs every algorithm in `names` on `config`'s data into `out/<name>/`, then writes the table and figures.

  Args:
    config: the shared experiment (its `algorithm` is replaced).
    names: algorithms to run, in table order.
    out: the comparison folder (local or gs://).
    per_algorithm: {name: {hyperparameter: value}} applied to that algorithm only.
    echo: prints progress and the table (None: silent).
    **run_kwargs: passed to `experiment.run` (resume, overwrite, progress, write_plots, ...).

  Returns:
    The summaries, in `names` order (with `stop_after`, the runs' {"status": "stopped", ...}: no table then).
    Also written: out/config.json (the comparison, before the runs), out/comparison.md, out/comparison.csv,
    out/*.png.
  """
  say = echo or (lambda line: None)
  if not names or len(set(names)) != len(names):
    raise ConfigError(f"give distinct algorithms to compare, got {names}")
  per_algorithm = per_algorithm or {}
  stray = sorted(set(per_algorithm) - set(names))
  if stray:
    raise ConfigError(f"per-algorithm settings for {', '.join(stray)}, which is not among {', '.join(names)}")
  configs = []
  for name in names:  # every check before the first run starts
    cfg, skipped = for_algorithm(config, name, per_algorithm.get(name))
    runner.check_config(cfg)
    if skipped:
      say(skipped_note(name, skipped))
    configs.append(cfg)
  out = paths.as_path(out)
  try:
    data = runner.load_data(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  record = out / "config.json"
  if distributed.is_primary() and (run_kwargs.get("overwrite") or not record.exists()):  # a resume keeps its own
    paths.make_dirs(out)
    paths.write_text(record, json.dumps({**config.to_dict(), "algorithms": list(names),
                                         "per_algorithm": per_algorithm}, indent=2, default=repr) + "\n")
  summaries = [experiment.run(cfg, out / cfg.algorithm, data=data, echo=echo, **run_kwargs) for cfg in configs]
  unfinished = [s for s in summaries if s.get("status") != "complete"]
  if unfinished:
    return summaries
  rows = [row(s) for s in summaries]
  paths.write_text(out / "comparison.md", format_table(rows, markdown=True) + "\n")
  paths.write_text(out / "comparison.csv", format_csv(rows))
  plots.plot_runs([out / name for name in names], out)
  say("\n" + format_table(rows))
  return summaries
