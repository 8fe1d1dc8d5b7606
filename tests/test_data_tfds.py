"""The TFDS sources on real prepared data: tiny look-alike datasets written into a temporary TFDS data folder.

`write_lookalike` writes a dataset with the catalogue builder's name, config, version and features (cifar10: 32x32x3
images, 10 classes; emnist/letters: 28x28x1, labels 1..26) in the array_record format, into the
`data_dir/<name>[/<config>]/<version>/` folder that `tfds build` fills, so TFDS's own reader (the catalogue builder
plus `as_data_source`, no TensorFlow, no network) reads it as it reads the real data. Images are PNG-encoded with
Pillow, as TFDS stores them (TFDS's own encoder needs TensorFlow).
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.data import tfds_sources

tfds = pytest.importorskip("tensorflow_datasets")


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="png")
  return out.getvalue()


def write_lookalike(tfds_name, data_dir, splits, *, num_classes=None, file_format="array_record"):
  """Writes `splits` ({split: (images [N, H, W, C] uint8, labels [N])}) as a prepared TFDS dataset.

  A catalogue name (`cifar10`, `emnist/letters`) gets the catalogue builder's name, config, version and features
  (features other than `image` and `label` get placeholder values); any other name gets version 1.0.0 and an
  image/label feature dict with `num_classes` classes. Returns the dataset's folder.
  """
  name, _, config = tfds_name.partition("/")
  if num_classes is None:
    real = tfds.builder(tfds_name, data_dir=data_dir)
    version, features = real.version, real.info.features
  else:
    shape = next(iter(splits.values()))[0].shape[1:]
    version = tfds.core.Version("1.0.0")
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=shape), "label": tfds.features.ClassLabel(num_classes=num_classes)}
    )

  def example(split, i, image, label):
    out = {}
    for key, feature in features.items():
      if key == "image":
        out[key] = _png(image)
      elif key == "label":
        out[key] = int(label)
      elif isinstance(feature, tfds.features.Text):
        out[key] = f"{split}_{i:05d}"
      else:  # cifar100's coarse_label
        out[key] = 0
    return out

  class LookAlike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = version
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config, version=version)] if config else []

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split, *arrays) for split, arrays in splits.items()}

    def _generate_examples(self, split, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, example(split, i, image, label)

  LookAlike.name = name
  builder = LookAlike(config=config or None, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)


def random_split(rng, n, shape, labels):
  """n random uint8 images and labels cycling through `labels`."""
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.resize(np.asarray(labels), n)


# The paper's datasets by fedspa-jax name: (TFDS name, image shape, labels as TFDS stores them, classes after load)
PAPER = {
    "cifar10": ("cifar10", (32, 32, 3), range(10), 10),
    "cifar100": ("cifar100", (32, 32, 3), range(100), 100),
    "emnist_letters": ("emnist/letters", (28, 28, 1), range(1, 27), 26),
    "emnist_byclass": ("emnist/byclass", (28, 28, 1), range(62), 62),
}


def write_paper_lookalike(name, data_dir, seed=0, per_class=2):
  """The look-alike of `name` with `per_class` training and one test image per class; returns {split: (x, y)}."""
  tfds_name, shape, labels, _ = PAPER[name]
  rng = np.random.default_rng(seed)
  splits = {"train": random_split(rng, per_class * len(labels), shape, labels),
            "test": random_split(rng, len(labels), shape, labels)}
  write_lookalike(tfds_name, data_dir, splits)
  return splits


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(tfds_sources, "_has_tensorflow", lambda: False)  # never try to download and prepare


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
  """A TFDS data folder holding look-alikes of CIFAR-10/100 and EMNIST letters/byclass."""
  data_dir = tmp_path_factory.mktemp("tfds")
  return data_dir, {name: write_paper_lookalike(name, data_dir, seed) for seed, name in enumerate(PAPER)}


def _by_pixels(x, y):
  return {image.tobytes(): int(label) for image, label in zip(x, y)}


def test_lookalike_sits_where_tfds_build_puts_the_real_data(paper_dir):
  data_dir, _ = paper_dir
  for folder in ("cifar10/3.0.2", "emnist/letters/3.1.0"):
    files = sorted(p.name for p in (data_dir / folder).iterdir())
    assert "dataset_info.json" in files and any(".array_record-" in f for f in files), (folder, files)
  info = json.loads((data_dir / "cifar10/3.0.2/dataset_info.json").read_text())
  assert info["name"] == "cifar10" and info["fileFormat"] == "array_record"


@pytest.mark.parametrize("name", list(PAPER))
def test_real_reader_returns_the_written_images_and_labels(paper_dir, name):
  data_dir, written = paper_dir
  _, shape, _, num_classes = PAPER[name]
  x, y, x_test, y_test, classes = fj.data.load_arrays(name, data_dir=data_dir, download=False)
  assert classes == num_classes and x.dtype == np.uint8 and y.dtype == np.int64
  offset = tfds_sources.TFDS_DATASETS[name].label_offset
  for (got_x, got_y), (want_x, want_y) in zip([(x, y), (x_test, y_test)], [written[name]["train"], written[name]["test"]]):
    assert got_x.shape == want_x.shape == (len(want_y), *shape)
    if tfds_sources.TFDS_DATASETS[name].transpose:
      got_x = got_x.transpose(0, 2, 1, 3)  # stored transposed, loaded upright
    assert _by_pixels(got_x, got_y) == _by_pixels(want_x, want_y - offset)  # TFDS shuffles the order


@pytest.mark.parametrize("name", [*PAPER, "tfds:cifar10", "CIFAR10", "emnist/letters"])
def test_load_partitions_the_real_data(paper_dir, name):
  data_dir, _ = paper_dir
  data = fj.data.load(name, num_clients=4, partition="iid", seed=0, data_dir=data_dir, cache=False)
  key = tfds_sources.TFDS_DATASETS.get(fj.data.loader.canonical_name(name)) or tfds_sources.TFDS_DATASETS["cifar10"]
  _, shape, labels, num_classes = PAPER[key.name]
  assert data.num_clients == 4 and data.sample_shape == shape and data.num_classes == num_classes
  assert data.train.count.tolist() == [len(labels) // 2] * 4
  assert int(data.test.count.sum()) >= len(labels)
  assert len(data.mean) == shape[-1] and len(data.std) == shape[-1]


def test_default_data_dir_is_tfds_data_dir_read_at_load_time(paper_dir, monkeypatch):
  data_dir, _ = paper_dir
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  assert tfds_sources.default_data_dir() == str(data_dir)
  data = fj.data.load("emnist_letters", num_clients=2, partition="iid", cache=False)
  assert data.num_classes == 26 and data.sample_shape == (28, 28, 1)


def test_any_prepared_dataset_loads_by_its_own_name(tmp_path):
  rng = np.random.default_rng(3)
  write_lookalike("tiny_digits", tmp_path, {"train": random_split(rng, 12, (8, 8, 1), range(3)),
                                             "test": random_split(rng, 6, (8, 8, 1), range(3))}, num_classes=3)
  assert (tmp_path / "tiny_digits/1.0.0/dataset_info.json").is_file()
  data = fj.data.load("tfds:tiny_digits", num_clients=3, partition="iid", data_dir=tmp_path, cache=False)
  assert data.num_classes == 3 and data.sample_shape == (8, 8, 1) and int(data.train.count.sum()) == 12


def test_emnist_letters_labels_shift_to_26_classes():
  spec = tfds_sources.TFDS_DATASETS["emnist_letters"]
  assert tfds_sources.convert_labels(np.array([1, 26, 5]), spec, 26).tolist() == [0, 25, 4]
  with pytest.raises(ValueError, match=r"span \[-1, 25\], expected \[0, 26\)"):
    tfds_sources.convert_labels(np.array([0, 26]), spec, 26)


# ---- errors


def _single_line(e):
  text = str(e.value)
  assert "\n" not in text, text
  return text


@pytest.mark.parametrize("download,why", [(False, "download=False"), (True, "TFDS needs tensorflow")])
def test_not_prepared_names_the_folder_the_command_and_where_to_copy(tmp_path, download, why):
  with pytest.raises(tfds_sources.TfdsNotPreparedError) as e:
    fj.data.load("cifar10", num_clients=2, partition="iid", data_dir=tmp_path, download=download, cache=False)
  assert isinstance(e.value, FileNotFoundError)
  text = _single_line(e)
  assert text.startswith(f"TFDS dataset cifar10 3.0.2 is not prepared in {tmp_path} (no {tmp_path}/cifar10/3.0.2)")
  assert why in text
  assert "run `bash scripts/prepare_tfds.sh cifar10` from a fedspa-jax checkout" in text
  assert f"copy the folder it prints to {tmp_path}/cifar10/3.0.2" in text


def test_not_prepared_default_folder_and_emnist_config(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError) as e:
    fj.data.load("emnist_letters", num_clients=2, partition="iid", cache=False)
  text = _single_line(e)
  assert f"not prepared in {tmp_path}/nowhere (no {tmp_path}/nowhere/emnist/letters/3.1.0)" in text
  assert "`bash scripts/prepare_tfds.sh emnist/letters`" in text and "holds emnist/letters/3.1.0" in text


def test_not_prepared_says_which_other_version_is_there(tmp_path):
  rng = np.random.default_rng(0)
  folder = write_lookalike("cifar10", tmp_path, {"train": random_split(rng, 4, (32, 32, 3), range(10)),
                                                 "test": random_split(rng, 2, (32, 32, 3), range(10))})
  folder.rename(folder.parent / "3.0.1")
  with pytest.raises(FileNotFoundError) as e:
    fj.data.load_arrays("cifar10", data_dir=tmp_path)
  assert f"{tmp_path}/cifar10 holds only version 3.0.1; tensorflow-datasets {tfds.__version__} reads 3.0.2" in (
      _single_line(e))


def test_unknown_tfds_name_is_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"TFDS has no dataset 'no_such_data'.* prepared in {tmp_path}"):
    fj.data.load_arrays("tfds:no_such_data", data_dir=tmp_path)


def test_tfrecord_data_without_tensorflow_names_the_package(tmp_path):
  rng = np.random.default_rng(0)
  folder = write_lookalike("cifar10", tmp_path, {"train": random_split(rng, 4, (32, 32, 3), range(10)),
                                                 "test": random_split(rng, 2, (32, 32, 3), range(10))})
  # TFDS writes tfrecord only with TensorFlow; relabel the files as what `tfds build` writes by default.
  info_path = folder / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  for f in folder.glob("*.array_record-*"):
    f.rename(f.with_name(f.name.replace(".array_record-", ".tfrecord-")))
  with pytest.raises(tfds_sources.MissingDependencyError, match="prepared as tfrecord, which only TensorFlow reads: "
                     "install it with `pip install tensorflow`, or prepare the dataset as array_record") as e:
    fj.data.load_arrays("cifar10", data_dir=tmp_path)
  assert e.value.name == "tensorflow"


def test_missing_image_decoder_names_pillow(paper_dir, monkeypatch):
  from tensorflow_datasets.core.features import image_feature  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(image_feature, "PIL_Image", None)
  monkeypatch.setattr(image_feature, "cv2", None)
  with pytest.raises(tfds_sources.MissingDependencyError, match="needs the Python package 'pillow'.*`pip install "
                     "pillow`") as e:
    fj.data.load_arrays("cifar10", data_dir=paper_dir[0])
  assert isinstance(e.value, ImportError)


@pytest.mark.parametrize("module,package", [("importlib_resources", "importlib-resources"),
                                            ("array_record.python", "array-record"), ("PIL.Image", "pillow")])
def test_missing_module_names_the_pip_package(module, package):
  error = tfds_sources._missing_dependency(ModuleNotFoundError(f"No module named {module!r}", name=module), "reading")
  assert f"install it with `pip install {package}`" in str(error) and "\n" not in str(error)


@pytest.mark.skipif(tfds_sources._has_tensorflow(), reason="with tensorflow installed, the CLI would try to download")
def test_cli_without_the_data_prints_one_line_and_exits_2(tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), FEDSPA_JAX_CACHE=str(tmp_path / "cache"),
             PYTHONPATH=os.pathsep.join(sys.path))
  result = subprocess.run(
      [sys.executable, "-m", "fedspa_jax", "run", "--dataset", "cifar10", "--partition", "iid", "--rounds", "1",
       "--out", str(tmp_path / "run")],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(f"fedspa-jax: error: TFDS dataset cifar10 3.0.2 is not prepared in {tmp_path}/tfds")
  assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_cli_names_a_missing_reader_package_in_one_line(paper_dir, tmp_path, monkeypatch, capsys):
  from tensorflow_datasets.core.features import image_feature  # pylint: disable=g-import-not-at-top

  from fedspa_jax import cli  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(image_feature, "PIL_Image", None)
  monkeypatch.setattr(image_feature, "cv2", None)
  code = cli.main(["run", "--dataset", "cifar10", "--partition", "iid", "--num-clients", "2", "--rounds", "1",
                   "--data-dir", str(paper_dir[0]), "--out", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith("fedspa-jax: error: reading TFDS dataset cifar10/3.0.2 needs the Python package 'pillow'")


SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "prepare_tfds.sh"


def test_prepare_script_prints_usage_without_names():
  result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "bash scripts/prepare_tfds.sh cifar10 cifar100 emnist/letters" in result.stdout


@pytest.mark.skipif(tfds_sources._has_tensorflow(), reason="with tensorflow installed, the script would build")
def test_prepare_script_says_it_needs_tensorflow(tmp_path):
  env = dict(os.environ, PREPARE_PYTHON=sys.executable, TFDS_OUT=str(tmp_path))
  result = subprocess.run(["bash", str(SCRIPT), "cifar10"], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 1 and "cannot import tensorflow and tensorflow_datasets" in result.stderr
