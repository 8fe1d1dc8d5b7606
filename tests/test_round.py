"""The round as one computation: vmapped equals a loop, permutation and padding invariance, one trace, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedspa_jax as fj
from fedspa_jax import masks
from fedspa_jax.algorithms.base import make_apply_fn
from fedspa_jax.algorithms.fedspa import make_client_update
from fedspa_jax.client import ClientData
from fedspa_jax.round import client_keys, gather_clients, make_client_mesh, run_cohort

NUM_CLIENTS = 12
HPARAMS = dict(density=0.4, clients_per_round=5, local_epochs=None, local_steps=6, batch_size=8, lr=0.05, rounds=10)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def data():
  return fj.data.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, max_samples_per_client=60, seed=1)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=10, hidden=(16,))


@pytest.fixture(scope="module")
def algo(model):
  return fj.algorithms.get("fedspa", model=model, **HPARAMS)


@pytest.fixture(scope="module")
def state0(algo, data):
  return algo.init(jax.random.key(0), data)


@pytest.fixture(scope="module")
def client_fn(model):
  return make_client_update(
      apply_fn=make_apply_fn(model), preprocess=lambda x: x, alpha=0.5, t_end=10, regrow="gradient",
      update_masks=True,
      train_kwargs=dict(optimizer=optax.sgd(0.05), batch_size=8, local_epochs=None, local_steps=6),
  )


def cohort_inputs(state, data, cohort):
  cohort = jnp.asarray(cohort, jnp.int32)
  cohort_data = gather_clients(ClientData(data.train.x, data.train.y, data.train.count), cohort)
  weights = cohort_data.count.astype(jnp.float32)
  keys = client_keys(jax.random.key(9), cohort)
  return gather_clients(state.clients, cohort), cohort_data, weights, keys


@pytest.fixture(scope="module")
def run(client_fn):
  def go(state, cohort_state, cohort_data, weights, keys, aggregation):
    return run_cohort(
        client_fn, state.server, cohort_state, cohort_data, weights, keys, jnp.int32(2), aggregation=aggregation,
        server_optimizer=optax.sgd(1.0),
    )

  return jax.jit(go, static_argnames="aggregation")


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
def test_vmapped_cohort_equals_python_loop(client_fn, run, state0, data, aggregation):
  cohort = [3, 0, 7, 11]
  cohort_state, cohort_data, weights, keys = cohort_inputs(state0, data, cohort)
  server, new_states, metrics = run(state0, cohort_state, cohort_data, weights, keys, aggregation)

  w = state0.server.params
  one_client = jax.jit(client_fn)
  outs = [
      one_client(w, jax.tree.map(lambda a: a[i], cohort_state), jax.tree.map(lambda a: a[i], cohort_data), keys[i],
                jnp.int32(2))
      for i in range(len(cohort))
  ]
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(w)[0]:
    get = lambda tree: np.asarray(jax.tree_util.tree_flatten_with_path(tree)[0][
        [p for p, _ in jax.tree_util.tree_flatten_with_path(w)[0]].index(path)][1])
    num, den = np.zeros(leaf.shape), np.zeros(leaf.shape)
    for out, weight in zip(outs, np.asarray(weights)):
      cover = get(out.coverage) if aggregation == "masked_mean" else np.ones(leaf.shape, bool)
      num += np.where(cover, weight * get(out.update), 0.0)
      den += np.where(cover, weight, 0.0)
    delta = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    expected[jax.tree_util.keystr(path)] = np.asarray(leaf) - delta
  for path, leaf in jax.tree_util.tree_flatten_with_path(server.params)[0]:
    np.testing.assert_allclose(leaf, expected[jax.tree_util.keystr(path)], rtol=1e-5, atol=1e-6)
  for i, out in enumerate(outs):
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], new_states), out.state)
    np.testing.assert_allclose(metrics["loss"][i], out.metrics["loss"], rtol=1e-5)


def test_permuting_the_cohort_changes_nothing(run, state0, data):
  cohort = [3, 0, 7, 11]
  perm = [2, 0, 3, 1]
  a_server, a_states, _ = run(state0, *cohort_inputs(state0, data, cohort), "mean")
  b_server, b_states, _ = run(state0, *cohort_inputs(state0, data, [cohort[i] for i in perm]), "mean")
  assert_trees_close(a_server.params, b_server.params)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[np.array(perm)], a_states), b_states)


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
def test_weight_zero_padding_client_changes_nothing(run, state0, data, aggregation):
  cohort_state, cohort_data, weights, keys = cohort_inputs(state0, data, [3, 0, 7, 11])
  pad_state, pad_data, _, pad_keys = cohort_inputs(state0, data, [3, 0, 7, 11, 5])
  pad_weights = jnp.concatenate([weights, jnp.zeros((1,))])
  a_server, _, _ = run(state0, cohort_state, cohort_data, weights, keys, aggregation)
  b_server, _, _ = run(state0, pad_state, pad_data, pad_weights, pad_keys, aggregation)
  assert_trees_close(a_server.params, b_server.params)


def test_round_traces_once_and_keeps_unsampled_clients(algo, state0, data):
  counted = jax.jit(chex.assert_max_traces(algo.round_fn, n=1))
  state = state0
  for _ in range(3):
    before = state.clients
    state, metrics = counted(state, data)
    sampled = set(np.asarray(metrics["cohort"]).tolist())
    assert len(sampled) == HPARAMS["clients_per_round"]
    for k in range(NUM_CLIENTS):
      if k not in sampled:
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[k], before), jax.tree.map(lambda a: a[k], state.clients))
  assert int(state.round) == 3
  chex.clear_trace_counter()
  for _ in range(3):
    algo.round(state, data)
  assert algo.round._cache_size() == 1


def test_mask_counts_exact_after_rounds(algo, state0, data):
  expected = masks.count_active(state0.clients, stacked=True)
  state = state0
  for _ in range(4):
    state, _ = algo.round(state, data)
  chex.assert_trees_all_equal(masks.count_active(state.clients, stacked=True), expected)
  changed = int(masks.hamming_distance(state.clients, state0.clients))
  assert changed > 0  # masks did evolve


def test_jit_and_eager_agree(algo, state0, data):
  eager_state, eager_metrics = algo.round_fn(state0, data)
  jit_state, jit_metrics = algo.round(state0, data)
  assert_trees_close(eager_state.server.params, jit_state.server.params)
  chex.assert_trees_all_equal(eager_state.clients, jit_state.clients)
  np.testing.assert_array_equal(eager_metrics["cohort"], jit_metrics["cohort"])


def test_sharded_round_equals_single_device(model, algo, state0, data):
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  mesh = make_client_mesh()
  sharded = fj.algorithms.get("fedspa", model=model, mesh=mesh, **HPARAMS)
  a, b = state0, state0
  for _ in range(2):
    a, ma = algo.round(a, data)
    b, mb = sharded.round(b, data)
  # The cohort axis really is split: each of the 8 devices holds one client's metrics.
  assert mb["loss"].sharding.spec == jax.sharding.PartitionSpec("clients")
  assert [shard.data.shape for shard in mb["loss"].addressable_shards] == [(1,)] * 8
  assert mb["cohort"].shape == (8,)  # 5 clients padded to a multiple of 8 devices
  np.testing.assert_array_equal(ma["cohort"], mb["cohort"][:5])
  assert_trees_close(a.server.params, b.server.params)
  chex.assert_trees_all_equal(a.clients, b.clients)


def test_mesh_without_auto_client_axis_is_rejected(model):
  with pytest.raises(ValueError, match="clients"):
    fj.algorithms.get("fedspa", model=model, mesh=jax.make_mesh((8,), ("data",)), **HPARAMS)
  explicit = jax.make_mesh((8,), ("clients",), axis_types=(jax.sharding.AxisType.Explicit,))
  with pytest.raises(ValueError, match="Auto"):
    fj.algorithms.get("fedspa", model=model, mesh=explicit, **HPARAMS)


def test_cohort_in_groups_equals_vmapped_cohort(model, algo, state0, data):
  grouped = fj.algorithms.get("fedspa", model=model, cohort_batch=2, **HPARAMS)
  a, ma = algo.round(state0, data)
  b, mb = grouped.round(state0, data)
  assert_trees_close(a.server.params, b.server.params)
  chex.assert_trees_all_equal(a.clients, b.clients)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="cohort_batch"):
    fj.algorithms.get("fedspa", model=model, cohort_batch=0, **HPARAMS)
