"""TFF's SQLite ClientData files (TFF >= 0.19; `emnist_all.sqlite`, `shakespeare.sqlite`, `cifar100.sqlite`).

TFF (`tff.simulation.datasets.sql_client_data`) stores a federated dataset as one SQLite database with the tables
`examples(split_name, client_id, serialized_example_proto)`, one serialized `tf.train.Example` per row, and
`client_metadata(client_id, split_name, num_examples)`. `load_data` downloads `<name>.sqlite.lzma` and decompresses
it once next to itself (`download.get_compressed_file`). The features, as TFF's parsers read them:

- EMNIST (`all_train`/`all_test`, `digits_only_train`/`digits_only_test`): `pixels` float [28, 28] in [0, 1]
  (1.0 = background), `label` int64;
- Shakespeare (`train`/`test`): `snippets` bytes, one whole speech per row;
- CIFAR-100 (`train`: clients "0".."499", `test`: clients "0".."99"): `image` [32, 32, 3] stored as int64 0..255,
  `label` int64 0..99, `coarse_label` int64 0..19.

The rows are read in one pass over `examples` (SQLite streams them; nothing but the current row is held beyond the
compact samples kept), parsed with the `tf.train.Example` proto that TFDS ships (`tf_example_pb2`), without
TensorFlow. TFF writes each client's rows together; a client's rows keep the table's order.
"""

from __future__ import annotations

import logging
import lzma
import os
import pathlib
import sqlite3
import tempfile
from typing import Callable, Iterable

import numpy as np

from fedspa_jax.data import cache as cache_lib, text
from fedspa_jax.data.natural_formats import DataFormatError, Samples, pixels_to_uint8, read_labels

log = logging.getLogger(__name__)

LZMA_SUFFIX = ".lzma"
# One converted row: (x of one sample, label or None).
RowParser = Callable[[dict, str], tuple[np.ndarray, int | None]]


def decompressed(path: pathlib.Path) -> pathlib.Path:
  """The SQLite file of `path`: itself, or for `<name>.sqlite.lzma` its decompressed `<name>.sqlite`, made once.

  The decompressed file goes next to the `.lzma` file (as TFF's `get_compressed_file` puts it), or, where that
  folder cannot be written, into `<cache>/tff/`. It is reused while it is newer than the `.lzma` file.

  Raises:
    DataFormatError: the `.lzma` file is not LZMA data or ends early (one line naming it); nothing is left behind.
  """
  path = pathlib.Path(path)
  if path.suffix != LZMA_SUFFIX:
    return path
  name = path.name[: -len(LZMA_SUFFIX)]
  folders = [path.parent] if os.access(path.parent, os.W_OK) else []
  folders.append(cache_lib.cache_dir() / "tff")
  for folder in folders:
    target = folder / name
    if target.is_file() and target.stat().st_mtime_ns >= path.stat().st_mtime_ns:
      return target
  target = folders[0] / name
  target.parent.mkdir(parents=True, exist_ok=True)
  log.info("decompressing %s to %s (once)", path, target)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
  try:
    decompressor = lzma.LZMADecompressor()
    with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
      while chunk := src.read(1 << 20):
        dst.write(decompressor.decompress(chunk))
    if not decompressor.eof:
      raise DataFormatError(f"{path} ends before the end of its LZMA stream (a truncated download?); download it again")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
  except lzma.LZMAError as e:
    os.unlink(tmp)
    raise DataFormatError(f"{path} is not an LZMA file ({e})") from None
  except BaseException:
    os.unlink(tmp)
    raise
  return target


def connect(path: pathlib.Path) -> sqlite3.Connection:
  """A read-only connection to TFF's database, checked for the `examples` table and its columns.

  Raises:
    DataFormatError: not a SQLite file, or no `examples(split_name, client_id, serialized_example_proto)`.
  """
  try:
    con = sqlite3.connect(f"{pathlib.Path(path).resolve().as_uri()}?mode=ro", uri=True)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
  except sqlite3.DatabaseError as e:
    raise DataFormatError(f"{path} is not a SQLite database ({e})") from None
  if "examples" not in tables:
    con.close()
    raise DataFormatError(f"{path} has no table 'examples' (has: {', '.join(sorted(tables)) or 'none'}): not a TFF "
                          f"SQLite ClientData file (examples(split_name, client_id, serialized_example_proto))")
  columns = {r[1] for r in con.execute("PRAGMA table_info(examples)")}
  if missing := {"split_name", "client_id", "serialized_example_proto"} - columns:
    con.close()
    raise DataFormatError(f"{path}: table 'examples' lacks the column(s) {', '.join(sorted(missing))}")
  return con


def split_names(path: pathlib.Path) -> list[str]:
  """The split names the database holds (`examples.split_name`), sorted."""
  con = connect(path)
  with con:
    names = sorted(r[0] for r in con.execute("SELECT DISTINCT split_name FROM examples"))
  con.close()
  return names


def _example_parser():
  try:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  except ImportError:  # a core dependency; only a broken install lacks it
    raise ImportError("reading TFF's SQLite files needs tensorflow_datasets' tf.train.Example proto "
                      "(pip install tensorflow-datasets)") from None
  return tf_example_pb2.Example.FromString


def feature_values(features, name: str, kind: str, size: int | None, where: str):
  """The values of feature `name` ("float", "int64" or "bytes" list), `size` of them (None: any number).

  Raises:
    DataFormatError: the Example lacks the feature, holds another kind of list or another number of values.
  """
  if name not in features:
    raise DataFormatError(f"{where}: an Example without the feature {name!r} (it has: "
                          f"{', '.join(sorted(features)) or 'none'})")
  feature = features[name]
  held = feature.WhichOneof("kind")
  if held != f"{kind}_list":
    raise DataFormatError(f"{where}: feature {name!r} holds a {held or 'empty'} value, expected {kind}_list")
  values = getattr(feature, held).value
  if size is not None and len(values) != size:
    raise DataFormatError(f"{where}: feature {name!r} has {len(values)} values, expected {size}")
  return values


def read_splits(path: pathlib.Path, splits: Iterable[str], parse: RowParser, finish: Callable[[list, list, str],
                Samples]) -> list[dict[str, Samples]]:
  """Every client of each split in `splits`, in one pass over the `examples` table.

  Args:
    path: the SQLite file (decompressed).
    splits: split names, e.g. `("all_train", "all_test")`.
    parse: one parsed Example's features and a `where` for messages -> (x of the sample, its label or None).
    finish: the x's and labels of one client's run of rows and a `where` -> its compact `Samples`.

  Returns:
    One dict per split: client id -> `Samples` (the client's rows in the table's order), ids sorted.

  Raises:
    DataFormatError: see `connect` and `feature_values`; a split with no rows (naming the splits the file holds).
  """
  splits = list(splits)
  from_bytes = _example_parser()
  con = connect(path)
  out: list[dict[str, list[Samples]]] = [{} for _ in splits]
  index = {s: i for i, s in enumerate(splits)}
  try:
    marks = ", ".join("?" * len(splits))
    rows = con.execute(f"SELECT split_name, client_id, serialized_example_proto FROM examples "
                       f"WHERE split_name IN ({marks}) ORDER BY rowid", splits)
    run_key, xs, ys = None, [], []

    def close_run():
      if run_key is not None and xs:
        split, client = run_key
        out[index[split]].setdefault(client, []).append(finish(xs, ys, f"{path}, client {client!r}"))

    for split, client, blob in rows:
      client = str(client)
      if (split, client) != run_key:
        close_run()
        run_key, xs, ys = (split, client), [], []
      where = f"{path}, split {split!r}, client {client!r}"
      try:
        example = from_bytes(blob)
      except Exception as e:  # the protobuf runtime's DecodeError; its class depends on the backend
        raise DataFormatError(f"{where}: a row that is not a serialized tf.train.Example ({e})") from None
      x, y = parse(example.features.feature, where)
      xs.append(x)
      ys.append(y)
    close_run()
  except sqlite3.DatabaseError as e:
    raise DataFormatError(f"{path}: cannot read table 'examples' ({e})") from None
  finally:
    con.close()
  for split, clients in zip(splits, out):
    if not clients:
      raise DataFormatError(f"{path} holds no rows of split {split!r} (it holds: {', '.join(split_names(path))})")
  return [{c: _join(runs) for c, runs in sorted(clients.items())} for clients in out]


def _join(runs: list[Samples]) -> Samples:
  if len(runs) == 1:
    return runs[0]
  return Samples(np.concatenate([r.x for r in runs]), None if runs[0].y is None else np.concatenate([r.y for r in runs]))


def _parse_emnist(features, where):
  return (np.asarray(feature_values(features, "pixels", "float", 28 * 28, where), np.float32),
          feature_values(features, "label", "int64", 1, where)[0])


def _parse_cifar(features, where):
  image = np.asarray(feature_values(features, "image", "int64", 32 * 32 * 3, where), np.int64)
  feature_values(features, "coarse_label", "int64", 1, where)  # part of TFF's schema: its absence is not TFF's file
  return image, feature_values(features, "label", "int64", 1, where)[0]


def _parse_snippet(features, where):
  return text.tff_rows(feature_values(features, "snippets", "bytes", 1, where)[0]), None


def _finish_emnist(num_classes):
  def finish(xs, ys, where):
    return Samples(pixels_to_uint8(np.stack(xs), where), read_labels(ys, where, num_classes))
  return finish


def _finish_cifar(num_classes):
  def finish(xs, ys, where):
    x = np.stack(xs)
    if x.min() < 0 or x.max() > 255:
      raise DataFormatError(f"{where}: image values must be in 0..255, got {x.min()}..{x.max()}")
    return Samples(x.astype(np.uint8).reshape(-1, 32, 32, 3), read_labels(ys, where, num_classes))
  return finish


def _finish_text(xs, ys, where):
  del ys, where
  return Samples(np.concatenate(xs), None)


def read_clients(path: pathlib.Path, splits: Iterable[str], kind: str, num_classes: int) -> list[dict[str, Samples]]:
  """The clients of `splits` of a TFF SQLite file (decompressed first if it is `.lzma`), as compact `Samples`.

  Args:
    path: `<name>.sqlite` or `<name>.sqlite.lzma`.
    splits: split names to read (e.g. `("all_train", "all_test")`).
    kind: "image" (EMNIST: x uint8 [n, 28, 28], 0 = background), "color" (CIFAR-100: x uint8 [n, 32, 32, 3]) or
      "text" (Shakespeare: x uint8 [n, 81] rows of TFF's tokens, `text.tff_rows`, y None).
    num_classes: labels must be below this.

  Returns:
    One dict per split, client id -> `Samples`, in sorted id order.
  """
  parse, finish = {"image": (_parse_emnist, _finish_emnist(num_classes)),
                   "color": (_parse_cifar, _finish_cifar(num_classes)),
                   "text": (_parse_snippet, _finish_text)}[kind]
  return read_splits(decompressed(path), splits, parse, finish)
