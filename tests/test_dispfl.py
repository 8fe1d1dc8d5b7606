"""DisPFL held against a plain-numpy round written from its reference code (rong-dai/DisPFL).

The reference's round for one client (fedml_api/standalone/DisPFL/dispfl_api.py `train`, `_aggregate_func`;
client.py `train`, `fire_mask`, `regrow_mask`; my_model_trainer.py `train`, `screen_gradients`):
  count = sum over {k} + neighbours of the masks their models were trained under; avg = sum(model_j) / count (0
  where count is 0); start = avg * mask_k; SGD steps with the weights multiplied by mask_k after each; drop the
  ceil(rate * nnz) smallest |w| per kernel; grow as many among the zeros of the dropped mask by largest |gradient| of
  one batch at the trained model; rate = alpha / 2 * (1 + cos(pi * t / T)).
The model is a softmax regression on float features (one kernel, one bias) and every client has 8 samples, so a
local step of batch 8 is the full-batch gradient whatever the batch order, which numpy computes exactly.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting
from fedspa_jax.algorithms.dispfl import make_neighbours
from fedspa_jax.round import PEERS_STREAM, make_client_mesh

K, SAMPLES, FEATURES, CLASSES = 8, 8, 6, 3
LR, ROUNDS, ALPHA = 0.5, 4, 0.5


def copy(tree):
  return jax.tree.map(jax.numpy.copy, tree)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  pairs = lambda: [(rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32),
                    rng.integers(0, CLASSES, SAMPLES).astype(np.int32)) for _ in range(K)]
  return fj.data.from_clients(pairs(), pairs(), num_classes=CLASSES)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=CLASSES, hidden=())


HPARAMS = dict(clients_per_round=4, local_steps=1, local_epochs=None, batch_size=SAMPLES, lr=LR, rounds=ROUNDS,
               alpha=ALPHA, neighbours=3)


# ---- the reference, in numpy -------------------------------------------------------------------------------------

def softmax_grads(kernel, bias, x, y):
  """Full-batch gradients of the mean cross-entropy of softmax(x @ kernel + bias)."""
  logits = x @ kernel + bias
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return x.T @ p / len(y), p.mean(axis=0)


def reference_client(k, neighbours, stored, x, y, rate):
  """One client's round as dispfl_api.py / client.py run it. `stored`: {"mask", "trained", "kernel", "bias"} [K, ...]
  (the round-start snapshot). Returns (new mask, trained mask, kernel, bias)."""
  group = list(neighbours) + [k]  # nei_indexs, with the client itself appended
  count = sum(stored["trained"][j].astype(np.float64) for j in group)
  inverse = np.divide(1.0, count, out=np.zeros_like(count), where=count != 0)
  kernel = sum(inverse * stored["kernel"][j] for j in group) * stored["mask"][k]
  bias = sum(stored["bias"][j] for j in group) / len(group)  # biases are dense: covered by every model
  g_kernel, g_bias = softmax_grads(kernel, bias, x, y)
  norm = math.sqrt(np.sum(g_kernel ** 2) + np.sum(g_bias ** 2))
  assert norm < 10.0  # the reference's clip_grad_norm_(10) does not act here
  kernel = (kernel - LR * g_kernel) * stored["mask"][k]
  bias = bias - LR * g_bias
  # fire_mask: sort |w| with inactive entries at 1e5, drop the first ceil(rate * nnz).
  mask = stored["mask"][k].copy().reshape(-1)
  remove = math.ceil(rate * mask.sum())
  order = np.argsort(np.where(mask, np.abs(kernel).reshape(-1), 1e5), kind="stable")
  mask[order[:remove]] = False
  # regrow_mask: gradient of one batch (all 8 samples) at the trained model; largest |g| among the zeros.
  g_kernel, _ = softmax_grads(kernel, bias, x, y)
  order = np.argsort(-np.where(mask, -1e5, np.abs(g_kernel).reshape(-1)), kind="stable")
  mask[order[:remove]] = True
  return mask.reshape(kernel.shape), stored["mask"][k], kernel, bias


def split(tree):
  """(kernel, bias) leaves of a softmax-regression params tree."""
  leaves = jax.tree.leaves(tree)
  return next(a for a in leaves if a.ndim >= 2 and a.shape[-2:] == (FEATURES, CLASSES)), next(
      a for a in leaves if a.shape[-1:] == (CLASSES,) and a.ndim in (1, 2) and a.shape[-2:] != (FEATURES, CLASSES))


def snapshot(algo, state, data):
  decoded = algo.client_states(state, data)
  kernel, bias = split(decoded.local)
  return {"mask": np.asarray(split(decoded.mask)[0]), "trained": np.asarray(split(decoded.trained_mask)[0]),
          "kernel": np.asarray(kernel, np.float64), "bias": np.asarray(bias, np.float64)}


def engine_neighbours(state, num_clients, n, topology="random"):
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), PEERS_STREAM)
  ids = jax.numpy.arange(num_clients, dtype=jax.numpy.int32)
  return np.asarray(make_neighbours(num_clients, n, topology)(key, ids))


@pytest.fixture(scope="module")
def rounds(model, data):
  """The engine's first two rounds, with the round-start snapshots and the neighbours each round drew."""
  algo = fj.algorithms.get("dispfl", model=model, **HPARAMS)
  state = algo.init(jax.random.key(3), data)
  out = []
  for _ in range(2):
    before, neighbours = snapshot(algo, state, data), engine_neighbours(state, K, 3)
    t = int(state.round)
    state, metrics = algo.round(state, data)
    out.append((t, before, neighbours, metrics, snapshot(algo, state, data)))
  return algo, out, state


@pytest.mark.parametrize("which", [0, 1])
def test_round_equals_the_reference_round(rounds, data, which):
  # Round 0 starts from w_0 ⊙ m_k everywhere; round 1 reads models trained under masks that differ from the
  # clients' current ones, and neighbours that were not sampled (4 of 8 clients train).
  _, out, _ = rounds
  t, before, neighbours, metrics, after = out[which]
  rate = ALPHA / 2 * (1 + math.cos(math.pi * t / ROUNDS))
  cohort = np.asarray(metrics["cohort"])
  assert sorted(cohort.tolist()) == sorted(set(cohort.tolist())) and len(cohort) == 4
  for k in range(K):
    if k not in cohort:  # not sampled: untouched
      for name in before:
        np.testing.assert_array_equal(after[name][k], before[name][k])
      continue
    offset, count = int(data.train.offset[k]), int(data.train.count[k])
    x = np.asarray(data.train.x[offset:offset + count], np.float64)
    y = np.asarray(data.train.y[offset:offset + count])
    mask, trained, kernel, bias = reference_client(k, neighbours[k], before, x, y, rate)
    np.testing.assert_array_equal(after["trained"][k], trained)
    np.testing.assert_array_equal(after["mask"][k], mask)
    assert after["mask"][k].sum() == before["mask"][k].sum()  # counts preserved by drop-and-grow
    assert np.sum(after["mask"][k] != before["mask"][k]) > 0  # and the mask did move
    np.testing.assert_allclose(after["kernel"][k], kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["bias"][k], bias, rtol=1e-5, atol=1e-6)


def test_random_neighbours_are_distinct_others_drawn_uniformly():
  # _benefit_choose(cs="random"): N distinct clients from the K - 1 others.
  seen = np.zeros((K, K))
  draw_all = jax.jit(jax.vmap(lambda key: make_neighbours(K, 3, "random")(key, jax.numpy.arange(K))))
  for draw in np.asarray(draw_all(jax.random.split(jax.random.key(0), 200))):
    for k in range(K):
      assert len(set(draw[k].tolist())) == 3 and k not in draw[k] and draw[k].min() >= 0 and draw[k].max() < K
      seen[k, draw[k]] += 1
  others = seen[~np.eye(K, dtype=bool)] / 200
  np.testing.assert_allclose(others, 3 / (K - 1), atol=0.12)  # each other client with probability N / (K - 1)


def test_ring_neighbours_are_left_and_right():
  draw = np.asarray(make_neighbours(K, 2, "ring")(jax.random.key(0), jax.numpy.arange(K)))
  np.testing.assert_array_equal(draw, np.stack([(np.arange(K) - 1) % K, (np.arange(K) + 1) % K], axis=1))


def test_ring_round_reads_the_ring(model, data):
  algo = fj.algorithms.get("dispfl", model=model, **{**HPARAMS, "neighbours": None, "topology": "ring"})
  state = algo.init(jax.random.key(4), data)
  before = snapshot(algo, state, data)
  state, metrics = algo.round(state, data)
  after = snapshot(algo, state, data)
  rate = ALPHA / 2 * 2
  for k in np.asarray(metrics["cohort"]):
    offset = int(data.train.offset[k])
    x = np.asarray(data.train.x[offset:offset + SAMPLES], np.float64)
    y = np.asarray(data.train.y[offset:offset + SAMPLES])
    mask, _, kernel, _ = reference_client(k, [(k - 1) % K, (k + 1) % K], before, x, y, rate)
    np.testing.assert_array_equal(after["mask"][k], mask)
    np.testing.assert_allclose(after["kernel"][k], kernel, rtol=1e-5, atol=1e-6)


def test_scored_with_the_trained_models(rounds, data):
  # The reference's "after local training" accuracy: each client's trained model, under the mask it trained with.
  algo, out, state = rounds
  after = out[-1][-1]
  ev = algo.evaluate(state, data)
  for k in range(K):
    offset, count = int(data.test.offset[k]), int(data.test.count[k])
    x = np.asarray(data.test.x[offset:offset + count], np.float64)
    y = np.asarray(data.test.y[offset:offset + count])
    predicted = np.argmax(x @ (after["kernel"][k] * after["trained"][k]) + after["bias"][k], axis=1)
    assert float(ev["accuracy"][k]) == pytest.approx(np.mean(predicted == y), abs=1e-6)


def test_bytes_and_state_accounting(rounds, data):
  algo, out, state = rounds
  _, before, neighbours, metrics, _ = out[1]
  params = state.server.params
  # The store holds exactly what client_state_bytes says: two masks in uint32 words and the model's values.
  stored = sum(leaf.nbytes for leaf in jax.tree.leaves(state.clients)) // K
  assert int(np.sum(metrics["client_state_bytes"])) == stored
  # Down: each sampled client receives its 3 neighbours' models (values under their trained masks, plus the mask);
  # up: its trained model once.
  kernel_size = FEATURES * CLASSES
  mask_cost = lambda active: min(-(-kernel_size // 8), active)  # bitmap or one-byte indices
  down = up = 0
  for k in np.asarray(metrics["cohort"]):
    for j in neighbours[k]:
      active = int(before["trained"][j].sum())
      down += 4 * (active + CLASSES) + mask_cost(active)
    active = int(before["mask"][k].sum())
    up += 4 * (active + CLASSES) + mask_cost(active)
  assert accounting.round_bytes(params, metrics) == {"bytes_down": down, "bytes_up": up}


def test_neighbours_out_of_range_is_a_clear_error(model, data):
  with pytest.raises(ValueError, match="neighbours must be at most K - 1 = 7, got 8"):
    algo = fj.algorithms.get("dispfl", model=model, **{**HPARAMS, "neighbours": 8})
    algo.round(algo.init(jax.random.key(0), data), data)
  with pytest.raises(ValueError, match="topology"):
    fj.algorithms.get("dispfl", model=model, topology="star")
  with pytest.raises(ValueError, match="neighbours is fixed at 2"):
    fj.algorithms.get("dispfl", model=model, topology="ring", neighbours=3)


def test_sharded_round_equals_one_device(model, data):
  # Neighbours live on other devices: the sharded round gathers their rows and must end where one device does.
  hparams = {**HPARAMS, "regrow": "random"}
  one = fj.algorithms.get("dispfl", model=model, **hparams)
  four = fj.algorithms.get("dispfl", model=model, mesh=make_client_mesh(jax.devices()[:4]), **hparams)
  placed, on_device = four.place(data), one.place(data)
  a, b = one.init(jax.random.key(5), on_device), four.init(jax.random.key(5), placed)
  for _ in range(2):
    a, _ = one.round(a, on_device)
    b, _ = four.round(b, placed)
  sa, sb = one.client_states(a, on_device), four.client_states(b, placed)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6), sa, sb)

