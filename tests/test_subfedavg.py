"""Sub-FedAvg (unstructured) as its reference code runs it: the prune-or-revert rule, the aggregation, the
evaluation with each client's own kept network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.algorithms.subfedavg import decide_pruning, mask_distance, percentile_prune, pruned_share


def kernel_and_bias(kernel, bias_size=2):
  return {"k": jnp.asarray(kernel, jnp.float32), "b": jnp.ones((bias_size,), jnp.float32)}


def decide(mask, early, late, accuracy, **overrides):
  kwargs = dict(rate=0.1, density=0.5, distance_threshold=1e-4, accuracy_threshold=0.5)
  kwargs.update(overrides)
  return decide_pruning(mask, early, late, lambda params: jnp.float32(accuracy), **kwargs)


# Late weights: |w| = 1..10 in a 2x5 kernel; the candidate drops ceil(0.1 * (10 - 1)) = 1 weight, the smallest.
LATE = kernel_and_bias(np.arange(1.0, 11.0).reshape(2, 5) * np.array([1, -1, 1, -1, 1]))
DENSE = fj.masks.dense_mask(LATE)
# Early weights whose smallest magnitude sits elsewhere (entry 9): the two candidates differ in 2 of 10 entries.
EARLY = kernel_and_bias(np.array([[5.0, 2, 3, 4, 6], [7, 8, 9, 10, 0.5]]))


def test_candidates_drop_below_the_percentile_as_numpy_does():
  # The reference: fake_prune in MMorafah/Sub-FedAvg's src/pruning/unstructured.py (at ffeb3c7) takes
  # np.percentile(abs(alive), percent) of the active weights and sets the mask to 0 where abs(weight) is below it.
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(40, 25)).astype(np.float32)
  mask = rng.random((40, 25)) < 0.7
  for rate in (0.05, 0.1, 0.37):
    got = np.asarray(percentile_prune({"k": jnp.asarray(mask)}, {"k": jnp.asarray(weights)}, rate)["k"])
    alive = np.abs(weights[mask])
    expected = np.where(np.abs(weights) < np.percentile(alive, 100 * rate), False, mask)
    np.testing.assert_array_equal(got, expected)


def test_no_pruning_when_early_and_late_candidates_agree():
  out = decide(DENSE, LATE, LATE, accuracy=1.0)
  assert float(out.distance) == 0.0 and not bool(out.tried) and not bool(out.kept)
  np.testing.assert_array_equal(out.mask["k"], DENSE["k"])
  np.testing.assert_array_equal(out.params["k"], LATE["k"])


def test_prune_and_keep_when_accurate_enough():
  out = decide(DENSE, EARLY, LATE, accuracy=0.8)
  assert float(out.distance) == pytest.approx(0.2)  # one kernel, 2 of 10 entries differ
  assert bool(out.tried) and bool(out.kept)
  expected = np.ones((2, 5), bool)
  expected[0, 0] = False  # |w| = 1, the smallest late weight
  np.testing.assert_array_equal(out.mask["k"], expected)
  np.testing.assert_array_equal(out.params["k"], np.where(expected, LATE["k"], 0.0))  # pruned weights zeroed
  np.testing.assert_array_equal(out.mask["b"], [True, True])  # biases are never pruned


def test_revert_when_the_pruned_network_is_not_accurate_enough():
  out = decide(DENSE, EARLY, LATE, accuracy=0.5)  # the threshold must be exceeded, not met
  assert bool(out.tried) and not bool(out.kept)
  np.testing.assert_array_equal(out.mask["k"], DENSE["k"])
  np.testing.assert_array_equal(out.params["k"], LATE["k"])  # the trained, unpruned network


def test_no_pruning_once_the_global_target_is_reached():
  mask = {"k": jnp.asarray(np.arange(10).reshape(2, 5) >= 6), "b": jnp.ones((2,), bool)}  # 6 of 12 pruned
  assert float(pruned_share(mask)) == pytest.approx(0.5)
  out = decide(mask, EARLY, LATE, accuracy=1.0, density=0.5)
  assert float(out.distance) > 0 and not bool(out.tried)
  np.testing.assert_array_equal(out.mask["k"], mask["k"])


@pytest.mark.parametrize("density, dropped", [(0.6, 3), (0.62, 2), (0.3, 6)])
def test_the_step_shrinks_near_the_target(density, dropped):
  # 100-entry kernel with 40 pruned, 10 biases: 40 / 110 of all parameters pruned.
  rng = np.random.default_rng(1)
  k = np.where(np.arange(100).reshape(10, 10) < 40, 0.0, rng.permutation(np.arange(1.0, 101.0))[:100].reshape(10, 10))
  late = kernel_and_bias(k, bias_size=10)
  mask = {"k": jnp.asarray(k != 0), "b": jnp.ones((10,), bool)}
  early = kernel_and_bias(k[::-1], bias_size=10)
  # density 0.6: gap 0.4 - 40/110 < rate 0.1, step min(gap / (70/110), 0.05) = 0.05 -> ceil(0.05 * 59) = 3 dropped.
  # density 0.62: step gap / (70/110) = 0.0257 -> ceil(1.52) = 2.  density 0.3: far away, rate 0.1 -> ceil(5.9) = 6.
  out = decide(mask, {**early, "k": jnp.where(mask["k"], early["k"], 0.0)}, late, accuracy=1.0, density=density)
  assert bool(out.kept)
  assert int(mask["k"].sum()) - int(out.mask["k"].sum()) == dropped
  dropped_weights = np.abs(np.asarray(late["k"]))[np.asarray(mask["k"] & ~out.mask["k"])]
  np.testing.assert_array_equal(np.sort(dropped_weights), np.sort(np.abs(k[k != 0]))[:dropped])


def test_mask_distance_averages_over_kernels():
  a = {"k1": jnp.zeros((2, 2), bool), "k2": jnp.zeros((4, 5), bool), "b": jnp.ones((3,), bool)}
  b = {"k1": jnp.array([[True, False], [False, False]]), "k2": jnp.zeros((4, 5), bool), "b": jnp.zeros((3,), bool)}
  assert float(mask_distance(a, b)) == pytest.approx((1 / 4 + 0) / 2)  # biases do not count


COHORT = 4


@pytest.fixture(scope="module")
def data():
  return jax.device_put(fj.data.synthetic(1.0, 1.0, num_clients=10, seed=0))


@pytest.fixture(scope="module")
def one_round(data):
  model = fj.models.get("mlp", num_classes=10, hidden=(16,))
  # Thresholds at 0 so that every sampled client with any mask change prunes in the first round.
  algo = fj.algorithms.get("subfedavg", model=model, clients_per_round=COHORT, local_epochs=2, lr=0.05,
                           distance_threshold=0.0, accuracy_threshold=0.0, prune_rate=0.2)
  state0 = algo.init(jax.random.key(0), data)
  state1, metrics = algo.round(jax.tree.map(jax.numpy.copy, state0), data)
  return model, algo, state0, state1, metrics, algo.client_states(state1, data)


def test_uniform_weighting_by_default(one_round):
  _, algo, _, _, metrics, _ = one_round
  assert algo.hparams["weighting"] == "uniform"
  np.testing.assert_array_equal(metrics["weight"], np.ones(COHORT))


def test_server_averages_the_kept_networks_over_their_new_masks(one_round):
  _, _, state0, state1, metrics, clients1 = one_round
  cohort = np.asarray(metrics["cohort"])
  assert int(np.sum(metrics["pruned"])) > 0
  w0, w1 = state0.server.params, state1.server.params
  for layer in w0:  # the MLP's layers
    for leaf in ("kernel", "bias"):
      v = np.asarray(clients1.params[layer][leaf])[cohort]  # the uploaded networks
      m = np.asarray(clients1.mask[layer][leaf])[cohort]  # their new masks
      np.testing.assert_array_equal(v[~m], 0.0)  # pruned weights are zero
      count = m.sum(axis=0)
      expected = np.where(count > 0, v.sum(axis=0) / np.maximum(count, 1), np.asarray(w0[layer][leaf]))
      np.testing.assert_allclose(np.asarray(w1[layer][leaf]), expected, rtol=1e-5, atol=1e-6)


def test_clients_keep_their_own_network_and_are_evaluated_with_it(one_round, data):
  model, algo, state0, state1, metrics, clients1 = one_round
  cohort = set(np.asarray(metrics["cohort"]).tolist())
  absent = [k for k in range(10) if k not in cohort]
  for k in absent:  # never sampled: the initial network, dense
    for a, b in zip(jax.tree.leaves(clients1.params), jax.tree.leaves(state0.server.params)):
      np.testing.assert_array_equal(np.asarray(a)[k], np.asarray(b))
  ev = algo.evaluate(state1, data)
  for k in range(10):
    own = jax.tree.map(lambda a: a[k], clients1.params)
    x, y = jax.device_get(data.test).client(k)
    logits = model.apply({"params": own}, x)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    assert float(ev["accuracy"][k]) == pytest.approx(accuracy, abs=1e-6)


def test_bytes_follow_the_masks(one_round):
  _, _, state0, state1, metrics, clients1 = one_round
  cohort = np.asarray(metrics["cohort"])
  leaves = jax.tree.leaves(state0.server.params)
  dense = fj.accounting.dense_bytes(state0.server.params)
  sent = fj.accounting.round_bytes(state0.server.params, metrics)
  assert sent["bytes_down"] == COHORT * dense  # every mask is dense in round 1
  up = 0
  for k in cohort:
    for m, p in zip(jax.tree.leaves(jax.tree.map(lambda a: a[k], clients1.mask)), leaves):
      active = int(np.sum(m))
      up += 4 * active + fj.accounting.mask_bytes(p.size, active)
  assert sent["bytes_up"] == up < COHORT * dense
