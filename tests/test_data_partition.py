"""Partitioners and per-client test sets: disjointness, exact class counts, minimums, determinism, errors."""

import time

import numpy as np
import pytest

from fedspa_jax.data import holdout, partitioners
from fedspa_jax.data.partitioners import apportion, partition

METHODS = {
    "iid": {},
    "pathological": {"classes_per_client": 2},
    "dirichlet": {"alpha": 0.3, "min_samples": 5},
}


@pytest.fixture(scope="module")
def labels():
  """60,000 labels over 10 classes with unequal class sizes."""
  return np.random.default_rng(0).choice(10, size=60_000, p=np.linspace(1, 2, 10) / 15).astype(np.int64)


@pytest.fixture(scope="module")
def small_labels():
  return np.random.default_rng(1).integers(0, 10, size=3_000)


def _assert_disjoint(parts, n):
  flat = np.concatenate(parts)
  assert flat.dtype == np.int64
  assert len(np.unique(flat)) == len(flat), "a sample went to two clients"
  assert flat.min() >= 0 and flat.max() < n
  for p in parts:
    assert np.all(np.diff(p) > 0), "indices are sorted"


@pytest.mark.parametrize("method", METHODS)
def test_every_sample_used_at_most_once(small_labels, method):
  parts = partition(small_labels, 37, method, seed=3, **METHODS[method])
  assert len(parts) == 37
  _assert_disjoint(parts, len(small_labels))
  # all three use every sample when the classes are large enough
  assert sum(len(p) for p in parts) == len(small_labels)


def test_iid_sizes_differ_by_at_most_one(small_labels):
  sizes = [len(p) for p in partition(small_labels, 7, "iid")]
  assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_clients,n", [(100, 2), (50, 3), (7, 10), (1, 1), (13, 4), (200, 1)])
def test_pathological_gives_exactly_n_classes(labels, num_clients, n):
  parts = partition(labels, num_clients, "pathological", classes_per_client=n, seed=5)
  _assert_disjoint(parts, len(labels))
  for p in parts:
    assert len(np.unique(labels[p])) == n


def test_pathological_exact_on_very_unbalanced_classes():
  sizes = [2000, 1000, 500, 200, 100, 50]
  y = np.repeat(np.arange(6), sizes)
  parts = partition(y, 40, "pathological", classes_per_client=3, seed=0)
  _assert_disjoint(parts, len(y))
  assert all(len(np.unique(y[p])) == 3 for p in parts)


def test_pathological_mixes_class_pairs(labels):
  """Not just the few pairs a fixed layout would give."""
  parts = partition(labels, 100, "pathological", classes_per_client=2, seed=0)
  pairs = {tuple(np.unique(labels[p])) for p in parts}
  assert len(pairs) > 20


def test_pathological_fedavg_shards_on_balanced_data():
  y = np.repeat(np.arange(10), 6000)
  parts = partition(y, 100, "pathological", classes_per_client=2, seed=0)
  assert all(len(p) == 600 for p in parts)
  assert all(np.all(np.bincount(y[p])[np.unique(y[p])] == 300) for p in parts)


def test_dirichlet_500_clients_alpha_01_terminates_with_minimum(labels):
  start = time.perf_counter()
  parts = partition(labels, 500, "dirichlet", alpha=0.1, min_samples=10, seed=0)
  assert time.perf_counter() - start < 20
  _assert_disjoint(parts, len(labels))
  assert sum(len(p) for p in parts) == len(labels)
  assert min(len(p) for p in parts) >= 10


def test_dirichlet_repair_reaches_tight_minimum(labels):
  """One draw cannot meet 110 of 120 average samples; the repair must, and still use each sample once."""
  parts = partition(labels, 500, "dirichlet", alpha=0.1, min_samples=110, max_tries=2, seed=1)
  _assert_disjoint(parts, len(labels))
  assert min(len(p) for p in parts) >= 110
  assert sum(len(p) for p in parts) == len(labels)


def test_dirichlet_is_label_skewed(labels):
  skewed = partition(labels, 50, "dirichlet", alpha=0.05, min_samples=1, seed=0)
  flat = partition(labels, 50, "dirichlet", alpha=1000.0, min_samples=1, seed=0)
  classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])
  assert classes(skewed) < 5 < 9.5 < classes(flat)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_split_other_seed_other_split(small_labels, method):
  a = partition(small_labels, 20, method, seed=7, **METHODS[method])
  b = partition(small_labels, 20, method, seed=7, **METHODS[method])
  c = partition(small_labels, 20, method, seed=8, **METHODS[method])
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_apportion_hand_checked():
  assert apportion(10, np.array([1, 1, 1])).tolist() == [4, 3, 3]
  assert apportion(7, np.array([0, 5, 2])).tolist() == [0, 5, 2]
  assert apportion(5, np.array([3, 1]), cap=np.array([2, 5])).tolist() == [2, 3]
  with pytest.raises(ValueError, match="cannot split"):
    apportion(5, np.array([1, 1]), cap=np.array([2, 2]))


@pytest.mark.parametrize(
    "method,kwargs,num_clients,match",
    [
        ("kmeans", {}, 10, r"unknown partition 'kmeans'; known: iid, pathological, dirichlet"),
        ("pathological", {"classes_per_client": 11}, 10, r"classes_per_client=11 .* the 10 classes present"),
        ("pathological", {"classes_per_client": 0}, 10, r"classes_per_client=0"),
        ("iid", {}, 3_001, r"more clients than samples: 3001 clients but 3000 samples"),
        ("pathological", {"classes_per_client": 2}, 1_501, r"more clients than samples allow"),
        ("dirichlet", {"alpha": 0.0}, 10, r"alpha must be > 0, got 0.0"),
        ("dirichlet", {"alpha": -1.0}, 10, r"alpha must be > 0, got -1.0"),
        ("dirichlet", {"min_samples": 400}, 10, r"more clients than samples allow: 10 clients x min_samples=400"),
        ("iid", {"alpha": 0.1}, 10, r"partition 'iid' takes no option alpha; its options: none"),
        ("pathological", {"n": 2}, 10, r"takes no option n; its options: classes_per_client"),
        ("iid", {}, 0, r"num_clients must be >= 1"),
    ],
)
def test_partition_errors(small_labels, method, kwargs, num_clients, match):
  with pytest.raises(ValueError, match=match):
    partition(small_labels, num_clients, method, **kwargs)


def test_partition_rejects_float_or_negative_labels():
  with pytest.raises(ValueError, match="1-D integer array"):
    partitioners.iid(np.zeros(10), 2)
  with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
    partitioners.dirichlet(np.array([0, 1, -1, 2]), 2, min_samples=1)


def test_pathological_impossible_class_balance():
  y = np.repeat([0, 1], [1000, 5])
  with pytest.raises(ValueError, match="cannot give 10 clients 2 distinct classes"):
    partition(y, 10, "pathological", classes_per_client=2)


# Per-client test sets.


@pytest.fixture(scope="module")
def dirichlet_parts(labels):
  return partition(labels, 50, "dirichlet", alpha=0.3, min_samples=20, seed=0)


def test_split_local_is_stratified_and_disjoint(labels, dirichlet_parts):
  train, test = holdout.split_local(labels, dirichlet_parts, test_fraction=0.25, seed=0)
  for part, tr, te in zip(dirichlet_parts, train, test):
    assert len(np.intersect1d(tr, te)) == 0
    assert np.array_equal(np.union1d(tr, te), part)
    assert abs(len(te) - 0.25 * len(part)) <= 1
    # each class is held out in proportion (rounding of the total and largest remainder: < 1.5 per class)
    for c in np.unique(labels[part]):
      assert abs(np.sum(labels[te] == c) - 0.25 * np.sum(labels[part] == c)) < 1.5


def test_split_local_keeps_one_training_sample():
  y = np.array([0, 1, 1])
  train, test = holdout.split_local(y, [np.array([0]), np.array([1, 2])], test_fraction=0.9)
  assert [len(t) for t in train] == [1, 1] and [len(t) for t in test] == [0, 1]


def test_draw_global_follows_client_label_distribution(labels, dirichlet_parts):
  test_labels = np.random.default_rng(9).integers(0, 10, size=10_000)
  counts = holdout.label_counts(labels, dirichlet_parts, 10)
  parts = holdout.draw_global(counts, test_labels, min_test_samples=0, seed=0)
  _assert_disjoint(parts, len(test_labels))
  assert sum(len(p) for p in parts) == len(test_labels)
  for k, p in enumerate(parts):
    test_counts = np.bincount(test_labels[p], minlength=10)
    assert np.all(test_counts[counts[k] == 0] == 0), "a client is tested on a class it never trains on"
    expected = counts[k] / counts.sum(0) * np.bincount(test_labels, minlength=10)
    assert np.all(np.abs(test_counts - expected) < 1 + 1e-9)


def test_draw_global_tops_up_small_clients():
  counts = np.array([[1000, 0], [1, 0], [0, 0]])
  test_labels = np.array([0] * 10 + [1] * 10)
  parts = holdout.draw_global(counts, test_labels, min_test_samples=3, seed=0)
  assert len(parts[1]) == 3 and np.all(test_labels[parts[1]] == 0)
  assert len(parts[2]) == 0  # no training data, nothing to follow
  assert len(np.unique(parts[1])) == 3
