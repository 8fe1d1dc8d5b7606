"""Diverged clients (issue 17): counted in every evaluation, they stop the run, and no checkpoint holds them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import config as config_lib
from fedspa_jax import experiment
from fedspa_jax.records import TrainingDiverged

POISONED = 2  # the client whose personal model is forced to NaN


def poison(state, when=True):
  """The state with client POISONED's personal model set to NaN (float leaves of the store) `when` (traceable)."""
  clients = jax.tree.map(
      lambda a: jnp.where(when, a.at[POISONED].set(jnp.nan), a) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      state.clients,
  )
  return state._replace(clients=clients)


@pytest.fixture(scope="module")
def local_run():
  data = fj.data.synthetic(alpha=1.0, beta=1.0, num_clients=6, seed=0, max_samples_per_client=40)
  model = fj.models.get("mlp", num_classes=data.num_classes, hidden=(8,))
  algo = fj.algorithms.get("local", model=model, clients_per_round=3, local_steps=2, local_epochs=None,
                           batch_size=8, lr=0.05, rounds=3)
  state = algo.init(jax.random.key(0), data)
  state, _ = algo.round(state, data)
  return algo, state, data


def test_a_nan_client_is_counted_as_diverged_and_left_out(local_run):
  algo, state, data = local_run
  ev = algo.evaluate(state, data)
  bad = algo.evaluate(poison(state), data)
  assert int(ev["diverged"]) == 0 and int(bad["diverged"]) == 1
  assert bool(bad["client_diverged"][POISONED]) and np.isnan(bad["accuracy"][POISONED]) and np.isnan(bad["loss"][POISONED])
  others = np.delete(np.asarray(ev["accuracy"]), POISONED)
  assert float(bad["accuracy_summary"]["mean"]) == pytest.approx(float(np.nanmean(others)), abs=1e-6)
  assert np.isfinite(float(bad["loss_summary"]["mean"]))  # the mean alone would hide it: `diverged` says it


def poisoned_build(at_round):
  """`experiment.build` whose algorithm's round writes NaN into one client's model after round `at_round`."""
  build = experiment.build

  def patched(config, data):
    model, algo = build(config, data)

    def round_fn(state, data):  # the run loop compiles algo.round_fn
      state, metrics = algo.round_fn(state, data)
      return poison(state, state.round == at_round), metrics

    return model, dataclasses.replace(algo, round_fn=round_fn)

  return patched


@pytest.mark.parametrize("eval_every", [1, 5])
def test_no_checkpoint_is_written_over_the_last_good_one(tmp_path, monkeypatch, eval_every):
  config = config_lib.apply_overrides(config_lib.load("default", smoke=True), {
      "algorithm": "local", "rounds": 4, "checkpoint_every": 1, "eval_every": eval_every})
  del config.hparams["density"]  # FedSpa's
  monkeypatch.setattr(experiment, "build", poisoned_build(at_round=3))
  with pytest.raises(TrainingDiverged) as e:
    experiment.run(config, tmp_path, echo=None, write_plots=False)
  # Caught by the evaluation (1 client's model scores NaN) or, without one, by the checkpoint guard on the store.
  assert ("1 of" in str(e.value)) if eval_every == 1 else ("client's state holds NaN" in str(e.value))
  assert "the last good checkpoint" in str(e.value) and "(round 2)" in str(e.value)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_diverged_clients_are_printed():
  from fedspa_jax.logging_utils import format_record

  record = {"round": 3, "accuracy_mean": 0.5, "accuracy_std": 0.1, "accuracy_p10": 0.2, "accuracy_p90": 0.9,
            "train_loss": 0.3, "bytes_up": 10, "bytes_down": 10, "wall_time": 1.0}
  assert "DIVERGED" not in format_record({**record, "eval_diverged": 0})
  assert "DIVERGED: 2 clients" in format_record({**record, "eval_diverged": 2})


def test_a_lost_client_s_nan_loss_stops_the_run_and_one_that_never_started_does_not():
  """records.consume by hand: the clients that trained (samples > 0) are the ones whose losses count, a dropped client
  whose update was lost among them (it keeps what it trained); padding and never-started slots (0 samples) are not."""
  from fedspa_jax import records
  params = {"w": jnp.zeros((3,), jnp.float32)}
  metrics = lambda loss: {  # one round of 4 slots: reporting, lost (weight 0), never started, padding
      "weight": np.array([[1.0, 0.0, 0.0, 0.0]]), "samples": np.array([[10, 6, 0, 0]]),
      "loss": np.array([loss]), "accuracy": np.array([[0.5, 0.7, 0.0, 0.0]]),
      "values_down": np.zeros((1, 4, 1), np.int32), "values_up": np.zeros((1, 4, 1), np.int32)}
  totals = records.Totals()
  train = records.consume(metrics([1.0, 3.0, np.nan, np.nan]), 0, totals, params)
  assert train == {"train_loss": 2.0, "train_accuracy": pytest.approx(0.6)} and totals.samples == 16
  with pytest.raises(TrainingDiverged, match="round 1"):
    records.consume(metrics([1.0, np.nan, 0.0, 0.0]), 0, records.Totals(), params)
  # Every training pass is work done: Ditto's global model (global_samples) beside its personal one, FedRep's head.
  totals = records.Totals()
  records.consume({**metrics([1.0, 3.0, 0.0, 0.0]), "global_samples": np.array([[4, 2, 0, 0]]),
                   "head_samples": np.array([[1, 0, 0, 0]])}, 0, totals, params)
  assert totals.samples == 16 + 6 + 1
