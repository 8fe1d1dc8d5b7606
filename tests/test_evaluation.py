"""Evaluation at scale: any subset of clients, clients without test data, participation, memory-bounded groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax.evaluation import summarize

SIZES = [(6, 3), (1, 0), (9, 4), (4, 2), (3, 0), (7, 5)]  # (train, test) samples per client


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  make = lambda n: (rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n))
  return fj.data.from_clients([make(a) for a, _ in SIZES], [make(b) for _, b in SIZES], num_classes=3)


@pytest.fixture(scope="module")
def trained(data):
  model = fj.models.get("mlp", num_classes=3, hidden=(8,))
  algo = fj.algorithms.get("fedspa", model=model, clients_per_round=2, local_steps=2, local_epochs=None,
                           batch_size=4, rounds=3, eval_clients_per_batch=4)
  state = algo.init(jax.random.key(0), data)
  for _ in range(2):
    state, _ = algo.round(state, data)
  return algo, state, algo.evaluate(state, data)


def test_clients_without_test_data_are_counted_and_left_out(trained):
  _, _, ev = trained
  without = [k for k, (_, b) in enumerate(SIZES) if b == 0]
  assert np.isnan(np.asarray(ev["accuracy"])[without]).all()
  assert int(ev["with_test_data"]) == 4 and int(ev["evaluated"]) == 6
  with_data = np.asarray(ev["accuracy"])[[k for k, (_, b) in enumerate(SIZES) if b]]
  assert float(ev["accuracy_summary"]["mean"]) == pytest.approx(float(np.mean(with_data)), abs=1e-6)
  assert float(ev["accuracy_summary"]["worst10"]) == pytest.approx(float(np.min(with_data)), abs=1e-6)
  assert np.isfinite(float(ev["loss_summary"]["mean"]))


def test_participation_is_reported(trained):
  _, state, ev = trained
  took_part = np.asarray(state.participation) > 0
  assert int(np.asarray(state.participation).sum()) == 4  # 2 rounds of 2 clients
  np.testing.assert_array_equal(ev["participated"], took_part)
  assert int(ev["participating"]) == int(took_part.sum())
  acc = np.asarray(ev["accuracy"])
  kept = acc[took_part & ~np.isnan(acc)]
  expected = float(np.mean(kept)) if kept.size else float("nan")
  np.testing.assert_allclose(float(ev["accuracy_summary_participating"]["mean"]), expected, atol=1e-6)


def test_a_subset_equals_the_same_clients_of_the_full_evaluation(trained, data):
  algo, state, ev = trained
  ids = np.array([5, 0, 3])
  sub = algo.evaluate(state, data, ids)
  np.testing.assert_array_equal(sub["clients"], ids)
  np.testing.assert_allclose(sub["accuracy"], np.asarray(ev["accuracy"])[ids], rtol=1e-6)
  np.testing.assert_allclose(sub["loss"], np.asarray(ev["loss"])[ids], rtol=1e-6)


@pytest.mark.parametrize("ids, match", [([], "non-empty"), ([6], r"\[0, 6\)"), ([-1], r"\[0, 6\)"),
                                        ([1, 1], "distinct")])
def test_bad_client_ids_are_rejected_before_compiling(trained, data, ids, match):
  algo, state, _ = trained
  with pytest.raises(ValueError, match=match):
    algo.evaluate(state, data, np.asarray(ids, np.int32))


def test_summaries_ignore_nan_and_match_numpy():
  values = jnp.asarray([0.5, jnp.nan, 0.25, 1.0, 0.75, jnp.nan, 0.0, 0.5, 0.5, 1.0, 0.25, 0.75])
  kept = np.asarray(values)[~np.isnan(np.asarray(values))]
  s = summarize(values)
  assert float(s["mean"]) == pytest.approx(kept.mean()) and float(s["std"]) == pytest.approx(kept.std())
  assert float(s["median"]) == pytest.approx(np.median(kept))
  assert float(s["p10"]) == pytest.approx(np.percentile(kept, 10))
  assert float(s["worst10"]) == pytest.approx(0.0)  # ceil(10% of 10) = 1 lowest value
  empty = summarize(jnp.full((3,), jnp.nan))
  assert all(np.isnan(float(v)) for v in empty.values())
