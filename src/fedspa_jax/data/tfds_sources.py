"""Image classification datasets from the TensorFlow Datasets catalogue, as numpy arrays.

With TensorFlow installed the whole split is read at once (`tfds.load(..., batch_size=-1)` then `tfds.as_numpy`);
without it, through TFDS's random-access `tfds.data_source` (which needs the dataset prepared in the array_record
format: `tfds build <name> --file_format=array_record`). `data_dir` is passed through to TFDS either way.
`tensorflow_datasets` is imported on first use only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np


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


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _read_with_tf(tfds_name: str, split: str, data_dir, download: bool) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  batch = tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1, data_dir=data_dir, download=download))
  return np.asarray(batch["image"]), np.asarray(batch["label"])


def _read_with_data_source(tfds_name: str, split: str, data_dir, download: bool) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=download)
  examples = [source[i] for i in range(len(source))]
  if not examples:
    raise ValueError(f"TFDS split {tfds_name}:{split} is empty")
  return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def read_split(tfds_name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True):
  """Reads one TFDS split whole.

  Args:
    tfds_name: TFDS name (with config), e.g. `cifar10`, `emnist/letters`.
    split: `train`, `test`, or any TFDS split string.
    data_dir: TFDS data folder (None: TFDS's default, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
    download: let TFDS download and prepare the dataset when it is not there.

  Returns:
    `(images [N, H, W, C], labels [N])` as TFDS stores them.

  Raises:
    RuntimeError: TFDS could not provide the split (the message says how to prepare it).
  """
  read = _read_with_tf if _has_tensorflow() else _read_with_data_source
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    return read(tfds_name, split, data_dir, download)
  except Exception as e:  # TFDS raises many types here; say what to do instead of a deep traceback.
    how = f"tfds build {tfds_name}" + ("" if _has_tensorflow() else " --file_format=array_record")
    how += f" --data_dir={data_dir}" if data_dir else ""
    raise RuntimeError(
        f"TFDS could not load {tfds_name}:{split} (data_dir={data_dir or 'TFDS default'}): {e}\n"
        f"Prepare the dataset with `{how}` (on a machine that can download it; then copy the data folder here)."
    ) from e


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
    data_dir: TFDS data folder.
    download: let TFDS download when the data are missing.

  Returns:
    `(x_train [N, H, W, C] uint8, y_train [N] int64, x_test [M, H, W, C] uint8, y_test [M] int64, num_classes)`.
  """
  num_classes = spec.num_classes
  if num_classes is None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    num_classes = tfds.builder(spec.tfds_name, data_dir=data_dir).info.features["label"].num_classes - spec.label_offset
  out = []
  for split in ("train", "test"):
    x, y = read_split(spec.tfds_name, split, data_dir, download)
    if x.ndim == 3:
      x = x[..., None]
    if spec.transpose:
      x = x.transpose(0, 2, 1, 3)
    out += [np.ascontiguousarray(x), convert_labels(y, spec, num_classes)]
  return (*out, num_classes)
