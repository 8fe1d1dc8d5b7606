"""`load(name, ...)`: a named dataset, partitioned among clients, as `FederatedData`.

Sources: MNIST and Fashion-MNIST from their IDX files (`idx_sources`), CIFAR-10/100 and EMNIST through TFDS
(`tfds_sources`; any other TFDS image dataset as `"tfds:<name>"`), and Synthetic(alpha, beta) (`synthetic`), which
comes with its own per-client split. Partitions of file, TFDS and natural sources are cached on disk (`cache`). The
natural datasets, FEMNIST and Shakespeare, come split by user in LEAF's or TFF's files (`natural`): one client per
user; so does CIFAR-100 with `format="tff"` (TFF's 500 clients).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fedspa_jax.data import build, cache as cache_lib, idx_sources, natural, tfds_sources
from fedspa_jax.data import partitioners as partition_lib
from fedspa_jax.data.federated import FederatedData
from fedspa_jax.data.synthetic import synthetic

SYNTHETIC = "synthetic"
TFDS_PREFIX = "tfds:"


def dataset_names() -> list[str]:
  """The names `load` knows (plus any TFDS image dataset as `"tfds:<name>"`)."""
  return sorted([*idx_sources.IDX_DATASETS, *tfds_sources.TFDS_DATASETS, *natural.NATURAL_DATASETS, SYNTHETIC])


def canonical_name(name: str) -> str:
  """`"Fashion-MNIST"` -> `"fashion_mnist"`, `"emnist/letters"` -> `"emnist_letters"`; `tfds:` names kept.

  Raises:
    ValueError: unknown dataset (the message lists the known ones).
  """
  if name.startswith(TFDS_PREFIX):
    return name
  key = name.strip().lower().replace("-", "_").replace("/", "_")
  if key not in dataset_names():
    raise ValueError(
        f"unknown dataset {name!r}; known: {', '.join(dataset_names())} (or 'tfds:<name>' for another TFDS "
        f"image dataset)"
    )
  return key


def load_arrays(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True, verify: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """A named dataset's official splits, centralised.

  Args:
    name: a name from `dataset_names()` other than `synthetic`, or `"tfds:<name>"`.
    data_dir: folder to look in first (IDX files) or the TFDS data folder (None: `$TFDS_DATA_DIR`, else
      `~/tensorflow_datasets`).
    download: fetch the data when they are not found (TFDS: only where TensorFlow is installed).
    verify: check the IDX files' sha256.

  Returns:
    `(x_train [N, H, W, C] uint8, y_train [N] int64, x_test [M, H, W, C] uint8, y_test [M] int64, num_classes)`.

  Raises:
    FileNotFoundError: the data are not there (see `load`).
    ImportError: a package the TFDS reader needs is missing (see `load`).
  """
  name = canonical_name(name)
  if name in idx_sources.IDX_DATASETS:
    spec = idx_sources.IDX_DATASETS[name]
    return (*idx_sources.load_idx_arrays(spec, data_dir, download=download, verify=verify), spec.num_classes)
  if name == SYNTHETIC or name in natural.NATURAL_DATASETS:
    raise ValueError(f"{name} data come already split per client; use load({name!r}, ...)")
  spec = tfds_sources.TFDS_DATASETS.get(name) or tfds_sources.TfdsDataset(name, name[len(TFDS_PREFIX) :])
  return tfds_sources.load_tfds_arrays(spec, data_dir, download=download)


def source_files(name: str, data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The files `load_arrays(name, data_dir)` reads, as they are on disk now: the four IDX files it finds first, or
  every file of the TFDS dataset's folder (all its versions); [] when none are there (yet)."""
  name = canonical_name(name)
  if name in idx_sources.IDX_DATASETS:
    folder = idx_sources.find_files(spec := idx_sources.IDX_DATASETS[name], idx_sources.search_dirs(spec, data_dir))
    return [] if folder is None else [folder / f for f in idx_sources.FILES]
  spec = tfds_sources.TFDS_DATASETS.get(name) or tfds_sources.TfdsDataset(name, name[len(TFDS_PREFIX) :])
  root = pathlib.Path(data_dir).expanduser() if data_dir else pathlib.Path(tfds_sources.default_data_dir())
  folder = root / spec.tfds_name.split(":")[0]
  return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _load_natural(name: str, num_clients, partition, seed, data_dir, test_mode, test_fraction, cache, **options):
  if partition not in (None, "natural"):
    raise ValueError(f"{name} comes split by user (one client per user); got partition={partition!r}, use None")
  if test_mode not in (None, "split"):
    raise ValueError(f"{name} keeps each user's own train/test split; got test_mode={test_mode!r}, leave it unset")
  return natural.load_natural(name, data_dir=data_dir, num_clients=num_clients, test_fraction=test_fraction,
                              seed=seed, cache=cache, **options)


def _load_synthetic(num_clients: int, partition: str | None, seed: int, test_mode, test_fraction, **kwargs):
  if partition not in (None, "natural"):
    raise ValueError(
        f"synthetic data come with their own per-client split; got partition={partition!r}, use None"
    )
  if test_mode not in (None, "split"):
    raise ValueError(f"synthetic data have no global test split; got test_mode={test_mode!r}, use 'split'")
  return synthetic(num_clients=num_clients, seed=seed, test_fraction=test_fraction, **kwargs)


def load(
    name: str,
    *,
    num_clients: int | None = None,
    partition: str | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    cache: bool = True,
    test_mode: str | None = None,
    test_fraction: float = 0.2,
    min_test_samples: int = 1,
    **partition_args,
) -> FederatedData:
  """Loads a named dataset and partitions it among `num_clients` clients.

  Args:
    name: `fashion_mnist`, `mnist`, `cifar10`, `cifar100`, `emnist_letters`, `emnist_byclass`, `synthetic`,
      `femnist`, `shakespeare`, or `"tfds:<name>"` (any TFDS dataset with `image` and `label` features and
      train/test splits).
    num_clients: K (required, >= 1), except for the natural datasets (`femnist`, `shakespeare`), where None or 0
      means every user in the files and n a seeded subset of n users.
    partition: `iid`, `pathological` or `dirichlet` (required except for `synthetic` and the natural datasets,
      which have their own split).
    seed: seeds the partition and the test assignment (and the generator, for `synthetic`).
    data_dir: folder to look in first for IDX files, or the TFDS data folder (None: `$TFDS_DATA_DIR`, else
      `~/tensorflow_datasets`).
    download: fetch missing data (IDX files from their official addresses; TFDS's own download and preparation,
      which needs TensorFlow).
    verify: check the IDX files' sha256.
    cache: read and write the partition cache (`$FEDSPA_JAX_CACHE` or `~/.cache/fedspa_jax`); an entry built from
      other source files than those on disk now (`source_files`) is rebuilt.
    test_mode: `global` (default: deal the official test split out by each client's label distribution) or
      `split` (hold out `test_fraction` of each client's share); `synthetic` always splits.
    test_fraction: share held out per client in `split` mode.
    min_test_samples: smallest test set per client in `global` mode.
    **partition_args: the partitioner's options (`classes_per_client`; `alpha`, `min_samples`, `max_tries`,
      `balance`), for `synthetic` the generator's (`alpha`, `beta`, `dimension`, `num_classes`, `iid`,
      `max_samples_per_client`), for the natural datasets `format`, `min_samples`, `client_fraction`,
      `sample_fraction`, `only_digits`, `per_position`, `holdout` (`natural.load_natural`); `format="tff"` makes
      `cifar100` TFF's natural 500-client split (no `partition`).

  Returns:
    `FederatedData`; images uint8 [N_total, H, W, C] (flat, see `federated.ClientSplit`) with per-channel `mean`/`std`.

  Raises:
    ValueError: unknown dataset, partition or option, or arguments the partitioner cannot satisfy.
    FileNotFoundError: IDX files absent everywhere (the message names every place looked in), or a TFDS dataset not
      prepared in the TFDS data folder (`tfds_sources.TfdsNotPreparedError`: the message names the folder, the command
      that prepares the dataset on a machine with internet and where to copy it).
    ImportError: `tfds_sources.MissingDependencyError`, a package the TFDS reader needs (the message names it).
  """
  name = canonical_name(name)
  if name in natural.NATURAL_DATASETS or (name in natural.TFF_NATURAL_DATASETS and partition_args.get("format")):
    return _load_natural(name, num_clients, partition, seed, data_dir, test_mode, test_fraction, cache,
                         **partition_args)
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f"num_clients must be an integer >= 1 for {name}, got {num_clients!r} (0, all users, is for "
                     f"the natural datasets: {', '.join(natural.NATURAL_DATASETS)})")
  if name == SYNTHETIC:
    return _load_synthetic(num_clients, partition, seed, test_mode, test_fraction, **partition_args)
  if partition is None:
    raise ValueError(f"pass partition=...; known: {', '.join(partition_lib.PARTITIONERS)}")
  args = dict(
      num_clients=num_clients,
      partition=partition,
      seed=seed,
      test_mode=test_mode or "global",
      test_fraction=test_fraction,
      min_test_samples=min_test_samples,
      **partition_lib.resolve_partition_args(partition, partition_args),
  )
  path = cache_lib.partition_path(name, args)
  stamp = cache_lib.source_stamp(source_files(name, data_dir)) if cache else None
  if cache and (hit := cache_lib.load_partition(path, stamp)) is not None:
    return hit
  x, y, x_test, y_test, num_classes = load_arrays(name, data_dir, download=download, verify=verify)
  data = build.from_arrays(x, y, x_test, y_test, num_classes=num_classes, name=name, **args)
  if cache:
    # The files read: those stamped above, or those just downloaded.
    cache_lib.save_partition(path, data, stamp or cache_lib.source_stamp(source_files(name, data_dir)))
  return data
