"""Resume refuses what would change the run's trajectory beyond its config: the checkpoint format, the sampling
(stratified strata, which follow `shard_clients`) and the algorithm's resolved hyperparameters. Every refusal is one
line, comes before training, and leaves the run folder as it was."""

import contextlib
import dataclasses
import io

import jax
import pytest

from fedspa_jax import algorithms, cli, experiment, resume
from fedspa_jax import config as config_lib

SMOKE = ["--set", "smoke=true", "--set", "model.hidden=[8]"]


def call(*argv):
  """(exit code, stdout, stderr) of `fedspa-jax *argv`, in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def snapshot(folder):
  """{path: bytes} of every file under `folder`."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_in_one_line(code, stderr, *fragments):
  assert code == cli.EXIT_BAD_INPUT, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedspa-jax: error: cannot resume"), stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def stratified(**changes) -> config_lib.Config:
  """The default smoke config with 16 clients, 8 per round, stratified sampling, 2 rounds with a checkpoint each."""
  config = dataclasses.replace(config_lib.load("default", smoke=True), num_clients=16, rounds=2, checkpoint_every=1,
                               eval_every=2)
  return config_lib.apply_overrides(config, {"hparams.clients_per_round": 8, "hparams.cohort_sampling": "stratified",
                                             "model.hidden": [8], **changes})


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A run of `stratified()` on one device (so 1 stratum), stopped with a checkpoint after round 1."""
  out = tmp_path_factory.mktemp("resume") / "run"
  experiment.run(stratified(), out, stop_after=1, echo=None, write_plots=False, progress=False)
  return out


def test_checkpoints_record_format_sampling_and_resolved_hparams(stopped):
  from fedspa_jax.checkpoint import Checkpointer

  ckpt = Checkpointer(stopped / "checkpoints")
  meta = ckpt.read_meta()
  ckpt.close()
  assert meta["format"] == resume.CHECKPOINT_FORMAT
  assert meta["sampling"] == {"cohort_sampling": "stratified", "cohort_strata": 1}
  assert meta["algorithm_hparams"]["weighting"] == "uniform" and meta["algorithm_hparams"]["density"] == 0.5


def test_another_checkpoint_format_is_refused(stopped, monkeypatch):
  before = snapshot(stopped)
  monkeypatch.setattr(resume, "CHECKPOINT_FORMAT", resume.CHECKPOINT_FORMAT + 1)
  code, _, stderr = call("run", "--out", stopped, "--resume", "--no-plots", "--quiet")
  assert_refused_in_one_line(code, stderr, f"checkpoint format is {resume.CHECKPOINT_FORMAT - 1}",
                             f"reads format {resume.CHECKPOINT_FORMAT}", "--overwrite")
  assert snapshot(stopped) == before


def test_a_changed_default_is_named(stopped, monkeypatch):
  # The same config, but FedSpa's weighting default moved from "uniform" to "samples" (as a new version might).
  before = snapshot(stopped)
  factory, preset, doc = algorithms._ALGORITHMS["fedspa"]
  monkeypatch.setitem(algorithms._ALGORITHMS, "fedspa", (factory, {**preset, "weighting": "samples"}, doc))
  code, _, stderr = call("run", "--out", stopped, "--resume", "--no-plots", "--quiet")
  assert_refused_in_one_line(code, stderr, "weighting: 'uniform' -> 'samples'", "a default changed")
  assert snapshot(stopped) == before


def test_flipping_shard_clients_under_stratified_sampling_is_refused(stopped):
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  # 16 clients: 1 stratum of 16 on one device, 8 strata of 2 on the 8 devices; the store has 16 rows either way, so
  # the checkpoint's arrays fit both runs and only the recorded sampling tells them apart.
  before = snapshot(stopped)
  code, _, stderr = call("run", "--out", stopped, "--resume", "--set", "shard_clients=true", "--no-plots", "--quiet")
  assert_refused_in_one_line(code, stderr, "shard_clients: false -> true",
                             "stratified sampling over 1 stratum -> stratified sampling over 8 strata")
  assert snapshot(stopped) == before


def test_sampling_record():
  uniform = config_lib.apply_overrides(stratified(), {"hparams.cohort_sampling": "uniform"})
  for config in (uniform, dataclasses.replace(uniform, shard_clients=True)):  # uniform cohorts ignore the devices
    assert resume.sampling(config, config.hparams) == {"cohort_sampling": "uniform"}
  assert resume.sampling(stratified(), stratified().hparams)["cohort_strata"] == 1
  sharded = stratified(shard_clients=True)
  assert resume.sampling(sharded, sharded.hparams)["cohort_strata"] == 8
  fixed = stratified(shard_clients=True, **{"hparams.cohort_strata": 16})
  assert resume.sampling(fixed, fixed.hparams)["cohort_strata"] == 16
