"""Several processes as one jax.distributed job: one writer, clear errors for bad arguments or no coordinator.

That 2 processes x 2 forced CPU devices (scripts/multihost_local.sh on 127.0.0.1, gloo) equal one process, stop
together on SIGTERM and resume exactly is tested in tests/test_preemption.py.
"""

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from fedspa_jax import cli, distributed, experiment
from fedspa_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ["--config", "default", "--set", "smoke=true", "--set", "num_clients=16", "--set",
            "hparams.clients_per_round=8", "--set", "rounds=6", "--set", "eval_every=3", "--set", "checkpoint_every=3",
            "--no-plots", "--quiet"]


def config() -> config_lib.Config:
  base = config_lib.load("default", smoke=True)
  base = dataclasses.replace(base, num_clients=16, rounds=6, eval_every=3, checkpoint_every=3, shard_clients=True)
  return config_lib.apply_overrides(base, [("hparams.clients_per_round", 8)])


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
