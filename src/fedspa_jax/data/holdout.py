"""Per-client test data that follow each client's own label distribution.

Two ways (`test_mode`):
- `"global"`: draw from the dataset's official test split. Each class's test samples are dealt out among the
  clients in proportion to how many training samples of that class each holds, so every client's test labels
  follow its training labels, test sizes are proportional to training sizes, and the test sets are disjoint.
  A client whose share rounds below `min_test_samples` is topped up from the test samples of its own classes
  (these few may also belong to another client's test set).
- `"split"`: hold out a `test_fraction` of each client's own share, stratified by class.
"""

from __future__ import annotations

import numpy as np

from fedspa_jax.data.partitioners import apportion, group_by_owner, make_rng


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
  """[K, C] number of samples of each class per client (`parts` index into `labels`)."""
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def split_local(
    labels: np.ndarray, parts: list[np.ndarray], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Holds out a stratified `test_fraction` of each client's samples as its test data.

  A client with n >= 2 samples keeps at least one for training and one for testing (n_test =
  round(test_fraction * n) clipped to [1, n - 1]); a client with one sample keeps it for training.

  Args:
    labels: [N] integer labels.
    parts: K index arrays into `labels` (a partition).
    test_fraction: share held out, in (0, 1).
    seed: numpy seed.

  Returns:
    `(train_parts, test_parts)`: K sorted index arrays each, into `labels`, disjoint, together equal to `parts`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = make_rng(seed, 1)
  train_parts, test_parts = [], []
  for part in parts:
    n = len(part)
    n_test = 0 if n < 2 else min(n - 1, max(1, int(round(test_fraction * n))))
    classes, sizes = np.unique(labels[part], return_counts=True)
    quota = apportion(n_test, sizes) if n_test else np.zeros(len(classes), np.int64)
    test = [rng.permutation(part[labels[part] == c])[:q] for c, q in zip(classes, quota)]
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_parts.append(np.setdiff1d(part, test).astype(np.int64))
    test_parts.append(test.astype(np.int64))
  return train_parts, test_parts


def draw_global(
    train_counts: np.ndarray, test_labels: np.ndarray, *, min_test_samples: int = 1, seed: int = 0
) -> list[np.ndarray]:
  """Deals the official test split out to the clients following their training label distributions.

  Args:
    train_counts: [K, C] training samples per client and class (see `label_counts`).
    test_labels: [M] labels of the test split.
    min_test_samples: a client with training data gets at least this many test samples (if its classes have
      that many); 0 turns the top-up off.
    seed: numpy seed.

  Returns:
    K sorted int64 index arrays into `test_labels`. Class c's test samples are split among the clients in
    proportion to `train_counts[:, c]`; disjoint except for the top-ups.
  """
  num_clients, num_classes = train_counts.shape
  test_labels = np.asarray(test_labels)
  if test_labels.size and test_labels.max() >= num_classes:
    raise ValueError(f"test labels go up to {test_labels.max()} but the training data have {num_classes} classes")
  rng = make_rng(seed, 1)
  owner = np.full(len(test_labels), -1, dtype=np.int64)
  for c in range(num_classes):
    pool = rng.permutation(np.flatnonzero(test_labels == c))
    if len(pool) and train_counts[:, c].sum() > 0:
      owner[pool] = np.repeat(np.arange(num_clients), apportion(len(pool), train_counts[:, c]))
  parts = group_by_owner(owner, num_clients)
  return [_top_up(p, train_counts[k], test_labels, min_test_samples, rng) for k, p in enumerate(parts)]


def _top_up(
    part: np.ndarray, counts: np.ndarray, test_labels: np.ndarray, minimum: int, rng: np.random.Generator
) -> np.ndarray:
  """Adds test samples of the client's classes (weighted by its class counts) until it has `minimum`."""
  need = minimum - len(part)
  if need <= 0 or counts.sum() == 0:
    return part.astype(np.int64)
  candidates = np.setdiff1d(np.flatnonzero(counts[test_labels] > 0), part)
  if not len(candidates):
    return part.astype(np.int64)
  cand_labels = test_labels[candidates]
  weights = counts[cand_labels] / np.bincount(cand_labels, minlength=len(counts))[cand_labels]
  extra = rng.choice(candidates, size=min(need, len(candidates)), replace=False, p=weights / weights.sum())
  return np.sort(np.concatenate([part, extra])).astype(np.int64)
