"""Preemption: SIGTERM, SIGINT and --deadline stop a run cleanly with a checkpoint; --resume continues exactly.

The subprocess tests send SIGTERM at a seeded random moment after training has started (the first evaluated round
is on disk), check the documented exit status (75) and the checkpoint at the round the run reports, resume, and
compare with an uninterrupted run of the same config: every evaluated round exactly once, equal values.
"""

import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from fedspa_jax import cli, experiment, preemption, runner
from fedspa_jax import config as config_lib
from fedspa_jax import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROUNDS, EVAL_EVERY = 500, 50
SETTINGS = ["--config", "default", "--set", "smoke=true", "--set", "num_clients=16", "--set",
            "hparams.clients_per_round=4", "--set", f"rounds={ROUNDS}", "--set", f"eval_every={EVAL_EVERY}",
            "--set", "checkpoint_every=0", "--set", "model.hidden=[8]", "--no-plots", "--quiet"]
VOLATILE = {"wall_time", "run_dir"}
STOPPED = re.compile(r"stopped after round (\d+) \((SIGTERM|SIGINT|deadline)\); checkpoint (\S+);")


def config(**changes) -> config_lib.Config:
  base = dataclasses.replace(config_lib.load("default", smoke=True), num_clients=16, rounds=ROUNDS,
                             eval_every=EVAL_EVERY, checkpoint_every=0, **changes)
  return config_lib.apply_overrides(base, [("hparams.clients_per_round", 4), ("model.hidden", [8])])


def records(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: pathlib.Path, reference: pathlib.Path, rounds: int = ROUNDS,
                    every: int = EVAL_EVERY) -> None:
  """Equal summaries, and every evaluated round exactly once with the reference's values."""
  a, b = json.loads((reference / "summary.json").read_text()), json.loads((run_dir / "summary.json").read_text())
  for key in a:
    if key in VOLATILE or key == "device":
      continue
    if isinstance(a[key], float):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    elif key == "client_accuracy":
      np.testing.assert_allclose(b[key], a[key], atol=1e-6)
    else:
      assert b[key] == a[key], key
  ra, rb = records(reference), records(run_dir)
  assert [r["round"] for r in rb] == list(range(every, rounds + 1, every))  # none lost, none repeated
  for x, y in zip(ra, rb):
    assert set(x) == set(y)
    np.testing.assert_allclose([y[k] for k in x if k != "wall_time"], [x[k] for k in x if k != "wall_time"],
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run, in this process."""
  out = tmp_path_factory.mktemp("preemption") / "reference"
  experiment.run(config(), out, echo=None, write_plots=False, progress=False)
  return out


def start(args: list[str], **popen) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "fedspa_jax", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def wait_for_training(run_dir: pathlib.Path, proc: subprocess.Popen, timeout: float = 120) -> None:
  """Returns once the first evaluated round is in metrics.jsonl (the rounds are running)."""
  deadline = time.monotonic() + timeout
  while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "the run did not start training"
    time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  return proc.returncode, out, err


@pytest.mark.parametrize("seed", [0])
def test_sigterm_at_a_random_moment_stops_with_a_checkpoint_and_resume_equals_uninterrupted(
    seed, reference, tmp_path):
  run_dir = tmp_path / "run"
  proc = start(["run", *SETTINGS, "--out", str(run_dir)])
  try:
    wait_for_training(run_dir, proc)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    proc.send_signal(signal.SIGTERM)
  finally:
    code, _, err = finish(proc)
  assert code == cli.EXIT_STOPPED == preemption.EXIT_STOPPED, err
  [(stop, reason, path)] = STOPPED.findall(err)
  stop = int(stop)
  assert reason == "SIGTERM" and 0 < stop < ROUNDS
  assert pathlib.Path(path) == run_dir / "checkpoints" / str(stop) and pathlib.Path(path).is_dir()
  assert not (run_dir / "summary.json").exists()
  # flushed; a stop saves without evaluating: a round it stops at is evaluated by the resumed run
  assert [r["round"] for r in records(run_dir)] == list(range(EVAL_EVERY, stop, EVAL_EVERY))

  code, _, err = finish(start(["run", "--out", str(run_dir), "--resume", "--no-plots", "--quiet"]))
  assert code == 0, err
  assert_same_run(run_dir, reference)


def test_two_processes_stop_together_and_resume_to_the_one_process_run(tmp_path):
  """2 processes x 2 devices (scripts/multihost_local.sh): SIGTERM reaches process 1 only, both stop at the same
  round with one checkpoint; the resumed job equals this process's uninterrupted run on its 8 devices (uniform
  cohorts do not depend on the devices; 16 clients pad to 16 on 4 devices and on 8)."""
  rounds, every = 60, 10
  settings = [*SETTINGS, "--set", f"rounds={rounds}", "--set", f"eval_every={every}"]
  one = tmp_path / "one"
  experiment.run(dataclasses.replace(config(), rounds=rounds, eval_every=every, shard_clients=True), one, echo=None,
                 write_plots=False, progress=False)
  run_dir = tmp_path / "two"
  env = {**os.environ, "FEDSPA_NO_ENV": "1", "PYTHON": sys.executable, "DEVICES_PER_PROCESS": "2",
         "LOG_DIR": str(tmp_path / "logs"), "TIMEOUT": "200", "GRACE": "60"}
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the script adds the device count per process
  launch = lambda *args: subprocess.Popen(
      ["bash", str(ROOT / "scripts" / "multihost_local.sh"), "2", "--", *args], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  proc = launch("run", *settings, "--out", str(run_dir))
  try:
    wait_for_training(run_dir, proc, timeout=200)
    time.sleep(random.Random(1).uniform(0.0, 0.5))
    pids = subprocess.run(["pgrep", "-f", "--", f"--out {run_dir} .*--process-id 1"], capture_output=True,
                          text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGTERM)
  finally:
    code, out, err = finish(proc, timeout=200)
  assert code == cli.EXIT_STOPPED, out[-2000:] + err[-2000:]
  logs = out + err + (tmp_path / "logs" / "process-1.log").read_text()
  stops = {int(r) for r, _, _ in STOPPED.findall(logs)}
  assert len(stops) == 1, logs[-3000:]  # both processes report the same round
  [stop] = stops
  assert 0 < stop < rounds and (run_dir / "checkpoints" / str(stop)).is_dir()
  code, out, err = finish(launch("run", "--out", str(run_dir), "--resume", "--no-plots", "--quiet"), timeout=200)
  assert code == 0, out[-2000:] + err[-2000:]
  assert "4 x" in json.loads((run_dir / "summary.json").read_text())["device"]
  assert_same_run(run_dir, one, rounds, every)


def test_deadline_stops_with_a_checkpoint(tmp_path):
  run_dir = tmp_path / "run"
  code, _, err = finish(start(["run", *SETTINGS, "--set", "rounds=1000000", "--out", str(run_dir),
                               "--deadline", "0.05"]))  # 3 s: start-up and compilation take about that
  assert code == cli.EXIT_STOPPED, err
  [(stop, reason, path)] = STOPPED.findall(err)
  assert reason == "deadline" and int(stop) >= 1
  assert (run_dir / "checkpoints" / stop).is_dir()


@pytest.mark.parametrize("deadline", ["0", "-5", "nan"])
def test_a_deadline_that_is_not_positive_is_refused(deadline, tmp_path, capsys):
  assert cli.main(["run", *SETTINGS, "--out", str(tmp_path / "x"), "--deadline", deadline]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--deadline must be a positive number of minutes" in err
  assert not (tmp_path / "x").exists()


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_the_deadline_stops_before_the_next_dispatch_could_overrun():
  clock = FakeClock()
  stopper = preemption.Stopper(deadline_s=10.0, clock=clock)
  answers = []
  for t in (1.0, 3.0, 5.5, 6.5):  # gaps: -, 2, 2.5, 1: left 9, 7, 4.5 (< 2 x 2.5), ...
    clock.now = t
    answers.append(stopper.should_stop(round=int(t)))
  assert answers == [None, None, "deadline", "deadline"]
  with pytest.raises(ValueError, match="positive"):
    preemption.Stopper(deadline_s=0)


def test_signals_request_a_stop_and_the_old_handlers_come_back():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  stopper = preemption.Stopper()
  with stopper.handle_signals():
    assert stopper.should_stop(1) is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stopper.requested == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):  # a second notice by Ctrl-C, before the stop is decided, does not wait
      os.kill(os.getpid(), signal.SIGINT)
    assert stopper.should_stop(2) == "SIGTERM"  # after the decision, signals are ignored: tests/test_job.py
  assert {s: signal.getsignal(s) for s in before} == before
  first = preemption.Stopper()
  with first.handle_signals():
    os.kill(os.getpid(), signal.SIGINT)
    assert first.requested == "SIGINT"


class StopAt(preemption.Stopper):
  """Stops at the first dispatch boundary at or after `round`, and counts the boundaries it was asked at."""

  def __init__(self, round: int):
    super().__init__()
    self.round, self.asked = round, []

  def should_stop(self, round: int):
    self.asked.append(round)
    return "test" if round >= self.round else None


def sweep_config() -> config_lib.Config:
  return dataclasses.replace(config(), rounds=12, eval_every=4, checkpoint_every=0, rounds_per_dispatch=2)


def test_a_stopped_sweep_resumes_to_the_uninterrupted_sweep(tmp_path):
  kwargs = dict(lrs=[0.05, 0.1], echo=None, progress=False)
  whole = sweep_lib.sweep(sweep_config(), [0, 1], tmp_path / "whole", **kwargs)
  stopper = StopAt(7)
  with pytest.raises(preemption.Stopped) as stopped:
    sweep_lib.sweep(sweep_config(), [0, 1], tmp_path / "cut", stopper=stopper, **kwargs)
  assert stopped.value.round == 8 and stopper.asked == [2, 4, 6, 8]  # boundaries of 2 fused rounds
  assert (tmp_path / "cut" / "checkpoints" / "8").is_dir()
  for lr in ("0.05", "0.1"):  # round 8's evaluation is left to the resumed sweep: the stop saves first
    assert [r["round"] for r in records(tmp_path / "cut" / f"lr_{lr}" / "seed_1")] == [4]
  with pytest.raises(config_lib.ConfigError, match="seeds"):
    sweep_lib.sweep(sweep_config(), [0, 2], tmp_path / "cut", resume=True, **kwargs)
  resumed = sweep_lib.sweep(sweep_config(), [0, 1], tmp_path / "cut", resume=True, **kwargs)
  for lr in ("0.05", "0.1"):
    for seed in (0, 1):
      a = records(tmp_path / "whole" / f"lr_{lr}" / f"seed_{seed}")
      b = records(tmp_path / "cut" / f"lr_{lr}" / f"seed_{seed}")
      assert [r["round"] for r in b] == [4, 8, 12]
      for x, y in zip(a, b):
        np.testing.assert_allclose([y[k] for k in x if k != "wall_time"], [x[k] for k in x if k != "wall_time"],
                                   rtol=1e-5, atol=1e-6)
  assert resumed["best_lr"] == whole["best_lr"]
  for lr, accuracy in whole["final_accuracy_mean_by_lr"].items():
    assert resumed["final_accuracy_mean_by_lr"][lr]["mean"] == pytest.approx(accuracy["mean"], rel=1e-5)


def test_a_loop_that_can_stop_must_save():
  batch = runner.Batch(runs=[], state=None, data=None, round_fn=None, evaluate=None)
  with pytest.raises(ValueError, match="needs `save`"):
    runner.loop(batch, end=1, stopper=preemption.Stopper())


def test_a_stopped_comparison_resumes_and_completes(tmp_path):
  from fedspa_jax import compare

  cfg = dataclasses.replace(config(), rounds=4, eval_every=2)
  out = tmp_path / "cmp"
  with pytest.raises(preemption.Stopped) as stopped:
    compare.run(cfg, ["fedspa", "fedavg"], out, echo=None, progress=False, write_plots=False, stopper=StopAt(2))
  assert stopped.value.round == 2 and (out / "fedspa" / "checkpoints" / "2").is_dir()
  assert not (out / "fedavg").exists() and not (out / "comparison.md").exists()
  summaries = compare.run(cfg, ["fedspa", "fedavg"], out, echo=None, progress=False, write_plots=False, resume=True)
  assert [s["status"] for s in summaries] == ["complete", "complete"]
  assert [r["round"] for r in records(out / "fedspa")] == [2, 4] and (out / "comparison.md").is_file()
