"""The client population sharded over 8 forced CPU devices: layout, per-device memory, equality with one device."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedspa_jax as fj
from fedspa_jax import config as config_lib
from fedspa_jax import experiment, population
from fedspa_jax.data.federated import FederatedData, split_from_flat
from fedspa_jax.round import ClientOutput, SimState, make_client_mesh, make_round
from fedspa_jax.server import init_server

VOLATILE = {"wall_time", "run_dir", "device", "hparams"}
HPARAMS = dict(density=0.4, clients_per_round=8, local_epochs=1, batch_size=8, lr=0.05, rounds=10)


def tiny(**changes) -> config_lib.Config:
  """The default config's smoke variant with 16 clients, 8 per round (a multiple of 8 strata), 6 rounds."""
  config = config_lib.load("default", smoke=True)
  config = dataclasses.replace(config, num_clients=16, rounds=6, checkpoint_every=3, eval_every=3,
                               rounds_per_dispatch=3)
  return config_lib.apply_overrides(config, [("hparams.clients_per_round", 8), *changes.items()])


def quiet_run(config, workdir, **kw):
  return experiment.run(config, workdir, echo=None, write_plots=False, progress=False, **kw)


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_runs_close(a_dir, a, b_dir, b):
  for key in ("bytes_up", "bytes_down", "samples", "clients_participating", "num_clients"):
    assert a[key] == b[key], key
  np.testing.assert_allclose(a["client_accuracy"], b["client_accuracy"], atol=1e-6)
  np.testing.assert_allclose(a["final_loss_mean"], b["final_loss_mean"], rtol=1e-5)
  ra, rb = records(a_dir), records(b_dir)
  assert [r["round"] for r in ra] == [r["round"] for r in rb] == [3, 6]
  for x, y in zip(ra, rb):
    for k in x:
      if k != "wall_time":
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=k)
  ca, cb = np.load(a_dir / "clients.npz"), np.load(b_dir / "clients.npz")
  np.testing.assert_array_equal(ca["participation"], cb["participation"])
  np.testing.assert_array_equal(ca["hamming"], cb["hamming"])  # the same masks, client by client


@pytest.fixture(scope="module")
def data():
  return fj.data.synthetic(1.0, 1.0, num_clients=20, max_samples_per_client=60, seed=3)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=10, hidden=(16,))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  return make_client_mesh()


@pytest.fixture(scope="module")
def sharded(model, mesh):
  return fj.algorithms.get("fedspa", model=model, mesh=mesh, **HPARAMS)


def test_placed_data_holds_each_block_on_its_device(data, sharded):
  placed = sharded.place(data)
  k_pad, block = 24, 3  # 20 clients padded to a multiple of 8 devices
  assert placed.num_clients == 20 and placed.train.count.shape == (k_pad,)
  for split, placed_split in ((data.train, placed.train), (data.test, placed.test)):
    rows = placed_split.x.shape[0] // 8
    for shard_x, shard_y, shard_off, shard_count in zip(
        *(sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
          for a in (placed_split.x, placed_split.y, placed_split.offset, placed_split.count))):
      assert shard_count.data.shape == (block,)
      d = (shard_count.index[0].start or 0) // block
      for j in range(block):
        k = d * block + j
        n, start = int(shard_count.data[j]), int(shard_off.data[j])
        if k >= 20:
          assert n == 0
          continue
        x, y = split.client(k)
        np.testing.assert_array_equal(np.asarray(shard_x.data)[start : start + n], x)
        np.testing.assert_array_equal(np.asarray(shard_y.data)[start : start + n], y)
      assert shard_x.data.shape[0] == rows
  # Data memory per device: the largest block's training samples, not N_total.
  counts = np.pad(np.asarray(data.train.count), (0, k_pad - 20))
  assert placed.train.x.shape[0] // 8 == counts.reshape(8, block).sum(1).max() < data.train.total


def test_store_is_sharded_one_block_per_device(data, model, sharded):
  placed = sharded.place(data)
  state = sharded.init(jax.random.key(0), placed)
  spec = jax.sharding.PartitionSpec("clients")
  for leaf in jax.tree.leaves(state.clients) + [state.participation]:
    assert leaf.shape[0] == 24 and leaf.sharding.spec == spec
    assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {3}
  held = population.per_device_bytes(state.clients)
  total = sum(a.nbytes for a in jax.tree.leaves(state.clients))
  assert len(held) == 8 and set(held.values()) == {total // 8}
  # The masks are stored packed (uint32 words); client k's initial state does not depend on the sharding.
  single = fj.algorithms.get("fedspa", model=model, **HPARAMS)
  ref = single.client_states(single.init(jax.random.key(0), data), data)
  got = sharded.client_states(state, data)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref, got)


def test_round_needs_placed_data(data, sharded):
  placed = sharded.place(data)
  state = sharded.init(jax.random.key(0), placed)
  with pytest.raises(TypeError, match="place"):
    sharded.round(state, jax.device_put(data))


@pytest.fixture(scope="module")
def eight_uniform(tmp_path_factory):
  """The tiny run on 8 devices, uniform sampling, uninterrupted: (folder, summary)."""
  workdir = tmp_path_factory.mktemp("eight") / "run"
  return workdir, quiet_run(tiny(shard_clients=True), workdir)


@pytest.mark.parametrize("sampling", ["uniform", "stratified"])
def test_sharded_run_equals_one_device(sampling, eight_uniform, tmp_path):
  # One device ("stratified" with the 8 strata the 8 devices give) against 8 devices, fused rounds.
  changes = {"hparams.cohort_sampling": sampling}
  one = quiet_run(tiny(**changes, **({"hparams.cohort_strata": 8} if sampling == "stratified" else {})),
                  tmp_path / "one")
  if sampling == "uniform":
    eight_dir, eight = eight_uniform
  else:
    eight_dir, eight = tmp_path / "eight", quiet_run(tiny(**changes, shard_clients=True), tmp_path / "eight")
  assert "8 x" in eight["device"]
  assert_runs_close(tmp_path / "one", one, eight_dir, eight)


def test_stratified_sampling_draws_evenly_from_each_stratum():
  placement = population.Placement(num_clients=32, shards=1, strata=4)  # 4 strata of 8
  cohorts = jax.vmap(lambda k: population.sample_stratified(k, placement, 8))(
      jax.random.split(jax.random.key(0), 400))
  cohorts = np.asarray(cohorts)
  assert cohorts.max() < 32
  for row in cohorts:
    assert len(set(row.tolist())) == 8
    np.testing.assert_array_equal(np.bincount(row // 8, minlength=4), [2, 2, 2, 2])
  freq = np.bincount(cohorts.ravel(), minlength=32) / 400
  np.testing.assert_allclose(freq, 8 / 32, atol=0.08)  # every client: S / K, as under uniform sampling


STRATA, COHORT, ROUNDS = 8, 8, 4000


def inclusion_counts(sample, num_clients: int) -> np.ndarray:
  """[K] how often each client is in a cohort over ROUNDS draws of `sample(key) -> [S] ids`."""
  cohorts = np.asarray(jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(0), ROUNDS)))
  return np.bincount(cohorts.ravel(), minlength=num_clients)


def assert_inclusion_is_s_over_k(counts: np.ndarray, num_clients: int) -> None:
  """Every client in a cohort with probability S / K: chi-square of the counts against ROUNDS * S / K, p > 1e-6."""
  expected = ROUNDS * COHORT / num_clients
  statistic = float(np.sum((counts - expected) ** 2 / expected))
  worst = int(np.argmax(np.abs(counts - expected)))
  assert stats.chi2.sf(statistic, num_clients - 1) > 1e-6, (
      f"client {worst} sampled {counts[worst]} times, expected {expected:.0f}")


@pytest.mark.parametrize("num_clients", [96, 100, 104])
def test_stratified_inclusion_matches_uniform_sampling(num_clients):
  # S = 8 from T = 8 strata. Uniform sampling puts every client in a cohort with probability S / K; stratified
  # sampling gives each stratum S / T clients, which matches only for equal strata. K = 100 (7 strata of 13 and one
  # of 9, whose clients would be sampled 44% more often) must be refused, never sampled with the bias.
  uniform = inclusion_counts(lambda k: population.sample_cohort(k, num_clients, COHORT), num_clients)
  assert_inclusion_is_s_over_k(uniform, num_clients)
  placement = population.Placement(num_clients, shards=1, strata=STRATA)
  try:
    stratified = inclusion_counts(lambda k: population.sample_stratified(k, placement, COHORT), num_clients)
  except ValueError as refused:
    assert num_clients % STRATA, f"equal strata must be sampled, got: {refused}"
    assert "equal" in str(refused)
    return
  assert_inclusion_is_s_over_k(stratified, num_clients)


def owner_labelled(num_clients: int) -> FederatedData:
  """K clients of 1 to 5 samples whose one feature is their owner's id (the same data as train and test)."""
  counts = 1 + np.arange(num_clients) % 5
  x = np.repeat(np.arange(num_clients, dtype=np.float32), counts)[:, None]
  split = split_from_flat(x, np.zeros(len(x), np.int32), counts)
  return FederatedData(train=split, test=split, num_classes=10)


DENSE_HPARAMS = dict(clients_per_round=16, local_steps=1, local_epochs=None, batch_size=4, rounds=4)


def test_data_placed_for_another_placement_is_refused(model, mesh):
  # K = 200 on 8 devices, placed for a uniform-sampling method (8 blocks of 25, strata 8), then given to a
  # stratified one with 16 strata; and placed on 4 devices (blocks of 50), then given to the 8-device method,
  # whose blocks of 25 would read the wrong rows through those offsets.
  data = owner_labelled(200)
  uniform = fj.algorithms.get("fedavg", model=model, mesh=mesh, **DENSE_HPARAMS)
  placed = uniform.place(data)
  devices = tuple(device.id for device in mesh.devices.flat)
  assert placed.placement == population.Placement(200, shards=8, strata=8, devices=devices)
  assert (placed.placement.block, placed.placement.padded) == (25, 200)
  assert uniform.place(placed) is placed
  stratified = fj.algorithms.get("fedavg", model=model, mesh=mesh, cohort_sampling="stratified", cohort_strata=16,
                                 **DENSE_HPARAMS)
  both = r"placed for 200 clients on 8 devices .* 8 strata, but this algorithm's placement is 200 clients .* 16 strata"
  with pytest.raises(ValueError, match=both):
    stratified.init(jax.random.key(0), placed)
  with pytest.raises(ValueError, match=both):
    stratified.place(placed)
  # Placed for it, 200 clients still do not split into 16 equal strata: refused too, before compiling.
  with pytest.raises(ValueError, match="strata of equal size"):
    stratified.init(jax.random.key(0), stratified.place(data))
  on_four = fj.algorithms.get("fedavg", model=model, mesh=make_client_mesh(jax.devices()[:4]),
                              **DENSE_HPARAMS).place(data)
  assert on_four.placement.block == 50
  state = uniform.init(jax.random.key(0), placed)
  for call in (uniform.round, uniform.evaluate):
    with pytest.raises(ValueError, match=r"placed for 200 clients on 4 devices .* placement is 200 clients on 8 "):
      call(state, on_four)
  single = fj.algorithms.get("fedavg", model=model, **DENSE_HPARAMS)
  with pytest.raises(ValueError, match="placed for 200 clients on 8 devices"):
    single.init(jax.random.key(0), placed)


MAX_ROWS = 5  # owner_labelled's largest client


def read_rows(params, state, data, key, round):
  """A client that trains nothing and reports the smallest and largest owner id among the rows it reads."""
  del key, round
  within = jnp.arange(MAX_ROWS, dtype=jnp.int32)
  seen = jnp.take(data.x[:, 0], data.offset + within, mode="clip")
  own = within < data.count
  metrics = {"lo": jnp.min(jnp.where(own, seen, jnp.inf)), "hi": jnp.max(jnp.where(own, seen, -jnp.inf)),
             "rows": data.count}
  return ClientOutput(update=jax.tree.map(jnp.zeros_like, params), coverage=None, state=state, metrics=metrics)


@pytest.mark.parametrize("sampling, num_clients, strata", [("uniform", 200, None), ("stratified", 208, 16)])
def test_each_client_reads_only_its_own_rows(sampling, num_clients, strata, mesh):
  data = owner_labelled(num_clients)
  placed = population.place(data, mesh, strata)
  placement = placed.placement
  optimizer = optax.sgd(1.0)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  run = jax.jit(make_round(read_rows, num_clients=num_clients, cohort_size=16, weighting="uniform",
                           server_optimizer=optimizer, mesh=mesh, sampling=sampling, strata=strata))
  state = SimState(server=init_server(params, optimizer), clients=jnp.zeros((placement.padded,), jnp.int32),
                   round=jnp.zeros((), jnp.int32), key=jax.random.key(1),
                   participation=jnp.zeros((placement.padded,), jnp.int32))
  seen = set()
  for _ in range(4):
    state, metrics = run(state, placed.train)
    metrics = jax.device_get(metrics)
    real = metrics["cohort"] < num_clients
    ids = metrics["cohort"][real]
    np.testing.assert_array_equal(metrics["lo"][real], ids)
    np.testing.assert_array_equal(metrics["hi"][real], ids)
    np.testing.assert_array_equal(metrics["rows"][real], np.asarray(data.train.count)[ids])
    seen.update(ids.tolist())
  assert len(seen) > 16  # several cohorts, spread over the devices


def test_deal_order_balances_a_sorted_cohort():
  from fedspa_jax.round import deal_order

  order = np.asarray(deal_order(8, 4))
  assert sorted(order.tolist()) == list(range(8))
  np.testing.assert_array_equal(order.reshape(4, 2), [[0, 7], [1, 6], [2, 5], [3, 4]])


def test_bad_populations_fail_before_compiling(model, mesh, tmp_path):
  small = fj.data.synthetic(1.0, 1.0, num_clients=6, max_samples_per_client=20, seed=0)
  algo = fj.algorithms.get("fedspa", model=model, mesh=mesh, **{**HPARAMS, "clients_per_round": 2})
  with pytest.raises(ValueError, match="6 clients cannot be sharded over 8 devices"):
    algo.init(jax.random.key(0), small)
  sixteen = fj.data.synthetic(1.0, 1.0, num_clients=16, max_samples_per_client=20, seed=0)
  with pytest.raises(ValueError, match="multiple of 8"):
    fj.algorithms.get("fedspa", model=model, mesh=mesh, cohort_sampling="stratified",
                      **{**HPARAMS, "clients_per_round": 6}).init(jax.random.key(0), sixteen)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    fj.algorithms.get("fedspa", model=model, mesh=mesh, cohort_sampling="stratified", cohort_strata=4,
                      **HPARAMS).init(jax.random.key(0), sixteen)
  # K = 100 in the 8 strata of 8 devices: 7 of 13 clients and one of 9, whose clients would be sampled more often.
  hundred = fj.data.synthetic(1.0, 1.0, num_clients=100, max_samples_per_client=20, seed=0)
  with pytest.raises(ValueError, match=r"equal size.*100 clients do not split into 8 equal strata \(100 / 8 = 12.5"):
    fj.algorithms.get("fedspa", model=model, mesh=mesh, cohort_sampling="stratified", **HPARAMS).init(
        jax.random.key(0), hundred)
  with pytest.raises(ValueError, match="cohort_sampling"):
    fj.algorithms.get("fedspa", model=model, cohort_sampling="per_client", **HPARAMS)
  with pytest.raises(config_lib.ConfigError, match="cannot be sharded"):
    quiet_run(tiny(num_clients=6, shard_clients=True, **{"hparams.clients_per_round": 3}), tmp_path / "k6")
  with pytest.raises(config_lib.ConfigError, match="20 clients do not split into 8 equal strata"):
    quiet_run(tiny(num_clients=20, shard_clients=True, **{"hparams.cohort_sampling": "stratified"}), tmp_path / "k20")


def test_checkpoint_of_another_device_count(eight_uniform, tmp_path, monkeypatch):
  four = make_client_mesh(jax.devices()[:4])
  # 16 clients: 16 rows on 8 devices and on 4, so orbax reshards and the run ends as the uninterrupted one.
  config = tiny(shard_clients=True)
  whole_dir, whole = eight_uniform
  quiet_run(config, tmp_path / "moved", stop_after=3)
  with monkeypatch.context() as patch:
    patch.setattr(experiment, "make_client_mesh", lambda: four)
    moved = quiet_run(config, tmp_path / "moved", resume=True)
  assert_runs_close(whole_dir, whole, tmp_path / "moved", moved)
  # 20 clients: 24 rows on 8 devices, 20 on 4 (another layout): the resume refuses with a clear error. (No evaluation
  # before the stop: it would compile one more program that this check does not need.)
  config = tiny(num_clients=20, shard_clients=True, eval_every=6)
  quiet_run(config, tmp_path / "run", stop_after=3)
  monkeypatch.setattr(experiment, "make_client_mesh", lambda: four)
  with pytest.raises(config_lib.ConfigError, match="cannot resume.*clients"):
    quiet_run(config, tmp_path / "run", resume=True)


@pytest.mark.parametrize("name", ["ditto", "fedavg_ft", "subfedavg"])
def test_other_algorithms_sharded_equal_one_device(name, data, model, mesh):
  # Dense per-client state (Ditto), fine-tuning at evaluation (FedAvg-FT), Sub-FedAvg's own state and rules.
  hparams = dict(clients_per_round=8, local_steps=3, local_epochs=None, batch_size=8, lr=0.05, rounds=4)
  one = fj.algorithms.get(name, model=model, **hparams)
  eight = fj.algorithms.get(name, model=model, mesh=mesh, **hparams)
  placed, on_device = eight.place(data), one.place(data)
  a, b = one.init(jax.random.key(1), on_device), eight.init(jax.random.key(1), placed)
  for _ in range(2):
    a, ma = one.round(a, on_device)
    b, mb = eight.round(b, placed)
    assert sorted(np.asarray(ma["cohort"]).tolist()) == sorted(np.asarray(mb["cohort"]).tolist())
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6),
               a.server.params, b.server.params)
  ea, eb = one.evaluate(a, on_device), eight.evaluate(b, placed)
  np.testing.assert_allclose(ea["accuracy"], eb["accuracy"], atol=1e-6)
  np.testing.assert_array_equal(ea["participated"], eb["participated"])
  sa, sb = one.client_states(a, data), eight.client_states(b, data)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6), sa, sb)
