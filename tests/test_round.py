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
from fedspa_jax.round import client_keys, make_client_mesh, run_cohort, sample_cohort

NUM_CLIENTS = 12
HPARAMS = dict(density=0.4, clients_per_round=5, local_epochs=None, local_steps=6, batch_size=8, lr=0.05, rounds=10)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def copy(tree):
  """A copy whose buffers a donating round may consume while the original stays usable."""
  return jax.tree.map(jnp.copy, tree)


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
def round_kept(algo):
  """The round jitted without donation: its argument stays usable (tests reuse one initial state)."""
  return jax.jit(algo.round_fn)


@pytest.fixture(scope="module")
def client_fn(model):
  return make_client_update(
      apply_fn=make_apply_fn(model), preprocess=lambda x: x, alpha=0.5, t_end=10, regrow="gradient",
      update_masks=True,
      train_kwargs=dict(optimizer=optax.sgd(0.05), batch_size=8, local_epochs=None, local_steps=6),
  )


def cohort_inputs(algo, state, data, cohort):
  ids = np.asarray(cohort)
  train = data.train
  cohort_data = ClientData(train.x, train.y, jnp.asarray(train.offset[ids]), jnp.asarray(train.count[ids]))
  weights = cohort_data.count.astype(jnp.float32)
  keys = client_keys(jax.random.key(9), jnp.asarray(ids, jnp.int32))
  return algo.client_states(state, data, ids), cohort_data, weights, keys


def client_view(cohort_data, i):
  return ClientData(cohort_data.x, cohort_data.y, cohort_data.offset[i], cohort_data.count[i])


@pytest.fixture(scope="module")
def run(client_fn):
  def go(state, cohort_state, cohort_data, weights, keys, aggregation, group_size=None):
    return run_cohort(
        client_fn, state.server, cohort_state, cohort_data, weights, keys, jnp.int32(2), aggregation=aggregation,
        server_optimizer=optax.sgd(1.0), group_size=group_size or weights.shape[0],
    )

  return jax.jit(go, static_argnames=("aggregation", "group_size"))


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
@pytest.mark.parametrize("group_size", [None, 1, 2])
def test_vmapped_cohort_equals_python_loop(client_fn, run, algo, state0, data, aggregation, group_size):
  cohort = [3, 0, 7, 11]
  cohort_state, cohort_data, weights, keys = cohort_inputs(algo, state0, data, cohort)
  server, new_states, metrics = run(state0, cohort_state, cohort_data, weights, keys, aggregation, group_size)

  w = state0.server.params
  one_client = jax.jit(client_fn)
  outs = [
      one_client(w, jax.tree.map(lambda a: a[i], cohort_state), client_view(cohort_data, i), keys[i], jnp.int32(2))
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
    assert int(metrics["steps"][i]) == int(out.metrics["steps"])


def test_permuting_the_cohort_changes_nothing(run, algo, state0, data):
  cohort = [3, 0, 7, 11]
  perm = [2, 0, 3, 1]
  a_server, a_states, _ = run(state0, *cohort_inputs(algo, state0, data, cohort), "mean")
  b_server, b_states, _ = run(state0, *cohort_inputs(algo, state0, data, [cohort[i] for i in perm]), "mean")
  assert_trees_close(a_server.params, b_server.params)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[np.array(perm)], a_states), b_states)


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
def test_weight_zero_padding_client_changes_nothing(run, algo, state0, data, aggregation):
  cohort_state, cohort_data, weights, keys = cohort_inputs(algo, state0, data, [3, 0, 7, 11])
  pad_state, pad_data, _, pad_keys = cohort_inputs(algo, state0, data, [3, 0, 7, 11, 5])
  pad_weights = jnp.concatenate([weights, jnp.zeros((1,))])
  a_server, _, _ = run(state0, cohort_state, cohort_data, weights, keys, aggregation)
  b_server, _, _ = run(state0, pad_state, pad_data, pad_weights, pad_keys, aggregation)
  assert_trees_close(a_server.params, b_server.params)


def test_round_traces_once_and_keeps_unsampled_clients(algo, state0, data):
  counted = jax.jit(chex.assert_max_traces(algo.round_fn, n=1))
  state = copy(state0)
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
    state, _ = algo.round(state, data)
  assert algo.round._cache_size() == 1


def test_mask_counts_exact_after_rounds(algo, state0, data):
  initial = algo.client_states(state0, data)
  expected = masks.count_active(initial, stacked=True)
  state = copy(state0)
  for _ in range(12):
    state, _ = algo.round(state, data)
  final = algo.client_states(state, data)
  chex.assert_trees_all_equal(masks.count_active(final, stacked=True), expected)
  changed = int(masks.hamming_distance(final, initial))
  assert changed > 0  # masks did evolve


def test_masks_are_stored_as_bits(algo, state0, data):
  decoded = algo.client_states(state0, data)
  for stored, mask in zip(jax.tree.leaves(state0.clients), jax.tree.leaves(decoded)):
    assert stored.dtype == jnp.uint32 and stored.shape == (NUM_CLIENTS, -(-mask[0].size // 32))
    np.testing.assert_array_equal(masks.unpack_words(stored, mask.shape[1:]), mask)


def test_donated_round_equals_kept_round(algo, round_kept, state0, data):
  a, ma = round_kept(state0, data)
  b, mb = algo.round(copy(state0), data)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(ma, mb)


def test_cohort_sampling_is_a_uniform_subset():
  counts = np.zeros(10)
  keys = jax.random.split(jax.random.key(0), 2000)
  for cohort in np.asarray(jax.jit(jax.vmap(lambda k: sample_cohort(k, 10, 3)))(keys)):
    assert len(set(cohort.tolist())) == 3 and cohort.min() >= 0 and cohort.max() < 10
    counts[cohort] += 1
  # Each client is in a cohort with probability 3/10: 600 of 2000 draws, sd ~20.5.
  assert np.all(np.abs(counts - 600) < 100), counts
  assert sorted(np.asarray(sample_cohort(jax.random.key(0), 7, 7)).tolist()) == list(range(7))


def test_jit_and_eager_agree(algo, round_kept, state0, data):
  eager_state, eager_metrics = algo.round_fn(state0, data)
  jit_state, jit_metrics = round_kept(state0, data)
  assert_trees_close(eager_state.server.params, jit_state.server.params)
  chex.assert_trees_all_equal(eager_state.clients, jit_state.clients)
  np.testing.assert_array_equal(eager_metrics["cohort"], jit_metrics["cohort"])


def test_mesh_without_auto_client_axis_is_rejected(model):
  with pytest.raises(ValueError, match="clients"):
    fj.algorithms.get("fedspa", model=model, mesh=jax.make_mesh((8,), ("data",)), **HPARAMS)
  explicit = jax.make_mesh((8,), ("clients",), axis_types=(jax.sharding.AxisType.Explicit,))
  with pytest.raises(ValueError, match="Auto"):
    fj.algorithms.get("fedspa", model=model, mesh=explicit, **HPARAMS)


def test_cohort_in_groups_equals_vmapped_cohort(model, round_kept, state0, data):
  grouped = fj.algorithms.get("fedspa", model=model, cohort_batch=2, **HPARAMS)
  a, ma = round_kept(state0, data)
  b, mb = grouped.round(copy(state0), data)
  assert_trees_close(a.server.params, b.server.params)
  chex.assert_trees_all_equal(a.clients, b.clients)
  np.testing.assert_allclose(ma["loss"], mb["loss"][:5], rtol=1e-5)
  assert mb["cohort"].shape == (6,) and int(mb["cohort"][5]) == NUM_CLIENTS  # 3 groups of 2, one padding
  with pytest.raises(ValueError, match="cohort_batch"):
    fj.algorithms.get("fedspa", model=model, cohort_batch=0, **HPARAMS)


@pytest.fixture(scope="module")
def skewed():
  """Clients of 0, 1, 3, 9, 17 and 40 training samples (and one test sample each)."""
  rng = np.random.default_rng(0)
  sizes = [0, 1, 3, 9, 17, 40]
  train = [(rng.normal(size=(n, 60)).astype(np.float32), rng.integers(0, 10, n)) for n in sizes]
  test = [(rng.normal(size=(1, 60)).astype(np.float32), rng.integers(0, 10, 1)) for _ in sizes]
  return fj.data.from_clients(train, test, num_classes=10)


def skewed_algo(model, cohort_batch, weighting):
  algo = fj.algorithms.get("fedspa", model=model, density=0.4, clients_per_round=6, local_epochs=2, batch_size=4,
                           lr=0.05, rounds=5, cohort_batch=cohort_batch, weighting=weighting)
  return algo, jax.jit(algo.round_fn)  # no donation: the tests keep their states


@pytest.fixture(scope="module")
def skewed_uniform(model):
  """cohort_batch -> (algorithm, its jitted round) on `skewed`, uniform weighting: compiled once for both tests."""
  return {cohort_batch: skewed_algo(model, cohort_batch, "uniform") for cohort_batch in (None, 1, 4)}


@pytest.mark.parametrize("cohort_batch,weighting", [(None, "samples"), (1, "uniform"), (4, "uniform")])
def test_each_client_trains_exactly_its_own_steps_on_skewed_data(model, skewed, skewed_uniform, cohort_batch,
                                                                 weighting):
  algo, round_fn = (skewed_uniform[cohort_batch] if weighting == "uniform" else
                    skewed_algo(model, cohort_batch, weighting))
  state = algo.init(jax.random.key(0), skewed)
  before = state.server.params
  state, metrics = round_fn(state, skewed)
  cohort, steps, samples = (np.asarray(metrics[k]) for k in ("cohort", "steps", "samples"))
  count = np.asarray(skewed.train.count)
  for k, st, sa in zip(cohort, steps, samples):
    n = count[k] if k < 6 else 0
    assert st == 2 * -(-n // 4) and sa == 2 * n  # 2 epochs of ceil(n / 4) steps, no step past the data
  weight = dict(zip(cohort.tolist(), np.asarray(metrics["weight"]).tolist()))
  assert weight[0] == 0.0 and weight[1] == 1.0 and weight[5] > 0
  assert np.all(np.diff(np.where(cohort < 6, count[np.minimum(cohort, 5)], -1)) <= 0)  # largest first
  del before


def test_a_client_without_training_data_sends_a_zero_update(client_fn, algo, state0, skewed):
  params = algo.init(jax.random.key(0), skewed).server.params
  mask = masks.init_masks(jax.random.key(1), params, masks.uniform_densities(params, 0.4))
  train = skewed.train
  empty = ClientData(train.x, train.y, jnp.asarray(train.offset[0]), jnp.asarray(train.count[0]))
  out = jax.jit(client_fn)(params, mask, empty, jax.random.key(2), jnp.int32(1))
  for leaf in jax.tree.leaves(out.update):
    np.testing.assert_array_equal(leaf, 0.0)
  assert int(out.metrics["samples"]) == 0 and int(out.metrics["steps"]) == 0
  del state0


def test_skewed_groups_equal_one_vmapped_group(skewed, skewed_uniform):
  outs = []
  for cohort_batch in (None, 1, 4):
    algo, round_fn = skewed_uniform[cohort_batch]
    state = algo.init(jax.random.key(0), skewed)
    for _ in range(2):
      state, _ = round_fn(state, skewed)
    outs.append(state)
  for other in outs[1:]:
    assert_trees_close(outs[0].server.params, other.server.params)
    chex.assert_trees_all_equal(outs[0].clients, other.clients)
