"""The public data API: load, from_arrays, from_clients, the partition cache, summaries, and real Fashion-MNIST."""

import json
import pathlib

import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.data import idx_sources, loader

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = all((FASHION_DIR / f).is_file() for f in idx_sources.FILES)
PARTITIONS = {"iid": {}, "pathological": {"classes_per_client": 2}, "dirichlet": {"alpha": 0.5, "min_samples": 5}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def indexed():
  """Float features that are each sample's own index, so a sample's origin can be read off any client's data."""
  rng = np.random.default_rng(0)
  x = np.arange(2_000, dtype=np.float32)[:, None]
  x_test = -1.0 - np.arange(500, dtype=np.float32)[:, None]
  return x, rng.integers(0, 10, 2_000), x_test, rng.integers(0, 10, 500)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return (
      rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8),
      np.arange(300) % 5,
      rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8),
      np.arange(100) % 5,
  )


def _valid(split):
  return [split.client(k) for k in range(split.num_clients)]


def _arrays(data):
  return [data.train.x, data.train.y, data.train.count, data.test.x, data.test.y, data.test.count]


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("test_mode", ["global", "split"])
def test_from_arrays_uses_every_sample_at_most_once(indexed, partition, test_mode):
  x, y, x_test, y_test = indexed
  data = fj.data.from_arrays(
      x, y, x_test, y_test, num_clients=20, partition=partition, seed=0, test_mode=test_mode,
      min_test_samples=0, **PARTITIONS[partition]
  )
  train_ids = np.concatenate([cx[:, 0] for cx, _ in _valid(data.train)])
  test_ids = np.concatenate([cx[:, 0] for cx, _ in _valid(data.test)])
  ids = np.concatenate([train_ids, test_ids])
  assert len(np.unique(ids)) == len(ids), "a sample appears twice"
  assert len(train_ids) + (len(test_ids) if test_mode == "split" else 0) == len(x)
  assert (test_ids < 0).all() if test_mode == "global" else (test_ids >= 0).all()
  for split, labels in ((data.train, y), (data.test, y_test if test_mode == "global" else y)):
    for cx, cy in _valid(split):  # labels travel with their samples
      ids = cx[:, 0].astype(int)
      np.testing.assert_array_equal(cy, labels[ids if test_mode == "split" or split is data.train else -1 - ids])


def test_from_arrays_layout_padding_and_test_follow_train_classes(images):
  x, y, x_test, y_test = images
  data = fj.data.from_arrays(x, y, x_test, y_test, num_clients=10, partition="pathological", classes_per_client=2)
  # Flat: the data and nothing more (no padding to the largest client), client k at rows offset[k]:+count[k].
  assert data.train.x.shape == (300, 8, 8, 3) and data.train.x.dtype == np.uint8
  assert data.train.y.dtype == np.int32 and data.train.count.dtype == np.int32 and data.train.offset.dtype == np.int32
  assert data.num_classes == 5 and data.name == "arrays"
  for split in (data.train, data.test):
    np.testing.assert_array_equal(split.offset, np.cumsum(split.count) - split.count)
    assert split.max_count == int(split.count.max())
  for k in range(10):
    assert set(data.test.client(k)[1]) <= set(data.train.client(k)[1])
  assert int(data.test.count.sum()) == 100


def test_channel_stats_match_numpy(images):
  x = images[0]
  data = fj.data.from_arrays(*images, num_clients=3, partition="iid")
  np.testing.assert_allclose(data.mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(data.std, (x / 255.0).std(axis=(0, 1, 2)), rtol=1e-12)
  assert all(isinstance(v, float) for v in data.mean + data.std)


def test_grayscale_gets_a_channel_axis_and_floats_get_no_stats(indexed):
  x = np.zeros((40, 5, 5), np.uint8)
  data = fj.data.from_arrays(x, np.arange(40) % 2, num_clients=4, partition="iid")
  assert data.sample_shape == (5, 5, 1) and len(data.mean) == 1
  data = fj.data.from_arrays(indexed[0], indexed[1], num_clients=4, partition="iid")
  assert data.mean is None and data.std is None and data.train.x.dtype == np.float32


def test_default_test_mode_is_global_with_a_test_split_else_split(indexed):
  x, y, x_test, y_test = indexed
  with_test = fj.data.from_arrays(x, y, x_test, y_test, num_clients=5, partition="iid")
  assert (with_test.test.client(0)[0] < 0).all()
  without = fj.data.from_arrays(x, y, num_clients=5, partition="iid", test_fraction=0.1)
  assert int(without.train.count.sum()) == 1800 and int(without.test.count.sum()) == 200


def test_from_arrays_is_a_pytree_the_engine_can_take(images):
  import jax

  data = fj.data.from_arrays(*images, num_clients=3, partition="iid")
  leaves = jax.tree.leaves(data)
  assert len(leaves) == 8  # x, y, offset, count per split
  assert jax.tree.structure(data) == jax.tree.structure(jax.tree.map(lambda a: a, data))


@pytest.mark.parametrize("partition", PARTITIONS)
def test_same_seed_same_data_other_seed_other_data(indexed, partition):
  make = lambda seed: fj.data.from_arrays(*indexed, num_clients=8, partition=partition, seed=seed, **PARTITIONS[partition])
  a, b, c = make(3), make(3), make(4)
  assert all(np.array_equal(u, v) for u, v in zip(_arrays(a), _arrays(b)))
  assert not all(np.array_equal(u, v) for u, v in zip(_arrays(a), _arrays(c)))


def test_from_clients_keeps_the_users_split():
  rng = np.random.default_rng(0)
  train = [(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, n)) for n in (5, 9, 2)]
  test = [(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, n)) for n in (1, 3, 2)]
  data = fj.data.from_clients(train, test, name="leaf")
  assert data.train.count.tolist() == [5, 9, 2] and data.test.count.tolist() == [1, 3, 2]
  for k, (x, y) in enumerate(train):
    np.testing.assert_array_equal(data.train.client(k)[0], x)
    np.testing.assert_array_equal(data.train.client(k)[1], y)
  assert data.name == "leaf" and data.num_classes == 4


def test_from_clients_without_test_holds_out_a_share():
  train = [(np.full((n, 6, 6), k, np.uint8), np.arange(n) % 3) for k, n in enumerate((10, 20))]
  data = fj.data.from_clients(train, test_fraction=0.2, seed=0)
  assert data.train.count.tolist() == [8, 16] and data.test.count.tolist() == [2, 4]
  assert data.sample_shape == (6, 6, 1) and data.mean is not None
  assert (data.test.client(1)[0] == 1).all(), "held-out samples stay with their client"


def test_from_clients_takes_sequences_with_a_label_per_position():
  rng = np.random.default_rng(0)
  text = lambda n: (rng.integers(1, 9, (n, 5)).astype(np.int32), rng.integers(0, 9, (n, 5)))  # 0: padding
  train = [text(n) for n in (6, 10, 1)]
  data = fj.data.from_clients(train, test_fraction=0.3, seed=0)
  assert data.train.count.tolist() == [4, 7, 1] and data.test.count.tolist() == [2, 3, 0]
  assert data.train.y.shape == (12, 5) and data.train.y.dtype == np.int32 and data.mean is None
  for k, (x, y) in enumerate(train):  # each client's sequences, whole, split between its train and test rows
    xs = np.concatenate([data.train.client(k)[0], data.test.client(k)[0]])
    ys = np.concatenate([data.train.client(k)[1], data.test.client(k)[1]])
    assert sorted(map(bytes, np.concatenate([xs, ys], 1).astype(np.int64))) == sorted(
        map(bytes, np.concatenate([x, y], 1).astype(np.int64)))
  assert data.num_classes == 1 + max(int(y.max()) for _, y in train)
  given = fj.data.from_clients(train, [text(2) for _ in train], num_classes=12)
  assert given.test.count.tolist() == [2, 2, 2] and given.num_classes == 12


@pytest.mark.parametrize("change, match", [
    (lambda x, y: (x[:, :4], y[:, :4]), r"client 1's labels are \[n, 4\] \(test data \[n, 4\]\), client 0's \[n, 5\]"),
    (lambda x, y: (x, y[..., None]), r"client 1 labels must be an integer array \[n\] .* or \[n, L\]"),
    (lambda x, y: (x, y.astype(np.float32)), "integer array"),
])
def test_from_clients_refuses_sequence_labels_of_another_shape(change, match):
  x, y = np.ones((3, 5), np.int32), np.ones((3, 5), np.int64)
  with pytest.raises(ValueError, match=match):
    fj.data.from_clients([(x, y), change(x, y)])


def test_from_arrays_partitions_by_class_and_refuses_sequence_labels():
  with pytest.raises(ValueError, match=r"per-position labels \[n, L\] go through from_clients"):
    fj.data.from_arrays(np.ones((8, 5), np.int32), np.ones((8, 5), np.int64), num_clients=2, partition="iid")


def test_load_synthetic_routes_to_the_generator():
  data = fj.data.load("synthetic", num_clients=5, alpha=0.5, beta=0.5, seed=2)
  direct = fj.data.synthetic(0.5, 0.5, num_clients=5, seed=2)
  assert all(np.array_equal(u, v) for u, v in zip(_arrays(data), _arrays(direct)))
  assert data.name == "synthetic(0.5,0.5)"


def test_synthetic_iid_draws_every_clients_inputs_from_one_distribution():
  # FedProx's Synthetic-IID: x ~ N(0, Sigma) for every client, against v_k ~ N(B_k, 1) per client without it; the
  # name says which (alpha and beta do not apply).
  def client_means(data):
    split = data.train
    return np.stack([np.asarray(split.x[o : o + n]).mean(0) for o, n in zip(split.offset.tolist(), split.count.tolist())])

  iid = fj.data.synthetic(1.0, 1.0, num_clients=40, iid=True, seed=0)
  non_iid = fj.data.synthetic(1.0, 1.0, num_clients=40, seed=0)
  assert iid.name == "synthetic_iid" and non_iid.name == "synthetic(1,1)"
  assert np.abs(client_means(iid)).max() < 0.5 < np.std(client_means(non_iid))


@pytest.fixture
def fake_source(images, monkeypatch):
  """`load_arrays` replaced by a counter that serves `images` under any registered name."""
  calls = []

  def load_arrays(name, data_dir=None, *, download=True, verify=True):
    calls.append(name)
    return (*images, 5)

  monkeypatch.setattr(loader, "load_arrays", load_arrays)
  return calls


def test_partition_cache_hit_returns_identical_arrays_without_reading_the_source(fake_source, tmp_path):
  first = fj.data.load("mnist", num_clients=6, partition="dirichlet", alpha=0.3, min_samples=3, seed=1)
  files = list((tmp_path / "cache" / "partitions").glob("mnist-*.npz"))
  assert len(files) == 1 and fake_source == ["mnist"]
  again = fj.data.load("mnist", num_clients=6, partition="dirichlet", alpha=0.3, min_samples=3, seed=1)
  assert fake_source == ["mnist"], "a hit does not touch the source"
  for u, v in zip(_arrays(first), _arrays(again)):
    assert u.dtype == v.dtype and np.array_equal(u, v)
  assert (again.num_classes, again.name, again.mean, again.std) == (first.num_classes, first.name, first.mean, first.std)
  # defaults spelled out hit the same entry; another seed or option is another entry
  fj.data.load("mnist", num_clients=6, partition="dirichlet", alpha=0.3, min_samples=3, max_tries=100, seed=1)
  assert fake_source == ["mnist"]
  fj.data.load("mnist", num_clients=6, partition="dirichlet", alpha=0.3, min_samples=3, seed=2)
  fj.data.load("mnist", num_clients=6, partition="dirichlet", alpha=0.4, min_samples=3, seed=1)
  assert len(fake_source) == 3 and len(list(files[0].parent.iterdir())) == 3


def test_cache_false_neither_reads_nor_writes(fake_source, tmp_path):
  fj.data.load("cifar10", num_clients=3, partition="iid", cache=False)
  fj.data.load("cifar10", num_clients=3, partition="iid", cache=False)
  assert len(fake_source) == 2 and not (tmp_path / "cache").exists()


def test_summary_counts_classes_and_text(images):
  data = fj.data.from_arrays(*images, num_clients=10, partition="pathological", classes_per_client=2, name="toy")
  s = fj.data.summarize(data)
  json.dumps(s)
  assert s["train"]["count"] == data.train.count.tolist() and s["train"]["total"] == 300
  assert s["train"]["classes_per_client"] == {"min": 2, "max": 2}
  assert all(len(c) == 2 for c in s["train"]["classes"])
  assert np.array_equal(np.sum(s["train"]["label_counts"], axis=0), np.bincount(images[1]))
  text = fj.data.format_summary(data, max_clients=3)
  assert text.startswith("toy: 10 clients, 5 classes, samples (8, 8, 3)")
  assert "classes per client 2..2" in text and "7 more clients" in text
  c0 = s["train"]["classes"][0]
  assert f"{c0[0]}:{s['train']['label_counts'][0][c0[0]]}" in text.splitlines()[4]


def test_plot_label_histogram_writes_a_png(images, tmp_path):
  data = fj.data.from_arrays(*images, num_clients=10, partition="dirichlet", alpha=0.5, min_samples=2)
  path = fj.data.plot_label_histogram(data, tmp_path / "plots" / "labels.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Errors.


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fj.data.load("imagenet", num_clients=2, partition="iid"), ValueError,
         r"unknown dataset 'imagenet'; known: cifar10, cifar100, emnist_byclass, emnist_letters, fashion_mnist, femnist, "
         r"mnist, shakespeare, synthetic"),
        (lambda: fj.data.load("mnist", num_clients=2, partition="shards"), ValueError,
         r"unknown partition 'shards'; known: iid, pathological, dirichlet"),
        (lambda: fj.data.load("mnist", num_clients=2), ValueError, r"pass partition=...; known: iid"),
        (lambda: fj.data.load("mnist", num_clients=2, partition="iid", alpha=0.1), ValueError, r"takes no option alpha"),
        (lambda: fj.data.load("synthetic", num_clients=2, partition="dirichlet"), ValueError, r"their own per-client split"),
        (lambda: fj.data.load("synthetic", num_clients=2, test_mode="global"), ValueError, r"no global test split"),
    ],
)
def test_load_errors_before_reading_any_data(fake_source, call, error, match):
  with pytest.raises(error, match=match):
    call()
  assert fake_source == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(partition="pathological", classes_per_client=6, num_clients=3), r"classes_per_client=6 .* the 5 classes present"),
        (dict(partition="iid", num_clients=301), r"more clients than samples: 301 clients but 300 samples"),
        (dict(partition="dirichlet", alpha=0.0, num_clients=3), r"alpha must be > 0"),
        (dict(partition="dirichlet", alpha=-2, num_clients=3), r"alpha must be > 0"),
        (dict(partition="iid", num_clients=3, test_mode="local"), r"unknown test_mode 'local'; known: global, split"),
        (dict(partition="iid", num_clients=3, num_classes=3), r"labels go up to 4 but num_classes=3"),
    ],
)
def test_from_arrays_errors(images, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fj.data.from_arrays(*images, **kwargs)


def test_input_shape_errors(images):
  x, y, x_test, y_test = images
  with pytest.raises(ValueError, match="has 300 inputs but 299 labels"):
    fj.data.from_arrays(x, y[:-1], num_clients=2, partition="iid")
  with pytest.raises(ValueError, match="pass both x_test and y_test"):
    fj.data.from_arrays(x, y, x_test, num_clients=2, partition="iid")
  with pytest.raises(ValueError, match="test_mode='global' draws from a test split"):
    fj.data.from_arrays(x, y, num_clients=2, partition="iid", test_mode="global")
  with pytest.raises(ValueError, match=r"test samples have shape \(8, 8, 2\)"):
    fj.data.from_arrays(x, y, x_test[..., :2], y_test, num_clients=2, partition="iid")
  with pytest.raises(ValueError, match="got 1 training clients but 2 test clients"):
    fj.data.from_clients([(x, y)], [(x, y), (x, y)])


def test_dataset_names_are_canonicalised():
  assert loader.canonical_name("Fashion-MNIST") == "fashion_mnist"
  assert loader.canonical_name("emnist/letters") == "emnist_letters"
  assert loader.canonical_name("tfds:svhn_cropped") == "tfds:svhn_cropped"


# The real thing.


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("FEDSPA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
  try:
    yield fj.data.load("fashion_mnist", num_clients=100, partition="pathological", classes_per_client=2, seed=0,
                       download=False, cache=False)
  finally:
    mp.undo()


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST IDX files absent: run scripts/install_datasets.sh")
def test_real_fashion_mnist_pathological_100_clients(fashion):
  assert fashion.train.x.shape == (60_000, 28, 28, 1) and fashion.train.x.dtype == np.uint8
  assert fashion.train.count.tolist() == [600] * 100
  assert int(fashion.train.count.sum()) + int(fashion.test.count.sum()) == 70_000
  labels = fashion.train.y
  assert all(len(np.unique(fashion.train.client(k)[1])) == 2 for k in range(100))
  assert all(set(fashion.test.client(k)[1]) <= set(fashion.train.client(k)[1]) for k in range(100))
  assert np.array_equal(np.bincount(labels.ravel(), minlength=10), np.full(10, 6000))
  np.testing.assert_allclose(fashion.mean, (0.2860,), atol=1e-4)
  np.testing.assert_allclose(fashion.std, (0.3530,), atol=1e-4)
  # the clients' training images are exactly the official 60,000, each used once (compared by a random projection)
  raw = fj.data.read_idx(FASHION_DIR / idx_sources.FILES[0]).reshape(60_000, -1)
  w = np.random.default_rng(0).normal(size=784).astype(np.float32)
  chunks = lambda images: np.array_split(images.reshape(60_000, -1), 20)
  project = lambda images: np.sort(np.concatenate([c.astype(np.float32) @ w for c in chunks(images)]))
  np.testing.assert_allclose(project(fashion.train.x), project(raw), rtol=1e-5, atol=1e-3)


def test_clients_with_different_sample_shapes_are_refused():
  train = [(np.zeros((3, 4), np.float32), np.zeros(3, int)), (np.zeros((2, 5), np.float32), np.zeros(2, int))]
  with pytest.raises(ValueError, match=r"client 1 has sample shape \(5,\), client 0 has \(4,\)"):
    fj.data.from_clients(train, train)


def test_flat_split_holds_each_client_exactly_once():
  xs = [np.full((n, 2), k, np.float32) for k, n in enumerate((3, 0, 5))]
  split = fj.data.stack_clients(xs, [np.full(len(x), k) for k, x in enumerate(xs)])
  assert split.x.shape == (8, 2) and split.offset.tolist() == [0, 3, 3] and split.count.tolist() == [3, 0, 5]
  assert split.client(1)[0].shape == (0, 2) and (split.client(2)[0] == 2).all()
  np.testing.assert_array_equal(split.owners(), [0, 0, 0, 2, 2, 2, 2, 2])
  with pytest.raises(ValueError, match="sum to 7 but there are 8 samples"):
    fj.data.split_from_flat(split.x, split.y, [3, 0, 4])
