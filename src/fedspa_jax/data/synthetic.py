"""Synthetic(alpha, beta) federated data, the generator of the FedProx / LEAF benchmark.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks" (MLSys 2020).
Client k draws a softmax-regression model W_k ~ N(u_k, 1), b_k ~ N(u_k, 1) with u_k ~ N(0, alpha) (how much the
clients' models differ) and inputs x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1), B_k ~ N(0, beta) (how much their inputs
differ), Sigma = diag(j^-1.2); labels are argmax(W_k^T x + b_k). Sample counts are lognormal(4, 2) + 50 as in the
original; `max_samples_per_client` caps them. Generation is vectorised over chunks of clients, so a million
clients take seconds.
"""

from __future__ import annotations

import numpy as np

from fedspa_jax.data.federated import FederatedData, split_from_flat


def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    num_clients: int = 30,
    dimension: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    max_samples_per_client: int | None = 500,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedData:
  """Generates Synthetic(alpha, beta) federated data (numpy, seeded, deterministic).

  Args:
    alpha: spread of the clients' local models (0 = same model family).
    beta: spread of the clients' input distributions.
    num_clients: K.
    dimension: input features.
    num_classes: label classes.
    iid: one shared model and input distribution for all clients (the original's Synthetic-IID).
    max_samples_per_client: cap on a client's total samples (train + test); None keeps the original's long tail.
    test_fraction: share of each client's samples held out as its test data (at least one sample each).
    seed: numpy seed.

  Returns:
    `FederatedData` with float32 inputs [dimension].
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  counts = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  if max_samples_per_client is not None:
    counts = np.minimum(counts, max_samples_per_client)
  mean_w = rng.normal(0.0, alpha, num_clients)
  shift = rng.normal(0.0, beta, num_clients)
  scale = np.sqrt(np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2))
  if iid:
    w_global = rng.normal(0.0, 1.0, (dimension, num_classes))
    b_global = rng.normal(0.0, 1.0, num_classes)
  n_test = np.maximum(1, np.round(test_fraction * counts).astype(np.int64))
  xs, ys = [], []
  # Clients in chunks of about 2^16 samples: vectorised, with per-sample model copies kept small.
  bounds = np.searchsorted(np.cumsum(counts), np.arange(0, counts.sum(), 2**16), side="right").tolist()
  for a, b in zip(bounds, bounds[1:] + [num_clients]):
    if a == b:
      continue
    c, owner = b - a, np.repeat(np.arange(b - a), counts[a:b])
    if iid:
      mean_x = np.zeros((c, dimension))
    else:
      mean_x = rng.normal(shift[a:b, None], 1.0, (c, dimension))
      w = rng.normal(mean_w[a:b, None, None], 1.0, (c, dimension, num_classes))
      bias = rng.normal(mean_w[a:b, None], 1.0, (c, num_classes))
    x = mean_x[owner] + rng.normal(size=(len(owner), dimension)) * scale
    logits = x @ w_global + b_global if iid else np.einsum("nd,ndc->nc", x, w[owner]) + bias[owner]
    xs.append(x.astype(np.float32))
    ys.append(np.argmax(logits, axis=1).astype(np.int32))
  x, y = np.concatenate(xs), np.concatenate(ys)
  # Each client's first n_test samples are its test data.
  within = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
  is_test = within < np.repeat(n_test, counts)
  return FederatedData(
      train=split_from_flat(x[~is_test], y[~is_test], counts - n_test),
      test=split_from_flat(x[is_test], y[is_test], n_test),
      num_classes=num_classes,
      name="synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})",
  )
