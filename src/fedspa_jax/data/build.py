"""`FederatedData` from the user's own arrays: a centralised dataset to partition, or per-client splits.

Images are stored uint8 NHWC ([N, H, W, C]; a uint8 [N, H, W] array gets a channel axis) and get per-channel
`mean`/`std` computed from the training images (after scaling to [0, 1]) unless given; float inputs are kept as
they are, with `mean = std = None`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedspa_jax.data import holdout
from fedspa_jax.data import partitioners as partition_lib
from fedspa_jax.data.federated import FederatedData, stack_clients, take_clients

TEST_MODES = ("global", "split")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 images scaled to [0, 1], exact, without a float copy of the images.

  Args:
    x: [N, H, W, C] uint8.

  Returns:
    `(mean, std)`, tuples of C Python floats.
  """
  levels = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  # In chunks of images: bincount widens its input to int64, 8 bytes per pixel (4.6 GB for FEMNIST's 750k images).
  step = max(1, (1 << 22) // max(1, int(np.prod(x.shape[1:]))))
  for c in range(x.shape[-1]):
    hist = np.zeros(256, np.float64)
    for start in range(0, len(x), step):
      hist += np.bincount(np.ravel(x[start : start + step, ..., c]), minlength=256)
    mean = hist @ levels / hist.sum()
    means.append(float(mean))
    stds.append(float(np.sqrt(hist @ (levels - mean) ** 2 / hist.sum())))
  return tuple(means), tuple(stds)


def _as_inputs(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x[..., None] if x.dtype == np.uint8 and x.ndim == 3 else x


def _check_labels(x: np.ndarray, y: np.ndarray, what: str, sequences: bool = False) -> np.ndarray:
  """Integer labels >= 0, one per input: [n] class labels, or with `sequences` also [n, L] per-position labels."""
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer) or y.ndim not in ((1, 2) if sequences else (1,)):
    shapes = "[n] (a class per sample) or [n, L] (a class per position, 0 = padding)" if sequences else (
        "[n] (a class per sample; per-position labels [n, L] go through from_clients)")
    raise ValueError(f"{what} labels must be an integer array {shapes}, got shape {y.shape} and dtype {y.dtype}")
  if len(x) != len(y):
    raise ValueError(f"{what} has {len(x)} inputs but {len(y)} labels")
  if y.size and y.min() < 0:
    raise ValueError(f"{what} labels must be >= 0, got {y.min()}")
  return y.astype(np.int64)


def _num_classes(given: int | None, *label_arrays: np.ndarray) -> int:
  top = max((int(y.max()) + 1 for y in label_arrays if y.size), default=0)
  if given is None:
    return top
  if top > given:
    raise ValueError(f"labels go up to {top - 1} but num_classes={given}")
  return given


def _normalisation(x: np.ndarray, mean, std):
  if mean is None and std is None and x.dtype == np.uint8:
    return channel_stats(x)
  return (None if mean is None else tuple(mean)), (None if std is None else tuple(std))


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    num_clients: int,
    partition: str,
    seed: int = 0,
    test_mode: str | None = None,
    test_fraction: float = 0.2,
    min_test_samples: int = 1,
    num_classes: int | None = None,
    name: str = "arrays",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **partition_args,
) -> FederatedData:
  """Partitions a centralised dataset among clients.

  Args:
    x: [N, ...] training inputs (uint8 images [N, H, W, C] or [N, H, W], or float features).
    y: [N] integer labels.
    x_test: [M, ...] the official test inputs, if there are any.
    y_test: [M] their labels.
    num_clients: K.
    partition: `iid`, `pathological` or `dirichlet` (see `fedspa_jax.data.partitioners`).
    seed: seeds the partition and the test assignment.
    test_mode: `global` (deal `x_test` out by each client's label distribution) or `split` (hold out
      `test_fraction` of each client's share); default `global` when `x_test` is given, else `split`.
    test_fraction: share held out per client in `split` mode.
    min_test_samples: smallest test set per client in `global` mode (see `holdout.draw_global`).
    num_classes: label classes; default max label + 1.
    name: dataset name for logs.
    mean: per-channel mean for uint8 inputs; default computed from `x`.
    std: per-channel std for uint8 inputs; default computed from `x`.
    **partition_args: the partitioner's options, e.g. `classes_per_client=2`, `alpha=0.1, min_samples=10`.

  Returns:
    `FederatedData` whose splits hold each client's samples flat (see `federated.ClientSplit`).
  """
  x = _as_inputs(x)
  y = _check_labels(x, y, "the training data")
  if (x_test is None) != (y_test is None):
    raise ValueError("pass both x_test and y_test, or neither")
  if x_test is not None:
    x_test = _as_inputs(x_test)
    y_test = _check_labels(x_test, y_test, "the test data")
    if x_test.shape[1:] != x.shape[1:]:
      raise ValueError(f"test samples have shape {x_test.shape[1:]}, training samples {x.shape[1:]}")
  test_mode = test_mode or ("split" if x_test is None else "global")
  if test_mode not in TEST_MODES:
    raise ValueError(f"unknown test_mode {test_mode!r}; known: {', '.join(TEST_MODES)}")
  if test_mode == "global" and x_test is None:
    raise ValueError("test_mode='global' draws from a test split; pass x_test and y_test or use 'split'")
  num_classes = _num_classes(num_classes, y, *([] if y_test is None else [y_test]))
  parts = partition_lib.partition(y, num_clients, partition, seed=seed, **partition_args)
  if test_mode == "split":
    train_parts, test_parts = holdout.split_local(y, parts, test_fraction=test_fraction, seed=seed)
    test = take_clients(x, y, test_parts)
  else:
    train_parts = parts
    counts = holdout.label_counts(y, parts, num_classes)
    test_parts = holdout.draw_global(counts, y_test, min_test_samples=min_test_samples, seed=seed)
    test = take_clients(x_test, y_test, test_parts)
  mean, std = _normalisation(x, mean, std)
  return FederatedData(
      train=take_clients(x, y, train_parts), test=test, num_classes=num_classes, name=name, mean=mean, std=std
  )


def from_clients(
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    test: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    name: str = "clients",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FederatedData:
  """`FederatedData` from a federated split the user already has (LEAF writers, another library's partition).

  Args:
    train: K pairs `(x_k [n_k, ...], y_k [n_k])`, one per client, in client order. Sequence data have a label per
      position, `y_k [n_k, L]`, where label 0 marks padding (left out of the loss and the accuracy, as for the
      natural Shakespeare set; e.g. token ids x_k [n_k, L] and their next tokens), the same L for every client.
    test: K pairs for the clients' test data; None holds out a `test_fraction` of each client's training pairs
      instead (see `holdout.split_local`; stratified by class, for sequences uniformly).
    test_fraction: share held out when `test` is None.
    seed: seeds the held-out split.
    num_classes: label classes; default max label + 1.
    name: dataset name for logs.
    mean: per-channel mean for uint8 inputs; default computed from all training inputs.
    std: per-channel std; default computed likewise.

  Returns:
    `FederatedData` with client k in row k of both splits.
  """
  if not len(train):
    raise ValueError("need at least one client")
  if test is not None and len(test) != len(train):
    raise ValueError(f"got {len(train)} training clients but {len(test)} test clients")
  xs = [_as_inputs(x) for x, _ in train]
  ys = [_check_labels(x, y, f"client {k}", sequences=True) for k, (x, (_, y)) in enumerate(zip(xs, train))]
  if test is None:
    split = _split_clients(xs, ys, test_fraction, seed)
    (xs, ys), (xs_test, ys_test) = split
  else:
    xs_test = [_as_inputs(x) for x, _ in test]
    ys_test = [_check_labels(x, y, f"client {k}'s test data", sequences=True)
               for k, (x, (_, y)) in enumerate(zip(xs_test, test))]
  shape = lambda y: "[n" + "".join(f", {d}" for d in y.shape[1:]) + "]"
  for k, (y, y_test) in enumerate(zip(ys, ys_test)):
    if not y.shape[1:] == y_test.shape[1:] == ys[0].shape[1:]:
      raise ValueError(f"client {k}'s labels are {shape(y)} (test data {shape(y_test)}), client 0's {shape(ys[0])}: "
                       f"every client's labels need the same shape")
  num_classes = _num_classes(num_classes, *ys, *ys_test)
  mean, std = _normalisation(np.concatenate(xs) if xs[0].dtype == np.uint8 else xs[0], mean, std)
  as_int32 = lambda arrays: [a.astype(np.int32) for a in arrays]
  return FederatedData(
      train=stack_clients(xs, as_int32(ys)),
      test=stack_clients(xs_test, as_int32(ys_test)),
      num_classes=num_classes,
      name=name,
      mean=mean,
      std=std,
  )


def _split_clients(xs, ys, test_fraction, seed):
  """Per-client hold-out over ragged client arrays (offsets into their concatenation), stratified by class; uniform
  for sequence labels [n, L]."""
  offsets = np.cumsum([0] + [len(y) for y in ys])
  labels = np.concatenate([y if y.ndim == 1 else np.zeros(len(y), np.int64) for y in ys])  # sequences: uniform
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
  train_parts, test_parts = holdout.split_local(labels, parts, test_fraction=test_fraction, seed=seed)
  local = lambda ps: [p - o for p, o in zip(ps, offsets[:-1])]
  pick = lambda ps: ([x[p] for x, p in zip(xs, local(ps))], [y[p] for y, p in zip(ys, local(ps))])
  return pick(train_parts), pick(test_parts)
