"""Seeds (and lrs) as one vmapped program: a sweep equals separate runs seed by seed (and lr by lr), compiles its
round once, records a diverged lr, refuses bad seeds and lrs before compiling, and runs from the command line."""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from fedspa_jax import cli, experiment
from fedspa_jax import config as config_lib
from fedspa_jax import sweep as sweep_lib
from fedspa_jax.config import ConfigError
from fedspa_jax.data import split_from_flat
from fedspa_jax.data.federated import FederatedData

SEEDS = (0, 1, 2)
EXACT = ("round", "bytes_up", "bytes_down", "samples", "eval_clients", "eval_with_test_data", "eval_participating",
         "eval_diverged")


def tiny(**changes) -> config_lib.Config:
  """The default config's smoke variant (6 clients, 3 per round, 2 local steps, a 16-unit MLP), 4 rounds."""
  config = dataclasses.replace(config_lib.load("default", smoke=True), rounds=4, checkpoint_every=0)
  return config_lib.apply_overrides(config, changes)


def records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 3-seed sweep (counting traces of its round) and the 3 separate runs it should equal."""
  root = tmp_path_factory.mktemp("sweep")
  traces = []

  def counting(round_fn):
    def traced(state, data):
      traces.append(1)
      return round_fn(state, data)

    return make_sweep_round(traced)

  make_sweep_round = sweep_lib.make_sweep_round
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sweep_lib, "make_sweep_round", counting)
    summary = experiment.sweep(tiny(), SEEDS, root / "sweep", echo=None, progress=False)
  runs = {s: experiment.run(tiny(seed=s), root / f"run{s}", echo=None, progress=False, write_plots=False)
          for s in SEEDS}
  return root, summary, runs, len(traces)


def test_sweep_equals_separate_runs_seed_by_seed(swept):
  root, _, runs, _ = swept
  for s in SEEDS:
    ours, theirs = records(root / "sweep" / f"seed_{s}" / "metrics.jsonl"), records(root / f"run{s}" / "metrics.jsonl")
    assert [r["round"] for r in ours] == [1, 2, 3, 4]
    assert ours[0].keys() == theirs[0].keys()
    for a, b in zip(ours, theirs):
      for key in a:
        if key in EXACT:
          assert a[key] == b[key], (s, a["round"], key)
        elif key != "wall_time":
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"seed {s} {key}")
    mine = json.loads((root / "sweep" / f"seed_{s}" / "summary.json").read_text())
    np.testing.assert_allclose(np.array(mine["client_accuracy"], float), np.array(runs[s]["client_accuracy"], float),
                               atol=1e-5)
    assert mine["seed"] == s and mine["bytes_total"] == runs[s]["bytes_total"]
    clients = np.load(root / "sweep" / f"seed_{s}" / "clients.npz")
    np.testing.assert_array_equal(clients["participation"], np.load(root / f"run{s}" / "clients.npz")["participation"])


def test_seeds_differ_and_the_summary_is_mean_and_std_over_seeds(swept):
  root, summary, runs, _ = swept
  per_seed = [runs[s]["final_accuracy_mean"] for s in SEEDS]
  assert len(set(per_seed)) == len(SEEDS)  # the seeds really are different simulations
  np.testing.assert_allclose(summary["final_accuracy_mean_per_seed"], per_seed, atol=1e-5)
  np.testing.assert_allclose(summary["final_accuracy_mean"]["mean"], np.mean(per_seed), atol=1e-5)
  np.testing.assert_allclose(summary["final_accuracy_mean"]["std"], np.std(per_seed), atol=1e-5)
  assert summary["bytes_total"]["mean"] == pytest.approx(np.mean([runs[s]["bytes_total"] for s in SEEDS]))
  assert set(summary["final_accuracy"]) == set(runs[0]["final_accuracy"])
  assert summary["seeds"] == list(SEEDS)
  assert json.loads((root / "sweep" / "summary.json").read_text()) == summary
  assert config_lib.Config.from_dict(json.loads((root / "sweep" / "seed_1" / "config.json").read_text())).seed == 1


def test_the_vmapped_round_is_traced_once(swept):
  *_, traces = swept
  assert traces == 1  # 4 rounds, 3 seeds: one trace, one compiled program


@pytest.mark.parametrize(
    "seeds, message",
    [
        ([], "at least one seed"),
        ([0, 1, 0], "seeds must be distinct; repeated: 0"),
        ([0, 1.5], "seeds must be integers, got 1.5"),
        ([True], "seeds must be integers, got True"),
        (["1"], "seeds must be integers, got '1'"),
        ([-1], "seeds must be >= 0"),
        (3, "seeds must be a list of integers"),
    ],
)
def test_bad_seeds_raise_before_anything_runs(seeds, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    experiment.sweep(tiny(), seeds, tmp_path / "x", echo=None, progress=False)
  assert not (tmp_path / "x").exists()


def test_an_occupied_folder_is_refused(swept):
  root, *_ = swept
  with pytest.raises(ConfigError, match="already holds a run"):
    experiment.sweep(tiny(), SEEDS, root / "sweep", echo=None, progress=False)


LR_SEEDS = (0, 1)
BIG_LR = 1e30  # diverges in the first round


@pytest.fixture(scope="module")
def lr_swept(swept):
  """A sweep over 3 lrs (the config's, a larger one, a diverging one) x 2 seeds, its traces, and separate runs."""
  root, _, runs, _ = swept
  base_lr = tiny().hparams["lr"]
  lrs = (base_lr, 4 * base_lr, BIG_LR)
  traces = []

  def counting(round_fn):
    traces.append(1)  # called once per trace of the lr-vmapped round, when the algorithm is built with a traced lr
    return make_sweep_round(round_fn)

  make_sweep_round = sweep_lib.make_sweep_round
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sweep_lib, "make_sweep_round", counting)
    summary = experiment.sweep(tiny(), LR_SEEDS, root / "lrs", lrs=lrs, echo=None, progress=False)
  separate = {(base_lr, s): root / f"run{s}" for s in LR_SEEDS}  # the seed sweep's runs have the config's lr
  for s in LR_SEEDS:
    out = root / f"run_lr{s}"
    experiment.run(sweep_lib.with_lr(tiny(seed=s), lrs[1]), out, echo=None, progress=False, write_plots=False)
    separate[lrs[1], s] = out
  return root / "lrs", lrs, summary, separate, len(traces)


def test_lr_sweep_equals_separate_runs_lr_by_lr_and_compiles_once(lr_swept):
  out, lrs, _, separate, traces = lr_swept
  assert traces == 1  # 3 lrs x 2 seeds x 4 rounds: one trace, one compiled program
  for (lr, s), run_dir in separate.items():
    ours, theirs = records(out / f"lr_{lr:g}" / f"seed_{s}" / "metrics.jsonl"), records(run_dir / "metrics.jsonl")
    assert [r["round"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
      for key in a:
        if key in EXACT:
          assert a[key] == b[key], (lr, s, a["round"], key)
        elif key != "wall_time":
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"lr {lr} seed {s} {key}")
    mine = json.loads((out / f"lr_{lr:g}" / f"seed_{s}" / "summary.json").read_text())
    assert mine["hparams"]["lr"] == lr and mine["seed"] == s
    assert config_lib.Config.from_dict(
        json.loads((out / f"lr_{lr:g}" / f"seed_{s}" / "config.json").read_text())).hparams["lr"] == lr
  accuracies = {lr: json.loads((out / f"lr_{lr:g}" / "summary.json").read_text())["final_accuracy_mean"]["mean"]
                for lr in lrs[:2]}
  assert accuracies[lrs[0]] != accuracies[lrs[1]]  # the lrs really are different simulations


def test_a_diverged_lr_is_recorded_and_the_others_go_on(lr_swept):
  out, lrs, summary, _, _ = lr_swept
  big = summary["by_lr"][f"{BIG_LR:g}"]
  assert big["status"] == "diverged" and big["diverged_seeds"] == list(LR_SEEDS)
  assert summary["final_accuracy_mean_by_lr"][f"{BIG_LR:g}"] is None
  seed_summary = json.loads((out / f"lr_{BIG_LR:g}" / "seed_0" / "summary.json").read_text())
  assert seed_summary["status"] == "diverged" and "diverged" in seed_summary["error"]
  means = {lr: summary["final_accuracy_mean_by_lr"][f"{lr:g}"]["mean"] for lr in lrs[:2]}
  assert summary["best_lr"] == max(means, key=means.get)
  assert summary["lrs"] == list(lrs) and summary["seeds"] == list(LR_SEEDS)
  assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    "lrs, message",
    [
        ([], "at least one lr"),
        ([0.1, -1.0], "lrs must be finite and > 0, got -1.0"),
        ([0.0], "lrs must be finite and > 0, got 0.0"),
        ([float("nan")], "lrs must be finite and > 0"),
        ([0.1, 0.1], "lrs must be distinct; repeated: 0.1"),
        ([True], "lrs must be numbers, got True"),
        (0.1, "lrs must be a list of numbers"),
    ],
)
def test_bad_lrs_raise_before_anything_runs(lrs, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    experiment.sweep(tiny(), (0,), tmp_path / "x", lrs=lrs, echo=None, progress=False)
  assert not (tmp_path / "x").exists()


def small_data(counts):
  counts = np.asarray(counts)
  n = int(counts.sum())
  x, y = np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n) % 2
  split = split_from_flat(x, y, counts)
  return FederatedData(train=split, test=split, num_classes=2)


def test_stacking_pads_rows_and_refuses_other_shapes():
  stacked = sweep_lib.stack_data([small_data([3, 1]), small_data([2, 4])])
  assert stacked.train.x.shape == (2, 6, 2) and stacked.train.max_count == 4
  np.testing.assert_array_equal(stacked.train.x[0, :4], small_data([3, 1]).train.x)  # padding after the rows in use
  np.testing.assert_array_equal(stacked.train.count, [[3, 1], [2, 4]])
  with pytest.raises(ConfigError, match="same-shaped data"):
    sweep_lib.stack_data([small_data([3, 1]), small_data([1, 1, 1])])


def call(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def test_cli_sweep_writes_the_seed_folders_and_a_summary(tmp_path):
  out = tmp_path / "seeds"
  code, stdout, stderr = call("sweep", "--seeds", "3", "5", "--set", "smoke=true", "--set", "rounds=2",
                              "--set", "model.hidden=[8]", "--out", out)
  assert code == 0, stderr
  assert [line.split()[1] for line in stdout.splitlines() if line.startswith("round")] == ["1", "2"]
  assert "over 2 seeds" in stdout and stdout.splitlines()[-1].startswith("done: fedspa")
  for s in (3, 5):
    assert len(records(out / f"seed_{s}" / "metrics.jsonl")) == 2
    assert (out / f"seed_{s}" / "summary.json").is_file()
  assert json.loads((out / "summary.json").read_text())["seeds"] == [3, 5]
  assert (out / "config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "x"], "seeds must be integers, got 'x'"),
    (["--seeds", "0,0"], "seeds must be distinct"),
    (["--seeds", "0", "--seed", "1"], "sweep takes --seeds, not --seed"),
    (["--seeds", "0", "--lrs", "0.1", "-0.5"], "lrs must be finite and > 0, got -0.5"),
    (["--seeds", "0", "--lrs", "0.1,x"], "lrs must be numbers, got 'x'"),
    (["--seeds", "0", "--lrs", "0.1,0.1"], "lrs must be distinct"),
])
def test_cli_bad_seeds_are_a_clear_error(args, message, tmp_path):
  code, _, stderr = call("sweep", *args, "--set", "smoke=true", "--out", tmp_path / "x")
  assert code == cli.EXIT_BAD_INPUT
  assert message in stderr and len(stderr.strip().splitlines()) == 1
  assert not (tmp_path / "x").exists()


def test_fused_rounds_and_seeded_evaluation_samples_match_the_run(tmp_path):
  config = tiny(rounds_per_dispatch=2, eval_every=2, eval_clients=4)
  experiment.sweep(config, (0, 1), tmp_path / "sweep", echo=None, progress=False)
  experiment.run(tiny(rounds_per_dispatch=2, eval_every=2, eval_clients=4, seed=1), tmp_path / "run", echo=None,
                 progress=False, write_plots=False)
  ours, theirs = records(tmp_path / "sweep" / "seed_1" / "metrics.jsonl"), records(tmp_path / "run" / "metrics.jsonl")
  assert [(r["round"], r["eval_clients"]) for r in ours] == [(2, 4), (4, 6)]  # the last evaluation covers all
  for a, b in zip(ours, theirs):
    for key in a:
      if key != "wall_time":
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_lrs_that_agree_to_6_digits_get_their_own_folders(tmp_path):
  lrs = (0.1, 0.1000001)  # f"{lr:g}" names both "0.1"
  summary = experiment.sweep(tiny(rounds=1), (0,), tmp_path / "close", lrs=lrs, echo=None, progress=False)
  assert sorted(p.name for p in (tmp_path / "close").iterdir() if p.is_dir()) == ["checkpoints", "lr_0.1",
                                                                                 "lr_0.1000001"]
  for lr in lrs:
    for folder in (f"lr_{lr!r}", f"lr_{lr!r}/seed_0"):
      assert json.loads((tmp_path / "close" / folder / "config.json").read_text())["hparams"]["lr"] == lr
  assert list(summary["by_lr"]) == ["0.1", "0.1000001"]
  assert [sweep_lib.lr_text(lr) for lr in (1.0, 100.0, 1e-05, 0.03, 1e30)] == ["1", "100", "1e-05", "0.03", "1e+30"]


def test_the_sweep_does_not_import_the_experiment_module():
  code = "import sys, fedspa_jax.sweep; assert 'fedspa_jax.experiment' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
