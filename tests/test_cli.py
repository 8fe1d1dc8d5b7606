"""The command line end to end on tiny configs: every output of a run, resume, compare, plot, and clear errors."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedspa_jax import cli, experiment, records
from fedspa_jax import config as config_lib

SMOKE = ["--set", "smoke=true", "--set", "model.hidden=[8]"]
PNG = b"\x89PNG\r\n\x1a\n"


def call(*argv):
  """(exit code, stdout, stderr) of `fedspa-jax *argv`, in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "run"
  code, stdout, stderr = call("run", *SMOKE, "--out", out)
  assert code == 0, stderr
  return out, stdout


def test_run_prints_each_round_and_a_final_line(run_dir):
  _, stdout = run_dir
  lines = [line for line in stdout.splitlines() if line.startswith("round")]
  assert [int(line.split()[1]) for line in lines] == [1, 2, 3]
  assert all(" acc " in line for line in lines)
  assert "done: fedspa on synthetic" in stdout


def test_run_writes_config_and_metrics(run_dir):
  out, _ = run_dir
  config = json.loads((out / "config.json").read_text())
  resolved = config.pop(config_lib.RESOLVED_KEY)  # the algorithm's hyperparameters as resolved, for the record
  assert config == config_lib.apply_overrides(config_lib.load("default", smoke=True), {"model.hidden": [8]}).to_dict()
  assert resolved["weighting"] == "uniform" and resolved["density"] == 0.5
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records] == [1, 2, 3]
  for key in ("accuracy_mean", "accuracy_std", "accuracy_p10", "accuracy_p90", "loss_mean", "train_loss", "bytes_up",
              "bytes_down", "wall_time"):
    assert all(key in r for r in records), key
  assert records[0]["bytes_up"] > 0 and records[2]["bytes_up"] == 3 * records[0]["bytes_up"]  # cumulative
  if "flops" in records[0]:
    assert records[2]["flops"] > records[0]["flops"] > 0
  # The run trains: the clients' evaluated loss falls from the first round's evaluation to the last.
  assert records[2]["loss_mean"] < records[0]["loss_mean"]


def test_run_writes_summary_and_clients(run_dir):
  out, _ = run_dir
  summary = json.loads((out / "summary.json").read_text())
  for key in ("algorithm", "dataset", "partition", "final_accuracy_mean", "best_accuracy_mean", "client_accuracy",
              "bytes_up", "bytes_down", "flops", "wall_time", "device"):
    assert key in summary, key
  assert summary["algorithm"] == "fedspa" and len(summary["client_accuracy"]) == 6
  assert summary["hparams"]["weighting"] == "uniform"
  assert summary["final_accuracy_mean"] == pytest.approx(np.mean(summary["client_accuracy"]), abs=1e-6)
  clients = np.load(out / "clients.npz")
  assert clients["hamming"].shape == (6, 6) and clients["label_counts"].shape == (6, 10)
  np.testing.assert_array_equal(np.diag(clients["hamming"]), 0)
  np.testing.assert_array_equal(clients["hamming"], clients["hamming"].T)


def test_run_writes_plots_checkpoint_and_tensorboard(run_dir):
  out, _ = run_dir
  for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "client_accuracy.png", "mask_hamming.png"):
    assert (out / name).read_bytes()[:8] == PNG, name
  assert (out / "checkpoints" / "3").is_dir()  # the final round
  try:
    import tensorboard  # noqa: F401
  except ImportError:
    assert not (out / "tensorboard").exists()
  else:
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())


def test_rerun_into_the_same_folder_is_refused(run_dir):
  out, _ = run_dir
  code, _, stderr = call("run", *SMOKE, "--out", out)
  assert code == cli.EXIT_BAD_INPUT
  assert "already holds a run" in stderr and "--resume" in stderr and "--overwrite" in stderr


def test_resume_with_another_config_is_refused(run_dir):
  out, _ = run_dir
  code, _, stderr = call("run", *SMOKE, "--set", "lr=0.3", "--out", out, "--resume")
  assert code == cli.EXIT_BAD_INPUT
  assert "different config" in stderr and "hparams.lr: 0.05 -> 0.3" in stderr


def test_stop_after_then_resume_from_the_saved_config(run_dir, tmp_path):
  ref, _ = run_dir
  out = tmp_path / "run"
  code, stdout, _ = call("run", *SMOKE, "--out", out, "--stop-after", "1", "--no-plots")
  assert code == 0 and "continue with --resume" in stdout
  code, stdout, stderr = call("run", "--out", out, "--resume", "--no-plots", "--progress")  # its own config
  assert code == 0 and "resuming" in stdout
  assert "samples/s" in stderr and "comm" in stderr  # the progress bar
  a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
  for key in ("client_accuracy", "final_accuracy", "bytes_up", "bytes_down", "samples", "hparams"):
    assert a[key] == b[key], key


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algorithm", "fedsap"], "unknown algorithm 'fedsap'; known algorithms:"),
        (["--dataset", "fmnist"], "unknown dataset 'fmnist'; known:"),
        (["--model", "lenet"], "unknown model 'lenet'; known models:"),
        (["--set", "desnity=0.2"], "unknown hyperparameters for 'fedspa': desnity; known:"),
        (["--set", "dta.alpha=2"], "unknown config key 'dta.alpha'"),
        (["--config", "nope"], "unknown config 'nope'; shipped configs:"),
        (["--set", "smoke=maybe"], "smoke must be true or false"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path):
  code, _, stderr = call("run", *args, "--out", tmp_path / "x")
  assert code == cli.EXIT_BAD_INPUT
  assert message in stderr
  assert not (tmp_path / "x").exists()


def test_divergence_exit_code(monkeypatch):
  def diverge(*args, **kwargs):
    raise records.TrainingDiverged("training diverged in round 2; the last good checkpoint is x (round 1)")

  monkeypatch.setattr(experiment, "run", diverge)
  code, _, stderr = call("run")
  assert code == cli.EXIT_DIVERGED and "diverged in round 2" in stderr


def test_flags_make_the_config():
  args = cli.make_parser().parse_args(
      ["run", "--algorithm", "fedspa", "--dataset", "fashion_mnist", "--partition", "pathological",
       "--num-clients", "100", "--rounds", "50", "--out", "runs/x", "--set", "data.classes_per_client=2",
       "--set", "density=0.2", "--set", "rounds=40"]
  )
  config, _ = cli.resolve_config(args)
  assert (config.algorithm, config.dataset, config.partition, config.num_clients) == (
      "fedspa", "fashion_mnist", "pathological", 100)
  assert config.rounds == 40  # --set comes after flags
  # The default's data options (Synthetic's alpha, beta) were dropped with its dataset.
  assert config.hparams["density"] == 0.2 and config.data_args == {"classes_per_client": 2}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  out = tmp_path_factory.mktemp("cmp")
  code, stdout, stderr = call("compare", "--algorithms", "fedspa,fedavg", *SMOKE, "--set", "fedspa.density=0.3",
                              "--out", out)
  assert code == 0, stderr
  return out, stdout


def test_compare_runs_each_algorithm_and_ends_in_a_table(compared):
  out, stdout = compared
  assert "fedavg: not its hyperparameters, skipped: density" in stdout
  table = stdout[stdout.index("final acc (mean)") - 100:]
  assert "fedspa" in table and "fedavg" in table
  md = (out / "comparison.md").read_text().splitlines()
  assert md[0].startswith("| algorithm") and md[1].startswith("|:-") and len(md) == 4
  csv = (out / "comparison.csv").read_text().splitlines()
  assert csv[0].startswith("algorithm,acc_mean") and [line.split(",")[0] for line in csv[1:]] == ["fedspa", "fedavg"]
  fedspa = json.loads((out / "fedspa" / "summary.json").read_text())
  fedavg = json.loads((out / "fedavg" / "summary.json").read_text())
  assert fedspa["hparams"]["density"] == 0.3
  assert fedspa["bytes_total"] < fedavg["bytes_total"]  # sparse messages
  assert (out / "accuracy_vs_round.png").read_bytes()[:8] == PNG
  assert not (out / "fedavg" / "mask_hamming.png").exists()  # dense: no masks


def test_plot_command(compared, tmp_path):
  out, _ = compared
  code, stdout, _ = call("plot", out / "fedspa", out / "fedavg", "--out", tmp_path / "figs")
  assert code == 0
  assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
      "accuracy_vs_bytes.png", "accuracy_vs_round.png", "client_accuracy.png"]
  code, stdout, _ = call("plot", out / "fedspa", "--out", tmp_path / "one")
  assert code == 0 and (tmp_path / "one" / "mask_hamming.png").read_bytes()[:8] == PNG
  code, _, stderr = call("plot", out / "fedspa", out / "fedavg")
  assert code == cli.EXIT_BAD_INPUT and "--out" in stderr
  code, _, stderr = call("plot", tmp_path)
  assert code == cli.EXIT_BAD_INPUT and "no metrics.jsonl" in stderr


def test_python_dash_m_lists_what_is_known():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "fedspa_jax", "list"], capture_output=True, text=True, env=env,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert "fedspa" in result.stdout and "synthetic" in result.stdout and "default" in result.stdout
