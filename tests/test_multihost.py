"""Several processes as one jax.distributed job on 127.0.0.1 (gloo): equal to one process, resumable, one writer.

The test starts 2 processes x 4 forced CPU devices through scripts/multihost_local.sh (free port, a timeout, every
process stopped at the end), in a new session so that nothing outlives it.
"""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from fedspa_jax import cli, distributed, experiment
from fedspa_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["--config", "default", "--set", "smoke=true", "--set", "num_clients=16", "--set",
            "hparams.clients_per_round=8", "--set", "rounds=6", "--set", "eval_every=3", "--set", "checkpoint_every=3",
            "--no-plots", "--quiet"]
VOLATILE = {"wall_time", "run_dir"}


def config() -> config_lib.Config:
  base = config_lib.load("default", smoke=True)
  base = dataclasses.replace(base, num_clients=16, rounds=6, eval_every=3, checkpoint_every=3, shard_clients=True)
  return config_lib.apply_overrides(base, [("hparams.clients_per_round", 8)])


def launch(processes: int, args: list[str], log_dir: pathlib.Path, timeout: float = 240) -> subprocess.CompletedProcess:
  env = {**os.environ, "FEDSPA_NO_ENV": "1", "PYTHON": sys.executable, "DEVICES_PER_PROCESS": "4",
         "LOG_DIR": str(log_dir), "TIMEOUT": str(int(timeout - 20))}
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the script adds the device count per process
  proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "multihost_local.sh"), str(processes), "--", *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    out = ""
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the script and every process it started, whatever happened
    except ProcessLookupError:
      pass
    proc.wait()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def records(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_and_resume(tmp_path):
  # The reference: this process, its 8 forced devices, uninterrupted.
  one = experiment.run(config(), tmp_path / "one", echo=None, write_plots=False, progress=False)
  run_dir = tmp_path / "two"
  first = launch(2, ["run", *SETTINGS, "--out", str(run_dir), "--stop-after", "3"], tmp_path / "logs1")
  assert first.returncode == 0, first.stdout[-3000:]
  assert [r["round"] for r in records(run_dir)] == [3]  # written once: a second writer would append a copy
  assert (run_dir / "checkpoints" / "3").is_dir() and not (run_dir / "summary.json").exists()
  second = launch(2, ["run", *SETTINGS, "--out", str(run_dir), "--resume"], tmp_path / "logs2")
  assert second.returncode == 0, second.stdout[-3000:]
  two = json.loads((run_dir / "summary.json").read_text())
  assert "8 x" in two["device"]  # 2 processes x 4 devices, one mesh
  for key in one:
    if key in VOLATILE:
      continue
    if isinstance(one[key], float):
      np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
    elif key == "client_accuracy":
      np.testing.assert_allclose(two[key], one[key], atol=1e-6)
    else:
      assert two[key] == one[key], key
  ra, rb = records(tmp_path / "one"), records(run_dir)
  assert [r["round"] for r in rb] == [3, 6]
  for a, b in zip(ra, rb):
    np.testing.assert_allclose([a[k] for k in a if k != "wall_time"], [b[k] for k in a if k != "wall_time"],
                               rtol=1e-5, atol=1e-6)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, "is_primary", lambda: False)
  summary = experiment.run(config(), tmp_path / "worker", echo=None, write_plots=False, progress=False)
  assert summary["status"] == "complete"
  written = {p.name for p in (tmp_path / "worker").iterdir()} if (tmp_path / "worker").exists() else set()
  assert not written & {"metrics.jsonl", "summary.json", "config.json", "clients.npz"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_exits_with_a_message(tmp_path):
  port = free_port()  # nothing listens there
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "fedspa_jax", "run", *SETTINGS, "--out", str(tmp_path / "x"), "--distributed",
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
       "--distributed-timeout", "2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
  )
  assert result.returncode == cli.EXIT_BAD_INPUT
  assert f"cannot reach the coordinator at 127.0.0.1:{port}" in result.stderr
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1"], "need --distributed"),
    (["--distributed", "--coordinator", "127.0.0.1:1"], "give all three"),
    (["--distributed", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "[0, 2)"),
])
def test_bad_distributed_arguments(argv, message, capsys, tmp_path):
  assert cli.main(["run", *SETTINGS, "--out", str(tmp_path / "x"), *argv]) == cli.EXIT_BAD_INPUT
  assert message in capsys.readouterr().err
