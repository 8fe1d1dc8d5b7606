"""Natural federated datasets: FEMNIST by writer, Shakespeare by speaking role (LEAF's or TFF's files) and
CIFAR-100 by TFF's 500 clients (TFF's files, `format="tff"`).

    data = fj.data.load("femnist", data_dir="~/leaf/data/femnist", format="leaf")     # every writer in the files
    data = fj.data.load("shakespeare", data_dir="~/.tff", format="tff", num_clients=100, seed=0)
    data = fj.data.load("cifar100", data_dir="~/.tff", format="tff")                    # TFF's natural split

Each user of the files is one client, with its own train and test samples as the files split them (or, when the
files hold one split only, a seeded per-client holdout: `holdout.split_local`). LEAF's JSON and TFF's HDF5 files
are read one at a time and one user at a time (`natural_formats`), TFF's SQLite files row by row in one pass
(`tff_sqlite`); what is kept is the compact samples (uint8) of the users read, and the result is written once into
arrays of its final size: memory is the data (twice, for a moment, for the uint8 images) plus O(K), plus one
parsed LEAF JSON document.

The tasks (docs/data.md has the table): FEMNIST and CIFAR-100 are image classification. Shakespeare from LEAF's
files is LEAF's task, the next character after each 80-character sample (`y` is 0 except at the last position, so
one prediction per sample is scored; `per_position=True` scores every position instead); from TFF's files it is
TFF's task: TFF's vocabulary (`text.TFF_VOCAB_SIZE` = 90), each snippet wrapped in BOS/EOS, padded and cut into
rows of 81 (`text.tff_rows`), every non-padding position scored.

Which users become clients, in this order:
1. `sample_fraction`: users are drawn at random, whole, across all files, until the samples drawn reach
   `int(sample_fraction * total samples)`. (LEAF's `--sf` with `-s niid` draws per file and truncates the last
   user drawn to hit the target exactly; this keeps every user drawn whole.)
2. `min_samples` (LEAF's `-k`): users with fewer samples (train + test) are dropped;
3. `num_clients` or `client_fraction`: a seeded uniform subset of that many (that share of the) remaining users.
Clients are in sorted id order (Python's string order), as LEAF's reader (`sorted(user_data)`) and TFF's
`SqlClientData` (`sorted(client_ids)`) order them, whatever the files' layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np

from fedspa_jax.data import cache as cache_lib, holdout, text, tff_sqlite
from fedspa_jax.data.build import channel_stats
from fedspa_jax.data.federated import ClientSplit, FederatedData, split_from_flat
from fedspa_jax.data.natural_formats import IMAGE_SIDE, DataFormatError, Samples, read_leaf_file, read_tff_file
from fedspa_jax.data.partitioners import make_rng

log = logging.getLogger(__name__)

FORMATS = ("leaf", "tff")
# Bumped when what a load returns for the same options changes (2: sorted clients, LEAF/TFF Shakespeare tasks).
TASK_VERSION = 2
# LEAF's folders of JSON files, latest preprocessing stage first (as LEAF's split_data.py looks for its input).
LEAF_ONE_SPLIT_DIRS = ("rem_user_data", "sampled_data", "all_data")


@dataclasses.dataclass(frozen=True)
class NaturalDataset:
  """A natural federated dataset.

  Attributes:
    name: as `load` knows it.
    kind: "image" (28x28 grey images), "color" (32x32 RGB images), both with class labels, or "text" (token
      sequences, next-token labels).
    num_classes: label classes of the LEAF files (text: LEAF's vocabulary size).
    tff_files: variant -> (train file, test file) names of TFF's HDF5 files (before TFF 0.19).
    tff_sqlite: variant -> (SQLite file, (train split, test split)) of TFF's SQLite file (TFF >= 0.19).
    tff_classes: variant -> its number of classes in TFF's files, where it differs from `num_classes`.
    leaf: LEAF has the dataset.
    holdout_default: the test set by default: the files' own (False) or a holdout of each client's training
      samples (True: CIFAR-100, whose TFF test clients are another population than its training clients).
  """

  name: str
  kind: str
  num_classes: int
  tff_files: dict[str, tuple[str, str]]
  tff_sqlite: dict[str, tuple[str, tuple[str, str]]] = dataclasses.field(default_factory=dict)
  tff_classes: dict[str, int] = dataclasses.field(default_factory=dict)
  leaf: bool = True
  holdout_default: bool = False

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return {"image": (IMAGE_SIDE, IMAGE_SIDE, 1), "color": (32, 32, 3)}.get(self.kind, (text.SEQUENCE_LENGTH,))


FEMNIST = NaturalDataset(
    name="femnist", kind="image", num_classes=62,
    tff_files={"full": ("fed_emnist_train.h5", "fed_emnist_test.h5"),
               "digits": ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5")},
    tff_sqlite={"full": ("emnist_all.sqlite", ("all_train", "all_test")),
                "digits": ("emnist_all.sqlite", ("digits_only_train", "digits_only_test"))},
    tff_classes={"digits": 10},
)
SHAKESPEARE = NaturalDataset(
    name="shakespeare", kind="text", num_classes=text.VOCAB_SIZE,
    tff_files={"full": ("shakespeare_train.h5", "shakespeare_test.h5")},
    tff_sqlite={"full": ("shakespeare.sqlite", ("train", "test"))},
    tff_classes={"full": text.TFF_VOCAB_SIZE},
)
CIFAR100 = NaturalDataset(
    name="cifar100", kind="color", num_classes=100, tff_files={},
    tff_sqlite={"full": ("cifar100.sqlite", ("train", "test"))}, leaf=False, holdout_default=True,
)
NATURAL_DATASETS = {d.name: d for d in (FEMNIST, SHAKESPEARE)}
# Datasets that are natural only in TFF's files (`load(name, format="tff")`; otherwise another source's).
TFF_NATURAL_DATASETS = {d.name: d for d in (CIFAR100,)}
SPECS = {**NATURAL_DATASETS, **TFF_NATURAL_DATASETS}


@dataclasses.dataclass(frozen=True)
class Found:
  """The files of one dataset: format, training files, test files (None: one split only), and for TFF's SQLite
  file (train and test are that one file) the split names to read."""

  format: str
  train: list[pathlib.Path]
  test: list[pathlib.Path] | None
  splits: tuple[str, str] | None = None


def search_dirs(spec: NaturalDataset, data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
  """Folders looked in, in order: data_dir (and its `data/`, `<name>/`, `<name>/data/`), else the cache folder's
  `<name>/` (and its `data/`), TFF's download folder `~/.tff` (TFF >= 0.19 puts its SQLite files there) and Keras's
  `~/.keras/datasets` (where TFF's older `load_data` put its HDF5 files)."""
  if data_dir is not None:
    base = pathlib.Path(data_dir).expanduser()
    dirs = [base, base / "data", base / spec.name, base / spec.name / "data"]
  else:
    base = cache_lib.cache_dir() / spec.name
    dirs = [base, base / "data", pathlib.Path.home() / ".tff", pathlib.Path.home() / ".keras" / "datasets"]
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
  """In the first folder that has one: TFF's SQLite file of `variant` (the `<name>.sqlite.lzma` TFF downloads,
  whose decompressed copy is read, else `<name>.sqlite`), else its HDF5 files `<prefix>_train.h5` (+ `_test.h5`).

  The `.lzma` file comes first so that the file found (and the partition cache's stamp) stays the same once its
  decompressed copy appears beside it."""
  sqlite, splits = spec.tff_sqlite.get(variant, (None, None))
  train, test = spec.tff_files.get(variant, (None, None))
  for d in dirs:
    if sqlite:
      for name in (sqlite + tff_sqlite.LZMA_SUFFIX, sqlite):
        if (d / name).is_file():
          return Found("tff", [d / name], [d / name], splits)
    if train and (d / train).is_file():
      return Found("tff", [d / train], [d / test] if (d / test).is_file() else None)
  return None


def _tff_names(spec: NaturalDataset, variant: str) -> str:
  names = []
  if variant in spec.tff_sqlite:
    names.append(f"TFF SQLite file ({spec.tff_sqlite[variant][0]}[.lzma])")
  if variant in spec.tff_files:
    names.append(f"TFF HDF5 files ({' and '.join(spec.tff_files[variant])})")
  return " or ".join(names)


def locate(spec: NaturalDataset, data_dir, format: str | None, variant: str) -> Found:
  """The dataset's files in the given format (None: whichever is there).

  Raises:
    FileNotFoundError: no such files in any folder looked in (one line naming the files and the folders).
    ValueError: `format` None and both formats are there.
  """
  dirs = search_dirs(spec, data_dir)
  leaf = find_leaf(dirs) if format in (None, "leaf") and spec.leaf else None
  tff = find_tff(spec, dirs, variant) if format in (None, "tff") else None
  if leaf and tff:
    raise ValueError(f"{spec.name}: found LEAF files ({leaf.train[0].parent}) and TFF files ({tff.train[0]}); "
                     f"pass format='leaf' or format='tff'")
  if leaf or tff:
    return leaf or tff
  wanted = []
  if format in (None, "leaf") and spec.leaf:
    wanted.append("LEAF JSON files (train/*.json and test/*.json, or all_data/*.json)")
  if format in (None, "tff"):
    wanted.append(_tff_names(spec, variant))
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
  return locate(SPECS[name], data_dir, "tff" if only_digits else format, variant)


def _read_split(files: list[pathlib.Path], found_format: str, spec: NaturalDataset,
                num_classes: int) -> dict[str, Samples]:
  """Every user of one split's files (LEAF JSON or TFF HDF5), in file order; a user in two files is refused.
  LEAF's `num_samples` entries that disagree with the data are reported in one log line."""
  users: dict[str, Samples] = {}
  where: dict[str, pathlib.Path] = {}
  mismatches = []
  for path in files:
    if found_format == "leaf":
      clients = read_leaf_file(path, spec.kind, num_classes, mismatches)
    else:
      clients = read_tff_file(path, spec.kind, num_classes)
    for user, samples in clients:
      if user in users:
        raise DataFormatError(f"user {user!r} appears in both {where[user]} and {path}")
      users[user], where[user] = samples, path
  if mismatches:
    path, user, hint, held = mismatches[0]
    log.warning("%s: num_samples disagrees with user_data for %d of %d users (first: %s, user %r: %d listed, %d held; "
                "LEAF's Shakespeare split writes num_samples_test = n - n_train); read what user_data holds",
                spec.name, len(mismatches), len(users), path, user, hint, held)
  return users


def _read(found: Found, spec: NaturalDataset, num_classes: int, holdout_only: bool):
  """(train users, test users or None) of the files found."""
  if found.splits is not None:  # TFF's SQLite: both splits in one pass
    splits = found.splits[:1] if holdout_only else found.splits
    read = tff_sqlite.read_clients(found.train[0], splits, spec.kind, num_classes)
    return read[0], (None if holdout_only else read[1])
  train = _read_split(found.train, found.format, spec, num_classes)
  test = _read_split(found.test, found.format, spec, num_classes) if found.test and not holdout_only else None
  return train, test


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


def _assemble(spec: NaturalDataset, items: list[tuple[Samples, np.ndarray | None]],
              per_position: bool = True) -> ClientSplit:
  """One flat split from per-client compact samples (each with the rows to take, None for all), written once.

  Text rows [n, L + 1] become x = row[:-1] and y = row[1:] (`per_position`), or y = 0 but at the last position,
  which holds row[L] (LEAF's task: the next character after the sample, one prediction per sample).
  """
  counts = [len(s) if rows is None else len(rows) for s, rows in items]
  total = int(sum(counts))
  length = text.SEQUENCE_LENGTH
  if spec.kind == "text":
    x = np.empty((total, length), np.int32)
    y = np.zeros((total, length), np.int32)
  else:
    x = np.empty((total, *spec.sample_shape), np.uint8)
    y = np.empty((total,), np.int32)
  start = 0
  for (samples, rows), n in zip(items, counts):
    sx = samples.x if rows is None else samples.x[rows]
    if spec.kind == "text":
      x[start : start + n] = sx[:, :length]
      if per_position:
        y[start : start + n] = sx[:, 1:]
      else:
        y[start : start + n, -1] = sx[:, length]
    else:
      x[start : start + n] = sx.reshape(n, *spec.sample_shape)
      y[start : start + n] = samples.y if rows is None else samples.y[rows]
    start += n
  return split_from_flat(x, y, counts)


def _check_options(spec, format, num_clients, client_fraction, sample_fraction, min_samples, only_digits,
                   test_fraction, per_position, holdout) -> None:
  if format is not None and format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
  if format == "leaf" and not spec.leaf:
    raise ValueError(f"{spec.name} has no LEAF files; its natural split is TFF's (format='tff')")
  if per_position is not None and not isinstance(per_position, bool):
    raise ValueError(f"per_position must be true or false, got {per_position!r}")
  if per_position is not None and spec.kind != "text":
    raise ValueError(f"per_position applies to shakespeare's next-character task, not {spec.name}")
  if per_position is False and format == "tff":
    raise ValueError("TFF's Shakespeare task scores every position (per_position=False is LEAF's task: format='leaf')")
  if holdout is not None and not isinstance(holdout, bool):
    raise ValueError(f"holdout must be true or false, got {holdout!r}")
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
  if only_digits and "digits" not in spec.tff_sqlite:
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
    per_position: bool | None = None,
    holdout: bool | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    return_users: bool = False,
    cache: bool = False,
) -> FederatedData | tuple[FederatedData, list[str]]:
  """A natural federated dataset from LEAF's or TFF's files, one client per user.

  Args:
    name: `femnist`, `shakespeare` or `cifar100` (TFF's files only).
    data_dir: the folder holding the files (see `search_dirs`; None: the cache folder's `<name>/`, then `~/.tff`
      and `~/.keras/datasets`).
    format: `leaf` (JSON) or `tff` (SQLite, `.sqlite` or `.sqlite.lzma`, or the older HDF5); None: whichever the
      folders hold.
    num_clients: None or 0: every user that qualifies; n: a seeded subset of n of them.
    client_fraction: a seeded subset of this share of the users that qualify (instead of `num_clients`).
    sample_fraction: whole users drawn at random until this share of the samples (see the module docstring).
    min_samples: drop users with fewer samples (train + test), as LEAF's `-k`.
    only_digits: FEMNIST from TFF's digits-only files or splits (10 classes) instead of the full ones (62).
    per_position: Shakespeare: score every position (LEAF's files: instead of LEAF's one next character per
      sample). None: the format's own task.
    holdout: hold out `test_fraction` of each client's training samples as its test set instead of reading the
      files' test split. None: CIFAR-100 holds out (TFF's 100 test clients are not its 500 training clients),
      FEMNIST and Shakespeare read their test split.
    test_fraction: share of each client held out when the files hold one split only (or with `holdout`).
    seed: seeds the user sampling, the subset and the holdout.
    return_users: also return the users' ids (LEAF's user names, TFF's client ids), client k's at position k.
    cache: read and write the partition cache (`fedspa_jax.data.cache`; `load` turns it on), keyed by the options
      and the files read (an entry built from other or rewritten files is rebuilt). Not with `return_users`.

  Returns:
    `FederatedData`, clients in sorted id order. FEMNIST: x uint8 [N, 28, 28, 1] (0 = background, as MNIST), y
    int32 [N], `mean`/`std` of the training images, 62 classes (10 with `only_digits`). CIFAR-100: x uint8
    [N, 32, 32, 3], y int32 [N], 100 classes. Shakespeare: x int32 [N, 80] token ids, y int32 [N, 80] targets, 0 =
    not scored; LEAF: `num_classes = text.VOCAB_SIZE` (82), TFF: `text.TFF_VOCAB_SIZE` (90); `mean = std = None`.
    With `return_users`, `(data, user_ids)`.

  Raises:
    FileNotFoundError: no files of the format in any folder looked in.
    ValueError: bad options; `DataFormatError` (a ValueError) for files that are not what their format says.
  """
  spec = SPECS[name]
  _check_options(spec, format, num_clients, client_fraction, sample_fraction, min_samples, only_digits,
                 test_fraction, per_position, holdout)
  variant = "digits" if only_digits else "full"
  found = find(name, data_dir, format=format, only_digits=only_digits)
  num_classes = spec.tff_classes.get(variant, spec.num_classes) if found.format == "tff" else spec.num_classes
  if per_position is None:
    per_position = found.format == "tff"
  holdout_only = spec.holdout_default if holdout is None else holdout
  cache = cache and not return_users
  if cache:
    options = dict(format=found.format, num_clients=num_clients or 0, client_fraction=client_fraction,
                   sample_fraction=sample_fraction, min_samples=min_samples, only_digits=only_digits,
                   per_position=per_position, holdout=holdout_only, test_fraction=test_fraction, seed=seed,
                   task_version=TASK_VERSION)
    path = cache_lib.partition_path(name, options)
    stamp = cache_lib.source_stamp(list(dict.fromkeys([*found.train, *(found.test or [])])))
    if (hit := cache_lib.load_partition(path, stamp)) is not None:
      return hit
  train, test = _read(found, spec, num_classes, holdout_only)
  if not train:
    raise DataFormatError(f"{spec.name}: the files hold no users ({', '.join(str(p) for p in found.train)})")
  if test is not None and (extra := [u for u in test if u not in train]):
    raise DataFormatError(
        f"{spec.name}: {len(extra)} of the {len(test)} users of the test files have no training data (first: "
        f"{extra[0]!r}); each user's own samples must be split into train and test (LEAF: -t sample)"
    )
  users = sorted(train)
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
  train_split = _assemble(spec, train_items, per_position)
  mean, std = channel_stats(np.asarray(train_split.x)) if spec.kind != "text" else (None, None)
  data = FederatedData(train=train_split, test=_assemble(spec, test_items, per_position), num_classes=num_classes,
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
