"""Every registered algorithm in the same engine: it learns, it keeps absent clients' state, it traces once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting


def copy(tree):
  """A copy for a round to consume (rounds donate their state argument)."""
  return jax.tree.map(jax.numpy.copy, tree)

NUM_CLIENTS, COHORT, ROUNDS = 30, 10, 30


@pytest.fixture(scope="module")
def data():
  return jax.device_put(fj.data.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, seed=0))


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=10, hidden=(32,))


@pytest.fixture(scope="module", params=fj.algorithms.names())
def run(request, model, data):
  algo = fj.algorithms.get(request.param, model=model, clients_per_round=COHORT, lr=0.05, rounds=ROUNDS)
  state0 = algo.init(jax.random.key(0), data)
  state1, first_metrics = algo.round(copy(state0), data)
  state = copy(state1)
  history = [first_metrics]
  for _ in range(ROUNDS - 1):
    state, metrics = algo.round(state, data)
    history.append(metrics)
  return algo, state0, state1, state, history, algo.evaluate(state, data)


def test_learns_on_synthetic(run):
  algo, *_, ev = run
  # 10 classes: chance is 0.1.
  assert float(ev["accuracy_summary"]["mean"]) > 0.4, algo.name


def test_absent_clients_keep_their_state(run):
  algo, state0, state1, _, history, _ = run
  cohort = set(np.asarray(history[0]["cohort"]).tolist())
  assert len(cohort) == COHORT
  absent = [k for k in range(NUM_CLIENTS) if k not in cohort]
  chex.assert_trees_all_equal(
      jax.tree.map(lambda a: a[np.array(absent)], state0.clients),
      jax.tree.map(lambda a: a[np.array(absent)], state1.clients),
  )


def test_round_traces_once(run):
  algo, *_ = run
  assert algo.round._cache_size() == 1, algo.name


def total_bytes(state, metrics):
  sent = accounting.round_bytes(state.server.params, metrics)
  return sent["bytes_up"] + sent["bytes_down"]


def test_reports_accounting(run):
  algo, _, _, state, history, _ = run
  leaves = len(jax.tree.leaves(state.server.params))
  for key in ("values_up", "values_down", "client_state_bytes", "loss"):
    assert key in history[-1], (algo.name, key)
  for key in ("values_up", "values_down"):  # int32 counts per client and leaf; bytes come on the host
    # DisPFL's clients each receive their 3 neighbours' models (10% of the 30 clients): one count per message.
    # PruneFL's clients send two messages: their values under the mask and, in a readjustment round, the importance.
    shape = {("dispfl", "values_down"): (COHORT, 3, leaves),
             ("prunefl", "values_up"): (COHORT, 2, leaves)}.get((algo.name, key), (COHORT, leaves))
    assert history[-1][key].shape == shape and history[-1][key].dtype == np.int32, (algo.name, key)
  assert history[-1]["client_state_bytes"].shape == (leaves,)
  assert all(np.isfinite(np.asarray(m["loss"])).all() for m in history)


# The default client weighting of each method (docs/algorithms.md says where each paper stands).
WEIGHTING = {
    "fedavg": "samples", "fedavg_ft": "samples", "ditto": "samples", "fedper": "samples",
    "fedrep": "uniform", "subfedavg": "uniform", "local": "uniform", "dispfl": "uniform", "feddst": "samples", "prunefl": "samples",
    **{name: "uniform" for name in fj.algorithms.names() if name.startswith("fedspa")},
}


def test_default_weighting_is_explicit_and_recorded(run, data):
  algo, _, _, _, history, _ = run
  assert algo.hparams["weighting"] == WEIGHTING[algo.name]
  counts = np.asarray(data.train.count)[np.asarray(history[0]["cohort"])]
  expected = counts if WEIGHTING[algo.name] == "samples" else np.ones(COHORT)
  np.testing.assert_array_equal(history[0]["weight"], expected)


def test_every_algorithm_has_a_weighting_default():
  assert set(WEIGHTING) == set(fj.algorithms.names())


def test_fedavg_bytes_are_two_models_per_client(model, data):
  algo = fj.algorithms.get("fedavg", model=model, clients_per_round=COHORT, local_steps=1, local_epochs=None)
  state = algo.init(jax.random.key(0), data)
  _, metrics = algo.round(copy(state), data)
  model_bytes = accounting.dense_bytes(state.server.params)
  assert model_bytes == 4 * (60 * 32 + 32 + 32 * 10 + 10)
  assert total_bytes(state, metrics) == 2 * model_bytes * COHORT


@pytest.mark.parametrize("run", ["local"], indirect=True)
def test_local_sends_nothing_and_never_moves_the_global_model(run):
  _, state0, _, state, history, _ = run
  assert all(total_bytes(state, m) == 0 for m in history)
  chex.assert_trees_all_equal(state.server.params, state0.server.params)


SPARSE = [name for name in fj.algorithms.names() if name.startswith("fedspa") or name == "subfedavg"]


@pytest.mark.parametrize("run", SPARSE, indirect=True)
def test_sparse_methods_send_fewer_bytes_than_fedavg(run):
  algo, state0, _, state, history, _ = run
  dense = 2 * accounting.dense_bytes(state0.server.params) * COHORT
  first, last = total_bytes(state, history[0]), total_bytes(state, history[-1])
  if algo.name == "subfedavg":  # starts dense and only prunes
    assert accounting.round_bytes(state0.server.params, history[0])["bytes_down"] == dense // 2
    assert last < dense
  else:
    assert first == last < 0.75 * dense  # density 0.5 plus masks and dense biases


def test_algorithm_specific_errors(model):
  with pytest.raises(ValueError, match="ditto_lambda"):
    fj.algorithms.get("ditto", model=model, ditto_lambda=-1.0)
  with pytest.raises(ValueError, match="head_epochs"):
    fj.algorithms.get("fedrep", model=model, head_epochs=0)
  with pytest.raises(ValueError, match="finetune_epochs"):
    fj.algorithms.get("fedavg_ft", model=model, finetune_epochs=0)
  with pytest.raises(ValueError, match="prune_rate"):
    fj.algorithms.get("subfedavg", model=model, prune_rate=2.0)
  with pytest.raises(ValueError, match="distance_threshold"):
    fj.algorithms.get("subfedavg", model=model, distance_threshold=-1.0)
  with pytest.raises(ValueError, match="weighting"):
    fj.algorithms.get("fedavg", model=model, weighting="by_size")
  with pytest.raises(ValueError, match="unknown hyperparameters for 'fedavg': density"):
    fj.algorithms.get("fedavg", model=model, density=0.5)


def test_fedavg_flops_are_three_forward_passes_per_sample(model, data):
  algo = fj.algorithms.get("fedavg", model=model, clients_per_round=COHORT, local_steps=2, local_epochs=None)
  state = algo.init(jax.random.key(0), data)
  _, metrics = algo.round(copy(state), data)
  forward = 2 * (60 * 32 + 32 * 10)  # the MLP's two dense layers, per sample
  samples = int(np.sum(metrics["samples"]))
  assert float(metrics["flops"]) == pytest.approx(3 * forward * samples)
  assert float(metrics["flops_dense"]) == float(metrics["flops"])


@pytest.mark.parametrize("run,second", [("ditto", "global_samples"), ("fedrep", "head_samples")], indirect=["run"])
def test_methods_that_train_twice_count_both_passes(run, second):
  # docs/algorithms.md: "Ditto counts both of its trainings, FedRep its head epochs (full passes)": 3 x the MLP's
  # forward per sample of either pass.
  *_, history, _ = run
  m = history[-1]
  forward = 2 * (60 * 32 + 32 * 10)
  first, other = int(np.sum(m["samples"])), int(np.sum(m[second]))
  assert first > 0 and other > 0
  assert float(m["flops"]) == pytest.approx(3 * forward * (first + other))


@pytest.mark.parametrize("run", SPARSE, indirect=True)
def test_sparse_methods_train_with_fewer_flops(run):
  algo, _, _, _, history, _ = run
  m = history[-1]
  assert 0 < float(m["flops"]) < float(m["flops_dense"]), algo.name
