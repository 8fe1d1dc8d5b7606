"""Dropouts and stragglers inside the round: a straggler trains exactly round(f * steps) steps, a dropped client
weighs 0 (and never changes its state when it never starts), traces from files, the sharded round agrees."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedspa_jax as fj
from fedspa_jax.availability import AvailabilitySpec
from fedspa_jax.client import ClientData, local_train
from fedspa_jax.round import make_client_mesh

NUM_CLIENTS = 16
HPARAMS = dict(density=0.5, clients_per_round=8, local_epochs=2, batch_size=8, lr=0.05, rounds=5)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def data():
  return fj.data.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, max_samples_per_client=60, seed=1)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=10, hidden=(16,))


def one_round(model, data, **options):
  algo = fj.algorithms.get("fedspa", model=model, **HPARAMS, **options)
  state = algo.init(jax.random.key(0), data)
  before = algo.client_states(state, data)
  state, metrics = algo.round(state, algo.place(data))
  return algo, state, jax.device_get(metrics), before, algo.client_states(state, data)


@pytest.fixture(scope="module")
def plain(model, data):
  return one_round(model, data)


# 12 steps: 0.2 -> 2.4 and 0.3 -> 3.6 tell round from floor and ceil; 0.5 and 0.75 land on whole steps.
@pytest.mark.parametrize("work", [0.2, 0.3, 0.5, 0.75])
def test_a_straggler_trains_exactly_round_f_steps(model, data, work):
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  params = model.init(jax.random.key(1), jnp.zeros((1, *data.sample_shape)))["params"]
  train = data.train
  k = int(np.argmax(train.count))  # the largest client: several steps per epoch
  steps = 2 * -(-int(train.count[k]) // 8)
  client = lambda w: ClientData(jnp.asarray(train.x), jnp.asarray(train.y), jnp.int32(train.offset[k]),
                                jnp.int32(train.count[k]), w)
  kwargs = dict(apply_fn=apply_fn, optimizer=optax.sgd(0.05), batch_size=8)
  partial = local_train(params, None, client(jnp.float32(work)), jax.random.key(2), local_epochs=2, **kwargs)
  exact = local_train(params, None, client(None), jax.random.key(2), local_epochs=None,
                      local_steps=round(work * steps), **kwargs)
  assert steps == 12 and int(partial.steps) == {0.2: 2, 0.3: 4, 0.5: 6, 0.75: 9}[work]  # by hand
  assert_trees_close(partial.params, exact.params, rtol=0, atol=0)  # the same steps, on the same batches


def test_stragglers_in_the_round_run_their_share_and_keep_their_weight(model, data, plain):
  _, _, full, _, _ = plain
  _, _, metrics, _, _ = one_round(model, data, straggler_fraction=0.5, straggler_work=0.3)
  assert np.array_equal(metrics["cohort"], full["cohort"])  # the cohort's draw does not depend on the options
  slow = metrics["straggler"].astype(bool)
  assert 0 < slow.sum() < len(slow)
  expected = np.where(slow, [round(0.3 * s) for s in full["steps"]], full["steps"])
  assert np.array_equal(metrics["steps"], expected)
  assert np.array_equal(metrics["weight"], full["weight"])  # aggregated as FedAvg's implementations do
  assert metrics["dropped"].sum() == 0


@pytest.fixture(scope="module")
def dropped(model, data):
  """One round of FedSpa with half the sampled clients dropped, per mode."""
  return {mode: one_round(model, data, dropout=0.5, dropout_mode=mode) for mode in ("lost", "never_starts")}


@pytest.mark.parametrize("mode", ["lost", "never_starts"])
def test_a_dropped_client_weighs_zero_and_never_starting_leaves_its_state(model, data, plain, dropped, mode):
  _, _, full, before, after_plain = plain
  _, state, metrics, before2, after = dropped[mode]
  dropped = metrics["dropped"].astype(bool)
  assert 0 < dropped.sum() < len(dropped)
  assert np.all(metrics["weight"][dropped] == 0) and np.all(metrics["weight"][~dropped] > 0)
  ids = metrics["cohort"]
  same = lambda tree, i: all(np.array_equal(np.asarray(a)[i], np.asarray(b)[i])
                             for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(before)))
  for i, d in zip(ids, dropped):
    if d and mode == "never_starts":
      assert same(after, i)  # no work, no new mask
    else:  # it trained: its mask moved as in the plain round
      assert all(np.array_equal(np.asarray(a)[i], np.asarray(b)[i])
                 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(after_plain)))
  steps = metrics["steps"]
  if mode == "never_starts":
    assert np.all(steps[dropped] == 0)
    participation = np.asarray(state.participation)
    assert np.array_equal(participation[ids], (~dropped).astype(np.int32))
  else:
    assert np.array_equal(steps, full["steps"])


def test_costs_count_the_work_done_a_lost_client_s_too(model, data, plain, dropped):
  """By hand (RigL's accounting, models.flops): FedSpa's round costs a * (samples trained) + b * (clients that
  trained), a = 3 x the masked forward per sample, b = one regrowth batch of 8 x (2 x masked + dense forward);
  every client that trained downloaded m_k ⊙ w and sent U_k. A lost client did all of that; a client that never
  started did none of it."""
  forward = fj.models.flops.forward_flops(model, data.sample_shape)
  params = plain[1].server.params
  per_client_bytes = None
  for name, (_, _, metrics, _, after) in [("plain", plain), *dropped.items()]:
    states = after.mask if hasattr(after, "mask") else after
    mask = jax.tree.map(lambda leaf: np.asarray(leaf)[0], states)
    a = 3.0 * sum(f * np.mean(np.asarray(fj.accounting.kernel_at(mask, path))) for path, f in forward.items())
    b = 8 * (2.0 * a / 3.0 + sum(forward.values()))
    real = np.asarray(metrics["cohort"]) < NUM_CLIENTS
    trained = real & ~metrics["dropped"].astype(bool) if name == "never_starts" else real
    if name != "plain":
      assert np.array_equal(metrics["started"].astype(bool), trained) and metrics["dropped"].sum() > 0
    samples = np.asarray(metrics["samples"])
    assert np.all(samples[~trained] == 0)
    np.testing.assert_allclose(metrics["flops"], a * samples[trained].sum() + b * trained.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["flops_dense"], 3.0 * sum(forward.values()) * samples.sum(), rtol=1e-6)
    for key in ("values_down", "values_up"):
      values = np.asarray(metrics[key])
      assert np.all(values[~trained] == 0) and np.all(values[trained] > 0)
      per_client_bytes = per_client_bytes or fj.accounting.message_bytes(params, values[:1])  # static counts
      assert fj.accounting.message_bytes(params, values) == per_client_bytes * trained.sum()
  assert dropped["lost"][2]["flops"] == plain[2]["flops"]  # the same work as without dropouts


def test_a_dense_method_counts_the_samples_of_clients_that_trained(model, data):
  """FedAvg by hand: 3 x the dense forward FLOPs per sample trained, 4 bytes per weight each way per client that
  trained (1,146 weights: 60 x 16 + 16 + 16 x 10 + 10)."""
  forward = sum(fj.models.flops.forward_flops(model, data.sample_shape).values())
  assert forward == 2 * (60 * 16 + 16 * 10)
  for mode in ("lost", "never_starts"):
    algo = fj.algorithms.get("fedavg", model=model, **{k: v for k, v in HPARAMS.items() if k != "density"},
                             dropout=0.5, dropout_mode=mode)
    state = algo.init(jax.random.key(0), data)
    _, metrics = jax.device_get(algo.round(state, algo.place(data)))
    dropped = metrics["dropped"].astype(bool)
    assert 0 < dropped.sum() < len(dropped)
    trained = ~dropped if mode == "never_starts" else np.ones_like(dropped)
    assert np.array_equal(metrics["started"].astype(bool), trained)
    assert metrics["flops"] == pytest.approx(3.0 * forward * metrics["samples"][trained].sum(), rel=1e-6)
    assert np.all(metrics["samples"][trained] > 0) and np.all(metrics["samples"][~trained] == 0)
    params = state.server.params
    for key in ("values_down", "values_up"):
      assert fj.accounting.message_bytes(params, metrics[key]) == 4 * 1146 * trained.sum()


@pytest.mark.parametrize("name,extra", [("subfedavg", {}), ("dispfl", {}), ("feddst", {"readjust_interval": 1}),
                                        ("prunefl", {"readjust_interval": 1}), ("ditto", {})])
def test_a_round_in_which_nobody_starts_costs_nothing(model, data, name, extra, tmp_path):
  """By hand: every sampled client unavailable, never starting, receives and sends nothing and trains no sample; nor
  does it do a method's extra work (regrowth batches, pruning trials, importance sums, Ditto's second model)."""
  np.save(tmp_path / "nobody.npy", np.zeros((NUM_CLIENTS, 1), np.float32))
  known = fj.algorithms.known_hparams(name)
  options = {k: v for k, v in {**HPARAMS, **extra}.items() if k in known}
  algo = fj.algorithms.get(name, model=model, **options, availability=str(tmp_path / "nobody.npy"),
                           dropout_mode="never_starts")
  _, metrics = jax.device_get(algo.round(algo.init(jax.random.key(0), data), algo.place(data)))
  assert metrics["dropped"].sum() == HPARAMS["clients_per_round"] and metrics["started"].sum() == 0
  assert metrics["flops"] == 0 and metrics["flops_dense"] == 0 and metrics["samples"].sum() == 0
  assert not np.any(metrics["values_down"]) and not np.any(metrics["values_up"])


def test_the_aggregate_leaves_out_dropped_clients(model, data):
  """The server's new w is the plain round's rule applied to the reporting clients only."""
  algo, state, metrics, _, _ = one_round(model, data, dropout=0.4, aggregation="mean")
  reporting = ~metrics["dropped"].astype(bool)  # the fates drawn, not the weights the round gave them
  assert 0 < (~reporting).sum() < len(reporting)
  # Same cohort without dropouts, but each dropped client's data removed: it weighs 0 there too (no data).
  base = fj.algorithms.get("fedspa", model=model, **HPARAMS)
  state0 = base.init(jax.random.key(0), data)
  count = np.asarray(data.train.count).copy()
  count[metrics["cohort"][~reporting]] = 0
  emptied = dataclasses.replace(data, train=dataclasses.replace(data.train, count=count))
  state1, m1 = base.round(state0, base.place(emptied))
  reported = lambda m: set(np.asarray(m["cohort"])[np.asarray(m["weight"]) > 0].tolist())
  assert reported(m1) == reported(metrics) and set(np.asarray(m1["cohort"])) == set(metrics["cohort"])
  assert_trees_close(state.server.params, state1.server.params)


def test_availability_trace_from_a_file_decides_by_client_and_round(model, data, tmp_path):
  rng = np.random.default_rng(0)
  trace = (rng.random((NUM_CLIENTS, 3)) < 0.5).astype(np.float32)  # 0 or 1: the draws do not matter
  np.save(tmp_path / "trace.npy", trace)
  np.savetxt(tmp_path / "trace.csv", trace, delimiter=",")
  for path in (tmp_path / "trace.npy", tmp_path / "trace.csv"):
    algo = fj.algorithms.get("fedspa", model=model, **HPARAMS, availability=str(path))
    state = algo.init(jax.random.key(0), data)
    placed = algo.place(data)
    for t in range(4):
      state, metrics = algo.round(state, placed)
      expected = trace[metrics["cohort"], t % 3] == 0
      assert np.array_equal(metrics["dropped"].astype(bool), expected)
  np.save(tmp_path / "short.npy", trace[:5])
  algo = fj.algorithms.get("fedspa", model=model, **HPARAMS, availability=str(tmp_path / "short.npy"))
  with pytest.raises(ValueError, match="has 5 rows but the dataset has 16 clients"):
    algo.round(algo.init(jax.random.key(0), data), algo.place(data))
  with pytest.raises(ValueError, match="either dropout or an availability file"):
    fj.algorithms.get("fedspa", model=model, **HPARAMS, availability=str(path), dropout=0.1)


def test_off_by_default(plain):
  algo, _, metrics, _, _ = plain
  assert "dropped" not in metrics and "update_norm" not in metrics
  assert algo.hparams["dropout"] == 0.0 and algo.hparams["dp_clip"] is None


# FedDST readjusting every round: its votes, the mask's messages, are aggregated beside the DP release
# (`DPSpec.public`), over the devices too.
@pytest.mark.parametrize("name,extra", [("fedspa", {}), ("feddst", {"readjust_interval": 1})])
def test_sharded_round_equals_one_device_with_dp_dropouts_and_stragglers(model, data, name, extra):
  options = dict(dropout=0.3, dropout_mode="never_starts", straggler_fraction=0.4, dp_clip=1.0,
                 dp_noise_multiplier=0.5, dp_quantile=0.5, **extra)
  outs = []
  for mesh in (None, make_client_mesh()):
    algo = fj.algorithms.get(name, model=model, **HPARAMS, **options, mesh=mesh)
    state = algo.init(jax.random.key(0), algo.place(data) if mesh is not None else data)
    placed = algo.place(data)
    for _ in range(2):
      state, metrics = algo.round(state, placed)
    order = np.argsort(np.asarray(metrics["cohort"]))
    keys = ("cohort", "dropped", "started", "straggler", "steps", "weight", "values_down")
    picked = {k: np.asarray(metrics[k])[order] for k in keys}
    outs.append((jax.device_get(state.server), picked, np.asarray(state.participation)[:NUM_CLIENTS],
                 jax.device_get(algo.client_states(state, placed))))
  (server_a, m_a, p_a, c_a), (server_b, m_b, p_b, c_b) = outs
  for k in m_a:
    assert np.array_equal(m_a[k], m_b[k]), k
  assert np.array_equal(p_a, p_b)
  assert_trees_close(server_a, server_b, rtol=1e-4, atol=1e-5)
  # every client's stored state too: a never-started client's rows are put back on its own device as on one
  assert_trees_close(c_a, c_b, rtol=1e-4, atol=1e-5)


def test_dropout_and_straggler_rates_are_the_options_not_their_complements():
  # 2,000 rounds of 8 clients (16,000 draws each): dropout 0.2 loses about 20% (std of the share 0.0032), and
  # straggler_fraction 0.1 slows about 10% of the available clients; 1 - p in either place would give 0.8 or 0.9.
  from fedspa_jax import availability

  spec = availability.make_spec(0.2, "lost", 0.1, 0.5, None)
  cohort = jnp.arange(8, dtype=jnp.int32)
  fates = jax.jit(jax.vmap(lambda t: availability.draw_fate(jax.random.fold_in(jax.random.key(0), t), cohort, t,
                                                            spec, 8)))(jnp.arange(2000, dtype=jnp.int32))
  reports, straggler = np.asarray(fates.reports), np.asarray(fates.straggler)
  assert abs((1 - reports.mean()) - 0.2) < 0.015
  assert abs(straggler[reports].mean() - 0.1) < 0.015
