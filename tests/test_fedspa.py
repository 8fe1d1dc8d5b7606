"""FedSpa end to end: it learns, it evaluates per client, and bad input fails before compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj


def copy(tree):
  """A copy for a round to consume (rounds donate their state argument)."""
  return jax.tree.map(jax.numpy.copy, tree)


@pytest.fixture(scope="module")
def data():
  return jax.device_put(fj.data.synthetic(1.0, 1.0, num_clients=30, seed=0))


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=10, hidden=(32,))


@pytest.fixture(scope="module")
def trained(model, data):
  algo = fj.algorithms.get(
      "fedspa", model=model, density=0.5, clients_per_round=10, local_epochs=1, batch_size=32, lr=0.05, rounds=30
  )
  state = algo.init(jax.random.key(0), data)
  first = algo.evaluate(state, data)
  history = []
  for _ in range(30):
    state, metrics = algo.round(state, data)
    history.append(metrics)
  return algo, state, first, algo.evaluate(state, data), history


def test_fedspa_learns_on_synthetic(trained):
  _, _, first, last, _ = trained
  # 10 classes: chance is 0.1.
  assert float(first["accuracy_summary"]["mean"]) < 0.3
  assert float(last["accuracy_summary"]["mean"]) > 0.45


def test_evaluation_is_per_client_with_distribution(trained, data):
  _, _, _, ev, _ = trained
  assert ev["accuracy"].shape == (30,) and ev["loss"].shape == (30,)
  np.testing.assert_array_equal(ev["count"], data.test.count)
  summary = ev["accuracy_summary"]
  assert set(summary) == {"mean", "std", "p10", "median", "p90", "worst10"}
  acc = np.asarray(ev["accuracy"])
  np.testing.assert_allclose(summary["mean"], acc.mean(), rtol=1e-6)
  np.testing.assert_allclose(summary["p10"], np.percentile(acc, 10), rtol=1e-6)
  np.testing.assert_allclose(summary["worst10"], np.sort(acc)[:3].mean(), rtol=1e-6)


def test_round_metrics(trained, model, data):
  algo, state, _, _, history = trained
  assert int(state.round) == 30
  m = history[0]
  assert m["cohort"].shape == (10,) and m["loss"].shape == (10,)
  # FedSpa's default weighting is uniform: its objective is (1/K) sum_k f_k.
  assert algo.hparams["weighting"] == "uniform"
  np.testing.assert_array_equal(m["weight"], np.ones(10))
  assert float(history[0]["prune_rate"]) == pytest.approx(0.5)
  assert float(history[-1]["prune_rate"]) < 0.01
  params = state.server.params
  # By hand, for the MLP 60 -> 32 -> 10: ERK at 0.5 over kernels of 1920 and 320 entries (raw (60 + 32) / 1920 and
  # (32 + 10) / 320) would give the head 0.5 * 2240 / 134 * 42 / 320 > 1, so the head is dense and the first kernel
  # keeps 0.5 * 2240 - 320 = 800 weights. A message: 800 + 32 + 320 + 10 values of 4 bytes, plus the first kernel's
  # mask as a 240-byte bitmap (cheaper than 800 two-byte indices); the dense model is 2282 values.
  message = (800 + 32 + 320 + 10) * 4 + 240
  assert message == 4888 < 2282 * 4
  assert m["values_up"].shape == (10, len(jax.tree.leaves(params))) and m["values_up"].dtype == jnp.int32
  assert fj.accounting.round_bytes(params, m) == {"bytes_down": 10 * message, "bytes_up": 10 * message}


def test_sample_weighting_is_an_option(model, data):
  algo = fj.algorithms.get("fedspa", model=model, weighting="samples", clients_per_round=5, local_steps=1,
                           local_epochs=None)
  assert algo.hparams["weighting"] == "samples"
  _, m = algo.round(algo.init(jax.random.key(0), data), data)
  np.testing.assert_array_equal(m["weight"], np.asarray(data.train.count)[np.asarray(m["cohort"])])


@pytest.fixture(scope="module")
def past_t_end(model, data):
  """Rounds 0 (prune rate alpha) and 1 (= t_end: rate 0) of a FedSpa run with t_end=1."""
  algo = fj.algorithms.get("fedspa", model=model, clients_per_round=5, local_steps=2, local_epochs=None, t_end=1,
                           rounds=4, batch_size=16)
  state0 = algo.init(jax.random.key(3), data)
  state1, before = algo.round(copy(state0), data)
  state2, after = algo.round(copy(state1), data)
  return algo, state0, state1, state2, before, after


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (scan, while, cond, pjit, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_no_regrowth_gradient_after_t_end(past_t_end, data):
  algo, state0, state1, state2, before, after = past_t_end
  assert float(before["prune_rate"]) == pytest.approx(0.5) and float(after["prune_rate"]) == 0.0
  assert int(fj.masks.hamming_distance(state2.clients, state1.clients)) == 0  # no mask changes at rate 0
  assert int(fj.masks.hamming_distance(state1.clients, state0.clients)) > 0
  # The mask update, regrowth gradient included, sits in a real branch (a cond the vmapped cohort did not turn into
  # a select of both sides): one branch computes the gradient (matmuls), the other does nothing.
  jaxpr = jax.make_jaxpr(algo.round_fn)(state0, data).jaxpr
  conds = [e for e in _eqns(jaxpr) if e.primitive.name == "cond"]
  matmuls = lambda branch: sum(e.primitive.name == "dot_general" for e in _eqns(branch.jaxpr))
  assert any(sorted(matmuls(b) for b in e.params["branches"])[0] == 0 < max(matmuls(b) for b in e.params["branches"])
             for e in conds)


def test_flops_drop_after_t_end(past_t_end, model, data):
  algo, state0, _, _, before, after = past_t_end
  # By hand: forward FLOPs per sample 2 x 60 x 32 + 2 x 32 x 10 = 4480 dense; with 800 of 1920 first-kernel weights
  # active (and the head dense, see test_round_metrics) 3840 x 800 / 1920 + 640 = 2240. Training costs 3 x 2240 per
  # sample; each client's regrowth gradient on a batch of 16 costs 16 x (2 x 2240 + 4480) (RigL's accounting).
  per_sample, regrow = 3 * 2240, 16 * (2 * 2240 + 4480)
  for m, regrowth in ((before, 5 * regrow), (after, 0.0)):
    samples = int(np.sum(m["samples"]))
    assert float(m["flops"]) == pytest.approx(per_sample * samples + regrowth, rel=1e-6)
    assert float(m["flops_dense"]) == pytest.approx(3 * 4480 * samples, rel=1e-6)
  assert float(after["flops"]) / int(np.sum(after["samples"])) < float(before["flops"]) / int(np.sum(before["samples"]))


@pytest.mark.parametrize(
    "hparams, match",
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(alpha=1.2), "alpha"),
        (dict(alpha=-0.5), "alpha"),
        (dict(clients_per_round=0), "clients_per_round"),
        (dict(batch_size=0), "batch_size"),
        (dict(local_epochs=0), "local_epochs"),
        (dict(lr=-1.0), "lr"),
        (dict(regrow="magic"), "regrow"),
        (dict(aggregation="median"), "aggregation"),
        (dict(density_rule="foo"), "density_rule"),
        (dict(bogus=1), "unknown hyperparameters"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(model, hparams, match):
  with pytest.raises(ValueError, match=match):
    fj.algorithms.get("fedspa", model=model, **hparams)


def test_unknown_algorithm(model):
  with pytest.raises(ValueError, match="known algorithms: .*fedspa"):
    fj.algorithms.get("fedsparse", model=model)


def test_more_clients_per_round_than_clients(model, data):
  algo = fj.algorithms.get("fedspa", model=model, clients_per_round=31)
  with pytest.raises(ValueError, match=r"clients_per_round must be an integer in \[1, 30\]"):
    algo.init(jax.random.key(0), data)


def test_model_and_data_that_do_not_fit(data):
  wrong_classes = fj.models.get("mlp", num_classes=5)
  algo = fj.algorithms.get("fedspa", model=wrong_classes)
  with pytest.raises(ValueError, match="5.*10 classes|10 classes"):
    algo.init(jax.random.key(0), data)


def test_image_model_on_vector_data_is_rejected_before_compiling(data):
  algo = fj.algorithms.get("fedspa", model=fj.models.get("lenet5", num_classes=10))
  with pytest.raises(ValueError, match=r"does not accept inputs of shape \(60,\)"):
    algo.init(jax.random.key(0), data)


def test_data_with_another_client_count_is_rejected_before_compiling(trained):
  algo, state, _, _, _ = trained
  other = fj.data.synthetic(1.0, 1.0, num_clients=20, seed=0)
  with pytest.raises(ValueError, match="state holds 30 clients but data has 20"):
    algo.round(state, other)


def test_fixed_masks_ablation_keeps_masks(model, data):
  algo = fj.algorithms.get("fedspa", model=model, update_masks=False, clients_per_round=5, local_steps=2,
                           local_epochs=None)
  state = algo.init(jax.random.key(1), data)
  new, _ = algo.round(copy(state), data)
  assert int(fj.masks.hamming_distance(algo.client_states(new, data), algo.client_states(state, data))) == 0


def test_shared_initial_mask(model, data):
  algo = fj.algorithms.get("fedspa", model=model, shared_init_mask=True)
  state = algo.init(jax.random.key(1), data)
  assert int(jnp.max(fj.masks.pairwise_hamming(algo.client_states(state, data)))) == 0
