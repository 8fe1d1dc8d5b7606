"""Switching the algorithm from the command line, from the default config and from every shipped config, for every
algorithm `fedspa-jax list` names; and bad input (a broken config file, a value of the wrong type) as one line, exit 2.

`--algorithm A` (or `--set algorithm=A`) keeps the config's hyperparameters that A takes and names the others in one
line; hyperparameters given with `--set` that A does not take stay an error. Every (shipped config, algorithm) pair
resolves and passes every check that needs no data (where "unknown hyperparameters" stopped it before); every
algorithm trains a round from the default config; and `python -m fedspa_jax run --algorithm fedavg` runs to the end
in a process of its own. Training every pair would compile 100+ programs (a FedRep round on LeNet-5 alone costs ~30 s
of CPU to compile); how each algorithm trains on each model is tested elsewhere (test_algorithms, test_models_train,
test_split, the shipped configs' end-to-end tests).
"""

import contextlib
import io
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import cli, experiment, runner
from fedspa_jax import config as config_lib

SRC = str(pathlib.Path(__file__).resolve().parents[1] / "src")


def call(*argv):
  """(exit code, stdout, stderr) of `fedspa-jax *argv`, in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def listed() -> tuple[list[str], list[str]]:
  """(algorithms, configs) as `fedspa-jax list` prints them."""
  code, stdout, _ = call("list")
  assert code == 0
  lines = stdout.splitlines()
  start = lines.index("algorithms:") + 1
  end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  "))
  names = [line.split()[0] for line in lines[start:end]]
  configs = next(line for line in lines if line.startswith("configs:")).split(":", 1)[1]
  return names, [c.strip() for c in configs.split(",")]


ALGORITHMS, CONFIGS = listed()


def resolve(*argv, algorithm=None):
  """The config and the printed lines of `fedspa-jax run *argv [--algorithm A]`, without running it."""
  args = cli.make_parser().parse_args(["run", *argv, *(["--algorithm", algorithm] if algorithm else [])])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    config, _ = cli.resolve_config(args)
  return config, out.getvalue()


def test_list_names_the_registry_and_the_shipped_configs():
  assert ALGORITHMS == fj.algorithms.names() and len(ALGORITHMS) >= 12
  assert CONFIGS == config_lib.shipped_names() and "default" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_every_algorithm_resolves_and_checks_from_a_shipped_config(name):
  base = config_lib.load(name, smoke=True)
  for algorithm in ALGORITHMS:
    config, printed = resolve("--config", name, "--set", "smoke=true", algorithm=algorithm)
    known = set(fj.algorithms.known_hparams(algorithm))
    dropped = sorted(set(base.hparams) - known)
    assert config.algorithm == algorithm
    assert config.hparams == {k: v for k, v in base.hparams.items() if k in known}  # the rest kept, values as they were
    if algorithm != base.algorithm and dropped:
      assert printed == f"{algorithm}: not its hyperparameters, skipped: {', '.join(dropped)}\n"
    else:
      assert printed == ""
    runner.check_config(config)  # what failed before: "unknown hyperparameters for 'fedavg': density"


def test_set_algorithm_switches_too_and_explicit_unknown_hparams_stay_an_error(tmp_path):
  config, printed = resolve("--set", "algorithm=fedavg", "--set", "finetune_epochs=1")
  assert config.algorithm == "fedavg" and "density" not in config.hparams and config.hparams["finetune_epochs"] == 1
  assert printed == "fedavg: not its hyperparameters, skipped: density\n"
  code, stdout, stderr = call("run", "--algorithm", "fedavg", "--set", "density=0.3", "--out", tmp_path / "x")
  assert code == cli.EXIT_BAD_INPUT and "unknown hyperparameters for 'fedavg': density" in stderr
  assert not (tmp_path / "x").exists()
  # The same algorithm as the config's keeps everything, and says nothing.
  config, printed = resolve("--algorithm", "fedspa")
  assert config.hparams == config_lib.load("default").hparams and printed == ""


def train_one_round(config, data) -> None:
  _, algo = experiment.build(config, data)
  state = algo.init(jax.random.key(config.seed), data)
  state, metrics = algo.round(state, algo.place(data))
  assert int(state.round) == 1
  loss = np.asarray(metrics["loss"])[np.asarray(metrics["weight"]) > 0]
  assert loss.size and np.all(np.isfinite(loss))


@pytest.fixture(scope="module")
def default_data():
  return runner.load_data(config_lib.load("default"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_a_round_from_the_default_config(algorithm, default_data):
  # The default config at full size with test_algorithms' MLP: the same data, model and hyperparameters as there,
  # so the compiled programs are shared with it through the suite's compilation cache.
  config, _ = resolve("--set", "model.hidden=[32]", algorithm=algorithm)
  runner.check_config(config)
  train_one_round(config, default_data)


def test_the_issues_cases_resolve_and_pass_their_checks():
  # `--config fashion_mnist_pathological --algorithm fedrep`: the FedSpa density is dropped; momentum, lr and the
  # local work are kept. `--algorithm ditto --dataset fashion_mnist --partition pathological`: the default's density.
  config, printed = resolve("--config", "fashion_mnist_pathological", algorithm="fedrep")
  assert printed == "fedrep: not its hyperparameters, skipped: density\n"
  assert config.model == "lenet5" and config.hparams == {k: v for k, v in config_lib.load(
      "fashion_mnist_pathological").hparams.items() if k != "density"}
  runner.check_config(config)
  config, printed = resolve("--dataset", "fashion_mnist", "--partition", "pathological", algorithm="ditto")
  assert printed == "ditto: not its hyperparameters, skipped: density\n" and config.dataset == "fashion_mnist"
  runner.check_config(config)


def cli_process(*argv, cwd):
  """`python -m fedspa_jax *argv` in a new process, on this checkout's sources."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
         "FEDSPA_JAX_CACHE": str(cwd / "cache")}
  return subprocess.run([sys.executable, "-m", "fedspa_jax", *map(str, argv)], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=300)


def test_run_algorithm_fedavg_from_the_default_config_in_a_process(tmp_path):
  # The issue's first case: `fedspa-jax run --algorithm fedavg --rounds 2` stopped on the default's FedSpa density.
  # (test_cli's `compare` runs this same FedAvg config: the compiled programs are shared through the cache.)
  result = cli_process("run", "--algorithm", "fedavg", "--set", "smoke=true", "--set", "model.hidden=[8]",
                       "--out", "run", "--no-plots", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == "fedavg: not its hyperparameters, skipped: density"
  assert "done: fedavg on synthetic" in result.stdout
  resolved = (tmp_path / "run" / "config.json").read_text()
  assert '"algorithm": "fedavg"' in resolved and '"density"' not in resolved


def one_line_error(result) -> str:
  assert result.returncode == cli.EXIT_BAD_INPUT, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedspa-jax: error: "), result.stderr
  return lines[0]


def test_a_config_file_with_a_syntax_error_is_one_line_naming_the_file(tmp_path):
  (tmp_path / "broken.py").write_text("from fedspa_jax.config import Config\n\ndef get_config(smoke=False:\n  pass\n")
  line = one_line_error(cli_process("run", "--config", "broken.py", "--out", "run", cwd=tmp_path))
  assert "config file broken.py has a syntax error (line 3)" in line
  assert not (tmp_path / "run").exists()


def test_a_value_of_the_wrong_type_is_one_line_naming_the_key_and_type(tmp_path):
  for argv, message in [(["--set", "lr=fast"], "hyperparameter lr must be a number (float), got 'fast'"),
                        (["--set", "local_steps=1.5"], "hyperparameter local_steps must be an integer or null"),
                        (["--algorithm", "fedavg", "--set", "finetune_epochs=two"],
                         "hyperparameter finetune_epochs must be an integer (int), got 'two'"),
                        (["--set", "weighting=1"], "hyperparameter weighting must be a string or null")]:
    code, _, stderr = call("run", *argv, "--out", tmp_path / "x")
    lines = stderr.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith(f"fedspa-jax: error: {message}"), \
        stderr
    assert not (tmp_path / "x").exists()
