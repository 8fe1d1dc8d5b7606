"""The experiment loop: determinism, kill-and-resume equals uninterrupted, fused rounds equal unfused, divergence."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from fedspa_jax import config as config_lib
from fedspa_jax import experiment, run_folder, runner
from fedspa_jax.checkpoint import Checkpointer
from fedspa_jax.data import idx_sources
from fedspa_jax.records import TrainingDiverged

# Summary fields that legitimately differ between two runs of the same config.
VOLATILE = {"wall_time", "run_dir"}


def tiny(**changes) -> config_lib.Config:
  """The default config's smoke variant (6 clients, 3 per round, 2 local steps, a 16-unit MLP), 6 rounds."""
  config = config_lib.load("default", smoke=True)
  config = dataclasses.replace(config, rounds=6, checkpoint_every=2)
  return config_lib.apply_overrides(config, changes)


def quiet_run(config, workdir, **kw):
  return experiment.run(config, workdir, echo=None, write_plots=False, progress=False, **kw)


def records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]


def stable(summary):
  return {k: v for k, v in summary.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, quiet_run(tiny(), workdir)


def test_same_seed_gives_identical_metrics(reference, tmp_path):
  ref_dir, ref_summary = reference
  summary = quiet_run(tiny(), tmp_path / "again")
  assert records(tmp_path / "again") == records(ref_dir)
  assert stable(summary) == stable(ref_summary)
  assert len(records(ref_dir)) == 6


class Killed(Exception):
  pass


def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
  ref_dir, ref_summary = reference
  workdir = tmp_path / "killed"

  def kill_at_round_3(record):
    if record["round"] == 3:
      raise Killed()

  with pytest.raises(Killed):
    quiet_run(tiny(), workdir, on_eval=kill_at_round_3)
  ckpt = Checkpointer(workdir / "checkpoints")
  assert ckpt.rounds() == [2]
  ckpt.close()
  assert len(records(workdir)) == 3  # round 3 was logged before the "kill"
  summary = quiet_run(tiny(), workdir, resume=True)
  assert stable(summary) == stable(ref_summary)  # same accuracies, same bytes, same samples
  assert records(workdir) == records(ref_dir)  # round 3 is not logged twice


def test_fused_rounds_equal_unfused(reference, tmp_path):
  ref_dir, ref_summary = reference  # one round per dispatch, evaluated every round
  config = tiny(eval_every=3, checkpoint_every=0, rounds_per_dispatch=3)  # (sharded: tests/test_population.py)
  fused = quiet_run(config, tmp_path / "fused")
  for key in ("bytes_up", "bytes_down", "samples"):
    assert fused[key] == ref_summary[key]
  np.testing.assert_allclose(fused["client_accuracy"], ref_summary["client_accuracy"], atol=1e-6)
  a = [r for r in records(ref_dir) if r["round"] in (3, 6)]
  b = records(tmp_path / "fused")
  assert [r["round"] for r in b] == [3, 6]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    np.testing.assert_allclose([ra[k] for k in ra], [rb[k] for k in ra], rtol=1e-5, atol=1e-6)


def test_sampled_evaluations_then_all_clients_at_the_end(tmp_path):
  summary = quiet_run(tiny(eval_clients=2, eval_every=2), tmp_path / "sampled")
  logged = records(tmp_path / "sampled")
  assert [r["eval_clients"] for r in logged] == [2, 2, 6]  # rounds 2, 4 (a sample of 2), 6 (all)
  assert all(r["eval_participating"] <= r["eval_clients"] for r in logged)
  assert summary["clients_participating"] == int(np.sum(np.load(tmp_path / "sampled" / "clients.npz")["participation"] > 0))
  assert len(summary["client_accuracy"]) == 6


def test_chunks_stop_at_evaluations_checkpoints_and_the_end():
  config = tiny(rounds=10, eval_every=4, checkpoint_every=3, rounds_per_dispatch=5)
  r, chunks = 0, []
  while r < 10:
    chunks.append(runner.next_chunk(r, config=config, end=10))
    r += chunks[-1]
  # stops at checkpoints 3, 6, 9, evaluations 4, 8, the fuse grid 5, 10, and the end
  assert chunks == [3, 1, 1, 1, 2, 1, 1]


def test_divergence_stops_with_the_last_good_checkpoint_intact(tmp_path):
  workdir = tmp_path / "diverged"
  config = tiny(lr=1e8, checkpoint_every=1)
  with pytest.raises(TrainingDiverged, match=r"diverged .* round 2.*last good checkpoint .*round 1"):
    quiet_run(config, workdir)
  ckpt = Checkpointer(workdir / "checkpoints")
  assert ckpt.rounds() == [1]
  meta = ckpt.read_meta()
  assert meta["round"] == 1 and meta["config"]["hparams"]["lr"] == 1e8
  assert [r["round"] for r in meta["history"]] == [1]
  data = runner.load_data(config)
  _, algo = experiment.build(config, data)
  state, _ = ckpt.restore(algo.init(jax.random.key(0), data))
  ckpt.close()
  assert int(state.round) == 1
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.server.params))


def test_occupied_folder_needs_resume_or_overwrite(reference, tmp_path):
  ref_dir, _ = reference
  with pytest.raises(run_folder.RunExistsError, match="already holds a run.*--resume.*--overwrite"):
    quiet_run(tiny(), ref_dir)


def test_resume_with_a_different_config_is_refused_before_compiling(reference, monkeypatch):
  ref_dir, _ = reference
  monkeypatch.setattr(experiment, "load_data", lambda config: pytest.fail("loaded data"))
  with pytest.raises(run_folder.ConfigMismatchError, match=r"hparams.lr: 0.05 -> 0.1"):
    quiet_run(tiny(lr=0.1), ref_dir, resume=True)
  # Fields that do not change the trajectory may differ.
  run_folder.prepare_workdir(ref_dir, tiny(eval_every=2, checkpoint_every=5), resume=True, overwrite=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"algorithm": "fedspaa"}, "unknown algorithm 'fedspaa'; known algorithms: .*fedspa"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'; known: .*cifar10"),
        ({"model": "lenet"}, "unknown model 'lenet'; known models: .*mlp"),
        ({"densty": 0.3}, "unknown hyperparameters for 'fedspa': densty; known: .*density.*config keys: algorithm"),
        ({"model.widht": 3}, "bad model arguments"),
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"density": 1.5}, "density"),
        ({"eval_clients": 0}, "eval_clients must be an integer >= 1"),
        ({"eval_clients": 7}, "eval_clients=7 exceeds num_clients=6"),
        ({"cohort_batch": 0}, "cohort_batch"),
    ],
)
def test_bad_config_fails_before_data_and_compilation(changes, message, tmp_path, monkeypatch):
  monkeypatch.setattr(experiment, "load_data", lambda config: pytest.fail("loaded data"))
  with pytest.raises(ValueError, match=message):
    quiet_run(tiny(**changes), tmp_path / "bad")
  assert not (tmp_path / "bad").exists()


def test_changing_dataset_or_partition_drops_their_data_options():
  base = config_lib.load("fashion_mnist_pathological")
  assert base.data_args == {"classes_per_client": 2}
  changed = config_lib.apply_overrides(base, [("data.alpha", 0.1), ("partition", "dirichlet")])
  assert changed.data_args == {"alpha": 0.1}
  same = config_lib.apply_overrides(base, [("partition", "pathological"), ("data.classes_per_client", 3)])
  assert same.data_args == {"classes_per_client": 3}


def test_unknown_dotted_key():
  with pytest.raises(ValueError, match="unknown config key 'dat.alpha'.*dict fields"):
    config_lib.apply_overrides(tiny(), {"dat.alpha": 1})


@pytest.mark.parametrize("name", config_lib.shipped_names())
def test_shipped_configs_load_validate_and_document_their_command(name):
  for smoke in (False, True):
    config = config_lib.load(name, smoke=smoke)
    assert config.smoke == smoke
    runner.check_config(config)
  module = __import__(f"fedspa_jax.configs.{name}", fromlist=["get_config"])
  assert f"fedspa-jax run --config {name}" in module.__doc__ or name == "default"
  assert "fedspa-jax run" in module.__doc__
  small = config_lib.load(name, smoke=True)
  assert small.num_clients <= 6 and small.rounds <= 3


def test_config_file_by_path(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
      "from fedspa_jax.configs import default\n"
      "def get_config(smoke=False):\n"
      "  c = default.get_config(smoke)\n"
      "  c.rounds = 7\n"
      "  return c\n"
  )
  assert config_lib.load(str(path)).rounds == 7
  with pytest.raises(ValueError, match="unknown config 'nope'; shipped configs: .*default"):
    config_lib.load("nope")


FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not all((FASHION_DIR / f).is_file() for f in idx_sources.FILES),
    reason="Fashion-MNIST IDX files absent: run scripts/install_datasets.sh",
)
def test_fashion_mnist_smoke_runs_end_to_end(tmp_path):
  config = config_lib.load("fashion_mnist_pathological", smoke=True)
  config.data_args["download"] = False  # no network in tests
  config = dataclasses.replace(config, data_dir=str(FASHION_DIR))
  data = runner.load_data(config)
  summary = quiet_run(config, tmp_path / "fm", data=data)
  assert summary["dataset"] == "fashion_mnist" and len(summary["client_accuracy"]) == 4
  assert summary["bytes_total"] > 0
  # The work a run that trains does: 2 rounds x 2 clients x 2 local steps x batch 8 (every client holds thousands of
  # images), FLOPs counted for them (here more than dense training's: 64 samples cost less than the regrowth
  # gradients), a finite loss.
  assert summary["samples"] == 2 * 2 * 2 * 8
  assert summary["flops"] > 0 and summary["flops_dense"] > 0
  assert np.isfinite(summary["final_loss_mean"])
