"""The TFDS sources under `tfds.testing.mock_data` (no TensorFlow, no download)."""

import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.data import tfds_sources

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "name,shape,num_classes", [("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100), ("emnist_byclass", (28, 28, 1), 62)]
)
def test_tfds_dataset_loads_and_partitions_under_mock_data(name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=24):
    data = fj.data.load(name, num_clients=4, partition="iid", seed=0, cache=False)
  assert data.train.x.shape == (4, 6, *shape) and data.train.x.dtype == np.uint8
  assert data.test.x.shape[0] == 4 and data.test.x.shape[2:] == shape
  assert data.train.count.tolist() == [6, 6, 6, 6]
  assert int(data.test.count.sum()) == 24
  assert data.num_classes == num_classes and data.name == name
  assert len(data.mean) == shape[-1] and len(data.std) == shape[-1]


def test_tfds_prefix_reaches_any_catalogue_dataset():
  with tfds.testing.mock_data(num_examples=12):
    data = fj.data.load("tfds:cifar10", num_clients=3, partition="iid", cache=False)
  assert data.num_classes == 10 and data.train.x.shape[2:] == (32, 32, 3)


def test_data_dir_is_passed_to_tfds(tmp_path, monkeypatch):
  seen = []
  real = tfds.data_source

  def spy(name, **kwargs):
    seen.append((name, kwargs.get("split"), kwargs.get("data_dir")))
    return real(name, **kwargs)

  monkeypatch.setattr(tfds, "data_source", spy)
  monkeypatch.setattr(tfds_sources, "_has_tensorflow", lambda: False)
  with tfds.testing.mock_data(num_examples=8):
    fj.data.load("cifar10", num_clients=2, partition="iid", data_dir=tmp_path, cache=False)
  assert seen == [("cifar10", "train", str(tmp_path)), ("cifar10", "test", str(tmp_path))]


def test_emnist_letters_labels_shift_to_26_classes():
  spec = tfds_sources.TFDS_DATASETS["emnist_letters"]
  assert tfds_sources.convert_labels(np.array([1, 26, 5]), spec, 26).tolist() == [0, 25, 4]
  with pytest.raises(ValueError, match=r"span \[-1, 25\], expected \[0, 26\)"):
    tfds_sources.convert_labels(np.array([0, 26]), spec, 26)


def test_emnist_images_are_transposed_upright():
  with tfds.testing.mock_data(num_examples=4):
    raw = tfds.data_source("emnist/byclass", split="train")[0]["image"]
    x, *_ = tfds_sources.load_tfds_arrays(tfds_sources.TFDS_DATASETS["emnist_byclass"])
  np.testing.assert_array_equal(x[0, :, :, 0], raw[:, :, 0].T)


def test_tfds_failure_says_how_to_prepare(monkeypatch):
  def broken(*args):
    raise NotImplementedError("Random access data source for file format FileFormat.TFRECORD is not supported")

  monkeypatch.setattr(tfds_sources, "_has_tensorflow", lambda: False)
  monkeypatch.setattr(tfds_sources, "_read_with_data_source", broken)
  with pytest.raises(RuntimeError, match="tfds build cifar10 --file_format=array_record --data_dir=/x"):
    tfds_sources.read_split("cifar10", "train", "/x")
