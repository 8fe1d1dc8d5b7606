"""The shipped CIFAR-100 config (ResNet-18 at 1/8 of its width), smoke variant, end to end through the CLI on a
look-alike TFDS CIFAR-100 (see tests/test_data_tfds_configs.py, which runs the other datasets' configs). Its own
file: the longest compile of the suite, run by pytest-xdist beside the rest."""

import pytest

pytest.importorskip("tensorflow_datasets")
from test_data_tfds import write_paper_lookalike  # noqa: E402  (after the skip)
from test_data_tfds_configs import ELSEWHERE, _isolated, run_end_to_end  # noqa: E402,F401  (_isolated: autouse)


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
  """A look-alike CIFAR-100: 2 training images per class, one test image (as in test_data_tfds_configs)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  write_paper_lookalike("cifar100", data_dir, 1, per_class=2)
  return data_dir


@pytest.mark.parametrize("name", ELSEWHERE)
def test_shipped_config_smoke_runs_end_to_end_on_tfds_data(name, cifar100_dir, tmp_path):
  run_end_to_end(name, cifar100_dir, tmp_path)
