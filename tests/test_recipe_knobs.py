"""The DisPFL group's knobs (issue 28): dense or masked clipping, which leaves are masked, the balanced Dirichlet
partition, Ditto's split epochs, FedAvg-FT's fine-tuning settings, and the staleness of FedSpa's local models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedspa_jax as fj
from fedspa_jax import masks, resume
from fedspa_jax.algorithms.base import Common, make_apply_fn
from fedspa_jax.client import ClientData, local_train, make_preprocess
from fedspa_jax.data import build, holdout
from fedspa_jax.data import partitioners as partition_lib
from fedspa_jax.evaluation import evaluate_client, staleness
from fedspa_jax.run_folder import ConfigMismatchError

SIZES = [(13, 5), (7, 4), (20, 6), (9, 3), (11, 3), (16, 5)]  # (train, test) samples per client
COMMON = dict(clients_per_round=2, local_steps=None, local_epochs=1, batch_size=4, lr=0.1, rounds=6,
              eval_clients_per_batch=4)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  make = lambda n: (rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n))
  return fj.data.from_clients([make(a) for a, _ in SIZES], [make(b) for _, b in SIZES], num_classes=3)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("mlp", num_classes=3, hidden=(8,))


def uniform_common(**kwargs):
  return Common(weighting="uniform", **kwargs)


def view(split, k):
  return ClientData(jnp.asarray(split.x), jnp.asarray(split.y), jnp.asarray(split.offset)[k],
                    jnp.asarray(split.count)[k])


# --- clipping ---------------------------------------------------------------------------------------------------


def one_step(mask, **kwargs):
  """One SGD step (lr 1) of a loss whose gradient is exactly g = (3, 4): logits do not depend on w, and a linear
  regularizer g . w adds g. Returns w after the step, from w = 0."""
  g = jnp.asarray([3.0, 4.0], jnp.float32)
  data = ClientData(jnp.zeros((2, 1), jnp.float32), jnp.zeros((2,), jnp.int32), jnp.int32(0), jnp.int32(1))
  out = local_train({"w": jnp.zeros((2,), jnp.float32)}, mask, data, jax.random.key(0),
                    apply_fn=lambda p, x: jnp.zeros((x.shape[0], 2), jnp.float32),
                    regularizer=lambda p: jnp.vdot(g, p["w"]), **{**kwargs, "batch_size": 1, "local_steps": 1})
  return np.asarray(out.params["w"])


def test_dense_and_masked_clipping_differ_exactly_as_by_hand():
  mask = {"w": jnp.asarray([True, False])}
  # masked: clip (3, 0) to norm 1 -> (1, 0); dense: clip (3, 4) (norm 5) to norm 1 -> (0.6, 0.8), then mask -> (0.6, 0)
  masked = one_step(mask, **uniform_common(lr=1.0, clip_norm=1.0, clip_mode="masked", local_steps=1).train_kwargs())
  dense = one_step(mask, **uniform_common(lr=1.0, clip_norm=1.0, clip_mode="dense", local_steps=1).train_kwargs())
  np.testing.assert_allclose(masked, [-1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(dense, [-0.6, 0.0], rtol=1e-6)
  assert masked[1] == 0.0 and dense[1] == 0.0  # the inactive coordinate stays exactly 0 either way
  # Without a mask the two are one rule: (3, 4) -> (0.6, 0.8).
  for mode in ("masked", "dense"):
    kwargs = uniform_common(lr=1.0, clip_norm=1.0, clip_mode=mode, local_steps=1).train_kwargs()
    np.testing.assert_allclose(one_step(None, **kwargs), [-0.6, -0.8], rtol=1e-6)


def test_clip_mode_is_checked_and_recorded(model):
  with pytest.raises(ValueError, match="clip_mode must be one of"):
    uniform_common(clip_mode="both")
  algo = fj.algorithms.get("fedspa", model=model, clip_norm=10.0, clip_mode="dense")
  assert algo.hparams["clip_mode"] == "dense"
  assert fj.algorithms.get("fedavg", model=model).hparams["clip_mode"] == "masked"  # the default is unchanged


# --- which leaves are masked -------------------------------------------------------------------------------------


def test_erk_over_every_parameter_by_hand():
  params = {"b": jnp.zeros((2,)), "k": jnp.zeros((4, 2))}
  # ERK scores: k (4 + 2) / 8 = 0.75, b 2 / 2 = 1; 0.5 * 10 = eps * (0.75 * 8 + 1 * 2) -> eps = 0.625
  d = masks.erk_densities(params, 0.5, maskable=masks.maskable_rule("all"))
  assert d["k"] == pytest.approx(0.46875) and d["b"] == pytest.approx(0.625)
  assert masks.target_counts(params, d) == {"b": 1, "k": 4}  # round(1.25), round(3.75)
  assert masks.erk_densities(params, 0.5)["b"] == 1.0  # kernels only: the bias stays dense
  with pytest.raises(ValueError, match="masked_leaves must be one of"):
    masks.maskable_rule("biases")


@pytest.mark.parametrize("rule", ["uniform", "erk"])
def test_masked_biases_keep_exact_counts_and_zeros(model, data, rule):
  algo = fj.algorithms.get("fedspa", model=model, **COMMON, density=0.5, density_rule=rule, masked_leaves="all",
                           personal_model="local", alpha=0.5)
  state = algo.init(jax.random.key(0), data)
  params = state.server.params
  densities = masks.erk_densities(params, 0.5, maskable=masks.is_parameter) if rule == "erk" else jax.tree.map(
      lambda _: 0.5, params)
  want = masks.target_counts(params, densities)
  if rule == "uniform":  # every bias is sparse too: round(n / 2) of its n entries
    for name in params:
      assert want[name]["bias"] == round(params[name]["bias"].size / 2) < params[name]["bias"].size
  step = jax.jit(algo.round_fn)
  for _ in range(3):
    state, metrics = step(state, data)
  assert float(metrics["prune_rate"]) > 0  # the masks were evolved
  states = algo.client_states(state, data)
  counts = masks.count_active(states.mask, stacked=True)
  for got, n in zip(jax.tree.leaves(counts), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), n)
  trained = np.asarray(states.trained)
  for local, mask in zip(jax.tree.leaves(states.local), jax.tree.leaves(states.local_mask)):
    assert not np.any(np.asarray(local)[trained][~np.asarray(mask)[trained]])  # zeros stay zero, biases included


def test_subfedavg_prunes_biases_only_when_asked():
  import importlib

  subfedavg = importlib.import_module("fedspa_jax.algorithms.subfedavg")

  params = {"b": jnp.asarray([0.4, -0.1, 0.3, 0.2]), "k": jnp.asarray([[0.5, -0.6], [0.7, 0.8]])}
  mask = masks.dense_mask(params)
  # rate 0.5: ceil(0.5 * (4 - 1)) = 2 of 4 active entries dropped, the smallest |.|: b's -0.1 and 0.2, k's 0.5, -0.6
  pruned = subfedavg.percentile_prune(mask, params, 0.5, masks.maskable_rule("all"))
  np.testing.assert_array_equal(pruned["b"], [True, False, True, False])
  np.testing.assert_array_equal(pruned["k"], [[False, False], [True, True]])
  assert bool(np.all(subfedavg.percentile_prune(mask, params, 0.5)["b"]))  # kernels only: the bias stays
  model = fj.models.get("mlp", num_classes=3, hidden=(4,))
  assert fj.algorithms.get("subfedavg", model=model, masked_leaves="all").hparams["masked_leaves"] == "all"


# --- the balanced Dirichlet partition ----------------------------------------------------------------------------


def test_balanced_dirichlet_gives_equal_sizes_and_label_matched_test_sets():
  rng = np.random.default_rng(1)
  y = np.repeat(np.arange(4), 300)  # 1200 training samples, 300 per class
  y_test = np.repeat(np.arange(4), 100)  # 100 test samples per class: every class's test/train ratio is 1/3
  x, x_test = rng.normal(size=(1200, 2)).astype(np.float32), rng.normal(size=(400, 2)).astype(np.float32)
  parts = partition_lib.partition(y, 10, "dirichlet_balanced", seed=3, alpha=0.3)
  assert [len(p) for p in parts] == [120] * 10
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1200))  # each sample once
  mixes = np.stack([np.bincount(y[p], minlength=4) for p in parts])
  assert (mixes == 0).sum() > 0  # alpha 0.3: skewed mixes, some classes absent
  data = build.from_arrays(x, y, x_test, y_test, num_clients=10, partition="dirichlet_balanced", seed=3, alpha=0.3)
  train_counts = holdout.label_counts(y, parts, 4)
  np.testing.assert_array_equal(np.diff(data.train.offset, append=1200), data.train.count)
  test_counts = np.stack([np.bincount(data.test.y[o:o + c], minlength=4)
                          for o, c in zip(data.test.offset, data.test.count)])
  # Each class's 100 test samples are dealt in proportion to the clients' 300 training samples of it: a third of
  # each client's training count per class, up to the rounding of one sample.
  assert np.abs(test_counts - train_counts / 3).max() < 1
  assert np.abs(np.asarray(data.test.count) - 40).max() <= 2


def test_balanced_dirichlet_checks_its_input():
  with pytest.raises(ValueError, match="alpha must be > 0"):
    partition_lib.partition(np.zeros(10, np.int64), 2, "dirichlet_balanced", alpha=0.0)
  with pytest.raises(ValueError, match="takes no option min_samples"):
    partition_lib.partition(np.zeros(10, np.int64), 2, "dirichlet_balanced", min_samples=3)


# --- Ditto's epochs, FedAvg-FT's fine-tuning ---------------------------------------------------------------------


def test_ditto_global_and_personal_epochs_reach_training(model, data):
  algo = fj.algorithms.get("ditto", model=model, **{**COMMON, "local_epochs": 2}, personal_epochs=3, ditto_lambda=0.5)
  state = algo.init(jax.random.key(0), data)
  _, metrics = jax.jit(algo.round_fn)(state, data)
  for i, k in enumerate(np.asarray(metrics["cohort"])):
    n = SIZES[k][0]
    assert int(metrics["global_samples"][i]) == 2 * n  # the global model: 2 epochs
    assert int(metrics["samples"][i]) == 3 * n  # the personal model: 3 epochs
    assert int(metrics["steps"][i]) == 3 * -(-n // 4)


def test_finetune_lr_reaches_the_optimizer():
  g = {"w": jnp.asarray([1.0, -2.0], jnp.float32)}
  for finetune_lr, want in ((None, 0.1 * 0.5 ** 3), (0.3, 0.3)):
    kwargs = uniform_common(lr=0.1, lr_decay=0.5, finetune_lr=finetune_lr).finetune_kwargs(jnp.int32(3), 5)
    assert (kwargs["local_epochs"], kwargs["local_steps"]) == (5, None)
    update, _ = kwargs["optimizer"].update(g, kwargs["optimizer"].init(g), g)
    np.testing.assert_allclose(update["w"], -np.float32(want) * np.asarray(g["w"]), rtol=1e-6)
  with pytest.raises(ValueError, match="finetune_lr must be a number > 0"):
    uniform_common(finetune_lr=0.0)
  with pytest.raises(ValueError, match="leave it None"):
    uniform_common(finetune_lr=0.1, optimizer=optax.sgd(0.1))


def test_fedavg_ft_fine_tunes_its_epochs_at_its_lr(model, data):
  algo = fj.algorithms.get("fedavg_ft", model=model, **{**COMMON, "lr_decay": 0.5}, finetune_epochs=2,
                           finetune_lr=0.3)
  state = algo.init(jax.random.key(0), data)
  state, _ = jax.jit(algo.round_fn)(state, data)
  ev = algo.evaluate(state, data)
  apply_fn, preprocess = make_apply_fn(model), make_preprocess(None, None)
  for k in range(len(SIZES)):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2), k)
    tuned = local_train(state.server.params, None, view(data.train, k), key, apply_fn=apply_fn, preprocess=preprocess,
                        optimizer=optax.sgd(0.3), batch_size=4, local_epochs=2).params
    out = evaluate_client(apply_fn, tuned, view(data.test, k), preprocess=preprocess)
    assert float(ev["loss"][k]) == pytest.approx(float(out["loss"]), rel=1e-5)


# --- staleness ---------------------------------------------------------------------------------------------------


def test_staleness_by_hand():
  # After 5 rounds: clients last trained in rounds 3, 5 and 1 (1-based) are 2, 0 and 4 rounds old; 0: never trained.
  out = staleness(jnp.asarray([0, 3, 5, 1], jnp.int32), jnp.int32(5))
  assert float(out["mean"]) == 2.0 and int(out["max"]) == 4 and int(out["scored"]) == 3
  assert np.isnan(float(staleness(jnp.zeros((2,), jnp.int32), jnp.int32(5))["mean"]))


def test_staleness_of_local_models_follows_the_cohort_schedule(model, data):
  algo = fj.algorithms.get("fedspa", model=model, **COMMON, personal_model="local")
  state = algo.init(jax.random.key(2), data)
  step = jax.jit(algo.round_fn)
  last = {}  # client -> the round (1-based) it last trained in, read off the cohorts
  for t in range(1, 6):
    state, metrics = step(state, data)
    for k in np.asarray(metrics["cohort"]):
      last[int(k)] = t
  ev = algo.evaluate(state, data)
  ages = [5 - last[k] for k in sorted(last)]
  np.testing.assert_array_equal(np.asarray(ev["trained_round"]), [last.get(k, 0) for k in range(len(SIZES))])
  assert float(ev["staleness"]["mean"]) == pytest.approx(np.mean(ages))
  assert int(ev["staleness"]["max"]) == max(ages) and int(ev["staleness"]["scored"]) == len(last)
  assert "staleness" not in fj.algorithms.get("fedspa", model=model, **COMMON).evaluate(
      fj.algorithms.get("fedspa", model=model, **COMMON).init(jax.random.key(2), data), data)


def test_resume_reads_knobs_a_checkpoint_predates_as_their_defaults():
  config = fj.config.Config(algorithm="fedspa", dataset="synthetic", model="mlp", num_clients=4, rounds=2)
  now = resume.record(config, {"lr": 0.1, "clip_mode": "masked", "masked_leaves": "kernels", "finetune_lr": None})
  old = {**now, "algorithm_hparams": {"lr": 0.1}}
  resume.check(old, now, config, "ckpt")  # a run from before the knobs trained with their defaults
  changed = resume.record(config, {"lr": 0.1, "clip_mode": "dense", "masked_leaves": "kernels", "finetune_lr": None})
  with pytest.raises(ConfigMismatchError, match="clip_mode: 'masked' -> 'dense'"):
    resume.check(old, changed, config, "ckpt")
