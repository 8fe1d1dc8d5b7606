"""Where a run's numbers go: metrics.jsonl, TensorBoard event files (when tensorboard is installed), the terminal.

One record per evaluated round, a flat dict of JSON numbers (see `experiment` for its keys). Both files may be local
or in Cloud Storage (`fedspa_jax.paths`). Object stores cannot append, so there a file is rewritten whole on every
record (the files are small: one record per evaluation). TensorBoard support is optional: `TensorBoardLog.create`
returns None when the `tensorboard` package is absent; it writes plain event files with tensorboard's own record
format, so TensorFlow is not needed.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import time
from typing import Any, Iterable

from fedspa_jax import paths


class MetricsLog:
  """A JSON-lines file of records; on open it rewrites the file with `history` (so a resumed run's file holds
  exactly the rounds its checkpoint knows, and no rounds from after it). Each record is appended on a local disk,
  and rewrites the whole file in an object store."""

  def __init__(self, path: paths.PathLike, history: Iterable[dict[str, Any]] = ()):
    self.path = paths.as_path(path)
    self._lines = [json.dumps(record) + "\n" for record in history]
    paths.write_text(self.path, "".join(self._lines))

  def write(self, record: dict[str, Any]) -> None:
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    if paths.can_append(self.path):
      with self.path.open("a") as f:
        f.write(line)
    else:
      paths.write_text(self.path, "".join(self._lines))


def read_metrics(path: paths.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file."""
  return [json.loads(line) for line in paths.as_path(path).read_text().splitlines() if line.strip()]


class TensorBoardLog:
  """Scalar summaries in TensorBoard's event-file format (tag "<key>", step = round), one new event file per log.

  The file's records are kept in memory and the whole file is written after each event, so it is complete after
  every write on a local disk and in an object store alike (tensorboard's own writer appends, which gcsfs turns
  into overwrites, losing all but the last flush).
  """

  def __init__(self, path: paths.Path, record_writer, event_pb2, summary_pb2):
    self.path, self._event_pb2, self._summary_pb2 = path, event_pb2, summary_pb2
    self._buffer = io.BytesIO()
    self._records = record_writer(self._buffer)
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  @classmethod
  def create(cls, logdir: paths.PathLike) -> "TensorBoardLog | None":
    """A writer of a new event file in `logdir`, or None when tensorboard is not installed."""
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
      return None
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
    return cls(paths.as_path(logdir) / name, RecordWriter, event_pb2, summary_pb2)

  def _add(self, event) -> None:
    self._records.write(event.SerializeToString())
    paths.write_bytes(self.path, self._buffer.getvalue())

  def write(self, step: int, scalars: dict[str, Any], wall_time: float) -> None:
    values = [
        self._summary_pb2.Summary.Value(tag=key, simple_value=float(value))
        for key, value in scalars.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"
    ]
    self._add(self._event_pb2.Event(wall_time=wall_time, step=step, summary=self._summary_pb2.Summary(value=values)))

  def close(self) -> None:
    """Nothing to release: every event is written when it is added."""


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
