"""The run folder: where a run's files go, and the rule that one folder holds one run.

A folder holds a run when it has any of `RUN_MARKERS`. Another run may not write into it unless it resumes that
run (with a config that does not change its trajectory) or overwrites it (which removes only the files a run
writes, `OUTPUTS`, never anything else in the folder).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fedspa_jax import config as config_lib
from fedspa_jax import paths, plots
from fedspa_jax.checkpoint import Checkpointer
from fedspa_jax.config import Config, ConfigError

RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
_FILES = ("config.json", "metrics.jsonl", "summary.json", "clients.npz", *plots.FILES.values())
# What a run writes, with the temporary files `paths.write_bytes` renames over them on a local disk.
OUTPUTS = (*RUN_MARKERS, "clients.npz", "tensorboard", *plots.FILES.values(), *(f"{name}.tmp" for name in _FILES))


class RunExistsError(ConfigError):
  """The output folder already holds a run."""


class ConfigMismatchError(ConfigError):
  """A run is resumed with a config that differs from its checkpoint's."""


def default_workdir(config: Config, root: paths.PathLike = "runs") -> paths.Path:
  """`runs/<algorithm>-<dataset>-<date>-<time>`, made unique."""
  base = paths.as_path(root) / f"{config.algorithm}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
  path, i = base, 1
  while path.exists():
    path, i = base.with_name(f"{base.name}-{i}"), i + 1
  return path


def saved_config(workdir: paths.Path) -> dict[str, Any] | None:
  """The config of the run in `workdir`: its newest checkpoint's, else its config.json's, else None."""
  ckpt = Checkpointer(workdir / "checkpoints")
  try:
    meta = ckpt.read_meta()
  finally:
    ckpt.close()
  if meta is not None:
    return meta["config"]
  if (workdir / "config.json").is_file():
    return json.loads((workdir / "config.json").read_text())
  return None


def prepare_workdir(workdir: paths.PathLike, config: Config, *, resume: bool, overwrite: bool, primary: bool = True) -> None:
  """Makes `workdir` ready: refuses to mix two runs in one folder, clears it for `overwrite`, checks `resume`.

  Raises:
    RunExistsError: the folder holds a run and neither `resume` nor `overwrite` is set.
    ConfigMismatchError: `resume` with a config that changes the run's trajectory (the differences are listed).

  Every process of a distributed run checks; only the `primary` one deletes or creates anything. A cloud folder
  is proven usable first (`paths.check_writable`), by every process.
  """
  if resume and overwrite:
    raise ConfigError("choose one of resume and overwrite")
  workdir = paths.as_path(workdir)
  paths.check_writable(workdir)
  held = [name for name in RUN_MARKERS if (workdir / name).exists()]
  if held and overwrite:
    for name in OUTPUTS if primary else ():
      paths.remove(workdir / name)
  elif held and not resume:
    raise RunExistsError(
        f"{workdir} already holds a run ({', '.join(held)}); pass --resume to continue it, --overwrite to replace "
        "it, or choose another --out"
    )
  elif held:
    saved = saved_config(workdir)
    diff = config_lib.trajectory_diff(saved, config.to_dict()) if saved is not None else []
    if diff:
      raise ConfigMismatchError(
          f"the checkpoint in {workdir} was written by a different config (saved -> now):\n  " + "\n  ".join(diff)
          + "\nresume with the saved config (run --resume --out DIR alone), or pass --overwrite to start over"
      )
  if primary:
    paths.make_dirs(workdir)
