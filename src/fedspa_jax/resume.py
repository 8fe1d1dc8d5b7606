"""What a checkpoint must match to be resumed, beyond the config: its format, its sampling and its resolved
hyperparameters.

`run_folder.prepare_workdir` compares the configs before any data are read. A run can still change its trajectory
with the same config, and `check` refuses that once the algorithm is built, before the checkpoint is read or any
file of the run is written:

  format             `CHECKPOINT_FORMAT`: what the state and the metadata of a checkpoint hold.
  sampling           how the cohorts are drawn: "uniform", or "stratified" over T strata. T defaults to the devices
                     on the clients axis, so with stratified sampling, turning `shard_clients` on or off (or another
                     device count) changes the strata and so every later cohort. Uniform cohorts do not depend on
                     the devices.
  algorithm_hparams  every hyperparameter as the algorithm resolved it, defaults included: a default that changed
                     since the run started (FedSpa's `weighting`, FedRep's `head`, ...) changes the run although its
                     config did not.

    expected = resume.record(config, algo.hparams)           # after algo.init (FedRep/FedPer resolve their head)
    resume.check(ckpt.read_meta(), expected, config, where)  # ConfigMismatchError, one line, naming the field
    ckpt.save(r, state, {**expected, "round": r, ...})
"""

from __future__ import annotations

import json
from typing import Any

from fedspa_jax import population
from fedspa_jax.config import Config
from fedspa_jax.run_folder import ConfigMismatchError

# 3: the metadata records the sampling and the resolved hyperparameters; batch orders and initial masks come from
# uniform shuffles (`permute`), so a format-2 run would not continue its trajectory. 2: flat data, masks stored as
# uint32 bit words, participation counts.
CHECKPOINT_FORMAT = 3

_START_OVER = "pass --overwrite to start over"

# Hyperparameters added after runs were checkpointed, with the values those runs trained with: a checkpoint whose
# record lacks one resumes into a run that resolves it to this value (and into no other).
ADDED_HPARAMS = {"clip_mode": "masked", "finetune_lr": None, "masked_leaves": "kernels"}


def sampling(config: Config, hparams: dict[str, Any]) -> dict[str, Any]:
  """How the run draws its cohorts: {"cohort_sampling": mode} and, for "stratified", the number of strata T."""
  mode = hparams.get("cohort_sampling", "uniform")
  if mode != "stratified":
    return {"cohort_sampling": mode}
  from fedspa_jax.round import make_client_mesh  # the mesh `experiment.build` shards over

  mesh = make_client_mesh() if config.shard_clients else None
  placement = population.make_placement(config.num_clients, mesh, hparams.get("cohort_strata"))
  return {"cohort_sampling": mode, "cohort_strata": placement.strata}


def record(config: Config, hparams: dict[str, Any]) -> dict[str, Any]:
  """What every checkpoint's metadata records for `check`: format, sampling and the resolved hyperparameters."""
  return {"format": CHECKPOINT_FORMAT, "sampling": sampling(config, hparams),
          "algorithm_hparams": json.loads(json.dumps(hparams, default=repr))}


def _describe(s: dict[str, Any]) -> str:
  if s.get("cohort_sampling") == "stratified":
    t = s.get("cohort_strata")
    return f"stratified sampling over {t} {'stratum' if t == 1 else 'strata'}"
  return f"{s.get('cohort_sampling')} sampling"


def check(meta: dict[str, Any], expected: dict[str, Any], config: Config, where: Any) -> None:
  """Refuses to resume the checkpoint whose metadata is `meta` into a run that would continue differently.

  Args:
    meta: the checkpoint's metadata (`Checkpointer.read_meta`).
    expected: `record(config, algo.hparams)` of the run that would resume it.
    config: that run's config.
    where: the checkpoint (for the message).

  Raises:
    ConfigMismatchError: one line naming what differs (format, sampling or hyperparameters), saved -> now.
  """
  saved_format = meta.get("format")
  if saved_format != expected["format"]:
    raise ConfigMismatchError(
        f"cannot resume from {where}: its checkpoint format is {saved_format}, this version of fedspa-jax reads "
        f"format {expected['format']}; finish the run with the version that wrote it, or {_START_OVER}"
    )
  saved, now = meta.get("sampling"), expected["sampling"]
  if saved != now:
    was = meta.get("config", {}).get("shard_clients")
    cause = (f"shard_clients: {json.dumps(was)} -> {json.dumps(config.shard_clients)}" if was != config.shard_clients
             else "hparams.cohort_strata defaults to the devices on the clients axis")
    raise ConfigMismatchError(
        f"cannot resume from {where}: the cohorts would change: {_describe(saved)} -> {_describe(now)} ({cause}); "
        f"resume with the run's own setting on as many devices as it had, or {_START_OVER}"
    )
  saved, now = meta.get("algorithm_hparams", {}), expected["algorithm_hparams"]
  saved = {**{k: v for k, v in ADDED_HPARAMS.items() if k in now}, **saved}
  differ = [f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, "<unset>") != now.get(k, "<unset>")]
  if differ:
    raise ConfigMismatchError(
        f"cannot resume from {where}: the algorithm resolves its hyperparameters differently from the checkpoint "
        f"(saved -> now): {'; '.join(differ)}; a default changed since the run started: finish it with the version "
        f"that wrote it, or {_START_OVER}"
    )
