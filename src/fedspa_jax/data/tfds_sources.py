"""Image classification datasets from the TensorFlow Datasets catalogue, as numpy arrays.

Reading needs no TensorFlow. A dataset prepared in the array_record format (`tfds build NAME
--file_format=array_record`, or `scripts/prepare_tfds.sh NAME`) is read through TFDS's random-access
`as_data_source`, its PNG images decoded with Pillow; TFDS's reader also needs `array_record` and
`importlib_resources` (which TFDS imports without declaring it). A dataset prepared as tfrecord (`tfds build`'s
default) is read with TensorFlow when it is installed, and otherwise the error says so.

Preparing needs internet and TensorFlow (TFDS encodes the images with `tf.image`). With both, `download=True`
prepares a missing dataset here, as array_record; without them a missing dataset raises `TfdsNotPreparedError`,
naming the folder looked in, the command that prepares it elsewhere and where to copy the result.
`tensorflow_datasets` is imported on first use only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import pathlib

import numpy as np

PREPARE_SCRIPT = "scripts/prepare_tfds.sh"
_READ_CHUNK = 4096  # examples fetched per `__getitems__` call (array_record reads them in parallel)

# Import name -> pip package, for the modules TFDS's reader imports lazily.
_PACKAGES = {
    "PIL": "pillow",
    "cv2": "opencv-python",
    "importlib_resources": "importlib-resources",
    "array_record": "array-record",
    "tensorflow_datasets": "tensorflow-datasets",
    "tensorflow": "tensorflow",
}


class TfdsNotPreparedError(FileNotFoundError):
  """The dataset is not prepared in the TFDS data folder; the message says how to prepare it and where to put it."""


class MissingDependencyError(ImportError):
  """A package that reading the TFDS data needs is not installed; the message names it."""


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """A TFDS dataset as `load` uses it.

  Attributes:
    name: dataset name as `load` knows it.
    tfds_name: the TFDS name, with config (`emnist/letters`).
    num_classes: label classes after `label_offset`; None reads it from the TFDS metadata.
    label_offset: subtracted from TFDS's labels (EMNIST letters are 1..26 in a 37-class label space).
    transpose: swap height and width (EMNIST images are stored transposed).
  """

  name: str
  tfds_name: str
  num_classes: int | None = None
  label_offset: int = 0
  transpose: bool = False


TFDS_DATASETS = {
    d.name: d
    for d in (
        TfdsDataset("cifar10", "cifar10", 10),
        TfdsDataset("cifar100", "cifar100", 100),
        TfdsDataset("emnist_letters", "emnist/letters", 26, label_offset=1, transpose=True),
        TfdsDataset("emnist_byclass", "emnist/byclass", 62, transpose=True),
    )
}


def default_data_dir() -> str:
  """TFDS's default data folder as of now: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _missing_dependency(e: ImportError, what: str) -> MissingDependencyError:
  module = (e.name or "").split(".")[0]
  if not module and "PIL" in str(e):  # TFDS's "Decoding images with NumPy requires either OpenCV or PIL"
    module = "PIL"
  if not module:
    return MissingDependencyError(f"{what} needs a package that is not installed: {_first_line(e)}")
  package = _PACKAGES.get(module, module)
  return MissingDependencyError(
      f"{what} needs the Python package {package!r}, which is not installed ({_first_line(e)}); "
      f"install it with `pip install {package}`",
      name=module,
  )


@contextlib.contextmanager
def _tfds_call(what: str):
  """Runs TFDS code: a missing module becomes `MissingDependencyError`; absl's advice and warnings stay quiet."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # e.g. "OpenCV is not installed", "Variant folder ... has no dataset_info.json"
  try:
    yield
  except MissingDependencyError:
    raise
  except ImportError as e:
    raise _missing_dependency(e, what) from e
  finally:
    absl.setLevel(level)


def _import_tfds():
  with _tfds_call("reading TFDS datasets"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def not_prepared_message(tfds_name: str, version: str, data_dir: str, variant_dir: str, why: str) -> str:
  """One line: where `tfds_name` was looked for, why it was not prepared here, how to prepare it elsewhere."""
  variant = pathlib.Path(variant_dir)
  others = sorted(p.name for p in variant.parent.glob("[0-9]*") if p.is_dir() and p != variant)
  if variant.is_dir():
    found = f"{variant} holds no prepared dataset (no dataset_info.json)"
  elif others:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    found = (f"{variant.parent} holds only version {', '.join(others)}; tensorflow-datasets {tfds.__version__} reads "
             f"{version}, so prepare it with this version: TFDS_VERSION={tfds.__version__}")
  else:
    found = f"no {variant}"
  folder = variant.relative_to(data_dir) if variant.is_relative_to(data_dir) else variant
  return (
      f"TFDS dataset {tfds_name} {version} is not prepared in {data_dir} ({found}) and {why}. On a machine with "
      f"internet run `bash {PREPARE_SCRIPT} {tfds_name}` from a fedspa-jax checkout (TFDS with tensorflow, "
      f"writing array_record) and copy the folder it prints to {variant}, or pass data_dir (--data-dir) naming a "
      f"folder that holds {folder}"
  )


def prepared_builder(tfds_name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True):
  """The TFDS builder of a prepared dataset, prepared here first when that is possible and allowed.

  Args:
    tfds_name: TFDS name (with config), e.g. `cifar10`, `emnist/letters`.
    data_dir: TFDS data folder (None: `default_data_dir()`, read at this call).
    download: when the dataset is missing and TensorFlow is installed, let TFDS download and prepare it (as
      array_record). Without TensorFlow TFDS cannot encode the images, so nothing is downloaded.

  Returns:
    A `tfds.core.DatasetBuilder` whose `is_prepared()` is true.

  Raises:
    TfdsNotPreparedError (a FileNotFoundError): the dataset is neither prepared in `data_dir` nor could be here.
    MissingDependencyError (an ImportError): a package TFDS needs is not installed.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else default_data_dir()
  tfds = _import_tfds()
  with _tfds_call(f"reading TFDS dataset {tfds_name}"):
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise TfdsNotPreparedError(
          f"TFDS has no dataset {tfds_name!r}: it is neither in the TFDS catalogue nor prepared in {data_dir} "
          f"({_first_line(e)})"
      ) from e
    if builder.is_prepared():
      return builder
    message = functools.partial(
        not_prepared_message, tfds_name, str(builder.version), data_dir, os.fspath(builder.data_dir)
    )
    if not download:
      raise TfdsNotPreparedError(message("download=False"))
    if not _has_tensorflow():
      raise TfdsNotPreparedError(message("cannot be prepared here: TFDS needs tensorflow (and internet) for that"))
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # offline, blocked, disk full...: the same advice, with the cause
      raise TfdsNotPreparedError(message(f"preparing it here failed: {_first_line(e)}")) from e
  return builder


def _read_with_tf(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not _has_tensorflow():
    raise MissingDependencyError(
        f"TFDS dataset {builder.info.full_name} in {builder.data_dir} is prepared as {builder.info.file_format.value}, "
        f"which only TensorFlow reads: install it with `pip install tensorflow`, or prepare the dataset as "
        f"array_record (`bash {PREPARE_SCRIPT} {builder.info.full_name.rsplit('/', 1)[0]}`)",
        name="tensorflow",
    )
  batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return np.asarray(batch["image"]), np.asarray(batch["label"])


def read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of a prepared dataset whole.

  Args:
    builder: from `prepared_builder`.
    split: `train`, `test`, or any TFDS split string.

  Returns:
    `(images [N, H, W, C], labels [N])` as TFDS stores them.

  Raises:
    MissingDependencyError: a package the reader needs is not installed.
  """
  with _tfds_call(f"reading TFDS dataset {builder.info.full_name}"):
    try:
      source = builder.as_data_source(split=split)
    except NotImplementedError:  # TFDS's answer for a format without random access (tfrecord)
      return _read_with_tf(builder, split)
    n = len(source)
    if not n:
      raise ValueError(f"TFDS split {builder.info.full_name}:{split} is empty")
    fetch = getattr(source, "__getitems__", None) or (lambda keys: [source[k] for k in keys])
    images, labels = None, np.empty([n], np.int64)
    for start in range(0, n, _READ_CHUNK):
      for i, example in enumerate(fetch(range(start, min(start + _READ_CHUNK, n))), start):
        if images is None:
          images = np.empty([n, *np.shape(example["image"])], np.asarray(example["image"]).dtype)
        images[i], labels[i] = example["image"], example["label"]
  return images, labels


def convert_labels(labels: np.ndarray, spec: TfdsDataset, num_classes: int) -> np.ndarray:
  """TFDS labels -> int64 labels in [0, num_classes), applying `spec.label_offset`.

  Raises:
    ValueError: a label falls outside the range after the offset.
  """
  out = np.asarray(labels).astype(np.int64) - spec.label_offset
  if out.size and (out.min() < 0 or out.max() >= num_classes):
    raise ValueError(
        f"{spec.name}: labels minus offset {spec.label_offset} span [{out.min()}, {out.max()}], "
        f"expected [0, {num_classes})"
    )
  return out


def load_tfds_arrays(
    spec: TfdsDataset, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """Loads a TFDS dataset's train and test splits.

  Args:
    spec: which dataset (a value of `TFDS_DATASETS`, or `TfdsDataset(name, tfds_name)` for any other).
    data_dir: TFDS data folder (None: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).
    download: let TFDS download and prepare a missing dataset (needs internet and TensorFlow).

  Returns:
    `(x_train [N, H, W, C] uint8, y_train [N] int64, x_test [M, H, W, C] uint8, y_test [M] int64, num_classes)`.

  Raises:
    TfdsNotPreparedError (a FileNotFoundError): the dataset is not prepared in `data_dir` (the message says how to
      prepare it and where to copy it).
    MissingDependencyError (an ImportError): a package the reader needs is not installed (the message names it).
  """
  builder = prepared_builder(spec.tfds_name, data_dir, download=download)
  num_classes = spec.num_classes
  if num_classes is None:
    num_classes = builder.info.features["label"].num_classes - spec.label_offset
  out = []
  for split in ("train", "test"):
    x, y = read_split(builder, split)
    if x.ndim == 3:
      x = x[..., None]
    if spec.transpose:
      x = x.transpose(0, 2, 1, 3)
    out += [np.ascontiguousarray(x), convert_labels(y, spec, num_classes)]
  return (*out, num_classes)
