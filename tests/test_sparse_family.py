"""DisPFL, FedDST and PruneFL through the run wrapper: a run stopped and resumed ends where the uninterrupted one does."""

import dataclasses

import pytest

from fedspa_jax import compare
from fedspa_jax import config as config_lib
from fedspa_jax import experiment

VOLATILE = {"wall_time", "run_dir"}


@pytest.mark.parametrize("name", ["dispfl", "feddst", "prunefl"])
def test_resumed_run_equals_the_uninterrupted_one(name, tmp_path):
  # The default config's smoke variant (6 clients, 3 per round), 4 rounds, stopped after round 2 with a checkpoint.
  # DisPFL's store holds every client's model and two masks; FedDST's global mask and round live in the server
  # optimizer's state (it readjusts in round 1, so the resumed rounds start from a moved mask). PruneFL's server
  # holds the importance of rounds 0 and 1, which its first resumed round (2) readjusts with.
  config = config_lib.load("default", smoke=True)
  config = config_lib.apply_overrides(dataclasses.replace(config, rounds=4, checkpoint_every=2, eval_every=4),
                                      {"algorithm": name, **{"feddst": {"readjust_interval": 1},
                                                               "prunefl": {"readjust_interval": 2}}.get(name, {})})
  config, _ = compare.for_algorithm(config, name)  # PruneFL takes no density
  run = lambda workdir, **kw: experiment.run(config, workdir, echo=None, write_plots=False, progress=False, **kw)
  whole = run(tmp_path / "whole")
  run(tmp_path / "stopped", stop_after=2)
  resumed = run(tmp_path / "stopped", resume=True)
  assert {k: v for k, v in resumed.items() if k not in VOLATILE} == {
      k: v for k, v in whole.items() if k not in VOLATILE}
  assert whole["algorithm"] == name and whole["rounds"] == 4 and whole["bytes_total"] > 0
