"""MNIST and Fashion-MNIST from their standard IDX `.gz` files: locate, verify, download, read.

Files are looked up, in order, in `data_dir` (and `data_dir/<folder>`), the system dataset folder (Debian's
`dataset-fashion-mnist` package installs /usr/share/datasets/fashion-mnist; Debian has no MNIST package), and the
cache folder `<cache>/<folder>`. Only when no place has all four files are they downloaded, from the datasets'
own addresses, into the cache folder.

Every file is verified before use: the sha256 of the `.gz` file as published (the digests TFDS records for the
official URLs), or else the sha256 of its decompressed content. Debian re-wraps the Fashion-MNIST files (the gzip
header no longer carries the file name, so each file is exactly that name's length shorter than upstream's), so
their compressed digests differ; their content digests below were computed from Debian's files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import urllib.request

import numpy as np

from fedspa_jax.data import cache, idx

_TRAIN_IMAGES, _TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
_TEST_IMAGES, _TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
FILES = (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  """Where an IDX dataset lives and how to check it.

  Attributes:
    name: dataset name as `load` knows it.
    folder: folder name used under `data_dir`, the system folder and the cache.
    system_dirs: system-wide folders that may hold the files (distribution packages).
    urls: base addresses to download from, tried in order.
    gz_sha256: file name -> sha256 of the published `.gz` file.
    raw_sha256: file name -> sha256 of the decompressed content (accepts re-compressed copies).
    num_classes: label classes.
    hint: how to install the files, for the file-not-found message.
  """

  name: str
  folder: str
  system_dirs: tuple[str, ...]
  urls: tuple[str, ...]
  gz_sha256: dict[str, str]
  raw_sha256: dict[str, str]
  num_classes: int = 10
  hint: str = ""


FASHION_MNIST = IdxDataset(
    name="fashion_mnist",
    folder="fashion-mnist",
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    gz_sha256={
        _TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        _TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        _TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        _TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    raw_sha256={
        _TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        _TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        _TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        _TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    hint="On Debian/Ubuntu, run scripts/install_datasets.sh (it installs the package dataset-fashion-mnist).",
)

MNIST = IdxDataset(
    name="mnist",
    folder="mnist",
    system_dirs=("/usr/share/datasets/mnist",),
    # LeCun's page is the original; Google's CVDF mirror serves the same files (the ones TFDS downloads).
    urls=("https://yann.lecun.com/exdb/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    gz_sha256={
        _TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        _TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        _TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        _TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    raw_sha256={},
)

IDX_DATASETS = {d.name: d for d in (FASHION_MNIST, MNIST)}


def search_dirs(spec: IdxDataset, data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
  """The folders searched for `spec`'s files, in order (data_dir, data_dir/folder, system, cache)."""
  dirs = []
  if data_dir is not None:
    dirs += [pathlib.Path(data_dir).expanduser(), pathlib.Path(data_dir).expanduser() / spec.folder]
  dirs += [pathlib.Path(d) for d in spec.system_dirs]
  dirs.append(cache.cache_dir() / spec.folder)
  return dirs


def find_files(spec: IdxDataset, dirs: list[pathlib.Path]) -> pathlib.Path | None:
  """The first folder in `dirs` that holds all four IDX files of `spec`, or None."""
  for d in dirs:
    if all((d / f).is_file() for f in FILES):
      return d
  return None


def verified_content(path: pathlib.Path, spec: IdxDataset, name: str | None = None) -> bytes:
  """The decompressed bytes of one of `spec`'s files, after checking its digest.

  Args:
    path: the `.gz` file.
    spec: the dataset it belongs to.
    name: which of `FILES` it is (default: `path.name`).

  Raises:
    ValueError: neither the file's nor its content's sha256 is the known one.
  """
  name = name or path.name
  packed = path.read_bytes()
  try:
    raw = gzip.decompress(packed)
  except (OSError, EOFError):
    raw = None
  if hashlib.sha256(packed).hexdigest() == spec.gz_sha256[name] and raw is not None:
    return raw
  if raw is not None and name in spec.raw_sha256 and hashlib.sha256(raw).hexdigest() == spec.raw_sha256[name]:
    return raw
  raise ValueError(
      f"{path} does not match the published {spec.name} file {name} (sha256 of the .gz and of its content "
      f"differ from the known ones); delete it, or pass verify=False to use it anyway"
  )


def download(spec: IdxDataset, dest: pathlib.Path, timeout: float = 60.0) -> None:
  """Downloads `spec`'s four files into `dest`, trying its addresses in order and verifying each file.

  Raises:
    OSError: no address served a verified copy of some file (the message lists every attempt).
  """
  dest.mkdir(parents=True, exist_ok=True)
  for name in FILES:
    if (dest / name).is_file():
      continue
    errors = []
    for base in spec.urls:
      tmp = dest / f"{name}.part"
      try:
        with urllib.request.urlopen(base + name, timeout=timeout) as response:
          tmp.write_bytes(response.read())
        verified_content(tmp, spec, name)
        os.replace(tmp, dest / name)
        break
      except (OSError, ValueError) as e:
        errors.append(f"{base}{name}: {e}")
        tmp.unlink(missing_ok=True)
    else:
      raise OSError(f"could not download {spec.name}:\n  " + "\n  ".join(errors))


def locate(spec: IdxDataset, data_dir: str | os.PathLike | None, allow_download: bool) -> pathlib.Path:
  """The folder holding `spec`'s files: found in the search folders, else downloaded into the cache.

  Raises:
    FileNotFoundError: no folder has the files and downloading is off or failed; names every place looked in.
  """
  dirs = search_dirs(spec, data_dir)
  found = find_files(spec, dirs)
  if found is not None:
    return found
  problem = "downloading is off (download=False)"
  if allow_download:
    try:
      download(spec, dirs[-1])
      return dirs[-1]
    except OSError as e:
      problem = f"downloading failed: {e}"
  looked = "\n  ".join(str(d) for d in dirs)
  raise FileNotFoundError(
      f"{spec.name}: the IDX files {', '.join(FILES)} were not found; looked in:\n  {looked}\n"
      f"and {problem}. Put the files in one of these folders or pass data_dir=... {spec.hint}".rstrip()
  )


def load_idx_arrays(
    spec: IdxDataset, data_dir: str | os.PathLike | None = None, *, download: bool = True, verify: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads an IDX dataset's official train and test splits.

  Args:
    spec: which dataset (`FASHION_MNIST`, `MNIST`).
    data_dir: a folder to search first (also `data_dir/<spec.folder>`).
    download: fetch the files into the cache folder when no folder has them.
    verify: check each file's sha256 (see the module docstring).

  Returns:
    `(x_train [N, 28, 28, 1] uint8, y_train [N] int64, x_test [M, 28, 28, 1] uint8, y_test [M] int64)`.
  """
  folder = locate(spec, data_dir, download)
  read = (lambda p: verified_content(p, spec)) if verify else idx.read_idx_bytes
  arrays = [idx.parse_idx(read(folder / f)) for f in FILES]
  x_train, y_train, x_test, y_test = arrays
  for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
  return x_train[..., None], y_train.astype(np.int64), x_test[..., None], y_test.astype(np.int64)
