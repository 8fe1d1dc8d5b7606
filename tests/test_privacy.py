"""Client-level DP: clipping bounds what a client sends, the noise has the right std, the accountant is dp_accounting's
on the event the run uses, resume is exact, bad options fail in one line before compiling."""

import dataclasses
import functools
import json
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedspa_jax as fj
from fedspa_jax import config as config_lib
from fedspa_jax import experiment, privacy
from fedspa_jax.availability import AvailabilitySpec
from fedspa_jax.config import ConfigError
from fedspa_jax.round import ClientOutput, SimState, make_round
from fedspa_jax.server import DPSpec, clip_update, init_server


class Split(NamedTuple):
  x: jax.Array
  y: jax.Array
  offset: jax.Array
  count: jax.Array


def stub_round(updates, *, dp, availability=None, params=None):
  """A round whose client k sends `updates[k]` (a [K, P] table): the server path alone, no model."""
  num_clients, size = updates.shape
  params = {"w": jnp.zeros((size,), jnp.float32)} if params is None else params
  table = jnp.asarray(updates, jnp.float32)

  def client_fn(w, state, data, key, round):
    row = jnp.take(table, data.offset, axis=0)  # client k's offset is k
    return ClientOutput({"w": row}, None, state, {"loss": jnp.zeros(()), "steps": jnp.int32(1)})

  round_fn = make_round(client_fn, num_clients=num_clients, cohort_size=num_clients, weighting="uniform",
                        server_optimizer=optax.sgd(1.0), cohort_batch=None, dp=dp, availability=availability)
  train = Split(jnp.zeros((num_clients, 1)), jnp.zeros((num_clients,), jnp.int32),
                jnp.arange(num_clients, dtype=jnp.int32), jnp.ones((num_clients,), jnp.int32))
  state = SimState(init_server(params, optax.sgd(1.0), dp), jnp.zeros((num_clients,), jnp.int32),
                   jnp.zeros((), jnp.int32), jax.random.key(3), jnp.zeros((num_clients,), jnp.int32))
  return jax.jit(round_fn), state, train


def test_clipping_bounds_every_sent_update_and_keeps_small_ones():
  rng = np.random.default_rng(0)
  clip = 1.5
  for scale in (1e-3, 0.1, 1.0, 10.0, 1e3):
    update = {"a": jnp.asarray(rng.normal(size=(7, 3)) * scale, jnp.float32),
              "b": jnp.asarray(np.where(rng.random(11) < 0.5, 0.0, rng.normal(size=11) * scale), jnp.float32)}
    clipped, norm = clip_update(update, clip)
    flat = np.concatenate([np.ravel(update["a"]), np.ravel(update["b"])])
    out = np.concatenate([np.ravel(clipped["a"]), np.ravel(clipped["b"])])
    np.testing.assert_allclose(float(norm), np.linalg.norm(flat), rtol=1e-5)
    assert np.linalg.norm(out) <= clip * (1 + 1e-6)
    expected = flat if np.linalg.norm(flat) <= clip else flat * clip / np.linalg.norm(flat)  # same direction
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    assert np.all(out[flat == 0] == 0)  # a sparse update stays sparse


def test_released_aggregate_is_the_sum_of_clipped_updates_over_the_expected_cohort():
  # Client k sends (k + 1) * e (norm (k + 1) * sqrt(P)): with C = 2 and P = 4 only client 0 is below the clip.
  updates = np.outer(np.arange(1, 6), np.ones(4))
  round_fn, state, train = stub_round(updates, dp=DPSpec(clip=2.0, noise_multiplier=0.0))
  new, metrics = round_fn(state, train)
  clipped = [u * min(1.0, 2.0 / np.linalg.norm(u)) for u in updates]
  np.testing.assert_allclose(-np.asarray(new.server.params["w"]), np.sum(clipped, axis=0) / 5, rtol=1e-6)
  np.testing.assert_allclose(np.sort(metrics["update_norm"]), np.arange(1, 6) * 2.0, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_noise_std_on_the_aggregate_of_zero_updates(dropout):
  size, cohort, z, clip = 200_000, 4, 2.0, 0.5
  availability = None if not dropout else AvailabilitySpec(1.0 - dropout)
  round_fn, state, train = stub_round(np.zeros((cohort, size)), dp=DPSpec(clip, z), availability=availability)
  s1, _ = round_fn(state, train)
  s2, _ = round_fn(s1, train)
  first = -np.asarray(s1.server.params["w"])
  second = -np.asarray(s2.server.params["w"]) - first
  expected = z * clip / (cohort * (1.0 - dropout))  # the sum's noise over the expected number of reporting clients
  for noise in (first, second):
    assert abs(noise.std() / expected - 1) < 0.01  # 200k samples: the estimate's relative error is ~0.16%
    assert abs(noise.mean()) < 4 * expected / np.sqrt(size)
  assert abs(np.corrcoef(first, second)[0, 1]) < 0.01  # a fresh key every round


def test_adaptive_clip_moves_geometrically_towards_the_quantile():
  # Every norm (k + 1) * 2 is above C = 1 and no noise: b = 0, so C <- C * exp(-eta * (0 - gamma)).
  updates = np.outer(np.arange(1, 5), np.ones(4))
  spec = DPSpec(clip=1.0, noise_multiplier=0.0, quantile=0.5, clip_lr=0.2, count_noise=0.0)  # no noise at all
  round_fn, state, train = stub_round(updates, dp=spec)
  new, metrics = round_fn(state, train)
  assert float(metrics["dp_clip"]) == 1.0
  np.testing.assert_allclose(float(new.server.clip), np.exp(0.2 * 0.5), rtol=1e-6)
  # All below a large clip: b = 1, the clip shrinks by exp(-eta * (1 - gamma)).
  round_fn, state, train = stub_round(updates, dp=spec._replace(clip=100.0))
  new, _ = round_fn(state, train)
  np.testing.assert_allclose(float(new.server.clip), 100.0 * np.exp(-0.2 * 0.5), rtol=1e-6)


def test_adaptive_noise_split_composes_to_the_total_multiplier():
  from fedspa_jax.server import sum_noise_multiplier
  spec = DPSpec(clip=1.0, noise_multiplier=1.2, quantile=0.5, count_noise=0.9)
  z_sum = sum_noise_multiplier(spec)
  np.testing.assert_allclose((z_sum ** -2 + (2 * 0.9) ** -2) ** -0.5, 1.2, rtol=1e-12)  # Andrew et al., Thm 1


@functools.lru_cache(maxsize=None)
def direct_epsilon(population, sample, z, rounds, delta):
  """dp_accounting called by hand on the event of the run: sample without replacement, Gaussian of multiplier z / 2
  (replace-one neighbours move the clipped sum by up to 2C), composed over the rounds."""
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  event = dp_accounting.SampledWithoutReplacementDpEvent(population, sample, dp_accounting.GaussianDpEvent(z / 2))
  accountant.compose(event, rounds)
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sampling,strata,population,sample", [("uniform", None, 100, 10),
                                                               ("stratified", 5, 20, 2)])
def test_epsilon_equals_dp_accounting_on_the_same_event(sampling, strata, population, sample):
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  algo = fj.algorithms.get("fedavg", model=model, clients_per_round=10, dp_clip=1.0, dp_noise_multiplier=1.3,
                           dp_delta=1e-5, cohort_sampling=sampling, cohort_strata=strata)
  for rounds in (1, 50):
    record = privacy.epsilon_record(algo, 100, rounds)
    assert record["dp_delta"] == 1e-5
    np.testing.assert_allclose(record["dp_epsilon"], direct_epsilon(population, sample, 1.3, rounds, 1e-5), rtol=1e-9)
  assert privacy.epsilon_record(fj.algorithms.get("fedavg", model=model, dp_clip=1.0), 100, 5) == {}  # no noise


def test_target_epsilon_is_the_last_round_within_it():
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  algo = fj.algorithms.get("fedavg", model=model, clients_per_round=10, dp_clip=1.0, dp_noise_multiplier=3.0,
                           dp_target_epsilon=5.0)
  last = privacy.last_round_within(algo, 100, 500)
  assert 1 < last < 500
  assert direct_epsilon(100, 10, 3.0, last, 1e-5) <= 5.0 < direct_epsilon(100, 10, 3.0, last + 1, 1e-5)


def tiny(**changes):
  """The default config's smoke variant (6 clients, 3 per round), 6 rounds, with DP, stragglers and dropouts."""
  config = dataclasses.replace(config_lib.load("default", smoke=True), rounds=6, checkpoint_every=2)
  dp = {"dp_clip": 0.5, "dp_noise_multiplier": 0.8, "dp_quantile": 0.5, "dp_count_noise": 1.0,
        "straggler_fraction": 0.5, "dropout": 0.2}
  return config_lib.apply_overrides(config, {**dp, **changes})


def quiet_run(config, workdir, **kw):
  return experiment.run(config, workdir, echo=None, write_plots=False, progress=False, **kw)


def lines(workdir):
  return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dp_reference")
  return workdir, quiet_run(tiny(), workdir)


def test_run_records_epsilon_after_every_round(reference):
  workdir, summary = reference
  records = lines(workdir)
  assert [r["round"] for r in records] == list(range(1, 7))
  for r in records:
    np.testing.assert_allclose(r["dp_epsilon"], direct_epsilon(6, 3, 0.8, r["round"], 1e-5), rtol=1e-9)
    assert r["dp_delta"] == 1e-5
  np.testing.assert_allclose(summary["dp_epsilon"], records[-1]["dp_epsilon"], rtol=1e-12)
  assert summary["hparams"]["dp_clip"] == 0.5
  assert records[-1]["clients_dropped"] + records[-1]["clients_straggling"] > 0  # 18 draws at 0.2 and 0.4


def test_resume_with_dp_equals_the_uninterrupted_run(reference, tmp_path):
  ref_dir, ref_summary = reference
  assert quiet_run(tiny(), tmp_path, stop_after=3)["status"] == "stopped"
  summary = quiet_run(tiny(), tmp_path, resume=True)
  assert lines(tmp_path) == lines(ref_dir)
  assert summary["client_accuracy"] == ref_summary["client_accuracy"]
  assert summary["dp_epsilon"] == ref_summary["dp_epsilon"]


def test_target_epsilon_stops_the_run_with_a_checkpoint_before_it_is_exceeded(tmp_path):
  last = 4
  target = (direct_epsilon(6, 3, 0.8, last, 1e-5) + direct_epsilon(6, 3, 0.8, last + 1, 1e-5)) / 2
  out = quiet_run(tiny(dp_target_epsilon=target), tmp_path)
  assert out["status"] == "stopped" and out["reason"] == "dp_target_epsilon" and out["round"] == last
  assert out["dp_epsilon"] <= target
  assert out["checkpoint"].endswith(str(last))
  assert max(r["round"] for r in lines(tmp_path)) == last


@pytest.mark.parametrize("changes,message", [
    ({"dp_clip": -1.0}, "dp_clip must be a number > 0"),
    ({"dp_clip": 0.0}, "dp_clip must be a number > 0"),
    ({"dp_clip": float("inf")}, "dp_clip must be a number > 0"),
    ({"dp_delta": 0.0}, "dp_delta must be a number in (0, 1)"),
    ({"dp_clip": None, "dp_noise_multiplier": 1.0}, "dp_noise_multiplier=1.0 needs dp_clip"),
    ({"dp_delta": 1.0}, "dp_delta must be a number in (0, 1)"),
    ({"dp_noise_multiplier": -0.5}, "dp_noise_multiplier must be a number >= 0"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1)"),
    ({"dropout": -0.1}, "dropout must be a number in [0, 1)"),
    ({"dropout_mode": "vanishes"}, "dropout_mode must be one of"),
    ({"straggler_work": 0.0}, "straggler_work must be a number in (0, 1]"),
    ({"dp_quantile": 0.5, "dp_count_noise": 0.3}, "adaptive clipping needs dp_count_noise > dp_noise_multiplier / 2"),
])
def test_bad_options_are_one_line_errors_before_compiling(changes, message, monkeypatch, tmp_path):
  def no_compile(*a, **k):
    raise AssertionError("compiled")

  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(ConfigError) as e:
    quiet_run(tiny(**changes), tmp_path / "bad")
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "bad").exists()
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  hparams = {**tiny(**changes).hparams}
  with pytest.raises(ValueError, match="^[^\n]*$"):
    fj.algorithms.get("fedspa", model=model, **hparams)


def test_a_sweep_refuses_a_target_epsilon(tmp_path):
  with pytest.raises(ConfigError, match="a sweep runs all its rounds"):
    experiment.sweep(tiny(dp_target_epsilon=5.0), [0, 1], tmp_path / "s", echo=None, progress=False)
  assert not (tmp_path / "s").exists()


def test_messages_about_the_mask_are_aggregated_as_sent_and_only_the_model_is_private():
  # FedDST's votes and PruneFL's importance (`DPSpec.public`): client k sends values (k + 1) * e over 4 coordinates
  # and votes (k odd) over 3. Only the values are clipped (norms 2, 4, ..., 10 against C = 2) and noised; the votes'
  # uniform mean over the 5 clients is 2 / 5 exactly, with or without noise on the values.
  values, votes = np.outer(np.arange(1, 6), np.ones(4)), np.outer(np.arange(5) % 2, np.ones(3))
  table = jnp.asarray(np.concatenate([values, votes], axis=1), jnp.float32)

  def client_fn(w, state, data, key, round):
    row = jnp.take(table, data.offset, axis=0)
    return ClientOutput({"values": row[:4], "votes": row[4:]}, None, state,
                        {"loss": jnp.zeros(()), "steps": jnp.int32(1)})

  params = {"values": jnp.zeros((4,), jnp.float32), "votes": jnp.zeros((3,), jnp.float32)}
  train = Split(jnp.zeros((5, 1)), jnp.zeros((5,), jnp.int32), jnp.arange(5, dtype=jnp.int32),
                jnp.ones((5,), jnp.int32))
  clipped = np.sum([u * min(1.0, 2.0 / np.linalg.norm(u)) for u in values], axis=0) / 5
  for z in (0.0, 5.0):
    dp = DPSpec(clip=2.0, noise_multiplier=z, public=("votes",))
    round_fn = make_round(client_fn, num_clients=5, cohort_size=5, weighting="uniform",
                          server_optimizer=optax.sgd(1.0), cohort_batch=None, dp=dp)
    state = SimState(init_server(params, optax.sgd(1.0), dp), jnp.zeros((5,), jnp.int32), jnp.zeros((), jnp.int32),
                     jax.random.key(3), jnp.zeros((5,), jnp.int32))
    new, metrics = jax.jit(round_fn)(state, train)
    np.testing.assert_allclose(-np.asarray(new.server.params["votes"]), np.full(3, 2 / 5), rtol=1e-6)
    np.testing.assert_allclose(np.sort(metrics["update_norm"]), np.arange(1, 6) * 2.0, rtol=1e-6)  # values' only
    released = -np.asarray(new.server.params["values"])
    if z == 0:
      np.testing.assert_allclose(released, clipped, rtol=1e-6)
    else:  # noise of std z * C / 5 = 2 per coordinate: far from the clipped mean
      assert np.max(np.abs(released - clipped)) > 0.1


def test_a_round_where_nobody_can_report_releases_nothing():
  # An availability trace whose first round's column is all 0: no client reports, so the DP estimator's expected
  # count is 0; the round releases nothing (w and C stay) instead of dividing noise by 0. The next round (all 1)
  # releases the clipped mean plus noise as usual.
  trace = jnp.asarray(np.stack([np.zeros(4), np.ones(4)], axis=1), jnp.float32)  # [K, R]: round t uses column t % 2
  spec = DPSpec(clip=1.0, noise_multiplier=1.0, quantile=0.5, count_noise=1.0)
  round_fn, state, train = stub_round(np.ones((4, 3)), dp=spec, availability=AvailabilitySpec(trace))
  s1, m1 = round_fn(state, train)
  assert np.all(np.asarray(s1.server.params["w"]) == 0) and float(s1.server.clip) == 1.0
  assert int(np.sum(m1["dropped"])) == 4
  s2, _ = round_fn(s1, train)
  assert np.all(np.isfinite(np.asarray(s2.server.params["w"]))) and np.any(np.asarray(s2.server.params["w"]) != 0)


@pytest.mark.parametrize("name,extra,message", [
    ("local", {}, "local does not support client-level DP (dp_clip): nothing is aggregated or released"),
    ("dispfl", {"density": 0.5}, "dispfl does not support client-level DP (dp_clip): its clients read their "
                                 "neighbours' own models"),
    ("prunefl", {"initial_pruning_rounds": 2}, "prunefl does not support client-level DP (dp_clip): the initial "
                                               "pruning trains the released model"),
])
def test_methods_dp_cannot_cover_refuse_it_in_one_line(name, extra, message):
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  common = {"clients_per_round": 3, "local_epochs": 1, "batch_size": 8, "lr": 0.1}
  with pytest.raises(ValueError) as e:
    fj.algorithms.get(name, model=model, **common, dp_clip=0.5, dp_noise_multiplier=0.8, **extra)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  fj.algorithms.get(name, model=model, **common, **extra)  # fine without DP


def test_adaptive_clipping_noises_the_sum_with_z_delta():
  # z = 2 and sigma_b = 2 split as z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 = (1/4 - 1/16)^-1/2 = 2.3094 on the sum
  # (Andrew et al., Theorem 1), by hand: the first round's released noise has std z_delta * C / S at the initial C.
  size, cohort, clip = 200_000, 4, 0.5
  spec = DPSpec(clip, 2.0, quantile=0.5, clip_lr=0.2, count_noise=2.0)
  round_fn, state, train = stub_round(np.zeros((cohort, size)), dp=spec)
  s1, _ = round_fn(state, train)
  noise = -np.asarray(s1.server.params["w"])
  assert abs(noise.std() / ((1 / 4 - 1 / 16) ** -0.5 * clip / cohort) - 1) < 0.01
  assert float(s1.server.clip) != clip  # the noised count moved C


def test_dp_ignores_sample_weighting_and_masked_means():
  # Clients with 1, 2, 3, 4 and 5 samples, "samples" weighting and a masked mean: under DP the release is still the
  # plain sum of clipped updates over the expected 5 (a sample-weighted sum would move by more than C per client).
  updates = np.outer(np.arange(1, 6), np.ones(4))
  table = jnp.asarray(updates, jnp.float32)
  coverage = jnp.asarray(np.arange(20).reshape(5, 4) % 3 == 0)

  def client_fn(w, state, data, key, round):
    return ClientOutput({"w": jnp.take(table, data.offset, axis=0)}, {"w": jnp.take(coverage, data.offset, axis=0)},
                        state, {"loss": jnp.zeros(()), "steps": jnp.int32(1)})

  dp = DPSpec(clip=2.0, noise_multiplier=0.0)
  round_fn = make_round(client_fn, num_clients=5, cohort_size=5, weighting="samples", aggregation="masked_mean",
                        server_optimizer=optax.sgd(1.0), cohort_batch=None, dp=dp)
  params = {"w": jnp.zeros((4,), jnp.float32)}
  state = SimState(init_server(params, optax.sgd(1.0), dp), jnp.zeros((5,), jnp.int32), jnp.zeros((), jnp.int32),
                   jax.random.key(3), jnp.zeros((5,), jnp.int32))
  train = Split(jnp.zeros((15, 1)), jnp.zeros((15,), jnp.int32), jnp.arange(5, dtype=jnp.int32),
                jnp.arange(1, 6, dtype=jnp.int32))
  new, _ = jax.jit(round_fn)(state, train)
  clipped = np.sum([u * min(1.0, 2.0 / np.linalg.norm(u)) for u in updates], axis=0) / 5
  np.testing.assert_allclose(-np.asarray(new.server.params["w"]), clipped, rtol=1e-6)


def test_a_target_below_one_rounds_epsilon_is_a_one_line_error_before_compiling(monkeypatch, tmp_path):
  def no_compile(fn, *a, **k):  # building wraps functions in jit; calling one would trace and compile it
    def call(*args, **kwargs):
      raise AssertionError("compiled")

    return call

  monkeypatch.setattr(jax, "jit", no_compile)
  one = direct_epsilon(6, 3, 0.8, 1, 1e-5)  # the tiny config: 3 of 6 clients a round at z = 0.8
  with pytest.raises(ConfigError) as e:
    quiet_run(tiny(dp_target_epsilon=one / 2), tmp_path / "bad")
  assert "is below the epsilon of one round" in str(e.value) and "\n" not in str(e.value)
  assert f"({one:.3g})" in str(e.value)
  assert not (tmp_path / "bad").exists()
