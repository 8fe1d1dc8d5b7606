"""The run wrapper (`job.execute`) that `run`, `sweep` and `compare` share: a sweep over lrs equals separate runs in
every recorded number, per-lr records, deadlines that stop at the first boundary, a stop that saves before it
evaluates, exit status 75 through a storm of signals, summary.json before the per-client analysis, and the
`compare` / `--stop-after` edges (issue 25)."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedspa_jax import cli, client_stats, experiment, preemption, sweep
from fedspa_jax import config as config_lib
from fedspa_jax.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOLATILE = {"wall_time", "run_dir", "seed_dirs"}


def tiny(algorithm="fedavg_ft", **changes) -> config_lib.Config:
  """The default config's smoke variant (6 clients, 3 per round, 2 local steps, a 16-unit MLP) as `algorithm`."""
  config = config_lib.load("default", smoke=True)
  config = dataclasses.replace(config, algorithm=algorithm, rounds=3, checkpoint_every=0,
                               hparams={k: v for k, v in config.hparams.items() if k != "density"})
  return config_lib.apply_overrides(config, list(changes.items()))


def quiet(function, *args, **kwargs):
  return function(*args, echo=None, progress=False, **kwargs)


def lines(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same(ours, theirs, where=""):
  """Equal JSON values: the same keys, lists and strings, numbers equal up to float rounding (ints exactly)."""
  if isinstance(theirs, dict):
    assert set(ours) == set(theirs), (where, set(ours) ^ set(theirs))
    for key in theirs:
      if key not in VOLATILE:
        assert_same(ours[key], theirs[key], f"{where}.{key}")
  elif isinstance(theirs, list):
    assert len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(ours, theirs)):
      assert_same(a, b, f"{where}[{i}]")
  elif isinstance(theirs, float) and not isinstance(ours, str):
    assert ours is not None and (math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-6)
                                 or (math.isnan(ours) and math.isnan(theirs))), (where, ours, theirs)
  else:
    assert ours == theirs, (where, ours, theirs)


def assert_same_run_files(ours: pathlib.Path, theirs: pathlib.Path) -> None:
  """metrics.jsonl, summary.json and clients.npz of two run folders hold the same numbers."""
  assert_same(lines(ours / "metrics.jsonl"), lines(theirs / "metrics.jsonl"), str(ours / "metrics.jsonl"))
  assert_same(json.loads((ours / "summary.json").read_text()), json.loads((theirs / "summary.json").read_text()),
              str(ours / "summary.json"))
  a, b = np.load(ours / "clients.npz"), np.load(theirs / "clients.npz")
  assert set(a.files) == set(b.files)
  for key in b.files:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{ours} clients.npz {key}")


def test_an_lr_sweep_of_fedavg_ft_equals_four_runs_number_for_number(tmp_path):
  # FedAvg-FT's own protocol fine-tunes every client at every evaluation, with the run's lr: the sweep used to
  # fine-tune every lr's runs with the first lr's optimizer (issue 25, 1).
  config = tiny(rounds=2)
  code = cli.main(["sweep", "--config", "default", "--set", "smoke=true", "--set", "algorithm=fedavg_ft",
                   "--set", "rounds=2", "--set", "checkpoint_every=0", "--lrs", "0.05", "0.5", "--seeds", "1", "2",
                   "--out", str(tmp_path / "grid"), "--quiet"])
  assert code == 0
  for lr in (0.05, 0.5):
    for seed in (1, 2):
      run_dir = tmp_path / f"run_{lr}_{seed}"
      quiet(experiment.run, sweep.with_lr(dataclasses.replace(config, seed=seed), lr), run_dir, write_plots=False)
      assert_same_run_files(tmp_path / "grid" / f"lr_{lr}" / f"seed_{seed}", run_dir)
  losses = {lr: json.loads((tmp_path / "grid" / f"lr_{lr}" / "summary.json").read_text())["final_loss_mean"]["mean"]
            for lr in (0.05, 0.5)}
  assert losses[0.05] != losses[0.5]


def test_an_lr_sweep_fine_tunes_each_lr_with_its_own_lr(tmp_path):
  config = tiny("fedspa", density=0.5, eval_finetune_epochs=1, rounds=1)
  quiet(sweep.sweep, config, [0], tmp_path / "grid", lrs=[0.05, 0.5])
  run_dir = tmp_path / "run"  # the second lr: the one the sweep used to fine-tune with the first lr's optimizer
  quiet(experiment.run, sweep.with_lr(config, 0.5), run_dir, write_plots=False)
  assert "finetuned_accuracy_mean" in lines(run_dir / "metrics.jsonl")[-1]
  assert_same_run_files(tmp_path / "grid" / "lr_0.5" / "seed_0", run_dir)


def test_each_lr_of_a_fedrep_sweep_records_its_head(tmp_path):
  config = tiny("fedrep", rounds=1)
  head = ["head"]  # the MLP names its classifier "head": FedRep's default, resolved at init
  quiet(sweep.sweep, config, [0], tmp_path / "grid", lrs=[0.05, 0.1])
  for lr in ("0.05", "0.1"):
    lr_dir = tmp_path / "grid" / f"lr_{lr}"
    for record in (json.loads((lr_dir / "config.json").read_text())["algorithm_hparams"],
                   json.loads((lr_dir / "seed_0" / "config.json").read_text())["algorithm_hparams"],
                   json.loads((lr_dir / "seed_0" / "summary.json").read_text())["hparams"]):
      assert record["head"] == head and record["lr"] == float(lr)
  top = json.loads((tmp_path / "grid" / "config.json").read_text())
  assert "lr" not in top["algorithm_hparams"] and top["lrs"] == [0.05, 0.1] and top["algorithm_hparams"]["head"] == head


class Clock:
  """A fake clock that reads the given times in turn, then stays at the last."""

  def __init__(self, *times: float):
    self.times = list(times)

  def __call__(self) -> float:
    return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def test_a_dispatch_longer_than_half_the_deadline_stops_at_the_first_boundary_and_saves_before_evaluating(tmp_path):
  # Deadline 15 min; the first boundary (round 1 of 2) comes at 10.5 min, start-up and compilation included: the next
  # dispatch would end past the deadline, so the run stops there (it used to stop only once the deadline had passed).
  config = tiny("fedavg", rounds=2)
  reference = quiet(experiment.run, config, tmp_path / "whole", write_plots=False)
  stopper = preemption.Stopper(deadline_s=15 * 60, clock=Clock(0.0, 10.5 * 60, 20.5 * 60))
  with pytest.raises(preemption.Stopped) as stopped:
    quiet(experiment.run, config, tmp_path / "cut", write_plots=False, stopper=stopper)
  assert stopped.value.round == 1 and stopped.value.reason == "deadline"
  assert pathlib.Path(stopped.value.checkpoint) == tmp_path / "cut" / "checkpoints" / "1"
  ckpt = Checkpointer(tmp_path / "cut" / "checkpoints")
  assert ckpt.rounds() == [1] and ckpt.read_meta()["history"] == []
  ckpt.close()
  assert lines(tmp_path / "cut" / "metrics.jsonl") == []  # saved first: round 1's evaluation is the resume's work
  resumed = quiet(experiment.run, config, tmp_path / "cut", write_plots=False, resume=True)
  assert [r["round"] for r in lines(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]
  assert_same_run_files(tmp_path / "cut", tmp_path / "whole")
  assert resumed["final_accuracy"] == reference["final_accuracy"]


def test_the_first_gap_counts_from_the_start():
  stopper = preemption.Stopper(deadline_s=900.0, clock=Clock(0.0, 630.0))
  assert stopper.should_stop(round=2) == "deadline"  # 270 s left < 2 x 630 s
  stopper = preemption.Stopper(deadline_s=900.0, clock=Clock(0.0, 100.0, 200.0))
  assert [stopper.should_stop(round=r) for r in (1, 2)] == [None, None]  # 800, then 700 s left > 2 x 100 s


def test_signals_after_the_stop_decision_are_ignored():
  stopper = preemption.Stopper()
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with stopper.handle_signals():
    os.kill(os.getpid(), signal.SIGTERM)
    assert stopper.should_stop(1) == "SIGTERM" and stopper.decided == "SIGTERM"
    os.kill(os.getpid(), signal.SIGINT)  # a second notice, after the decision: no KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)
  assert {s: signal.getsignal(s) for s in before} == before  # in-process: the old handlers come back


def test_a_sigterm_storm_still_exits_75_with_a_checkpoint_that_resumes_exactly(tmp_path):
  settings = ["--config", "default", "--set", "smoke=true", "--set", "rounds=300", "--set", "eval_every=50",
              "--set", "checkpoint_every=0", "--set", "model.hidden=[8]", "--no-plots", "--quiet"]
  run_dir, whole = tmp_path / "run", tmp_path / "whole"
  command = [sys.executable, "-m", "fedspa_jax", "run", *settings]
  proc = subprocess.Popen([*command, "--out", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.02)
    first = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # The second once the stop's checkpoint is there (the decision is made, the process is on its way out), the
    # third just after, in its teardown; both within a second of the first.
    while not any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")) and time.monotonic() < first + 0.8:
      time.sleep(0.005)
    for _ in range(2):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
      time.sleep(0.15)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == preemption.EXIT_STOPPED, err
  assert "stopped after round" in err and "(SIGTERM)" in err
  assert cli.main(["run", "--out", str(run_dir), "--resume", "--no-plots", "--quiet"]) == 0
  assert cli.main(["run", *settings, "--out", str(whole)]) == 0
  assert_same_run_files(run_dir, whole)


def test_summary_is_written_before_the_analysis_and_its_failure_is_reported(tmp_path, monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise MemoryError("no room for the [K, K] distances")

  monkeypatch.setattr(client_stats, "is_mask_store", out_of_memory)
  said = []
  summary = experiment.run(tiny("fedspa", density=0.5, rounds=1), tmp_path / "run", echo=said.append,
                           progress=False, write_plots=False)
  saved = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert saved["status"] == "complete" and saved["client_analysis_error"].startswith("MemoryError: no room")
  assert summary["client_analysis_error"] == saved["client_analysis_error"]
  assert any("per-client analysis" in line and "MemoryError" in line for line in said)
  clients = np.load(tmp_path / "run" / "clients.npz")
  assert "accuracy" in clients.files and "hamming" not in clients.files


def test_the_chunked_distances_equal_the_pairwise_definitions():
  rng = np.random.default_rng(0)
  K = 7
  masks = {"w": rng.random((K, 5, 3)) < 0.5, "b": np.ones((K, 4), bool)}  # "b": dense for every client
  models = {"w": rng.normal(size=(K, 5, 3)), "b": rng.normal(size=(K, 4))}

  class Store:
    def __init__(self, ids):
      self.mask = {k: v[ids] for k, v in masks.items()}
      self.local = {k: v[ids] for k, v in models.items()}

  out = client_stats.client_distances(Store, K, models, chunk=3)
  flat_masks, flat_models = masks["w"].reshape(K, -1), np.concatenate([models["b"], models["w"].reshape(K, -1)], 1)
  for i in range(K):
    assert out["active"][i] == flat_masks[i].sum()
    for j in range(K):
      assert out["hamming"][i, j] == np.sum(flat_masks[i] != flat_masks[j])
      assert out["model_distance"][i, j] == pytest.approx(np.linalg.norm(flat_models[i] - flat_models[j]), abs=1e-9)
  np.testing.assert_allclose(out["model_norm"], np.linalg.norm(flat_models, axis=1))


def test_saves_on_cpu_are_synchronous_unless_the_environment_says_otherwise(monkeypatch):
  from fedspa_jax.checkpoint import default_asynchronous

  monkeypatch.delenv("FEDSPA_JAX_SYNC_CHECKPOINTS", raising=False)
  assert default_asynchronous() is False  # the tests run on CPU: an asynchronous save would double the state
  monkeypatch.setenv("FEDSPA_JAX_SYNC_CHECKPOINTS", "0")
  assert default_asynchronous() is True
  monkeypatch.setenv("FEDSPA_JAX_SYNC_CHECKPOINTS", "1")
  assert default_asynchronous() is False


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_stop_after_below_1_is_a_one_line_error(command, value, tmp_path, capsys):
  extra = ["--algorithms", "fedavg"] if command == "compare" else []
  code = cli.main([command, *extra, "--set", "smoke=true", "--stop-after", value, "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1 and f"--stop-after must be a round >= 1, got {value}" in err
  assert not (tmp_path / "x").exists()
  with pytest.raises(config_lib.ConfigError, match="stop_after must be a round >= 1"):
    quiet(experiment.run, tiny(), tmp_path / "y", stop_after=0)


def test_compare_stop_after_then_resume_with_the_folder_alone(tmp_path, capsys):
  out = tmp_path / "cmp"
  settings = ["--set", "smoke=true", "--set", "rounds=2", "--set", "checkpoint_every=0", "--no-plots", "--quiet"]
  code = cli.main(["compare", "--algorithms", "fedspa", "fedavg", *settings, "--set", "fedspa.density=0.3",
                   "--stop-after", "1", "--out", str(out)])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "stopped after round 1" in printed.out and "--resume" in printed.out and "comparison.md" not in printed.out
  assert not (out / "comparison.md").exists()
  for name in ("fedspa", "fedavg"):
    assert (out / name / "checkpoints" / "1").is_dir()
  code = cli.main(["compare", "--resume", "--out", str(out), "--quiet", "--no-plots"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert (out / "comparison.md").is_file() and "fedspa" in printed.out and "fedavg" in printed.out
  for name in ("fedspa", "fedavg"):
    assert [r["round"] for r in lines(out / name / "metrics.jsonl")] == [1, 2]
  assert json.loads((out / "fedspa" / "summary.json").read_text())["hparams"]["density"] == 0.3
