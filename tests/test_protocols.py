"""The evaluation protocols (issue 18): local adaptation for every method, FedSpa's "local" model, lr decay, clipping."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedspa_jax as fj
from fedspa_jax import config as config_lib
from fedspa_jax import experiment, masks, runner
from fedspa_jax.algorithms.base import Common, make_apply_fn
from fedspa_jax.client import ClientData, local_train, make_preprocess
from fedspa_jax.config import ConfigError
from fedspa_jax.data import idx, idx_sources
from fedspa_jax.evaluation import evaluate_client

SIZES = [(13, 5), (7, 4), (20, 6), (9, 0), (11, 3), (16, 5)]  # (train, test) samples per client
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
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


def trained(name, model, data, rounds=3, **hparams):
  algo = fj.algorithms.get(name, model=model, **{**COMMON, **hparams})
  state = algo.init(jax.random.key(1), data)
  step = jax.jit(algo.round_fn)  # no donation: the tests keep earlier states
  states = [state]
  for _ in range(rounds):
    state, metrics = step(state, data)
    states.append(state)
  return algo, states, metrics


@pytest.fixture(scope="module")
def fedspa_local(model, data):
  return trained("fedspa", model, data, rounds=4, personal_model="local")


def client_view(split, k):
  return ClientData(jnp.asarray(split.x), jnp.asarray(split.y), jnp.asarray(split.offset)[k],
                    jnp.asarray(split.count)[k])


def eval_key(state, k):
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2), k)


def score(model, params, data, k):
  out = evaluate_client(make_apply_fn(model), params, client_view(data.test, k), preprocess=make_preprocess(None, None))
  return float(out["accuracy"]), float(out["loss"])


def test_finetuning_equals_training_from_the_scored_model_then_scoring(fedspa_local, model, data):
  algo, states, _ = fedspa_local
  state = states[-1]
  ev = algo.evaluate(state, data, finetune_epochs=2)
  client_states = algo.client_states(state, data)
  kwargs = {**Common(**COMMON, weighting="uniform").train_kwargs(state.round), "local_epochs": 2, "local_steps": None}
  for k, (_, test) in enumerate(SIZES):
    mask = jax.tree.map(lambda a: a[k], client_states.mask)
    scored = masks.apply_mask(state.server.params, mask)  # masked_global, the protocol beside "local"
    tuned = local_train(scored, mask, client_view(data.train, k), eval_key(state, k), apply_fn=make_apply_fn(model),
                        preprocess=make_preprocess(None, None), **kwargs).params
    for leaf, m in zip(jax.tree.leaves(tuned), jax.tree.leaves(mask)):  # zeros stay zero
      assert not np.any(np.asarray(leaf)[~np.asarray(m)])
    if test == 0:
      assert np.isnan(ev["accuracy_masked_global"][k])
      continue
    acc, loss = score(model, tuned, data, k)
    assert float(ev["accuracy_masked_global"][k]) == pytest.approx(acc, abs=1e-6)
    assert float(ev["loss_masked_global"][k]) == pytest.approx(loss, rel=1e-5)
  assert float(ev["flops"]) > float(algo.evaluate(state, data)["flops"]) > 0  # fine-tuning is counted


def test_zero_finetuning_epochs_is_the_plain_evaluation(model, data):
  algo, states, _ = trained("fedspa", model, data)
  state = states[-1]
  ev, ev0 = algo.evaluate(state, data), algo.evaluate(state, data, finetune_epochs=0)
  np.testing.assert_array_equal(ev["accuracy"], ev0["accuracy"])
  np.testing.assert_array_equal(ev["loss"], ev0["loss"])
  client_masks = algo.client_states(state, data)
  for k, (_, test) in enumerate(SIZES):
    if test:  # m_k ⊙ w on the client's own test data
      mask = jax.tree.map(lambda a: a[k], client_masks)
      acc, _ = score(model, masks.apply_mask(state.server.params, mask), data, k)
      assert float(ev["accuracy"][k]) == pytest.approx(acc, abs=1e-6)


def test_fedavg_finetuned_for_one_epoch_is_fedavg_ft(model, data):
  fedavg, states, _ = trained("fedavg", model, data)
  fedavg_ft, states_ft, _ = trained("fedavg_ft", model, data)
  ev = fedavg.evaluate(states[-1], data, finetune_epochs=1)
  ev_ft = fedavg_ft.evaluate(states_ft[-1], data)
  np.testing.assert_array_equal(ev["accuracy"], ev_ft["accuracy"])
  np.testing.assert_array_equal(ev["loss"], ev_ft["loss"])
  assert not np.array_equal(np.nan_to_num(ev["accuracy"]), np.nan_to_num(fedavg.evaluate(states[-1], data)["accuracy"]))


def test_local_scores_the_params_of_the_last_participation(fedspa_local, model, data):
  algo, states, _ = fedspa_local
  final = states[-1]
  participation = np.asarray(final.participation)
  ev = algo.evaluate(final, data)
  stored = algo.client_states(final, data)
  checked = 0
  for t in range(len(states) - 1):
    before, after = states[t], states[t + 1]
    cohort = np.flatnonzero(np.asarray(after.participation) > np.asarray(before.participation))
    for k in cohort:
      if participation[k] != after.participation[k]:
        continue  # trained again later
      mask = jax.tree.map(lambda a: a[k], algo.client_states(before, data).mask)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(before.key, before.round), 1), int(k))
      k_train = jax.random.split(key, 3)[0]
      expected = jax.jit(lambda w, m, d, key: local_train(
          masks.apply_mask(w, m), m, d, key, apply_fn=make_apply_fn(model), preprocess=make_preprocess(None, None),
          **Common(**COMMON, weighting="uniform").train_kwargs(before.round)).params)(before.server.params, mask,
                                                                 client_view(data.train, k), k_train)
      local = jax.tree.map(lambda a: a[k], stored.local)
      for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree.leaves(stored.local_mask), jax.tree.leaves(mask)):  # the mask it trained under
        np.testing.assert_array_equal(a[k], b)
      if SIZES[k][1]:
        acc, _ = score(model, expected, data, k)
        assert float(ev["accuracy"][k]) == pytest.approx(acc, abs=1e-6)
      checked += 1
  assert checked >= 2


def test_a_never_trained_client_falls_back_to_the_masked_global_model(fedspa_local, data):
  algo, states, _ = fedspa_local
  final = states[-1]
  ev = algo.evaluate(final, data)
  never = np.flatnonzero((np.asarray(final.participation) == 0) & (np.asarray([t for _, t in SIZES]) > 0))
  assert never.size >= 1  # 4 rounds of 2 of 6 clients leave some out with this seed
  np.testing.assert_array_equal(ev["accuracy"][never], ev["accuracy_masked_global"][never])
  assert int(ev["participating"]) == int(np.sum(np.asarray(final.participation) > 0))
  assert not np.asarray(algo.client_states(final, data).trained)[never].any()


def test_lr_decay_sets_the_step_size_of_round_t():
  g = {"w": jnp.asarray([[1.0, -2.0], [0.5, 4.0]], jnp.float32)}
  common = Common(lr=0.1, lr_decay=0.5, weighting="uniform")
  for t in range(4):
    opt = common.train_kwargs(jnp.int32(t))["optimizer"]
    update, _ = opt.update(g, opt.init(g), g)
    np.testing.assert_array_equal(update["w"], -(np.float32(0.1) * np.float32(0.5) ** t) * np.asarray(g["w"]))


def test_lr_decay_in_rounds_of_a_linear_model():
  # One client, one full-batch step per round of a linear model: w_{t+1} = w_t - lr decay^t g_t.
  data = fj.data.from_clients([(np.eye(4, dtype=np.float32), np.arange(4) % 2)], [(np.eye(4, dtype=np.float32),
                              np.arange(4) % 2)], num_classes=2)
  model = fj.models.get("mlp", num_classes=2, hidden=())
  algo = fj.algorithms.get("fedavg", model=model, clients_per_round=1, local_steps=1, local_epochs=None,
                           batch_size=4, lr=0.5, lr_decay=0.5, rounds=4)
  state = algo.init(jax.random.key(0), data)
  step = jax.jit(algo.round_fn)  # no donation: the test keeps w_t
  apply_fn = make_apply_fn(model)
  x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
  for t in range(3):
    w = state.server.params
    grads = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)))(w)
    state, _ = step(state, data)
    for new, old, g in zip(jax.tree.leaves(state.server.params), jax.tree.leaves(w), jax.tree.leaves(grads)):
      np.testing.assert_allclose(new, old - 0.5 * 0.5**t * g, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_every_step(model, data):
  common = Common(lr=0.3, clip_norm=0.05, batch_size=4, weighting="uniform")
  norms = []
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
  train = lambda steps: local_train(params, None, client_view(data.train, 2), jax.random.key(3),
                                    apply_fn=make_apply_fn(model), **{**common.train_kwargs(), "local_epochs": None,
                                                                      "local_steps": steps}).params
  previous = params
  for steps in range(1, 6):
    current = train(steps)
    delta = jax.tree.map(jnp.subtract, current, previous)
    norms.append(float(jnp.sqrt(sum(jnp.sum(d * d) for d in jax.tree.leaves(delta)))))
    previous = current
  assert max(norms) <= 0.3 * 0.05 * (1 + 1e-5)
  assert min(norms) > 0.3 * 0.05 * 0.5  # the gradients here are larger than the bound: it binds


@pytest.mark.parametrize("hparams, match", [
    ({"personal_model": "best"}, "personal_model must be one of"),
    ({"lr_decay": 0.0}, "lr_decay must be a number in \\(0, 1\\]"),
    ({"lr_decay": 1.5}, "lr_decay must be a number in \\(0, 1\\]"),
    ({"clip_norm": 0.0}, "clip_norm must be a number > 0"),
    ({"clip_norm": -1.0}, "clip_norm must be a number > 0"),
])
def test_bad_protocol_options_are_clear_errors(model, hparams, match):
  with pytest.raises(ValueError, match=match):
    fj.algorithms.get("fedspa", model=model, **hparams)


def test_local_model_on_a_method_without_one_is_refused(model):
  with pytest.raises(ValueError, match="unknown hyperparameters for 'fedavg': personal_model"):
    fj.algorithms.get("fedavg", model=model, personal_model="local")


def test_negative_finetuning_is_refused_before_compiling(fedspa_local, data):
  algo, states, _ = fedspa_local
  with pytest.raises(ValueError, match="finetune_epochs must be an integer >= 0"):
    algo.evaluate(states[-1], data, finetune_epochs=-1)
  config = config_lib.apply_overrides(config_lib.load("default", smoke=True), {"eval_finetune_epochs": -1})
  with pytest.raises(ConfigError, match="eval_finetune_epochs must be an integer >= 0"):
    runner.check_config(config)


def test_resume_equals_an_uninterrupted_run_with_the_new_options(tmp_path):
  config = config_lib.apply_overrides(config_lib.load("default", smoke=True), {
      "personal_model": "local", "lr_decay": 0.9, "clip_norm": 1.0, "eval_finetune_epochs": 1, "rounds": 4,
      "checkpoint_every": 1})
  whole = experiment.run(config, tmp_path / "whole", echo=None, write_plots=False)
  experiment.run(config, tmp_path / "parts", echo=None, write_plots=False, stop_after=2)
  resumed = experiment.run(config, tmp_path / "parts", echo=None, write_plots=False, resume=True)
  for key in ("final_accuracy", "final_accuracy_masked_global", "final_accuracy_finetuned", "client_accuracy"):
    assert resumed[key] == whole[key], key
  lines = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  drop = lambda r: {k: v for k, v in r.items() if k != "wall_time"}
  assert [drop(r) for r in lines("parts")] == [drop(r) for r in lines("whole")]
  saved = json.loads((tmp_path / "whole" / "config.json").read_text())
  assert saved["algorithm_hparams"]["lr_decay"] == 0.9 and saved["algorithm_hparams"]["clip_norm"] == 1.0
  assert whole["protocol"] == "local" and whole["finetune_epochs"] == 1
  _, algo = experiment.build(config, runner.load_data(config))
  params = algo.init(jax.random.key(0), runner.load_data(config)).server.params
  values = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  assert whole["client_store_bytes_per_client"] > values  # the local model's values are kept per client


def test_the_reference_recipe_is_dispfls_defaults():
  full = config_lib.load("fashion_mnist_reference")
  # The recipe as the authors' group's code sets it (rong-dai/DisPFL at 7fb0428: the argparse defaults of
  # fedml_experiments/standalone/DisPFL/main_dispfl.py, and the clip_grad_norm_(..., 10) of
  # fedml_api/standalone/DisPFL/my_model_trainer.py), under that code's names.
  dispfl = {"epochs": 5, "batch_size": 128, "wd": 5e-4, "lr_decay": 0.998, "clip": 10, "dense_ratio": 0.5,
            "anneal_factor": 0.5, "momentum": 0, "lr": 0.1, "client_num_in_total": 100, "frac": 0.1,
            "partition_method": "dir", "partition_alpha": 0.3}
  ours = {"epochs": full.hparams["local_epochs"], "batch_size": full.hparams["batch_size"],
          "wd": full.hparams["weight_decay"], "lr_decay": full.hparams["lr_decay"], "clip": full.hparams["clip_norm"],
          "dense_ratio": full.hparams["density"], "anneal_factor": full.hparams["alpha"],
          "momentum": full.hparams["momentum"], "lr": full.hparams["lr"], "client_num_in_total": full.num_clients,
          "frac": full.hparams["clients_per_round"] / full.num_clients,
          "partition_method": {"dirichlet": "dir"}.get(full.partition, full.partition),
          "partition_alpha": full.data_args.get("alpha")}
  assert ours == dispfl


@pytest.mark.skipif(not all((FASHION_DIR / f).is_file() for f in idx_sources.FILES),
                    reason="Fashion-MNIST IDX files absent: run scripts/install_datasets.sh")
def test_the_reference_recipe_config_runs_end_to_end(tmp_path, monkeypatch):
  # On a real subset (the first 2,000 training and 500 test images): the final evaluation fine-tunes every client
  # for an epoch of its data, which on the whole set took most of a minute here.
  subset = tmp_path / "fashion_mnist"
  subset.mkdir()
  for name, n in zip(idx_sources.FILES, (2000, 2000, 500, 500)):
    idx.write_idx(subset / name, idx.read_idx(FASHION_DIR / name)[:n])
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))  # the partition cache is keyed by the arguments
  config = config_lib.load("fashion_mnist_reference", smoke=True)
  config.data_args.update(download=False, verify=False)
  config = dataclasses.replace(config, data_dir=str(subset))
  summary = experiment.run(config, tmp_path / "ref", echo=None, write_plots=False)
  assert summary["protocol"] == "local" and summary["finetune_epochs"] == 1
  assert summary["hparams"]["lr_decay"] == 0.998 and summary["hparams"]["clip_norm"] == 10.0
  # A client's data cover few of the 10 classes (Dirichlet 0.3): an epoch of local fine-tuning lifts its model well
  # above chance (0.1), and above the model it was scored with before.
  assert summary["final_accuracy_finetuned"]["mean"] > max(0.2, summary["final_accuracy_mean"])
