"""PNG figures of one run or several: accuracy vs round and vs bytes, per-client accuracy, mask distances.

Reads only a run folder's files (metrics.jsonl, summary.json, clients.npz), so figures can be redrawn at any time
(`fedspa-jax plot runs/a runs/b --out figs`), local or in Cloud Storage (`fedspa_jax.paths`). matplotlib is imported lazily and used through `Figure` objects
(no pyplot, no global backend), so this works headless and inside notebooks alike.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from fedspa_jax import paths
from fedspa_jax.client_stats import label_order
from fedspa_jax.logging_utils import read_metrics

FILES = {
    "round": "accuracy_vs_round.png",
    "bytes": "accuracy_vs_bytes.png",
    "clients": "client_accuracy.png",
    "hamming": "mask_hamming.png",
}


def _figure(width: float = 5.5, height: float = 3.6):
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _line_axes(fig):
  """Axes whose lines cycle through 10 colors, solid then dashed, so up to 20 runs stay distinguishable."""
  from cycler import cycler
  from matplotlib import colormaps

  ax = fig.add_subplot()
  ax.set_prop_cycle(cycler(linestyle=["-", "--"]) * cycler(color=colormaps["tab10"].colors))
  return ax


def _save(fig, path: paths.Path) -> paths.Path:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  paths.write_bytes(path, buffer.getvalue())
  return path


def load_run(run_dir: paths.PathLike) -> dict[str, Any]:
  """A run folder's records, summary (may be None for an unfinished run) and client arrays (None if absent)."""
  run_dir = paths.as_path(run_dir)
  if not (run_dir / "metrics.jsonl").is_file():
    raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl; is it a fedspa-jax run folder?")
  summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
  config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
  clients = paths.load_npz(run_dir / "clients.npz") if (run_dir / "clients.npz").is_file() else None
  return {
      "dir": run_dir,
      "label": (summary or {}).get("algorithm") or config.get("algorithm") or run_dir.name,
      "records": read_metrics(run_dir / "metrics.jsonl"),
      "summary": summary,
      "clients": clients,
  }


def _labels(runs: list[dict[str, Any]]) -> list[str]:
  labels = [r["label"] for r in runs]
  if len(set(labels)) < len(labels):  # same algorithm twice: tell runs apart by folder
    labels = [f"{r['label']} ({r['dir'].name})" for r in runs]
  return labels


def plot_accuracy_vs_round(runs: list[dict[str, Any]], path: paths.Path) -> paths.Path:
  """Mean personalized accuracy per evaluated round, with the p10-p90 band over clients."""
  fig = _figure()
  ax = _line_axes(fig)
  for run, label in zip(runs, _labels(runs)):
    rec = run["records"]
    x = [r["round"] for r in rec]
    (line,) = ax.plot(x, [r["accuracy_mean"] for r in rec], label=label)
    ax.fill_between(x, [r["accuracy_p10"] for r in rec], [r["accuracy_p90"] for r in rec], alpha=0.15,
                    color=line.get_color(), linewidth=0)
  ax.set(xlabel="round", ylabel="personalized test accuracy", title="mean over clients (band: p10-p90)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  return _save(fig, path)


def plot_accuracy_vs_bytes(runs: list[dict[str, Any]], path: paths.Path) -> paths.Path:
  """Mean personalized accuracy against cumulative bytes communicated (up + down, all clients)."""
  fig = _figure()
  ax = _line_axes(fig)
  for run, label in zip(runs, _labels(runs)):
    rec = run["records"]
    ax.plot([(r["bytes_up"] + r["bytes_down"]) / 2**20 for r in rec], [r["accuracy_mean"] for r in rec],
            marker=".", label=label)
  ax.set(xlabel="communicated (MiB, up + down)", ylabel="personalized test accuracy", title="accuracy vs communication")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  return _save(fig, path)


def plot_client_accuracy(runs: list[dict[str, Any]], path: paths.Path) -> paths.Path:
  """Distribution of the final per-client accuracies (histogram for one run, box plots to compare)."""
  fig = _figure()
  ax = fig.add_subplot()
  accs = [np.asarray(r["summary"]["client_accuracy"]) for r in runs]
  labels = _labels(runs)
  if len(runs) == 1:
    ax.hist(accs[0], bins=min(20, max(5, len(accs[0]) // 3)), range=(0, 1), edgecolor="white")
    ax.axvline(accs[0].mean(), color="black", linestyle="--", label=f"mean {accs[0].mean():.3f}")
    ax.set(xlabel="final personalized test accuracy", ylabel="clients", title=f"{labels[0]}: per-client accuracy")
    ax.legend(loc="upper left")
  else:
    ax.boxplot(accs, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set(ylabel="final personalized test accuracy", title="per-client accuracy")
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_mask_hamming(clients: dict[str, np.ndarray], path: paths.Path, title: str = "") -> paths.Path:
  """Heatmap of pairwise mask distances, clients ordered by label distribution (dominant class marked)."""
  distance, active, counts = clients["hamming"], clients["active"], clients["label_counts"]
  order = label_order(counts)
  share = distance / np.maximum(active[:, None] + active[None, :], 1)
  fig = _figure(5.2, 4.4)
  ax = fig.add_subplot()
  image = ax.imshow(share[np.ix_(order, order)], cmap="viridis", vmin=0.0, interpolation="nearest")
  fig.colorbar(image, ax=ax, label="share of active weights not shared")
  dominant = np.argmax(counts, axis=1)[order]
  starts = [i for i in range(len(order)) if i == 0 or dominant[i] != dominant[i - 1]]
  if len(starts) <= 20:
    ax.set_xticks(starts, [str(dominant[i]) for i in starts], fontsize=7)
    ax.set_yticks(starts, [str(dominant[i]) for i in starts], fontsize=7)
  ax.set(xlabel="clients by dominant label", ylabel="clients by dominant label",
         title=title or "mask Hamming distance between clients")
  return _save(fig, path)


def plot_run(run_dir: paths.PathLike, out_dir: paths.PathLike | None = None) -> list[paths.Path]:
  """All figures of one run, written into `out_dir` (default: the run folder)."""
  run = load_run(run_dir)
  out = paths.as_path(out_dir or run["dir"])
  written = [plot_accuracy_vs_round([run], out / FILES["round"]), plot_accuracy_vs_bytes([run], out / FILES["bytes"])]
  if run["summary"] is not None:
    written.append(plot_client_accuracy([run], out / FILES["clients"]))
  if run["clients"] is not None and "hamming" in run["clients"]:
    written.append(plot_mask_hamming(run["clients"], out / FILES["hamming"], f"{run['label']}: mask Hamming distance"))
  return written


def plot_runs(run_dirs: list[paths.PathLike], out_dir: paths.PathLike) -> list[paths.Path]:
  """Comparison figures of several runs (one line or box per run) into `out_dir`."""
  runs = [load_run(d) for d in run_dirs]
  out = paths.as_path(out_dir)
  written = [plot_accuracy_vs_round(runs, out / FILES["round"]), plot_accuracy_vs_bytes(runs, out / FILES["bytes"])]
  finished = [r for r in runs if r["summary"] is not None]
  if finished:
    written.append(plot_client_accuracy(finished, out / FILES["clients"]))
  return written
