"""Run folders in Google Cloud Storage, for real, against a local GCS emulator on 127.0.0.1.

A tiny run goes to gs://runs/run, stops with a checkpoint (as a preempted job would), and resumes from the command
line; every file it wrote is read back through `fedspa_jax.paths` and equals what the same uninterrupted run wrote to
a local folder: config, metrics, summary, client arrays, figures, TensorBoard events and orbax checkpoints (which
orbax writes with tensorstore's own GCS client, pointed at the emulator by TENSORSTORE_GCS_HTTP_URL). Bad cloud
paths fail in one line before training: an unreachable endpoint, a missing bucket, gcsfs not installed.

The emulator (PyPI's gcp-storage-emulator, in memory) runs in a subprocess on a free port, ended by the fixture.
"""

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedspa_jax import cli, experiment, paths, preemption, runner
from fedspa_jax import config as config_lib
from fedspa_jax.checkpoint import Checkpointer, to_storable
from test_cli import PNG, SMOKE, call

BUCKET = "runs"

# Starts the emulator on a free port, writes the port to argv[1], serves until its stdin closes.
EMULATOR = """
import pathlib, sys
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=sys.argv[2])
server.start()
port = pathlib.Path(sys.argv[1])
port.with_suffix(".tmp").write_text(str(server._api._httpd.server_address[1]))
port.with_suffix(".tmp").replace(port)
sys.stdin.read()
server.stop()
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL, with gcsfs (epath's backend) and tensorstore (orbax's) pointed at it."""
  folder = tmp_path_factory.mktemp("gcs")
  port_file = folder / "port"
  with open(folder / "emulator.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port_file), BUCKET], stdin=subprocess.PIPE,
                            stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 60
    while not port_file.exists():
      assert proc.poll() is None, (folder / "emulator.log").read_text()
      assert time.monotonic() < deadline, "the emulator did not start in 60 s"
      time.sleep(0.05)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    with pytest.MonkeyPatch.context() as env:
      env.setenv("STORAGE_EMULATOR_HOST", url)
      env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
      env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credential search
      env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # gcsfs: no storage-layout calls (gRPC)
      # The emulator ignores `ifGenerationMatch`, which orbax's OCDBT layout commits its manifest with, and
      # tensorstore then fails now and then with "Malformed StorageGeneration" (about 1 run in 3, asynchronous or
      # synchronous): against it, checkpoints use orbax's plain zarr layout (checkpoint._use_ocdbt).
      env.setenv("FEDSPA_JAX_CHECKPOINT_OCDBT", "0")
      yield url
  finally:
    proc.stdin.close()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=10)


def config() -> config_lib.Config:
  return config_lib.apply_overrides(config_lib.load("default", smoke=True), {"model.hidden": [8]})


def read_events(data: bytes) -> list:
  """The Event protos of a TensorBoard event file's bytes (TFRecord framing: length, crc, data, crc)."""
  from tensorboard.compat.proto import event_pb2

  events, at = [], 0
  while at < len(data):
    (n,) = struct.unpack("<Q", data[at:at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
    at += 12 + n + 4
  return events


def without(record: dict, *keys) -> dict:
  return {k: v for k, v in record.items() if k not in keys}


@pytest.fixture(scope="module")
def runs(emulator, tmp_path_factory):
  """(gs:// folder after a preemption + resume, files at the stop, local folder of the same run uninterrupted).

  The preemption is a real SIGTERM to this process after round 1's evaluation: the run stops at the next round
  boundary (round 2) with its checkpoint in the bucket."""
  gs = paths.as_path(f"gs://{BUCKET}/run")
  stopper = preemption.Stopper()
  notice = lambda record: os.kill(os.getpid(), signal.SIGTERM) if record["round"] == 1 else None
  with stopper.handle_signals(), pytest.raises(preemption.Stopped) as stopped:
    experiment.run(config(), os.fspath(gs), on_eval=notice, stopper=stopper, echo=None, progress=False)
  assert stopped.value.round == 2 and stopped.value.reason == "SIGTERM"
  assert stopped.value.checkpoint == f"gs://{BUCKET}/run/checkpoints/2"
  at_stop = {p.name: p.read_bytes() for p in gs.iterdir() if p.is_file()}
  at_stop["rounds"] = Checkpointer(gs / "checkpoints").rounds()
  code, stdout, stderr = call("run", "--out", gs, "--resume")
  assert code == 0, stderr
  assert "resuming gs://runs/run from round 2" in stdout
  local = tmp_path_factory.mktemp("gcs_local") / "run"
  experiment.run(config(), local, echo=None, progress=False)
  return gs, at_stop, local


def test_a_stopped_run_left_its_files_in_the_bucket(runs):
  _, at_stop, _ = runs
  assert at_stop["rounds"] == [2]
  # a stop saves first: round 2's evaluation is the resumed run's first work
  assert [json.loads(line)["round"] for line in at_stop["metrics.jsonl"].decode().splitlines()] == [1]
  assert json.loads(at_stop["config.json"])["rounds"] == 3
  assert "summary.json" not in at_stop and "clients.npz" not in at_stop
  assert not any(name.startswith(".fedspa-jax-probe") for name in at_stop)  # the probe object is deleted


def test_resumed_cloud_run_equals_the_uninterrupted_local_run(runs):
  gs, _, local = runs
  assert (gs / "config.json").read_text() == (local / "config.json").read_text()
  got = [json.loads(line) for line in (gs / "metrics.jsonl").read_text().splitlines()]
  want = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in got] == [1, 2, 3]  # no round lost or repeated across the stop
  assert [without(r, "wall_time") for r in got] == [without(r, "wall_time") for r in want]
  summary, reference = (json.loads((d / "summary.json").read_text()) for d in (gs, local))
  assert summary["run_dir"] == "gs://runs/run" and summary["status"] == "complete"
  assert without(summary, "wall_time", "run_dir") == without(reference, "wall_time", "run_dir")
  clients, expected = paths.load_npz(gs / "clients.npz"), paths.load_npz(local / "clients.npz")
  assert sorted(clients) == sorted(expected) and "hamming" in clients
  for key in expected:
    np.testing.assert_array_equal(clients[key], expected[key], err_msg=key)


def test_figures_and_tensorboard_events_are_in_the_bucket(runs):
  gs, _, _ = runs
  for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "client_accuracy.png", "mask_hamming.png"):
    assert (gs / name).read_bytes()[:8] == PNG, name
  files = sorted((gs / "tensorboard").iterdir())
  assert len(files) == 2  # one event file per process that logged: the stopped run and the resumed one
  steps = {}
  for f in files:
    for event in read_events(f.read_bytes()):
      for value in event.summary.value:
        steps.setdefault(event.step, {})[value.tag] = value.simple_value
  records = [json.loads(line) for line in (gs / "metrics.jsonl").read_text().splitlines()]
  assert sorted(steps) == [1, 2, 3]  # every flush kept the earlier events (an object store cannot append)
  for r in records:
    assert steps[r["round"]]["accuracy_mean"] == pytest.approx(r["accuracy_mean"])


def test_orbax_checkpoints_in_the_bucket_restore_to_the_local_ones(runs):
  gs, _, local = runs
  data = runner.load_data(config())
  _, algo = experiment.build(config(), data)
  like = algo.init(jax.random.key(0), data)
  remote, here = Checkpointer(gs / "checkpoints"), Checkpointer(local / "checkpoints")
  try:
    assert remote.rounds() == here.rounds() == [2, 3]
    got, meta = remote.restore(like)
    want, _ = here.restore(like)
  finally:
    remote.close()
    here.close()
  assert meta["round"] == 3 and [r["round"] for r in meta["history"]] == [1, 2, 3]
  assert int(got.round) == 3
  for a, b in zip(jax.tree.leaves(to_storable(got)), jax.tree.leaves(to_storable(want))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_missing_bucket_is_one_line_before_training_and_is_not_created(emulator):
  code, stdout, stderr = call("run", *SMOKE, "--out", "gs://no-such-bucket/run")
  assert code == cli.EXIT_BAD_INPUT
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "bucket 'no-such-bucket' does not exist" in lines[0], stderr
  assert "round" not in stdout
  assert not paths.as_path("gs://no-such-bucket").exists()


def test_an_unreachable_endpoint_is_one_line_before_training(emulator, monkeypatch):
  with socket.socket() as s:  # a free port that nothing listens on
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
  code, stdout, stderr = call("run", *SMOKE, "--out", f"gs://{BUCKET}/unreachable")
  assert code == cli.EXIT_BAD_INPUT
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and f"cannot reach the Cloud Storage endpoint {dead}" in lines[0], stderr
  assert "STORAGE_EMULATOR_HOST" in lines[0] and "round" not in stdout


def test_without_gcsfs_the_error_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
  code, stdout, stderr = call("run", *SMOKE, "--out", "gs://runs/no-gcsfs")
  assert code == cli.EXIT_BAD_INPUT
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install 'fedspa-jax[gcs]'" in lines[0], stderr
  with pytest.raises(config_lib.ConfigError, match=r"fedspa-jax\[gcs\]"):
    experiment.sweep(dataclasses.replace(config(), rounds=1), [0, 1], "gs://runs/no-gcsfs-sweep", echo=None)
  assert paths.as_path(tmp_path).is_dir()  # local paths need nothing


def test_local_writes_are_whole_files(tmp_path):
  target = tmp_path / "a" / "b.json"
  paths.write_text(target, "one")
  paths.write_text(target, "two")
  assert target.read_text() == "two" and sorted(p.name for p in target.parent.iterdir()) == ["b.json"]


def test_a_sweep_writes_its_folders_to_the_bucket(emulator):
  out = paths.as_path(f"gs://{BUCKET}/sweep")
  summary = experiment.sweep(dataclasses.replace(config(), rounds=1), [0, 1], os.fspath(out), echo=None,
                             progress=False)
  assert json.loads((out / "summary.json").read_text()) == summary
  assert json.loads((out / "config.json").read_text())["rounds"] == 1
  for seed, accuracy in zip((0, 1), summary["final_accuracy_mean_per_seed"]):
    folder = out / f"seed_{seed}"
    assert json.loads((folder / "config.json").read_text())["seed"] == seed
    assert [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((folder / "summary.json").read_text())["final_accuracy_mean"] == accuracy
    assert paths.load_npz(folder / "clients.npz")["accuracy"].shape == (6,)
