"""Federated datasets as flat (ragged) per-client arrays with static shapes.

Every source and partitioner in `fedspa_jax.data` ends in a `FederatedData`. Each split stores the samples of all
clients back to back, `x [N_total, ...]` / `y [N_total]`, with client k's samples at rows
`offset[k] : offset[k] + count[k]`. Memory is the data plus O(K): a skewed split costs what its samples cost, not
K times its largest client. The engine gathers each step's batch in-graph from `offset + position`.

`FederatedData` and `ClientSplit` are JAX pytrees (arrays are leaves; `max_count`, names and normalisation are
static), so `jax.device_put(data)` moves a dataset to the device once and a jitted round can take it as an argument.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientSplit:
  """One split (train or test) of a federated dataset, stored flat.

  Attributes:
    x: [N_total, ...] inputs of all clients, client by client; images stay uint8 (normalised inside the step),
      features float32. At least one row (an all-empty split holds one unused zero sample).
    y: [N_total] int32 labels; text: [N_total, L] int32 next-token ids, 0 = padding (`fedspa_jax.data.text`).
    offset: [K] int32 first row of each client.
    count: [K] int32 number of samples of each client.
    max_count: the largest client's count (static: it sizes evaluation chunks without a host sync).
  """

  x: np.ndarray
  y: np.ndarray
  offset: np.ndarray
  count: np.ndarray
  max_count: int

  @property
  def num_clients(self) -> int:
    return int(self.count.shape[0])

  @property
  def total(self) -> int:
    """Samples held by clients (the rows in use)."""
    return int(np.asarray(self.count, np.int64).sum())

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Client k's samples `(x [n_k, ...], y [n_k])` as numpy arrays (host side)."""
    start, n = int(np.asarray(self.offset)[k]), int(np.asarray(self.count)[k])
    return np.asarray(self.x[start : start + n]), np.asarray(self.y[start : start + n])

  def owners(self) -> np.ndarray:
    """[N_total] int64 client of every row (-1 for rows no client owns), host side."""
    owner = np.full(self.x.shape[0], -1, np.int64)
    count = np.asarray(self.count, np.int64)
    starts = np.repeat(np.asarray(self.offset, np.int64), count)
    within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    owner[starts + within] = np.repeat(np.arange(self.num_clients), count)
    return owner


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset: per-client flat train and test splits plus what the model needs to know.

  Attributes:
    train: the clients' training data.
    test: the clients' test data (same client order as `train`).
    num_classes: number of label classes.
    name: dataset name, for logs.
    mean: per-channel mean used to normalise uint8 inputs (after scaling to [0, 1]); None for float inputs.
    std: per-channel std used with `mean`; None for float inputs.
  """

  train: ClientSplit
  test: ClientSplit
  num_classes: int
  name: str = "arrays"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.train.num_clients != self.test.num_clients:
      raise ValueError(f"train has {self.train.num_clients} clients but test has {self.test.num_clients}")

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return self.train.sample_shape


jax.tree_util.register_dataclass(ClientSplit, data_fields=["x", "y", "offset", "count"], meta_fields=["max_count"])
jax.tree_util.register_dataclass(
    FederatedData, data_fields=["train", "test"], meta_fields=["num_classes", "name", "mean", "std"]
)


def split_from_flat(x: np.ndarray, y: np.ndarray, count: Sequence[int] | np.ndarray) -> ClientSplit:
  """A `ClientSplit` from samples already stored client by client.

  Args:
    x: [N, ...] inputs, client 0's first.
    y: [N] integer labels ([N, L] for sequence labels).
    count: [K] samples per client, summing to N.

  Returns:
    The split, with offsets the running sum of `count` (an empty `x` gets one unused zero row).
  """
  count = np.asarray(count, np.int64)
  if count.ndim != 1 or count.size == 0:
    raise ValueError(f"count must be a non-empty 1-D array of per-client sizes, got shape {count.shape}")
  if (count < 0).any():
    raise ValueError("client sizes must be >= 0")
  if len(x) != len(y):
    raise ValueError(f"got {len(x)} inputs but {len(y)} labels")
  if int(count.sum()) != len(y):
    raise ValueError(f"client sizes sum to {int(count.sum())} but there are {len(y)} samples")
  if int(count.sum()) >= 2**31:
    raise ValueError(f"{int(count.sum())} samples: int32 offsets hold at most 2^31 - 1")
  x, y = np.asarray(x), np.asarray(y).astype(np.int32, copy=False)  # no copy of labels already int32
  if len(y) == 0:
    x, y = np.zeros((1, *x.shape[1:]), x.dtype), np.zeros((1,), np.int32)
  offset = (np.cumsum(count) - count).astype(np.int32)
  return ClientSplit(x=x, y=y, offset=offset, count=count.astype(np.int32), max_count=int(count.max()))


def stack_clients(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> ClientSplit:
  """Concatenates ragged per-client arrays into one flat `ClientSplit`.

  Args:
    xs: K arrays `[n_k, ...]` with the same trailing shape and dtype.
    ys: K integer arrays `[n_k]`, or `[n_k, L]` (per-position labels of sequences).

  Returns:
    A `ClientSplit` with x [sum n_k, ...], y [sum n_k] (or [sum n_k, L]) int32, offset and count [K] int32.
  """
  if len(xs) != len(ys):
    raise ValueError(f"got {len(xs)} input arrays but {len(ys)} label arrays")
  if not len(xs):
    raise ValueError("need at least one client")
  sample_shape = np.shape(xs[0])[1:]
  for k, (x, y) in enumerate(zip(xs, ys)):
    if np.shape(x)[1:] != sample_shape:
      raise ValueError(f"client {k} has sample shape {np.shape(x)[1:]}, client 0 has {sample_shape}")
    if len(x) != len(y):
      raise ValueError(f"client {k} has {len(x)} inputs but {len(y)} labels")
  counts = [len(y) for y in ys]
  return split_from_flat(np.concatenate([np.asarray(x) for x in xs]), np.concatenate(ys), counts)


def take_clients(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray]) -> ClientSplit:
  """The split whose client k holds rows `parts[k]` of `x`/`y` (one gather, no per-client copies)."""
  index = np.concatenate([np.asarray(p, np.int64) for p in parts]) if len(parts) else np.zeros(0, np.int64)
  return split_from_flat(x[index], y[index], [len(p) for p in parts])
