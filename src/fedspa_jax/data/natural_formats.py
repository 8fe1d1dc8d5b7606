"""Readers of the file formats natural federated datasets come in: LEAF's JSON and TFF's HDF5 (TFF's SQLite files:
`tff_sqlite`).

Each yields one client at a time as `Samples` in a compact host form, so reading costs one client's (or, for LEAF,
one JSON document's) raw values at a time plus the compact samples kept:

- images: `x` uint8 [n, 28, 28] stored as MNIST stores digits, 0 = background and 255 = ink. LEAF and TFF store
  floats in [0, 1] with 1.0 = white background (TFF's `emnist.load_data` docstring: "the *inverse* of some MNIST
  representations"), so a value v becomes round(255 * (1 - v)). `y` int64 [n] labels.
- text: `x` uint8 [n, L + 1] token rows, `y` None. LEAF: each 80-character sample followed by its next character
  (LEAF's vocabulary, `text.encode`); TFF: a snippet's rows as TFF's preprocessing cuts them (`text.tff_rows`).

LEAF (https://github.com/TalwalkarLab/leaf) writes each split as JSON files `{"users": [...], "num_samples": [...],
"user_data": {user: {"x": [...], "y": [...]}}}` (plus `hierarchies` for some datasets). Its split step
(`data/utils/split_data.py`, `-t sample`) drops users with fewer than 2 samples, and for Shakespeare keeps test
samples from index `n_train + 79` on (so no test window overlaps a training one) while writing
`num_samples_test = n - n_train`, 79 more than it stores; a user left with no test sample is dropped from both
files. LEAF's own reader (`models/utils/model_utils.py`, `read_dir`) reads `user_data` and ignores `num_samples`;
so does this one: what `user_data` holds is read, and disagreeing `num_samples` entries are counted for one log
line. FEMNIST: `x` is 784 floats per sample (28 x 28, row by row), `y` a class in 0..61. Shakespeare: `x` an
80-character string, `y` the next character.

TFF (`tff.simulation.datasets`, before version 0.19) stores each split as one HDF5 file with a group
`examples/<client_id>/` holding one dataset per feature: EMNIST `pixels` float32 [n, 28, 28] and `label` int [n];
Shakespeare `snippets`, [n] variable-length strings (whole speeches of a role).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from fedspa_jax.data import text

IMAGE_SIDE = 28


class DataFormatError(ValueError):
  """A data file that does not hold what its format says; the message names the file (and the client)."""


class Samples(NamedTuple):
  """One client's samples in compact form (see the module docstring)."""

  x: np.ndarray
  y: np.ndarray | None

  def __len__(self) -> int:
    return len(self.x)


def read_labels(values, where: str, num_classes: int) -> np.ndarray:
  y = np.asarray(values)
  if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
    raise DataFormatError(f"{where}: labels must be a list of integers, got {y.dtype} of shape {y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DataFormatError(f"{where}: labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
  return y.astype(np.int64)


def pixels_to_uint8(values, where: str) -> np.ndarray:
  """[n, 28, 28] uint8 (0 = background) from [n, 784] or [n, 28, 28] floats in [0, 1] with 1.0 = background."""
  try:
    x = np.asarray(values, np.float32)
  except (ValueError, TypeError):
    raise DataFormatError(f"{where}: samples of different shapes (expected {IMAGE_SIDE * IMAGE_SIDE} pixels each)") from None
  n = len(values)
  if n == 0:
    return np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
  if x.shape[1:] not in ((IMAGE_SIDE * IMAGE_SIDE,), (IMAGE_SIDE, IMAGE_SIDE)):
    raise DataFormatError(f"{where}: samples of shape {x.shape[1:]}, expected {IMAGE_SIDE * IMAGE_SIDE} pixels "
                          f"({IMAGE_SIDE}x{IMAGE_SIDE})")
  if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
    raise DataFormatError(f"{where}: pixel values must be in [0, 1], got {np.nanmin(x):g}..{np.nanmax(x):g}")
  return np.rint((1.0 - x) * 255.0).astype(np.uint8).reshape(n, IMAGE_SIDE, IMAGE_SIDE)


def _windows(xs, ys, where: str) -> np.ndarray:
  """LEAF Shakespeare: [n, L + 1] token ids, each 80-character input followed by its next character."""
  length = text.SEQUENCE_LENGTH
  for s in xs:
    if not isinstance(s, str) or len(s) != length:
      got = f"a string of {len(s)} characters" if isinstance(s, str) else type(s).__name__
      raise DataFormatError(f"{where}: a sample of another shape ({got}); expected {length}-character strings")
  for s in ys:
    if not isinstance(s, str) or len(s) != 1:
      raise DataFormatError(f"{where}: labels must be single characters, got {s!r}")
  ids = text.encode("".join(xs)).reshape(len(xs), length)
  return np.concatenate([ids, text.encode("".join(ys))[:, None]], axis=1)


def read_leaf_file(path: pathlib.Path, kind: str, num_classes: int,
                   mismatches: list | None = None) -> Iterator[tuple[str, Samples]]:
  """The users of one LEAF JSON file's `user_data`, one at a time, in the file's order.

  Args:
    path: the file.
    kind: "image" (FEMNIST) or "text" (Shakespeare).
    num_classes: labels must be below this (images).
    mismatches: where given, `(path, user, num_samples entry, samples held)` is appended for each user whose
      `num_samples` entry disagrees with its data (LEAF's Shakespeare test files: all of them).

  Raises:
    DataFormatError: not LEAF's layout, a user without x and y or with different numbers of them, samples of
      another shape.
  """
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataFormatError(f"{path} is not a JSON file: {e}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
    raise DataFormatError(f"{path} is not a LEAF data file (it needs the key user_data, with users, num_samples)")
  user_data = doc["user_data"]
  hints = {}
  if isinstance(doc.get("users"), list) and isinstance(doc.get("num_samples"), list):
    hints = dict(zip(map(str, doc["users"]), doc["num_samples"]))
  for user in list(user_data):
    where = f"{path}, user {user!r}"
    entry = user_data[user]
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
      raise DataFormatError(f"{where}: its user_data entry has no x and y")
    xs, ys = entry["x"], entry["y"]
    if len(xs) != len(ys):
      raise DataFormatError(f"{where}: user_data holds {len(xs)} x but {len(ys)} y")
    if mismatches is not None and hints.get(str(user), len(xs)) != len(xs):
      mismatches.append((path, str(user), hints[str(user)], len(xs)))
    if kind == "image":
      yield str(user), Samples(pixels_to_uint8(xs, where), read_labels(ys, where, num_classes))
    else:
      yield str(user), Samples(_windows(xs, ys, where), None)
    del user_data[user]  # the parsed lists go as soon as they are converted


def _open_hdf5(path: pathlib.Path):
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError:  # a core dependency; only a broken install lacks it
    raise ImportError("reading TFF's HDF5 files needs the Python package h5py (pip install h5py)") from None
  try:
    return h5py, h5py.File(path, "r")
  except OSError as e:
    raise DataFormatError(f"{path} is not an HDF5 file: {e}") from None


def read_tff_file(path: pathlib.Path, kind: str, num_classes: int) -> Iterator[tuple[str, Samples]]:
  """The clients of one TFF HDF5 file (`examples/<client_id>/<feature>`), one at a time, in the file's order.

  Shakespeare's snippets become TFF's token rows (`text.tff_rows`: TFF's vocabulary, BOS/EOS, padding).

  Raises:
    DataFormatError: not an HDF5 file, no `examples` group, a client without the features, samples of another
      shape, labels out of range.
  """
  h5py, f = _open_hdf5(path)
  with f:
    if "examples" not in f or not isinstance(f["examples"], h5py.Group):
      raise DataFormatError(f"{path} has no group 'examples': not a TFF ClientData file "
                            f"(examples/<client_id>/<feature>)")
    features = ("pixels", "label") if kind == "image" else ("snippets",)
    for client_id, group in f["examples"].items():
      where = f"{path}, client {client_id!r}"
      if not isinstance(group, h5py.Group) or not all(name in group for name in features):
        raise DataFormatError(f"{where}: needs the datasets {', '.join(features)}")
      if kind == "image":
        pixels, labels = group["pixels"], group["label"]
        if pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
          raise DataFormatError(f"{where}: pixels of shape {pixels.shape[1:]}, expected ({IMAGE_SIDE}, {IMAGE_SIDE})")
        if labels.shape != (pixels.shape[0],):
          raise DataFormatError(f"{where}: {pixels.shape[0]} images but labels of shape {labels.shape}")
        yield client_id, Samples(pixels_to_uint8(pixels[()], where), read_labels(labels[()], where, num_classes))
      else:
        snippets = group["snippets"]
        if h5py.check_string_dtype(snippets.dtype) is None and snippets.dtype.kind not in "OS":
          raise DataFormatError(f"{where}: snippets must be strings, got {snippets.dtype}")
        if snippets.ndim != 1:
          raise DataFormatError(f"{where}: snippets of shape {snippets.shape}, expected one string per snippet")
        rows = [text.tff_rows(s if isinstance(s, bytes) else str(s)) for s in snippets[()]]
        empty = np.zeros((0, text.SEQUENCE_LENGTH + 1), np.uint8)
        yield client_id, Samples(np.concatenate(rows) if rows else empty, None)

