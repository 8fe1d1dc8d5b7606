"""Where a run's numbers go: metrics.jsonl, TensorBoard event files (when tensorboard is installed), the terminal.

One record per evaluated round, a flat dict of JSON numbers (see `experiment` for its keys). TensorBoard support
is optional: `TensorBoardLog.create` returns None when the `tensorboard` package is absent; it writes plain event
files with tensorboard's own writer, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterable


class MetricsLog:
  """Appends records to a JSON-lines file; on open it rewrites the file with `history` (so a resumed run's file
  holds exactly the rounds its checkpoint knows, and no rounds from after it)."""

  def __init__(self, path: str | pathlib.Path, history: Iterable[dict[str, Any]] = ()):
    self.path = pathlib.Path(path)
    tmp = self.path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
      for record in history:
        f.write(json.dumps(record) + "\n")
    tmp.replace(self.path)

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file."""
  with pathlib.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


class TensorBoardLog:
  """Scalar summaries in TensorBoard's event-file format (tag "<key>", step = round)."""

  def __init__(self, writer, event_pb2, summary_pb2):
    self._writer, self._event_pb2, self._summary_pb2 = writer, event_pb2, summary_pb2

  @classmethod
  def create(cls, logdir: str | pathlib.Path) -> "TensorBoardLog | None":
    """A writer into `logdir`, or None when tensorboard is not installed."""
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
      return None
    pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
    return cls(EventFileWriter(str(logdir)), event_pb2, summary_pb2)

  def write(self, step: int, scalars: dict[str, Any], wall_time: float) -> None:
    values = [
        self._summary_pb2.Summary.Value(tag=key, simple_value=float(value))
        for key, value in scalars.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"
    ]
    event = self._event_pb2.Event(wall_time=wall_time, step=step, summary=self._summary_pb2.Summary(value=values))
    self._writer.add_event(event)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def human_bytes(n: float) -> str:
  """1536 -> "1.5 KiB"."""
  if n < 1024:
    return f"{int(n)} B"
  exp = min(int(math.log(n, 1024)), 5)
  return f"{n / 1024**exp:.1f} {'KMGTP'[exp - 1]}iB"


def format_record(record: dict[str, Any]) -> str:
  """One terminal line for an evaluated round (with the other protocols' mean accuracies and diverged clients)."""
  others = [f"{key[len('accuracy_'):-len('_mean')]} {value:.4f}" for key, value in record.items()
            if key.startswith("accuracy_") and key.endswith("_mean") and key != "accuracy_mean"]
  others += [f"fine-tuned {record['finetuned_accuracy_mean']:.4f}"] if "finetuned_accuracy_mean" in record else []
  diverged = record.get("eval_diverged", 0)
  return (
      f"round {record['round']:4d}  acc {record['accuracy_mean']:.4f} ± {record['accuracy_std']:.4f}  "
      f"(p10 {record['accuracy_p10']:.3f}, p90 {record['accuracy_p90']:.3f})  "
      + (f"[{', '.join(others)}]  " if others else "")
      + (f"DIVERGED: {diverged} clients  " if diverged else "")
      + f"train loss {record['train_loss']:.4f}  "
      f"comm {human_bytes(record['bytes_up'] + record['bytes_down'])}  {record['wall_time']:.1f}s"
  )


def make_progress(*, total: int, initial: int, desc: str, enable: bool | None):
  """A tqdm bar over rounds on stderr; `enable=None` shows it only on a terminal."""
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, desc=desc, unit="round", disable=None if enable is None else not enable,
              dynamic_ncols=True, leave=False)
