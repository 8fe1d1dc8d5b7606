"""FedDST held against a plain-numpy round written from its reference code (bibikar/feddst).

The reference's round (dst.py's loop and `Client.train`; models.py `layer_prune`, `layer_grow`, `_decay`):
  clients start from the global w ⊙ m and train under m; in a readjustment round ((t - 1) % interval == 0) with
  r = a * a / 2 * (1 + cos(pi t / T)) they drop the r share of their active weights of smallest |w| and grow as many
  by largest |gradient| of a batch at the trained model (at 0); the server averages each weight over the clients
  whose mask keeps it, weighted by their samples, takes the union of the masks, and magnitude-prunes layers back to
  their target counts when the union is denser than the target.
The model is a softmax regression on float features and every client has 8 samples (local step = full batch), as in
tests/test_dispfl.py, so numpy computes the local step exactly.
"""

import math

import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting

from test_dispfl import CLASSES, FEATURES, K, SAMPLES, softmax_grads, split  # the same tiny setting

LR, A, T_END = 0.5, 0.5, 8
HPARAMS = dict(clients_per_round=4, local_steps=1, local_epochs=None, batch_size=SAMPLES, lr=LR, rounds=8,
               density=0.5, readjustment_ratio=A, readjust_interval=1, t_end=T_END)


@pytest.fixture(scope="module")
def data():
  # Unequal sample counts would make the weighting visible; every client has 8 samples here (the full-batch step),
  # so the weights are equal and the weighting is checked by its own test below.
  rng = np.random.default_rng(1)
  pairs = lambda: [(rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32),
                    rng.integers(0, CLASSES, SAMPLES).astype(np.int32)) for _ in range(K)]
  return fj.data.from_clients(pairs(), pairs(), num_classes=CLASSES)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=CLASSES, hidden=())


def reference_round(t, kernel, bias, mask, clients, target):
  """One FedDST round as dst.py runs it. clients: [(x, y, n)]; target: the kernel's count at round t."""
  rate = A * (A / 2 * (1 + math.cos(math.pi * t / T_END))) if t < T_END else 0.0
  readjust = (t - 1) % 1 == 0 and rate > 0
  num_k, den_k, num_b, den_b, masks = 0.0, 0.0, 0.0, 0.0, []
  for x, y, n in clients:
    w, b = kernel * mask, bias.copy()
    g_w, g_b = softmax_grads(w, b, x, y)
    w, b = (w - LR * g_w) * mask, b - LR * g_b
    new = mask.copy()
    if readjust:
      flat = new.reshape(-1)
      count = math.ceil(rate * flat.sum())
      flat[np.argsort(np.where(flat, np.abs(w).reshape(-1), np.inf), kind="stable")[:count]] = False
      g_w, _ = softmax_grads(w, b, x, y)
      flat[np.argsort(-np.where(flat, -np.inf, np.abs(g_w).reshape(-1)), kind="stable")[:count]] = True
    w = w * new
    masks.append(new)
    num_k, den_k = num_k + n * w * new, den_k + n * new
    num_b, den_b = num_b + n * b, den_b + n
  agg = np.divide(num_k, den_k, out=np.zeros_like(num_k), where=den_k > 0)
  union = den_k > 0
  if union.sum() > target:  # denser than the target: layer_prune to the target count
    flat = union.reshape(-1)
    order = np.argsort(np.where(flat, np.abs(agg).reshape(-1), np.inf), kind="stable")
    flat[order[:int(flat.sum()) - target]] = False
  return agg * union, num_b / den_b, union, masks, readjust


def client_data(data, cohort):
  out = []
  for k in cohort:
    offset, count = int(data.train.offset[k]), int(data.train.count[k])
    out.append((np.asarray(data.train.x[offset:offset + count], np.float64),
                np.asarray(data.train.y[offset:offset + count]), count))
  return out


def global_model(state):
  kernel, bias = split(state.server.params)
  return np.asarray(kernel, np.float64), np.asarray(bias, np.float64), np.asarray(split(state.server.opt_state.mask)[0])


@pytest.fixture(scope="module")
def rounds(model, data):
  algo = fj.algorithms.get("feddst", model=model, **HPARAMS)
  state = algo.init(jax.random.key(2), data)
  out = [(None, global_model(state))]
  for _ in range(3):
    state, metrics = algo.round(state, data)
    out.append((metrics, global_model(state)))
  return algo, out, state


def test_initial_mask_is_the_magnitude_pruned_init(rounds):
  # layer_prune(sparsity) on the random init: the largest |w_0| at the ERK count (one kernel: half of 18).
  _, out, _ = rounds
  kernel, _, mask = out[0][1]
  assert mask.sum() == 9
  assert np.abs(kernel[mask]).min() > np.abs(kernel[~mask]).max()  # (w_0 itself stays dense: clients get w_0 ⊙ m)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_round_equals_the_reference_round(rounds, data, t):
  # With readjust_interval 1 every round readjusts ((t - 1) % 1 == 0, t = 0 included, as dst.py computes it): the
  # union of the clients' masks is denser than the target and the server prunes it back; the rate shrinks with t.
  _, out, _ = rounds
  kernel, bias, mask = out[t][1]
  metrics, (kernel_after, bias_after, mask_after) = out[t + 1]
  cohort = np.asarray(metrics["cohort"])
  want_kernel, want_bias, want_mask, client_masks, readjust = reference_round(
      t, kernel, bias, mask, client_data(data, cohort), target=9)
  np.testing.assert_array_equal(np.asarray(metrics["readjusted"]), np.full(4, int(readjust)))
  np.testing.assert_array_equal(mask_after, want_mask)
  assert mask_after.sum() == 9
  np.testing.assert_allclose(kernel_after, want_kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias_after, want_bias, rtol=1e-5, atol=1e-6)
  # Up: each client's weights under its new mask (plus the mask); down: the global model under m.
  # (values per leaf: the bias's 3 and the kernel's active count)
  assert np.asarray(metrics["values_up"]).sum(axis=1).tolist() == [int(m.sum()) + CLASSES for m in client_masks]
  assert (np.asarray(metrics["values_down"]).sum(axis=1) == mask.sum() + CLASSES).all()
  if readjust:
    assert any((m != mask).any() for m in client_masks)


def test_clients_of_unequal_sizes_weigh_by_their_samples(model):
  # FedDST's default weighting is the reference's: each client by its training samples. Clients of 2..8 samples
  # (at most the batch of 8: one local step is still the full-batch gradient) make the weighting visible.
  rng = np.random.default_rng(3)
  sizes = [2, 8, 5, 3, 8, 6, 4, 7]
  pairs = lambda: [(rng.normal(size=(n, FEATURES)).astype(np.float32),
                    rng.integers(0, CLASSES, n).astype(np.int32)) for n in sizes]
  data = fj.data.from_clients(pairs(), pairs(), num_classes=CLASSES)
  algo = fj.algorithms.get("feddst", model=model, **HPARAMS)
  state = algo.init(jax.random.key(7), data)
  kernel, bias, mask = global_model(state)
  state, metrics = algo.round(state, data)
  kernel_after, bias_after, mask_after = global_model(state)
  cohort = np.asarray(metrics["cohort"])
  assert len({sizes[k] for k in cohort}) > 1  # the cohort mixes sizes
  want_kernel, want_bias, want_mask, _, _ = reference_round(0, kernel, bias, mask, client_data(data, cohort), target=9)
  np.testing.assert_array_equal(mask_after, want_mask)
  np.testing.assert_allclose(kernel_after, want_kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias_after, want_bias, rtol=1e-5, atol=1e-6)


def test_votes_and_values_are_weighted_by_samples(model):
  # Two clients of 2 and 6 samples keep different weights: where both keep a weight it is their 1:3 mean, where
  # one does it is that client's value (the other's zero does not enter), the union is the new mask.
  from fedspa_jax.algorithms.feddst import make_server

  params = {"k": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.zeros((2,), np.float32)}
  server = make_server({"k": 2, "b": 2}, {"k": 2, "b": 2}, t_end=1)
  state = server.init(params)
  np.testing.assert_array_equal(state.mask["k"], [[False, False], [True, True]])  # the 2 largest |w|
  x0 = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
  uploads = [np.array([[0.0, 0.0], [5.0, 0.0]], np.float32), np.array([[7.0, 0.0], [1.0, 0.0]], np.float32)]
  kept = [np.array([[False, False], [True, True]]), np.array([[True, False], [True, False]])]
  n = np.array([2.0, 6.0], np.float32)
  updates = np.stack([x0 - u for u in uploads])
  values = {"k": updates, "b": np.zeros((2, 2), np.float32)}
  coverage = {"k": np.stack(kept), "b": np.ones((2, 2), bool)}
  from fedspa_jax.server import aggregate_masked_mean
  delta = {"values": aggregate_masked_mean(values, coverage, n),
           "votes": aggregate_masked_mean({"k": np.stack(kept).astype(np.float32), "b": np.ones((2, 2), np.float32)},
                                          {"k": np.ones((2, 2, 2), bool), "b": np.ones((2, 2), bool)}, n)}
  updates, state = server.update(delta, state, params)
  new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
  # Union {(0,0), (1,0), (1,1)} is denser than 2: keep the two largest of (0,0) = 7, (1,0) = (2*5 + 6*1)/8 = 2,
  # (1,1) = client 0's 0.0 -> (0,0) and (1,0).
  np.testing.assert_array_equal(state.mask["k"], [[True, False], [True, False]])
  np.testing.assert_allclose(new["k"], [[7.0, 0.0], [2.0, 0.0]], rtol=1e-6)


def test_bad_hyperparameters(model):
  with pytest.raises(ValueError, match="readjust_interval"):
    fj.algorithms.get("feddst", model=model, readjust_interval=0)
  with pytest.raises(ValueError, match="server_lr must be 1"):
    fj.algorithms.get("feddst", model=model, server_lr=0.5)
  with pytest.raises(ValueError, match="readjustment_ratio"):
    fj.algorithms.get("feddst", model=model, readjustment_ratio=1.5)


def test_bytes_follow_the_masks(rounds):
  _, out, state = rounds
  metrics = out[2][0]
  sent = accounting.round_bytes(state.server.params, metrics)
  kernel_size = FEATURES * CLASSES
  cost = lambda active: 4 * (active + CLASSES) + min(-(-kernel_size // 8), active)
  assert sent["bytes_down"] == 4 * cost(9)
  assert sent["bytes_up"] == sum(cost(int(v.sum()) - CLASSES) for v in np.asarray(metrics["values_up"]))


def test_sharded_round_equals_one_device(model, data):
  # The global mask is replicated server state; the vote is one all-reduce of the clients' partial sums.
  from fedspa_jax.round import make_client_mesh

  one = fj.algorithms.get("feddst", model=model, **HPARAMS)
  four = fj.algorithms.get("feddst", model=model, mesh=make_client_mesh(jax.devices()[:4]), **HPARAMS)
  placed, on_device = four.place(data), one.place(data)
  a, b = one.init(jax.random.key(6), on_device), four.init(jax.random.key(6), placed)
  for _ in range(3):
    a, _ = one.round(a, on_device)
    b, _ = four.round(b, placed)
  chex_equal = lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_equal, a.server.params, b.server.params)
  jax.tree.map(chex_equal, a.server.opt_state.mask, b.server.opt_state.mask)


def test_prune_to_counts_keeps_the_largest_up_to_each_target():
  from fedspa_jax.mask_update import prune_to_counts

  params = {"k": np.array([[0.5, -3.0, 1.0], [2.0, -0.1, 4.0]], np.float32), "b": np.ones((3,), np.float32)}
  mask = {"k": np.array([[True, True, True], [True, False, True]]), "b": np.ones((3,), bool)}
  out = prune_to_counts(mask, params, {"k": 3, "b": 1})  # 5 active -> the 3 largest |w|: -3, 2, 4; biases stay
  np.testing.assert_array_equal(out["k"], [[False, True, False], [True, False, True]])
  np.testing.assert_array_equal(out["b"], [True, True, True])
  same = prune_to_counts(mask, params, {"k": 6, "b": 3})  # at or below the target: unchanged
  np.testing.assert_array_equal(same["k"], mask["k"])


def test_flops_are_sparse_training_plus_the_regrowth_batch(rounds):
  # Softmax regression 6 -> 3: dense forward 2 * 6 * 3 = 36 FLOPs per sample, 18 at the mask's density 9 / 18.
  # Per client (8 samples, batch 8): 3 * 18 * 8 training, and in a readjustment round one regrowth batch of
  # 8 * (2 * 18 + 36) (sparse forward and input gradients, dense weight gradients), as FedSpa's is counted.
  _, out, _ = rounds
  metrics = out[1][0]
  assert float(metrics["flops"]) == pytest.approx(4 * (3 * 18 * 8 + 8 * (2 * 18 + 36)))
  assert float(metrics["flops_dense"]) == pytest.approx(4 * 3 * 36 * 8)
