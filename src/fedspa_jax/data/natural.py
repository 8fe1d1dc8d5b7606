"""Natural federated datasets: FEMNIST by writer and Shakespeare by speaking role, from LEAF's or TFF's files.

    data = fj.data.load("femnist", data_dir="~/leaf/data/femnist", format="leaf")     # every writer in the files
    data = fj.data.load("shakespeare", data_dir="~/tff", format="tff", num_clients=100, seed=0)

Each user of the files is one client, with its own train and test samples as the files split them (or, when the
files hold one split only, a seeded per-client holdout: `holdout.split_local`). Files are read one at a time and
one user at a time (`natural_formats`); what is kept is the compact samples (uint8) of the users read, and the
result is written once into arrays of its final size: memory is the data (twice, for a moment, for FEMNIST's
uint8 images) plus O(K), plus one parsed LEAF JSON document.

Which users become clients, in this order (LEAF's own order: sample, then drop small users):
1. `sample_fraction` (LEAF's `--sf` with `-s niid`): users are drawn at random, whole, until the samples drawn reach
   `int(sample_fraction * total samples)`;
2. `min_samples` (LEAF's `-k`): users with fewer samples (train + test) are dropped;
3. `num_clients` or `client_fraction`: a seeded uniform subset of that many (that share of the) remaining users.
Clients keep the files' order (files sorted by name, users in each file's order).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from fedspa_jax.data import cache as cache_lib, holdout, text
from fedspa_jax.data.build import channel_stats
from fedspa_jax.data.federated import ClientSplit, FederatedData, split_from_flat
from fedspa_jax.data.natural_formats import IMAGE_SIDE, DataFormatError, Samples, read_leaf_file, read_tff_file
from fedspa_jax.data.partitioners import make_rng

FORMATS = ("leaf", "tff")
# LEAF's folders of JSON files, latest preprocessing stage first (as LEAF's split_data.py looks for its input).
LEAF_ONE_SPLIT_DIRS = ("rem_user_data", "sampled_data", "all_data")


@dataclasses.dataclass(frozen=True)
class NaturalDataset:
  """A natural federated dataset.

  Attributes:
    name: as `load` knows it.
    kind: "image" (28x28 grey images, class labels) or "text" (token sequences, next-token labels).
    num_classes: label classes (text: the vocabulary size).
    tff_files: variant -> (train file, test file) names TFF's `load_data` extracts.
    tff_classes: variant -> its number of classes, where it differs from `num_classes`.
  """

  name: str
  kind: str
  num_classes: int
  tff_files: dict[str, tuple[str, str]]
  tff_classes: dict[str, int] = dataclasses.field(default_factory=dict)


FEMNIST = NaturalDataset(
    name="femnist", kind="image", num_classes=62,
    tff_files={"full": ("fed_emnist_train.h5", "fed_emnist_test.h5"),
               "digits": ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5")},
    tff_classes={"digits": 10},
)
SHAKESPEARE = NaturalDataset(
    name="shakespeare", kind="text", num_classes=text.VOCAB_SIZE,
    tff_files={"full": ("shakespeare_train.h5", "shakespeare_test.h5")},
)
NATURAL_DATASETS = {d.name: d for d in (FEMNIST, SHAKESPEARE)}


@dataclasses.dataclass(frozen=True)
class Found:
  """The files of one dataset: format, training files, test files (None: one split only)."""

  format: str
  train: list[pathlib.Path]
  test: list[pathlib.Path] | None


def search_dirs(spec: NaturalDataset, data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
  """Folders looked in, in order: data_dir (and its `data/`, `<name>/`, `<name>/data/`), else the cache folder's
  `<name>/` (and its `data/`) and Keras's download folder `~/.keras/datasets` (where TFF's `load_data` puts files)."""
  if data_dir is not None:
    base = pathlib.Path(data_dir).expanduser()
    dirs = [base, base / "data", base / spec.name, base / spec.name / "data"]
  else:
    base = cache_lib.cache_dir() / spec.name
    dirs = [base, base / "data", pathlib.Path.home() / ".keras" / "datasets"]
  return list(dict.fromkeys(dirs))


def _json_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(folder.glob("*.json")) if folder.is_dir() else []


def find_leaf(dirs: list[pathlib.Path]) -> Found | None:
  """LEAF's `train/*.json` (+ `test/*.json`), else one split in `rem_user_data`/`sampled_data`/`all_data`."""
  for d in dirs:
    if train := _json_files(d / "train"):
      return Found("leaf", train, _json_files(d / "test") or None)
    for name in LEAF_ONE_SPLIT_DIRS:
      if files := _json_files(d / name):
        return Found("leaf", files, None)
  return None


def find_tff(spec: NaturalDataset, dirs: list[pathlib.Path], variant: str) -> Found | None:
  """TFF's `<prefix>_train.h5` (+ `<prefix>_test.h5`) of `variant` in the first folder that has it."""
  train, test = spec.tff_files[variant]
  for d in dirs:
    if (d / train).is_file():
      return Found("tff", [d / train], [d / test] if (d / test).is_file() else None)
  return None


def locate(spec: NaturalDataset, data_dir, format: str | None, variant: str) -> Found:
  """The dataset's files in the given format (None: whichever is there).

  Raises:
    FileNotFoundError: no such files in any folder looked in (one line naming the files and the folders).
    ValueError: `format` None and both formats are there.
  """
  dirs = search_dirs(spec, data_dir)
  leaf = find_leaf(dirs) if format in (None, "leaf") else None
  tff = find_tff(spec, dirs, variant) if format in (None, "tff") else None
  if leaf and tff:
    raise ValueError(f"{spec.name}: found LEAF files ({leaf.train[0].parent}) and TFF files ({tff.train[0]}); "
                     f"pass format='leaf' or format='tff'")
  if leaf or tff:
    return leaf or tff
  wanted = []
  if format in (None, "leaf"):
    wanted.append("LEAF JSON files (train/*.json and test/*.json, or all_data/*.json)")
  if format in (None, "tff"):
    wanted.append(f"TFF HDF5 files ({' and '.join(spec.tff_files[variant])})")
  raise FileNotFoundError(
      f"{spec.name}: no {' or '.join(wanted)} in {', '.join(str(d) for d in dirs)}; pass data_dir=... (--data-dir) "
      f"naming the folder that holds them (docs/data.md, 'Natural datasets'; scripts/prepare_leaf.sh makes them)"
  )


def find(name: str, data_dir: str | os.PathLike | None = None, *, format: str | None = None,
         only_digits: bool = False) -> Found:
  """The files `load_natural(name, data_dir=..., format=..., only_digits=...)` reads (see `locate`)."""
  if only_digits and format == "leaf":
    raise ValueError("only_digits reads TFF's digits-only files; LEAF's FEMNIST has all 62 classes")
  variant = "digits" if only_digits else "full"
  return locate(NATURAL_DATASETS[name], data_dir, "tff" if only_digits else format, variant)


def _read_split(files: list[pathlib.Path], found_format: str, spec: NaturalDataset,
                num_classes: int) -> dict[str, Samples]:
  """Every user of one split's files, in file order; a user in two files is refused."""
  reader = read_leaf_file if found_format == "leaf" else read_tff_file
  users: dict[str, Samples] = {}
  where: dict[str, pathlib.Path] = {}
  for path in files:
    for user, samples in reader(path, spec.kind, num_classes):
      if user in users:
        raise DataFormatError(f"user {user!r} appears in both {where[user]} and {path}")
      users[user], where[user] = samples, path
  return users


def _sample_users(sizes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """LEAF's non-IID sampling: random whole users until their samples reach int(fraction * total); sorted ids."""
  order = make_rng(seed, 3).permutation(len(sizes))
  target = int(fraction * sizes.sum())
  reached = np.cumsum(sizes[order]) >= target
  take = int(np.argmax(reached)) + 1 if reached.any() else len(order)
  return np.sort(order[:max(take, 1)])


def select_clients(sizes: np.ndarray, *, sample_fraction: float | None, min_samples: int, num_clients: int | None,
                   client_fraction: float | None, seed: int) -> np.ndarray:
  """Indices (sorted) of the users that become clients; see the module docstring for the order of the steps.

  Raises:
    ValueError: no user left, or more clients asked for than there are.
  """
  chosen = np.arange(len(sizes))
  if sample_fraction is not None:
    chosen = _sample_users(sizes, sample_fraction, seed)
  chosen = chosen[sizes[chosen] >= min_samples]
  if not len(chosen):
    raise ValueError(f"no user has min_samples={min_samples} samples (the largest has {int(sizes.max(initial=0))})")
  want = None
  if num_clients:
    want = num_clients
    if want > len(chosen):
      raise ValueError(f"num_clients={num_clients} but the files hold {len(chosen)} users that qualify")
  elif client_fraction is not None:
    want = max(1, int(round(client_fraction * len(chosen))))
  if want is not None and want < len(chosen):
    chosen = np.sort(make_rng(seed, 4).choice(chosen, size=want, replace=False))
  return chosen


def _assemble(spec: NaturalDataset, items: list[tuple[Samples, np.ndarray | None]]) -> ClientSplit:
  """One flat split from per-client compact samples (each with the rows to take, None for all), written once."""
  counts = [len(s) if rows is None else len(rows) for s, rows in items]
  total = int(sum(counts))
  length = text.SEQUENCE_LENGTH
  if spec.kind == "image":
    x = np.empty((total, IMAGE_SIDE, IMAGE_SIDE, 1), np.uint8)
    y = np.empty((total,), np.int32)
  else:
    x = np.empty((total, length), np.int32)
    y = np.empty((total, length), np.int32)
  start = 0
  for (samples, rows), n in zip(items, counts):
    sx = samples.x if rows is None else samples.x[rows]
    if spec.kind == "image":
      x[start : start + n, ..., 0] = sx
      y[start : start + n] = samples.y if rows is None else samples.y[rows]
    else:
      # A padded chunk's input stops where its targets stop (TFF's x = chunk[:-1], y = chunk[1:], both padded).
      y[start : start + n] = sx[:, 1:]
      x[start : start + n] = np.where(sx[:, 1:] != text.PAD, sx[:, :length], text.PAD)
    start += n
  return split_from_flat(x, y, counts)


def _check_options(spec, format, num_clients, client_fraction, sample_fraction, min_samples, only_digits,
                   test_fraction) -> None:
  if format is not None and format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
  if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int)
                                  or num_clients < 0):
    raise ValueError(f"num_clients must be an integer >= 0 (0 or None: all users), got {num_clients!r}")
  if num_clients and client_fraction is not None:
    raise ValueError("pass num_clients or client_fraction, not both")
  for name, value in (("client_fraction", client_fraction), ("sample_fraction", sample_fraction)):
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
      raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
    raise ValueError(f"min_samples must be an integer >= 0, got {min_samples!r}")
  if not isinstance(only_digits, bool):
    raise ValueError(f"only_digits must be true or false, got {only_digits!r}")
  if only_digits and "digits" not in spec.tff_files:
    raise ValueError(f"only_digits applies to femnist, not {spec.name}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def load_natural(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    format: str | None = None,
    num_clients: int | None = None,
    client_fraction: float | None = None,
    sample_fraction: float | None = None,
    min_samples: int = 0,
    only_digits: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    return_users: bool = False,
    cache: bool = False,
) -> FederatedData | tuple[FederatedData, list[str]]:
  """A natural federated dataset from LEAF's or TFF's files, one client per user.

  Args:
    name: `femnist` or `shakespeare`.
    data_dir: the folder holding the files (see `search_dirs`; None: the cache folder's `<name>/`, then
      `~/.keras/datasets`).
    format: `leaf` (JSON) or `tff` (HDF5); None: whichever the folders hold.
    num_clients: None or 0: every user that qualifies; n: a seeded subset of n of them.
    client_fraction: a seeded subset of this share of the users that qualify (instead of `num_clients`).
    sample_fraction: LEAF's writer-level sampling (`--sf`): whole users drawn until this share of the samples.
    min_samples: drop users with fewer samples (train + test), as LEAF's `-k`.
    only_digits: FEMNIST from TFF's digits-only files (10 classes) instead of the full ones (62).
    test_fraction: share of each client held out when the files hold one split only.
    seed: seeds the user sampling, the subset and the holdout.
    return_users: also return the users' ids (LEAF's user names, TFF's client ids), client k's at position k.
    cache: read and write the partition cache (`fedspa_jax.data.cache`; `load` turns it on), keyed by the options
      and the files read (an entry built from other or rewritten files is rebuilt). Not with `return_users`.

  Returns:
    `FederatedData`. FEMNIST: x uint8 [N, 28, 28, 1] (0 = background, as MNIST), y int32 [N], `mean`/`std` of the
    training images, 62 classes (10 with `only_digits`). Shakespeare: x int32 [N, 80] token ids, y int32 [N, 80]
    next-token ids, 0 = padding, `num_classes = text.VOCAB_SIZE`, `mean = std = None`. With `return_users`,
    `(data, user_ids)`.

  Raises:
    FileNotFoundError: no files of the format in any folder looked in.
    ValueError: bad options; `DataFormatError` (a ValueError) for files that are not what their format says.
  """
  spec = NATURAL_DATASETS[name]
  _check_options(spec, format, num_clients, client_fraction, sample_fraction, min_samples, only_digits,
                 test_fraction)
  num_classes = spec.tff_classes.get("digits" if only_digits else "full", spec.num_classes)
  found = find(name, data_dir, format=format, only_digits=only_digits)
  cache = cache and not return_users
  if cache:
    options = dict(format=found.format, num_clients=num_clients or 0, client_fraction=client_fraction,
                   sample_fraction=sample_fraction, min_samples=min_samples, only_digits=only_digits,
                   test_fraction=test_fraction, seed=seed)
    path = cache_lib.partition_path(name, options)
    stamp = cache_lib.source_stamp([*found.train, *(found.test or [])])
    if (hit := cache_lib.load_partition(path, stamp)) is not None:
      return hit
  train = _read_split(found.train, found.format, spec, num_classes)
  test = _read_split(found.test, found.format, spec, num_classes) if found.test else None
  if not train:
    raise DataFormatError(f"{spec.name}: the files hold no users ({', '.join(str(p) for p in found.train)})")
  if test is not None and (extra := [u for u in test if u not in train]):
    raise DataFormatError(
        f"{spec.name}: {len(extra)} of the {len(test)} users of the test files have no training data (first: "
        f"{extra[0]!r}); each user's own samples must be split into train and test (LEAF: -t sample)"
    )
  users = list(train)
  sizes = np.array([len(train[u]) + (len(test[u]) if test and u in test else 0) for u in users], np.int64)
  chosen = [users[i] for i in select_clients(
      sizes, sample_fraction=sample_fraction, min_samples=min_samples, num_clients=num_clients,
      client_fraction=client_fraction, seed=seed)]
  empty = Samples(train[users[0]].x[:0], None if train[users[0]].y is None else train[users[0]].y[:0])
  if test is not None:
    train_items = [(train[u], None) for u in chosen]
    test_items = [(test.get(u, empty), None) for u in chosen]
  else:
    train_items, test_items = _holdout([train[u] for u in chosen], test_fraction, seed)
  train_split = _assemble(spec, train_items)
  mean, std = channel_stats(np.asarray(train_split.x)) if spec.kind == "image" else (None, None)
  data = FederatedData(train=train_split, test=_assemble(spec, test_items), num_classes=num_classes,
                       name=spec.name, mean=mean, std=std)
  if cache:
    cache_lib.save_partition(path, data, stamp)
  return (data, chosen) if return_users else data


def _holdout(clients: list[Samples], test_fraction: float, seed: int):
  """Per-client seeded holdout (`holdout.split_local`; stratified by label for images, uniform for text)."""
  sizes = [len(s) for s in clients]
  offsets = np.cumsum([0] + sizes)
  labels = np.concatenate([s.y if s.y is not None else np.zeros(len(s), np.int64) for s in clients])
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
  train_parts, test_parts = holdout.split_local(labels, parts, test_fraction=test_fraction, seed=seed)
  train = [(s, p - o) for s, p, o in zip(clients, train_parts, offsets)]
  test = [(s, p - o) for s, p, o in zip(clients, test_parts, offsets)]
  return train, test
