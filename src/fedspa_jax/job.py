"""The run wrapper: a batch of runs in its folder, with checkpoints, resume, stops and the final records.

`experiment.run` (a batch of one run) and `sweep.sweep` (its seeds x lrs) each make a `runner.Batch` and the
records they write; everything between that and `runner.loop` is here, once:

    job = Job(config, workdir, batch, expected=resume.record(config, algo.hparams), write_configs=..., describe=...)
    summaries = execute(job, resume=True, stopper=stopper)    # every run's summary, also in its summary.json

It opens the checkpoint folder (`Checkpointer`, kept `config.keep_checkpoints`), checks and restores a resume
(`resume.check`, then every run's history, totals, last training metrics and divergence), writes the configs and
opens the metrics logs, saves every checkpoint behind a NaN guard (a diverged state never replaces a good
checkpoint), turns a stop into `preemption.Stopped` naming its checkpoint, names the last good checkpoint when
training diverges, and writes every run's summary.json and clients.npz.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fedspa_jax import distributed, paths, preemption, runner
from fedspa_jax import resume as resume_lib
from fedspa_jax.checkpoint import Checkpointer, LayoutMismatch
from fedspa_jax.config import Config, ConfigError
from fedspa_jax.records import Totals, TrainingDiverged
from fedspa_jax.run_folder import ConfigMismatchError

# What `resume.record` puts in every checkpoint's metadata; a job's other `expected` keys ("seeds", "lrs") must
# match too.
_RECORD_KEYS = ("format", "sampling", "algorithm_hparams")


@dataclasses.dataclass
class Job:
  """A batch of runs and its folder, as `execute` takes them.

  Attributes:
    config: the config as given (a sweep's: its seed and lr are the runs' own).
    workdir: the folder; checkpoints go to `workdir/checkpoints/<round>/`.
    batch: the runs, their stacked state and data, their round and evaluation.
    expected: what every checkpoint's metadata records and a resume must match: `resume.record(...)`, plus any
      other key the job needs kept ("seeds" and "lrs" of a sweep).
    write_configs: writes the config.json files and opens every run's `log` (and `tensorboard`); called by the
      first process, after a resume restored the runs' histories (metrics.jsonl is rewritten from them).
    describe: the line said before the rounds start, given the first round to run and the last.
    budget: the last round within the run's privacy budget (`dp_target_epsilon`; `privacy.last_round_within`), or
      None without one: the job stops there with a checkpoint, as `stop_after` would.
    budget_record: the privacy record ({"dp_epsilon", "dp_delta"}) after a given round, for the stop's message.
  """

  config: Config
  workdir: paths.Path
  batch: runner.Batch
  expected: dict[str, Any]
  write_configs: Callable[[], None]
  describe: Callable[[int, int], str]
  budget: int | None = None
  budget_record: Callable[[int], dict[str, Any]] | None = None


def _single(batch: runner.Batch) -> bool:
  return not batch.shape and len(batch.runs) == 1


def runs_meta(batch: runner.Batch) -> dict[str, Any]:
  """What a checkpoint records of the runs: a single run's history, totals and last training metrics at the top
  level (as `run` always wrote them); a batch's as a list "runs", with each run's divergence."""
  saved = [{"history": run.history, "totals": dataclasses.asdict(run.totals), "train": run.train,
            "diverged": run.diverged} for run in batch.runs]
  if _single(batch):
    return {key: saved[0][key] for key in ("history", "totals", "train")}
  return {"runs": saved}


def restore_runs(batch: runner.Batch, meta: dict[str, Any]) -> None:
  """The runs' history, totals, last training metrics and divergence from a checkpoint's metadata (`runs_meta`)."""
  saved = [meta] if _single(batch) and "runs" not in meta else meta["runs"]
  for run, one in zip(batch.runs, saved):
    run.history, run.totals = one["history"], Totals(**one["totals"])
    run.train, run.diverged = one.get("train", {}), one.get("diverged")


def check_resume(meta: dict[str, Any], expected: dict[str, Any], config: Config, where: Any) -> None:
  """`resume.check`, then every other key of `expected` (a sweep's seeds and lrs): ConfigMismatchError naming it."""
  resume_lib.check(meta, expected, config, where)
  for key in expected:
    if key not in _RECORD_KEYS and meta.get(key) != expected[key]:
      raise ConfigMismatchError(
          f"cannot resume from {where}: it is a sweep over {key} {meta.get(key)}, not {expected[key]}; "
          "resume with the sweep's own, or pass --overwrite to start over")


def check_stop_after(stop_after: Any) -> None:
  """Raises ConfigError unless `stop_after` is None or a round >= 1 (a stop before round 1 would save nothing)."""
  if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
    raise ConfigError(f"stop_after must be a round >= 1, got {stop_after!r}")


def execute(
    job: Job,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    stopper: preemption.Stopper | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    say: Callable[[str], None] = lambda line: None,
    progress: bool | None = None,
) -> list[dict[str, Any]] | dict[str, Any]:
  """Runs the job to its end (or `stop_after`) and writes every run's summary.json and clients.npz.

  Args:
    job: the runs and their folder.
    resume: continue from the newest checkpoint in the folder (none: start from the batch's state).
    stop_after: stop after this round (>= 1) with a checkpoint, as a preempted job would; `resume` continues.
    stopper: asked at every dispatch boundary (`preemption.Stopper`); a stop writes a checkpoint first.
    on_eval, say, progress: as `runner.loop` takes them.

  Returns:
    The runs' summaries, or, when `stop_after` ended it early, {"status": "stopped", "round", "checkpoint",
    "run_dir"}.

  Raises:
    ConfigError: `stop_after` below 1, or a checkpoint this job cannot continue (config, format, sampling,
      hyperparameters, seeds, lrs or array layout), before any file of the run is written.
    TrainingDiverged: a run diverged (unless the batch keeps going); the message names the last good checkpoint.
    preemption.Stopped: `stopper` stopped the job after its checkpoint was written; it names the checkpoint.
  """
  check_stop_after(stop_after)
  config, batch, primary = job.config, job.batch, distributed.is_primary()
  ckpt = Checkpointer(job.workdir / "checkpoints", keep=config.keep_checkpoints)
  try:
    if resume and (latest := ckpt.latest_round()) is not None:
      check_resume(ckpt.read_meta(latest), job.expected, config, ckpt.path(latest))  # before anything is written
      try:
        batch.state, meta = ckpt.restore(batch.state)
      except LayoutMismatch as e:
        raise ConfigError(f"cannot resume: {e}") from e
      restore_runs(batch, meta)
      say(f"resuming {job.workdir} from round {latest}")
    if primary:
      job.write_configs()
    start = int(batch.state.round)
    end = config.rounds if stop_after is None else max(start, min(config.rounds, stop_after))
    spent = job.budget is not None and job.budget < end  # the privacy budget ends the run first
    end = max(start, job.budget) if spent else end
    say(job.describe(start, end))

    def save(r: int, state: Any) -> None:
      if not batch.keep_going and not runner.all_finite((state.server.params, state.clients)):
        raise TrainingDiverged(f"training diverged by round {r}: the model or a client's state holds NaN or inf")
      ckpt.save(r, state, {**job.expected, "round": r, "config": config.to_dict(), **runs_meta(batch)})

    try:
      state, ev = runner.loop(batch, end=end, save=save, on_eval=on_eval, say=say, progress=progress,
                              stopper=stopper)
    except preemption.Stopped as e:
      path = ckpt.path(e.round)
      say(f"{e.reason}: stopped after round {e.round}; checkpoint {path}; continue with --resume")
      raise preemption.Stopped(e.round, e.reason, str(path)) from None
    except TrainingDiverged as e:
      good = ckpt.latest_round()
      where = f"the last good checkpoint is {ckpt.path(good)} (round {good})" if good is not None else (
          "no checkpoint was written before it")
      raise TrainingDiverged(
          f"{e}; {where}. Lower the learning rate (hparams.lr={config.hparams.get('lr')}) or check the data, "
          "and rerun with --overwrite."
      ) from None
    if end < config.rounds:
      path = ckpt.path(ckpt.latest_round())
      if spent:
        eps = job.budget_record(end) if job.budget_record is not None else {}
        say(f"stopped after round {end}, the last within dp_target_epsilon={config.hparams.get('dp_target_epsilon')} "
            f"(epsilon {eps.get('dp_epsilon', float('nan')):.3f} at delta {eps.get('dp_delta')}); checkpoint {path}")
        return {"status": "stopped", "reason": "dp_target_epsilon", "round": end, **eps, "checkpoint": str(path),
                "run_dir": str(job.workdir)}
      say(f"stopped after round {end}; checkpoint {path}; continue with --resume")
      return {"status": "stopped", "round": end, "checkpoint": str(path), "run_dir": str(job.workdir)}
    ckpt.wait()  # the last checkpoint is complete before the final analysis, which may need the memory
    return runner.finish(batch, state, ev, say=say)
  finally:
    ckpt.close()
    for run in batch.runs:
      if run.tensorboard is not None:
        run.tensorboard.close()
