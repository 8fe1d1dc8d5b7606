"""IDX reader/writer and the IDX-file sources: lookup order, checksums, download, error messages."""

import gzip
import hashlib
import io
import pathlib
import urllib.error

import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.data import idx, idx_sources


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx3-ubyte.gz", "a-idx3-ubyte"])
def test_idx_reader_reads_what_the_writer_wrote(tmp_path, dtype, name):
  array = (np.random.default_rng(0).normal(size=(5, 3, 4)) * 50).astype(dtype)
  fj.data.write_idx(tmp_path / name, array)
  back = fj.data.read_idx(tmp_path / name)
  assert back.dtype == np.dtype(dtype) and back.dtype.isnative
  np.testing.assert_array_equal(back, array)


def test_idx_writer_produces_the_mnist_header(tmp_path):
  labels = np.array([7, 2, 1], dtype=np.uint8)
  fj.data.write_idx(tmp_path / "l.gz", labels)
  raw = gzip.decompress((tmp_path / "l.gz").read_bytes())
  assert raw == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 1])


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x01\x00\x08\x01", "not an IDX file"),
        (b"\x00\x00\x42\x01", "not an IDX file"),
        (b"\x00\x00\x08\x02\x00\x00", "claims 2 dimensions"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2]), "should have 11 bytes, has 10"),
    ],
)
def test_idx_parser_rejects_malformed_files(raw, match):
  with pytest.raises(ValueError, match=match):
    idx.parse_idx(raw)


def _write_fake_dataset(folder: pathlib.Path, n_train=30, n_test=10, seed=0) -> dict[str, bytes]:
  """Four tiny IDX .gz files; returns name -> gz bytes."""
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
      "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
  }
  folder.mkdir(parents=True, exist_ok=True)
  for name, array in arrays.items():
    idx.write_idx(folder / name, array)
  return {name: (folder / name).read_bytes() for name in arrays}


def _spec(tmp_path, files: dict[str, bytes], **overrides) -> idx_sources.IdxDataset:
  kwargs = dict(
      name="fake",
      folder="fake-mnist",
      system_dirs=(str(tmp_path / "system"),),
      urls=("https://a.example/", "https://b.example/"),
      gz_sha256={n: hashlib.sha256(b).hexdigest() for n, b in files.items()},
      raw_sha256={},
  )
  return idx_sources.IdxDataset(**{**kwargs, **overrides})


def test_load_idx_arrays_from_data_dir(tmp_path):
  files = _write_fake_dataset(tmp_path / "mine")
  x, y, x_test, y_test = idx_sources.load_idx_arrays(_spec(tmp_path, files), tmp_path / "mine", download=False)
  assert x.shape == (30, 28, 28, 1) and x.dtype == np.uint8
  assert x_test.shape == (10, 28, 28, 1)
  assert y.dtype == np.int64 and y.tolist() == [i % 10 for i in range(30)]


def test_lookup_order_data_dir_subfolder_then_system_then_cache(tmp_path):
  files = _write_fake_dataset(tmp_path / "system")
  spec = _spec(tmp_path, files)
  assert idx_sources.locate(spec, None, False) == tmp_path / "system"
  _write_fake_dataset(tmp_path / "mine" / "fake-mnist")
  assert idx_sources.locate(spec, tmp_path / "mine", False) == tmp_path / "mine" / "fake-mnist"


def test_recompressed_files_pass_by_content_digest(tmp_path):
  """Debian re-wraps the Fashion-MNIST .gz files; the content digest still identifies them."""
  files = _write_fake_dataset(tmp_path / "d")
  raw = {n: gzip.decompress(b) for n, b in files.items()}
  for name, content in raw.items():
    (tmp_path / "d" / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
  spec = _spec(tmp_path, files, raw_sha256={n: hashlib.sha256(c).hexdigest() for n, c in raw.items()})
  x, *_ = idx_sources.load_idx_arrays(spec, tmp_path / "d", download=False)
  assert x.shape == (30, 28, 28, 1)
  with pytest.raises(ValueError, match="does not match the published fake file"):
    idx_sources.load_idx_arrays(_spec(tmp_path, files), tmp_path / "d", download=False)


def test_checksum_mismatch_is_an_error_unless_verify_false(tmp_path):
  files = _write_fake_dataset(tmp_path / "d")
  spec = _spec(tmp_path, {n: b"other" for n in files})
  with pytest.raises(ValueError, match="pass verify=False"):
    idx_sources.load_idx_arrays(spec, tmp_path / "d", download=False)
  x, *_ = idx_sources.load_idx_arrays(spec, tmp_path / "d", download=False, verify=False)
  assert x.shape == (30, 28, 28, 1)


def test_missing_files_error_names_every_place_looked_in(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    fj.data.load("mnist", num_clients=2, partition="iid", data_dir=tmp_path / "mine", download=False)
  message = str(err.value)
  for place in [tmp_path / "mine", tmp_path / "mine" / "mnist", "/usr/share/datasets/mnist", tmp_path / "cache" / "mnist"]:
    assert str(place) in message
  assert "download=False" in message


def test_missing_fashion_mnist_points_to_install_script(tmp_path, monkeypatch):
  spec = idx_sources.IdxDataset(**{**idx_sources.FASHION_MNIST.__dict__, "system_dirs": (str(tmp_path / "none"),)})
  monkeypatch.setitem(idx_sources.IDX_DATASETS, "fashion_mnist", spec)
  with pytest.raises(FileNotFoundError, match="scripts/install_datasets.sh"):
    fj.data.load("fashion_mnist", num_clients=2, partition="iid", download=False)


class _FakeServer:
  """Stands in for urllib.request.urlopen: serves `files` from one base address, fails on every other."""

  def __init__(self, base, files):
    self.base, self.files, self.requests = base, files, []

  def __call__(self, url, timeout):
    self.requests.append(url)
    name = url.rsplit("/", 1)[-1]
    if not url.startswith(self.base) or name not in self.files:
      raise urllib.error.URLError("unreachable")
    return io.BytesIO(self.files[name])


def test_download_tries_addresses_in_order_and_verifies(tmp_path, monkeypatch):
  files = _write_fake_dataset(tmp_path / "src")
  server = _FakeServer("https://b.example/", files)
  monkeypatch.setattr(idx_sources.urllib.request, "urlopen", server)
  spec = _spec(tmp_path, files)
  x, *_ = idx_sources.load_idx_arrays(spec, None, download=True)
  assert x.shape == (30, 28, 28, 1)
  cached = tmp_path / "cache" / "fake-mnist"
  assert sorted(p.name for p in cached.iterdir()) == sorted(files)
  assert server.requests[:2] == ["https://a.example/train-images-idx3-ubyte.gz", "https://b.example/train-images-idx3-ubyte.gz"]
  # a second load finds the cached files and downloads nothing
  server.requests.clear()
  idx_sources.load_idx_arrays(spec, None, download=True)
  assert server.requests == []


def test_download_of_corrupt_files_fails_cleanly(tmp_path, monkeypatch):
  files = _write_fake_dataset(tmp_path / "src")
  monkeypatch.setattr(idx_sources.urllib.request, "urlopen", _FakeServer("https://a.example/", {n: b"junk" for n in files}))
  with pytest.raises(FileNotFoundError, match="downloading failed: could not download fake"):
    idx_sources.load_idx_arrays(_spec(tmp_path, files), None, download=True)
  assert not list((tmp_path / "cache" / "fake-mnist").iterdir()), "no partial or unverified file left behind"


def test_the_partition_cache_follows_the_source_files(tmp_path, monkeypatch):
  """An entry built from other files (another data folder, or the same files rewritten) is rebuilt, never read; an
  entry of the files on disk is a hit that does not read them."""
  load = lambda folder, **kw: fj.data.load("mnist", num_clients=3, partition="iid", data_dir=folder, download=False,
                                           verify=False, **kw)
  entries = lambda: list((tmp_path / "cache" / "partitions").glob("mnist-*.npz"))
  _write_fake_dataset(tmp_path / "a", seed=0)
  _write_fake_dataset(tmp_path / "b", seed=1)
  first = load(tmp_path / "a")
  assert len(entries()) == 1
  other = load(tmp_path / "b")  # the same arguments, so the same entry: its stamp names folder a
  assert len(entries()) == 1
  np.testing.assert_array_equal(other.train.x, load(tmp_path / "b", cache=False).train.x)
  assert not np.array_equal(other.train.x, first.train.x)
  _write_fake_dataset(tmp_path / "b", seed=2)  # rewritten in place
  rewritten = load(tmp_path / "b")
  np.testing.assert_array_equal(rewritten.train.x, load(tmp_path / "b", cache=False).train.x)
  assert not np.array_equal(rewritten.train.x, other.train.x)

  def no_reading(*args, **kwargs):
    raise AssertionError("a hit must not read the source")

  monkeypatch.setattr(fj.data.loader, "load_arrays", no_reading)
  np.testing.assert_array_equal(load(tmp_path / "b").train.x, rewritten.train.x)
