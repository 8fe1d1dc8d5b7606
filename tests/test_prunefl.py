"""PruneFL held against a plain-numpy round written from its reference code (jiangyuang/PruneFL).

The reference's round (bases/fl/simulation/adaptive.py `AdaptiveClient.main`, `AdaptiveServer.main`,
`AdaptiveFL.check_adj_round`; control/algorithm.py `process_layer`, `architecture_search`):
  clients train m ⊙ w, summing the dense gradient of every step, and add (Σ g)^2 · (samples) to their importance;
  the server sets w ← w + Σ n_k / N (x_k − m ⊙ w); at the readjustment rounds (every ADJ_INTERVAL rounds, the first
  ADJ_INTERVAL rounds in) it sums the clients' importance, lets the int(dtp · active) smallest-|w| weights of each
  layer become candidates beside the pruned ones, dtp = MAX_DEC_DIFF · 0.5^(t / half life), and adds candidates by
  a heap over importance / cost while that beats (importance kept) / (time constant + cost kept).
The model is the softmax regression of tests/test_dispfl.py; two full-batch local steps per round, so the gradient
sum differs from one step's.
"""

import heapq
import math

import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting
from fedspa_jax.mask_update import select_by_importance_per_cost

from test_dispfl import CLASSES, FEATURES, K, SAMPLES, softmax_grads, split  # the same tiny setting

LR, STEPS, INTERVAL, MAX_DEC, HALF_LIFE = 0.5, 2, 2, 0.3, 4.0
HPARAMS = dict(clients_per_round=4, local_steps=STEPS, local_epochs=None, batch_size=SAMPLES, lr=LR, rounds=8,
               readjust_interval=INTERVAL, max_decrease=MAX_DEC, decrease_half_life=HALF_LIFE, time_constant=1.0)


# ---- the reference, in plain Python / numpy -----------------------------------------------------------------------

def reference_select(layers, dense_importance, dtp, time_constant):
  """control/algorithm.py's `main_control`: layers [(mask, weight, importance, coeff)] (maskable), dense_importance
  the importance summed over the other leaves. Returns the new masks."""
  numerator, denominator, lists, kept_masks = dense_importance, time_constant, [], []
  for mask, weight, sqg, coeff in layers:
    active = mask.reshape(-1)
    w, s = np.abs(weight.reshape(-1)), sqg.reshape(-1)
    max_dec = int(dtp * active.sum())
    threshold = np.sort(w[active])[max_dec]
    keep = (w >= threshold) & active
    numerator += s[keep].sum()
    denominator += coeff * keep.sum()
    candidates = np.flatnonzero(~keep)
    order = candidates[np.argsort(-s[candidates], kind="stable")]
    lists.append([(s[i], i) for i in order])
    kept_masks.append(keep)
  heap = [(-lst[0][0] / layers[j][3], j, 0) for j, lst in enumerate(lists) if lst]
  heapq.heapify(heap)
  while heap:
    negative, j, pos = heap[0]
    if -negative > numerator / denominator:
      value, index = lists[j][pos]
      numerator += value
      denominator += layers[j][3]
      kept_masks[j][index] = True
      heapq.heapreplace(heap, (-lists[j][pos + 1][0] / layers[j][3], j, pos + 1)) if pos + 1 < len(lists[j]) \
          else heapq.heappop(heap)
    else:
      break
  return [k.reshape(m.shape) for k, (m, *_) in zip(kept_masks, layers)]


def reference_round(t, kernel, bias, mask, importance, clients):
  """One PruneFL round: clients [(x, y, n)]; importance [kernel, bias] summed since the last readjustment."""
  new_k, new_b, total = kernel.copy(), bias.copy(), sum(n for *_, n in clients)
  importance = [a.copy() for a in importance]
  for x, y, n in clients:
    w, b = kernel * mask, bias.copy()
    sum_w, sum_b = np.zeros_like(w), np.zeros_like(b)
    for _ in range(STEPS):
      g_w, g_b = softmax_grads(w * mask, b, x, y)
      sum_w, sum_b = sum_w + g_w, sum_b + g_b
      w, b = (w - LR * g_w) * mask, b - LR * g_b
    importance[0] += sum_w ** 2 * n / total  # the reference's (Σ g)^2 * n, over N (see the module of prunefl)
    importance[1] += sum_b ** 2 * n / total
    new_k += n / total * (w - kernel * mask)
    new_b += n / total * (b - bias)
  readjust = t > 0 and t % INTERVAL == 0
  if readjust:
    dtp = MAX_DEC * 0.5 ** (t / HALF_LIFE)
    (mask,) = reference_select([(mask, new_k, importance[0], 1.0)], importance[1].sum(), dtp, time_constant=1.0)
    importance = [np.zeros_like(a) for a in importance]
  return new_k, new_b, mask, importance, readjust


# ---- the tests ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(3)
  pairs = lambda: [(rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32),
                    rng.integers(0, CLASSES, SAMPLES).astype(np.int32)) for _ in range(K)]
  return fj.data.from_clients(pairs(), pairs(), num_classes=CLASSES)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=CLASSES, hidden=())


def client_data(data, cohort):
  out = []
  for k in cohort:
    offset, count = int(data.train.offset[k]), int(data.train.count[k])
    out.append((np.asarray(data.train.x[offset:offset + count], np.float64),
                np.asarray(data.train.y[offset:offset + count]), count))
  return out


def snapshot(state):
  kernel, bias = split(state.server.params)
  server = state.server.opt_state
  return (np.asarray(kernel, np.float64), np.asarray(bias, np.float64), np.asarray(split(server.mask)[0]),
          [np.asarray(a, np.float64) for a in split(server.importance)])


@pytest.fixture(scope="module")
def rounds(model, data):
  algo = fj.algorithms.get("prunefl", model=model, **HPARAMS)
  state = algo.init(jax.random.key(2), data)
  out = [(None, snapshot(state))]
  for _ in range(5):
    state, metrics = algo.round(state, data)
    out.append((metrics, snapshot(state)))
  return algo, out, state


@pytest.mark.parametrize("t", [0, 1, 2, 3, 4])
def test_round_equals_the_reference_round(rounds, data, t):
  # Rounds 2 and 4 readjust (interval 2), the others only aggregate and accumulate importance.
  _, out, _ = rounds
  kernel, bias, mask, importance = out[t][1]
  metrics, (kernel_after, bias_after, mask_after, importance_after) = out[t + 1]
  cohort = np.asarray(metrics["cohort"])
  want_k, want_b, want_mask, want_importance, readjust = reference_round(
      t, kernel, bias, mask, importance, client_data(data, cohort))
  np.testing.assert_array_equal(mask_after, want_mask)
  np.testing.assert_allclose(kernel_after, want_k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias_after, want_b, rtol=1e-5, atol=1e-6)
  for got, want in zip(importance_after, want_importance):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert readjust == (t in (2, 4))
  if t == 2:
    assert (mask_after != mask).any()  # the check sees a readjustment change the mask (round 4's keeps it)
  # Down: the global model's active values; up: the same, plus the dense importance in a readjustment round.
  active = int(mask.sum()) + CLASSES
  assert (np.asarray(metrics["values_down"]).sum(axis=1) == active).all()
  up = np.asarray(metrics["values_up"])  # [S, 2 messages, L]
  assert (up[:, 0].sum(axis=1) == active).all()
  assert (up[:, 1].sum(axis=1) == readjust * (FEATURES + 1) * CLASSES).all()


def test_selection_matches_the_reference_heap_across_layers():
  # Three layers of different costs, a time constant, random importance: the sort-based rule equals the heap.
  rng = np.random.default_rng(0)
  shapes, costs = [(4, 5), (3, 6), (2, 7)], [1.0, 2.5, 0.7]
  params = {f"l{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
  params["b"] = rng.normal(size=(5,)).astype(np.float32)
  mask = {k: (rng.random(v.shape) < 0.6) if v.ndim > 1 else np.ones(v.shape, bool) for k, v in params.items()}
  importance = {k: rng.exponential(size=v.shape).astype(np.float32) for k, v in params.items()}
  cost_tree = {"l0": costs[0], "l1": costs[1], "l2": costs[2], "b": 1.0}
  for dtp, time_constant in [(0.3, 5.0), (0.5, 0.0), (0.0, 20.0)]:
    got = select_by_importance_per_cost(mask, params, importance, dtp, cost_tree, time_constant)
    layers = [(mask[f"l{i}"].copy(), params[f"l{i}"].astype(np.float64), importance[f"l{i}"].astype(np.float64),
               costs[i]) for i in range(3)]
    want = reference_select(layers, float(importance["b"].astype(np.float64).sum()), dtp, time_constant)
    for i in range(3):
      np.testing.assert_array_equal(np.asarray(got[f"l{i}"]), want[i], err_msg=f"layer {i} at {dtp}, {time_constant}")
    np.testing.assert_array_equal(np.asarray(got["b"]), mask["b"])


def test_selection_by_hand():
  # One layer, cost 1, no time constant: active {0: |w| 3, 1: |w| 1}, importance [4, 1, 6, 0.5]; dtp 0.5 drops
  # one (entry 1). Kept: Q = 4, T = 1. Candidates by importance: 2 (6 > 4/1: take, Q 10, T 2), 1 (1 < 5: stop).
  params = {"k": np.array([[3.0, 1.0, 0.2, 0.1]], np.float32)}
  mask = {"k": np.array([[True, True, False, False]])}
  importance = {"k": np.array([[4.0, 1.0, 6.0, 0.5]], np.float32)}
  got = select_by_importance_per_cost(mask, params, importance, 0.5, {"k": 1.0}, 0.0)
  np.testing.assert_array_equal(got["k"], [[True, False, True, False]])
  # A time constant of 4: Q/T = 4/5; 6 > 0.8 (take: 10/6), 1 < 10/6: stop. The same mask; a constant of 40 makes
  # 1 > 10/42 and 0.5 > 11/43: everything.
  np.testing.assert_array_equal(select_by_importance_per_cost(mask, params, importance, 0.5, {"k": 1.0}, 4.0)["k"],
                                [[True, False, True, False]])
  np.testing.assert_array_equal(select_by_importance_per_cost(mask, params, importance, 0.5, {"k": 1.0}, 40.0)["k"],
                                [[True, True, True, True]])


def test_layer_costs_and_bad_hyperparameters(model):
  from fedspa_jax.algorithms.prunefl import layer_cost_tree

  params = {"Dense_0": {"kernel": np.zeros((6, 3)), "bias": np.zeros(3)}}
  assert layer_cost_tree(params, (2.0,), 0.5) == {"Dense_0": {"kernel": 2.5, "bias": 0.5}}
  with pytest.raises(ValueError, match="one cost per maskable leaf"):
    layer_cost_tree(params, (1.0, 2.0), 1.0)
  with pytest.raises(ValueError, match="readjust_interval"):
    fj.algorithms.get("prunefl", model=model, readjust_interval=0)
  with pytest.raises(ValueError, match="server_lr must be 1"):
    fj.algorithms.get("prunefl", model=model, server_lr=0.5)
  with pytest.raises(ValueError, match="max_decrease"):
    fj.algorithms.get("prunefl", model=model, max_decrease=1.5)
  with pytest.raises(ValueError, match="costs must be"):
    fj.algorithms.get("prunefl", model=model, comm_cost=0.0)


def test_flops_count_the_dense_gradient_of_every_step(rounds):
  # Softmax regression: forward 2 * 6 * 3 = 36 FLOPs per sample (a multiply and an add per kernel weight). Every
  # step runs the forward and the input gradient at the mask's density and the kernel's weight gradient dense:
  # per sample 2 * 36 * density + 36, for 4 clients x 2 steps x 8 samples.
  _, out, _ = rounds
  for t in (0, 3):  # round 0: the dense mask; round 3: the mask readjusted after round 2
    metrics, _ = out[t + 1]
    density = out[t][1][2].mean()
    assert t == 0 or density < 1
    assert math.isclose(float(metrics["flops"]), 4 * STEPS * SAMPLES * (2 * 36 * density + 36), rel_tol=1e-6)
    # The dense equivalent: 3 x 36 per sample.
    assert math.isclose(float(metrics["flops_dense"]), 4 * STEPS * SAMPLES * 3 * 36, rel_tol=1e-6)


def test_bytes_follow_the_mask(rounds):
  # Round 3 (after the readjustment of round 2) sends sparse messages only; round 4 adds the dense importance.
  _, out, state = rounds
  kernel_size = FEATURES * CLASSES
  active = int(out[3][1][2].sum())
  sparse = 4 * (active + CLASSES) + min(-(-kernel_size // 8), active)  # values + the kernel's mask
  dense = 4 * (kernel_size + CLASSES)  # no mask
  for t, extra in ((3, 0), (4, dense)):
    sent = accounting.round_bytes(state.server.params, out[t + 1][0])
    assert sent["bytes_down"] == 4 * sparse
    assert sent["bytes_up"] == 4 * (sparse + extra)


def test_sharded_round_equals_one_device(model, data):
  from fedspa_jax.round import make_client_mesh

  one = fj.algorithms.get("prunefl", model=model, **HPARAMS)
  four = fj.algorithms.get("prunefl", model=model, mesh=make_client_mesh(jax.devices()[:4]), **HPARAMS)
  placed, on_device = four.place(data), one.place(data)
  a, b = one.init(jax.random.key(6), on_device), four.init(jax.random.key(6), placed)
  for _ in range(3):
    a, _ = one.round(a, on_device)
    b, _ = four.round(b, placed)
  close = lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
  jax.tree.map(close, a.server.params, b.server.params)
  jax.tree.map(np.testing.assert_array_equal, a.server.opt_state.mask, b.server.opt_state.mask)


def reference_initial_pruning(kernel, bias, x, y, max_rounds, interval):
  """adaptive.py's `initial_pruning` on one full batch: evaluate every 10 rounds, readjust every `interval` rounds
  from the first evaluation at accuracy >= 1.5 / classes, stop after 5 readjustments in a row within 10% density."""
  mask, importance = np.ones(kernel.shape, bool), [np.zeros_like(kernel), np.zeros_like(bias)]
  start, previous, stable = None, None, []
  for i in range(1, max_rounds + 1):
    if (i - 1) % 10 == 0 and start is None:
      accuracy = np.mean(np.argmax(x @ (kernel * mask) + bias, axis=1) == y)
      if accuracy >= 1.5 / CLASSES:
        start = i
    g_w, g_b = softmax_grads(kernel * mask, bias, x, y)
    importance = [importance[0] + g_w ** 2, importance[1] + g_b ** 2]
    kernel, bias = (kernel - LR * g_w) * mask, bias - LR * g_b
    if start is not None and (i - start) % interval == 0:
      (mask,) = reference_select([(mask, kernel, importance[0], 1.0)], importance[1].sum(), MAX_DEC, 1.0)
      importance = [np.zeros_like(kernel), np.zeros_like(bias)]
      density = (mask.sum() + bias.size) / (mask.size + bias.size)
      if previous is not None:
        stable.append(abs(density / previous - 1) <= 0.1)
      previous = density
      if len(stable) >= 5 and all(stable[-5:]):
        break
  return kernel * mask, bias, mask, start


@pytest.mark.parametrize("max_rounds, seed", [(12, 9), (40, 4), (40, 9)])
def test_initial_pruning_equals_the_reference(model, data, max_rounds, seed):
  # One full batch of client 0 (8 samples) per round, so the batch order does not matter; 12 rounds stop mid-way,
  # 40 run until the density settles. Init 4 scores 0.5 on the batch at round 1 (readjustments start at once),
  # init 9 scores 0.375 (below 1.5 / 3: they start at round 11).
  hparams = dict(HPARAMS, initial_pruning_rounds=max_rounds, initial_pruning_batches=1)
  dense = fj.algorithms.get("prunefl", model=model, **HPARAMS).init(jax.random.key(seed), data)
  state = fj.algorithms.get("prunefl", model=model, **hparams).init(jax.random.key(seed), data)
  kernel, bias, _, _ = snapshot(dense)
  x, y, _ = client_data(data, [0])[0]
  want_kernel, want_bias, want_mask, start = reference_initial_pruning(kernel, bias, x, y, max_rounds, INTERVAL)
  assert start is not None  # readjustments happened
  got_kernel, got_bias, got_mask, _ = snapshot(state)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert not want_mask.all()
  np.testing.assert_allclose(got_kernel * got_mask, want_kernel, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_bias, want_bias, rtol=1e-4, atol=1e-5)


def test_initial_pruning_needs_enough_data_on_the_host(model, data):
  algo = fj.algorithms.get("prunefl", model=model, **dict(HPARAMS, initial_pruning_rounds=5, initial_pruning_batches=2))
  with pytest.raises(ValueError, match="needs 16 samples on client 0"):
    algo.init(jax.random.key(0), data)
