"""A readable summary of a partition: per-client sample counts and classes, as a dict, text, or a PNG histogram."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fedspa_jax.data.federated import ClientSplit, FederatedData


def client_label_counts(split: ClientSplit, num_classes: int) -> np.ndarray:
  """[K, C] int64 number of samples of each class per client.

  For sequence labels (`y` [N, L], text), the number of target tokens of each class, padding (token 0) left out.
  """
  owner = split.owners()
  owned = owner >= 0
  y = np.asarray(split.y)[owned].astype(np.int64)
  owner = owner[owned]
  if y.ndim > 1:
    owner = np.broadcast_to(owner.reshape(-1, *[1] * (y.ndim - 1)), y.shape)[y != 0]
    y = y[y != 0]
  flat = owner * num_classes + y
  return np.bincount(flat, minlength=split.num_clients * num_classes).reshape(split.num_clients, num_classes)


def _split_summary(split: ClientSplit, num_classes: int) -> dict:
  counts = client_label_counts(split, num_classes)
  sizes = np.asarray(split.count, np.int64)  # samples (sequences, for text), not label counts
  return {
      "total": int(sizes.sum()),
      "count": sizes.tolist(),
      "classes": [np.flatnonzero(row).tolist() for row in counts],
      "label_counts": counts.tolist(),
      "min": int(sizes.min()),
      "mean": float(sizes.mean()),
      "max": int(sizes.max()),
      "classes_per_client": {"min": int((counts > 0).sum(1).min()), "max": int((counts > 0).sum(1).max())},
  }


def summarize(data: FederatedData) -> dict:
  """Per-client counts and classes of both splits (JSON-serialisable).

  Returns:
    `{"name", "num_clients", "num_classes", "sample_shape", "train": {...}, "test": {...}}`, each split with
    `total`, `count` [K], `classes` (K lists of the classes present), `label_counts` [K][C], `min`/`mean`/`max`
    of the counts and `classes_per_client` {min, max}.
  """
  return {
      "name": data.name,
      "num_clients": data.num_clients,
      "num_classes": data.num_classes,
      "sample_shape": list(data.sample_shape),
      "train": _split_summary(data.train, data.num_classes),
      "test": _split_summary(data.test, data.num_classes),
  }


def format_summary(data: FederatedData | dict, max_clients: int = 20) -> str:
  """`summarize(data)` as a table: a header, then one row per client (the first `max_clients`).

  Each row shows the client's train and test counts and its training classes as `class:count`.
  """
  s = data if isinstance(data, dict) else summarize(data)
  train, test = s["train"], s["test"]
  stats = lambda d: f"{d['total']} samples (per client min {d['min']}, mean {d['mean']:.1f}, max {d['max']})"
  cpc = train["classes_per_client"]
  lines = [
      f"{s['name']}: {s['num_clients']} clients, {s['num_classes']} classes, samples {tuple(s['sample_shape'])}",
      f"  train: {stats(train)}; classes per client {cpc['min']}..{cpc['max']}",
      f"  test:  {stats(test)}",
      f"{'client':>6} {'train':>6} {'test':>5}  classes (train samples per class)",
  ]
  for k in range(min(max_clients, s["num_clients"])):
    row = train["label_counts"][k]
    classes = " ".join(f"{c}:{row[c]}" for c in train["classes"][k])
    lines.append(f"{k:>6} {train['count'][k]:>6} {test['count'][k]:>5}  {classes}")
  if s["num_clients"] > max_clients:
    lines.append(f"   ... {s['num_clients'] - max_clients} more clients")
  return "\n".join(lines)


def plot_label_histogram(
    data: FederatedData, path: str | os.PathLike, *, split: str = "train", max_clients: int = 100
) -> pathlib.Path:
  """Writes a PNG of the clients' label distributions: one stacked bar per client, one colour per class.

  Uses matplotlib's Agg canvas directly (imported here, not at module import; pyplot's global backend is left
  alone, so this is safe inside notebooks).

  Args:
    data: the federated dataset.
    path: the PNG to write (parent folders are created).
    split: `train` or `test`.
    max_clients: plot the first this many clients.

  Returns:
    The path written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  counts = client_label_counts(getattr(data, split), data.num_classes)[:max_clients]
  num_clients, num_classes = counts.shape
  fig = Figure(figsize=(min(4 + 0.12 * num_clients, 24), 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["tab20" if num_classes <= 20 else "viridis"]
  bottom = np.zeros(num_clients)
  clients = np.arange(num_clients)
  for c in range(num_classes):
    color = cmap(c / max(num_classes - 1, 1)) if num_classes > 20 else cmap(c)
    ax.bar(clients, counts[:, c], bottom=bottom, width=0.9, color=color, label=str(c), linewidth=0)
    bottom += counts[:, c]
  ax.set_xlabel("client")
  ax.set_ylabel(f"{split} samples")
  ax.set_title(f"{data.name}: label distribution per client ({split}, {num_clients} of {data.num_clients} clients)")
  if num_classes <= 20:
    ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)
  return path
