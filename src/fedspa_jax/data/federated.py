"""Federated datasets as static-shape, padded per-client arrays.

Every source and partitioner in `fedspa_jax.data` ends in a `FederatedData`: for each split, client k's samples sit
in row k of `x [K, N_max, ...]` / `y [K, N_max]`, the first `count[k]` of them valid and the rest padding. The
engine vmaps over the client axis and never reads a padding sample (it masks by `count`).

`FederatedData` and `ClientSplit` are JAX pytrees (arrays are leaves; names and normalisation are static), so
`jax.device_put(data)` moves a dataset to the device once and a jitted round can take it as an argument.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientSplit:
  """One split (train or test) of a federated dataset.

  Attributes:
    x: [K, N_max, ...] inputs; images stay uint8 (normalised inside the step), features float32.
    y: [K, N_max] int32 labels; padding entries are 0.
    count: [K] int32 number of valid samples per client (valid samples come first).
  """

  x: np.ndarray
  y: np.ndarray
  count: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.x.shape[0])

  @property
  def max_count(self) -> int:
    return int(self.x.shape[1])

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[2:])

  def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Client k's valid samples `(x [n_k, ...], y [n_k])` as numpy arrays (host side)."""
    n = int(np.asarray(self.count)[k])
    return np.asarray(self.x[k, :n]), np.asarray(self.y[k, :n])


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset: per-client padded train and test splits plus what the model needs to know.

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

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return self.train.sample_shape


jax.tree_util.register_dataclass(ClientSplit, data_fields=["x", "y", "count"], meta_fields=[])
jax.tree_util.register_dataclass(
    FederatedData, data_fields=["train", "test"], meta_fields=["num_classes", "name", "mean", "std"]
)


def pad_clients(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *, min_count: int = 1
) -> ClientSplit:
  """Stacks ragged per-client arrays into one padded `ClientSplit`.

  Args:
    xs: K arrays `[n_k, ...]` with the same trailing shape and dtype.
    ys: K integer arrays `[n_k]`.
    min_count: the padded length is at least this (so an all-empty split still has shape [K, min_count, ...]).

  Returns:
    A `ClientSplit` with x [K, N_max, ...], y [K, N_max] int32 and count [K] int32.
  """
  if len(xs) != len(ys):
    raise ValueError(f"got {len(xs)} input arrays but {len(ys)} label arrays")
  if not xs:
    raise ValueError("need at least one client")
  sample_shape = np.shape(xs[0])[1:]
  dtype = np.asarray(xs[0]).dtype
  for k, (x, y) in enumerate(zip(xs, ys)):
    if np.shape(x)[1:] != sample_shape:
      raise ValueError(f"client {k} has sample shape {np.shape(x)[1:]}, client 0 has {sample_shape}")
    if len(x) != len(y):
      raise ValueError(f"client {k} has {len(x)} inputs but {len(y)} labels")
  counts = np.array([len(y) for y in ys], dtype=np.int32)
  n_max = max(int(counts.max()), min_count)
  x_out = np.zeros((len(xs), n_max, *sample_shape), dtype=dtype)
  y_out = np.zeros((len(xs), n_max), dtype=np.int32)
  for k, (x, y) in enumerate(zip(xs, ys)):
    x_out[k, : len(x)] = x
    y_out[k, : len(y)] = y
  return ClientSplit(x=x_out, y=y_out, count=counts)
