"""One experiment from a `Config`: data -> model -> algorithm -> rounds, with evaluation, logs, checkpoints, plots.

    from fedspa_jax import config as config_lib, experiment
    summary = experiment.run(config_lib.load("default"), "runs/x")
    summary = experiment.run(config, "runs/x", resume=True)        # continue from the newest checkpoint
    summary = experiment.sweep(config, [0, 1, 2], "runs/s")        # several seeds as one vmapped program

A run is a batch of one run of `runner.loop`, the loop a sweep's stacked seeds and lrs go through too
(`fedspa_jax.sweep`), wrapped by `job.execute` as a sweep is (checkpoints, resume, stops, the final records); this
module adds what a single run has: its folder rules, its data and algorithm, TensorBoard and plots. The run folder (docs/cli.md has the details):

    config.json       the config (resuming checks that it matches), plus `algorithm_hparams`: the algorithm's
                      hyperparameters as resolved, defaults included (a record; ignored when read back)
    metrics.jsonl     one line per evaluated round: personalized accuracy distribution, losses, cumulative bytes
                      (and FLOPs when the algorithm reports them), samples, wall time
    summary.json      final and best accuracy, per-client final accuracies, totals, wall time, device
    clients.npz       per-client final accuracy/loss, label counts, and mask distances for sparse methods
    checkpoints/<r>/  orbax checkpoints (state + config + history), written atomically
    tensorboard/      event files, when tensorboard is installed
    *.png             accuracy vs round and vs bytes, per-client accuracy, mask Hamming heatmap (sparse methods)

Everything a config can get wrong (unknown algorithm, dataset, model, hyperparameter or key; an occupied run folder;
a checkpoint of another config) raises ConfigError (a ValueError) before anything is compiled. Metrics come to the
host once per dispatch, one dispatch late, and are checked for NaN: a diverged run stops with `TrainingDiverged` and
never overwrites its last good checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax

from fedspa_jax import distributed, paths, plots, preemption, privacy
from fedspa_jax import config as config_lib
from fedspa_jax import data as data_lib
from fedspa_jax import job as job_lib
from fedspa_jax import records, runner
from fedspa_jax import resume as resume_lib
from fedspa_jax.config import Config, ConfigError
from fedspa_jax.logging_utils import MetricsLog, TensorBoardLog
from fedspa_jax.round import make_client_mesh
from fedspa_jax.runner import check_config, eval_ids, load_data
# What `run` raises, by the names its callers catch (the CLI, scripts): defined in `records` and `run_folder`.
from fedspa_jax.records import TrainingDiverged  # noqa: F401
from fedspa_jax.run_folder import ConfigMismatchError, RunExistsError, default_workdir, prepare_workdir  # noqa: F401


def build(config: Config, data: data_lib.FederatedData):
  """(model, algorithm) for a config and its data; with `shard_clients`, the clients are sharded over every device."""
  return runner.build(config, data, mesh=make_client_mesh() if config.shard_clients else None)


def run(
    config: Config,
    workdir: paths.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
    write_plots: bool = True,
    data: data_lib.FederatedData | None = None,
    stopper: preemption.Stopper | None = None,
) -> dict[str, Any]:
  """Runs `config` in `workdir` and returns its summary: `runner.loop` over a batch of one run.

  Args:
    config: the experiment.
    workdir: the run folder (default: a new `runs/<algorithm>-<dataset>-<time>`).
    resume: continue from the newest checkpoint in `workdir` (starts fresh when there is none).
    overwrite: replace the run `workdir` holds.
    stop_after: stop (with a checkpoint) after this round (>= 1), as a preempted job would; `resume` continues.
    on_eval: called with each evaluated round's record (after it is logged, before its checkpoint).
    progress: show a tqdm bar (None: only on a terminal).
    echo: prints one line per evaluated round and a few notes (None: silent).
    write_plots: write the PNG figures at the end.
    data: the dataset, when the caller already loaded it for this config (as `compare` does).
    stopper: asked at every dispatch boundary whether to stop (a signal or a deadline: `preemption.Stopper`); a
      stop writes a checkpoint at the round reached (before evaluating it: the resumed run evaluates that round
      first) and raises `preemption.Stopped`.

  Returns:
    The summary (also written to summary.json), or, when stopped early, {"status": "stopped", "round", ...}.

  Raises:
    ConfigError (a ValueError): bad config, data options or run folder, before anything is compiled.
    FileNotFoundError: the dataset's files are missing.
    TrainingDiverged: a loss or a parameter became NaN or infinite; the last good checkpoint stays as it is.
    preemption.Stopped: `stopper` stopped the run; its checkpoint (at the round reached) is written and its
      metrics.jsonl holds every evaluated round before it. `resume=True` continues exactly.
  """
  primary = distributed.is_primary()  # under jax.distributed only process 0 writes files and prints
  say = runner.say_for(echo)
  check_config(config)
  job_lib.check_stop_after(stop_after)
  workdir = paths.as_path(workdir) if workdir is not None else default_workdir(config)
  fresh = not paths.is_cloud(workdir) and not workdir.exists()  # nothing may touch a gs:// folder before its check
  prepare_workdir(workdir, config, resume=resume, overwrite=overwrite, primary=primary)
  distributed.barrier("fedspa_jax.prepare_workdir")
  try:  # data options, model/data fit: still input errors, found before compilation
    try:
      data = load_data(config) if data is None else data
    except TypeError as e:  # an option the data source does not take
      raise ConfigError(f"bad data options {config.data_args}: {e}") from e
    _, algo = build(config, data)
    budget = privacy.last_round_within(algo, data.num_clients, config.rounds)  # dp_target_epsilon's last round
    if budget == 0:
      raise ValueError(f"dp_target_epsilon={config.hparams.get('dp_target_epsilon')} is below the epsilon of one "
                       f"round ({privacy.epsilon_record(algo, data.num_clients, 1)['dp_epsilon']:.3g})")
    state = algo.init(jax.random.key(config.seed), data)
  except (ValueError, FileNotFoundError) as e:
    if fresh and primary and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()  # bad input leaves nothing behind, not even the folder this run made
    if isinstance(e, FileNotFoundError):
      raise
    raise ConfigError(str(e)) from e

  one = runner.Run(config, workdir, algo, data)
  batch = runner.Batch(
      runs=[one], state=state, data=algo.place(data),  # on the device, or laid out over the mesh
      round_fn=algo.round_fn,
      evaluate=lambda s, d, r, epochs=None: algo.evaluate(
          s, d, None if epochs else eval_ids(config, data.num_clients, r), finetune_epochs=epochs),
  )

  def write_configs() -> None:
    # The config as given, plus (for the record, not read back) the algorithm's hyperparameters as resolved,
    # defaults included: weighting, FedRep/FedPer's head, ...
    record = {**config.to_dict(), config_lib.RESOLVED_KEY: records.jsonable(algo.hparams)}
    paths.write_text(workdir / "config.json", json.dumps(record, indent=2) + "\n")
    one.log = MetricsLog(workdir / "metrics.jsonl", one.history)
    one.tensorboard = TensorBoardLog.create(workdir / "tensorboard")

  job = job_lib.Job(
      config, workdir, batch, expected=resume_lib.record(config, algo.hparams),  # after init: FedRep's head
      write_configs=write_configs, budget=budget,
      budget_record=lambda r: privacy.epsilon_record(algo, data.num_clients, r),
      describe=lambda start, end: (f"{algo.name} on {data.name}: {data.num_clients} clients, rounds "
                                   f"{start + 1}..{end} of {config.rounds} -> {workdir}"))
  result = job_lib.execute(job, resume=resume, stop_after=stop_after, stopper=stopper, on_eval=on_eval, say=say,
                           progress=progress)
  if isinstance(result, dict):  # stopped by `stop_after`
    return result
  [summary] = result
  if primary and write_plots:
    plots.plot_run(workdir)
  distributed.barrier("fedspa_jax.run_done")
  return summary


def sweep(config: Config, seeds, workdir=None, **kwargs) -> dict[str, Any]:
  """Runs `config` once per seed (and per lr with `lrs=`) as one vmapped program; see `fedspa_jax.sweep.sweep`."""
  from fedspa_jax import sweep as sweep_lib  # one way only: the sweep builds on `runner`, never on this module

  return sweep_lib.sweep(config, seeds, workdir, **kwargs)
