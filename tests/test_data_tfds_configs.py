"""The shipped CIFAR-10/100 and EMNIST configs, smoke variants, on look-alike TFDS data written into a temp folder.

The data are tiny TFDS datasets written like the real ones (`test_data_tfds.write_lookalike`) under the configs' own
dataset names, read through TFDS's real array_record reader with no network. Every such config loads and partitions
its data; one config per dataset (the others differ from it only in the partition) runs end to end through the
CLI: data, partition, model, FedSpa rounds, evaluation, checkpoints and summary. The ResNet-18 one, whose compile is
the longest, runs in tests/test_data_tfds_resnet.py, so that pytest-xdist runs it beside this file.
"""

import contextlib
import io
import json

import numpy as np
import pytest

from fedspa_jax import cli, runner
from fedspa_jax import config as config_lib
from fedspa_jax.data import tfds_sources

pytest.importorskip("tensorflow_datasets")
from test_data_tfds import PAPER, write_paper_lookalike  # noqa: E402  (after the skip)

CONFIGS = [name for name in config_lib.shipped_names() if config_lib.load(name).dataset in PAPER
           and "format" not in config_lib.load(name).data_args]  # cifar100_natural reads TFF's files: test_data_natural
END_TO_END = sorted({config_lib.load(name).dataset: name for name in CONFIGS}.values())
# As in test_models_train: ResNet-18 keeps its layer structure at 1/8 of its width, to keep compilation short.
NARROW = {"resnet18": {"width": 8}}
ELSEWHERE = ["cifar100_pathological"]  # run end to end in tests/test_data_tfds_resnet.py


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """Look-alikes of the configs' datasets: 10 training images per class (2 for CIFAR-100), one test image."""
  data_dir = tmp_path_factory.mktemp("tfds")
  for seed, name in enumerate(sorted({config_lib.load(c).dataset for c in CONFIGS})):
    write_paper_lookalike(name, data_dir, seed, per_class=2 if name == "cifar100" else 10)
  return data_dir


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(tfds_sources, "_has_tensorflow", lambda: False)  # never try to download


def call(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def test_the_paper_datasets_are_covered():
  assert {config_lib.load(c).dataset for c in END_TO_END} == {"cifar10", "cifar100", "emnist_letters"}
  assert set(ELSEWHERE) <= set(END_TO_END)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_loads_and_partitions_tfds_data(name, tfds_dir):
  config = config_lib.apply_overrides(config_lib.load(name, smoke=True), {"data_dir": str(tfds_dir)})
  runner.check_config(config)
  data = runner.load_data(config)
  _, shape, _, num_classes = PAPER[config.dataset]
  assert data.num_clients == config.num_clients and data.num_classes == num_classes and data.sample_shape == shape
  assert np.all(data.train.count > 0) and np.all(data.test.count > 0)


@pytest.mark.parametrize("name", [name for name in END_TO_END if name not in ELSEWHERE])
def test_shipped_config_smoke_runs_end_to_end_on_tfds_data(name, tfds_dir, tmp_path):
  run_end_to_end(name, tfds_dir, tmp_path)


def run_end_to_end(name, data_dir, tmp_path):
  """`fedspa-jax run --config name --set smoke=true` on the look-alikes in data_dir: completes, with a summary."""
  config = config_lib.load(name, smoke=True)
  narrow = [f"--set=model.{k}={v}" for k, v in NARROW.get(config.model, {}).items()]
  out = tmp_path / "run"
  code, stdout, stderr = call("run", "--config", name, "--set", "smoke=true", *narrow, "--data-dir", data_dir,
                              "--out", out, "--no-plots", "--quiet")
  assert code == 0, stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "complete" and summary["dataset"] == config.dataset
  assert len(summary["client_accuracy"]) == config.num_clients
  assert np.isfinite(summary["final_accuracy_mean"]) and summary["bytes_up"] > 0
  # What a run that trained gives and a broken one would not: samples trained on, FLOPs counted, a finite loss.
  assert summary["samples"] > 0 and summary["flops"] > 0 and np.isfinite(summary["final_loss_mean"])
  assert f"done: fedspa on {config.dataset}" in stdout
