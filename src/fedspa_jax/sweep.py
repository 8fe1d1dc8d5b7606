"""Several seeds (and learning rates) of one config as one compiled program: vmapped over whole simulations.

    from fedspa_jax import config as config_lib, experiment
    summary = experiment.sweep(config_lib.load("default"), seeds=[0, 1, 2], workdir="runs/sweep")
    grid = experiment.sweep(config_lib.load("default"), seeds=[0, 1], workdir="runs/grid", lrs=[0.01, 0.1])

With `lrs`, each (lr, seed) is a run: the algorithm is built inside the traced round with a traced lr (it enters only
through the clients' `optax.sgd`), the lr axis is vmapped outside the seed axis (state [L, S, ...], the seeds' data
shared by all lrs), and lr_<lr>/ holds what a seeds-only sweep folder holds; docs/cli.md has the layout.

The runs advance as one batch through `job.execute` and `runner.loop`, the wrapper and loop that `experiment.run`
drives with a batch of one, so their checkpoints, resume checks, stops, records, NaN checks and files come from the
same code as a run's. Each lr trains, evaluates and fine-tunes with its own algorithm (its lr traced), and records
its own resolved hyperparameters. Seed s of a sweep is the run
`experiment.run(replace(config, seed=s))`: its own data partition, model init, masks, cohorts and batches, with the
same records, equal up to float rounding (tests/test_sweep.py). The seeds' datasets and states are stacked on a
leading axis and each round is one `jit(vmap(round_fn))` over all seeds; the round counter stays unbatched (all seeds
are at the same round), so a `lax.cond` on the round (FedSpa's prune rate) stays a real branch. Datasets whose
partitions hold different numbers of samples are padded with unused rows (rows no client owns, which the flat layout
allows and never reads), so only the number of clients and the sample shape must agree, and they do for one config.

The sweep folder:

    config.json                 the config as given (its `seed` is not used: the seeds are in summary.json)
    summary.json                the seeds, each seed's final mean accuracy, and mean ± std over seeds (population
                                std, ddof=0) of the final accuracy distribution, best accuracy, bytes, FLOPs, samples
    seed_<s>/config.json        the config with seed=s
    seed_<s>/metrics.jsonl      as `run` writes it (`fedspa-jax plot` reads a seed folder like a run folder)
    seed_<s>/summary.json       as `run` writes it; its wall_time is the whole sweep's
    seed_<s>/clients.npz        as `run` writes it
    checkpoints/<r>/            every run's state (stacked), history and totals, every `checkpoint_every` rounds
                                and at a stop (`preemption`); `resume=True` continues the sweep from the newest

`rounds_per_dispatch`, `eval_every` and `eval_clients` work as in `run` (each seed evaluates its own seeded sample of
clients). What a sweep does not do: plots (draw them with
`fedspa-jax plot DIR/seed_0 DIR/seed_1 ...`), `shard_clients`, TensorBoard. Memory is the number of seeds times one
run's; a client's local loop, vmapped over seeds, runs as long as the longest of the seeds' clients at that cohort
position (results are unchanged, the extra steps are masked).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax import config as config_lib
from fedspa_jax import data as data_lib
from fedspa_jax import job as job_lib
from fedspa_jax import paths, preemption, runner
from fedspa_jax import resume as resume_lib
from fedspa_jax.config import Config, ConfigError
from fedspa_jax.logging_utils import MetricsLog, human_bytes
from fedspa_jax.records import jsonable, round_time
from fedspa_jax.round import SimState
from fedspa_jax.run_folder import OUTPUTS, RUN_MARKERS, ConfigMismatchError, RunExistsError, default_workdir, saved_config

# The stacked state's axes: everything per seed but the round counter, which all seeds share.
STATE_AXES = SimState(server=0, clients=0, round=None, key=0, participation=0)
SEED_DIR = re.compile(r"seed_-?\d+")
LR_DIR = re.compile(r"lr_[0-9.e+-]+")


def _check_values(values: Any, name: str, noun: str, types: tuple, empty: str,
                  problem: Callable[[Any], str | None], convert: Callable, fmt: Callable = str) -> tuple:
  """`values` as a tuple of distinct converted values; ConfigError for anything else.

  Args:
    name, noun: for the messages ("seeds must be integers", "lrs must be a list of numbers").
    types: the accepted types of one value (bools never are).
    empty: the message for an empty list.
    problem: a value's error message, or None when it is fine.
  """
  if isinstance(values, (str, bytes)) or not isinstance(values, (collections.abc.Sequence, np.ndarray)):
    raise ConfigError(f"{name} must be a list of {noun}, got {values!r}")
  values = list(values)
  if not values:
    raise ConfigError(empty)
  for v in values:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, types):
      raise ConfigError(f"{name} must be {noun}, got {v!r}")
    message = problem(v)
    if message:
      raise ConfigError(message)
  values = tuple(convert(v) for v in values)
  duplicates = sorted({v for v in values if values.count(v) > 1})
  if duplicates:
    raise ConfigError(f"{name} must be distinct; repeated: {', '.join(map(fmt, duplicates))}")
  return values


def check_seeds(seeds: Any) -> tuple[int, ...]:
  """The seeds as a tuple of distinct Python ints >= 0.

  Raises:
    ConfigError: no seeds, a seed that is not an integer (bools and floats included) or is negative, duplicates.
  """
  return _check_values(seeds, "seeds", "integers", (int, np.integer), "a sweep needs at least one seed",
                       lambda s: None if s >= 0 else f"seeds must be >= 0, got {s}", int)


def check_lrs(lrs: Any) -> tuple[float, ...]:
  """The learning rates as a tuple of distinct finite Python floats > 0.

  Raises:
    ConfigError: no lrs, an lr that is not a number (bools included), not finite or not > 0, duplicates.
  """
  return _check_values(lrs, "lrs", "numbers", (int, float, np.integer, np.floating),
                       "a sweep over lrs needs at least one lr",
                       lambda lr: None if np.isfinite(lr) and lr > 0 else f"lrs must be finite and > 0, got {lr!r}",
                       float, fmt=lr_text)


def _pad_rows(split: data_lib.ClientSplit, rows: int, max_count: int) -> data_lib.ClientSplit:
  pad = rows - split.x.shape[0]
  x, y = np.asarray(split.x), np.asarray(split.y)
  if pad:
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
  return dataclasses.replace(split, x=x, y=y, max_count=max_count)


def stack_data(datas: Sequence[data_lib.FederatedData]) -> data_lib.FederatedData:
  """The seeds' datasets stacked on a leading axis [seeds, ...].

  Each split's flat rows are padded to the largest seed's with unused zero rows (no client owns them, so nothing
  reads them) and its static `max_count` set to the largest seed's (it only sizes evaluation chunks).

  Raises:
    ConfigError: the datasets differ in anything but their number of rows (clients, sample shape, dtypes, classes).
  """
  for name in ("num_classes", "name", "mean", "std"):
    values = {repr(getattr(d, name)) for d in datas}
    if len(values) > 1:
      raise ConfigError(f"a sweep needs the same dataset for every seed; {name} differs: {sorted(values)}")
  splits = {}
  for split in ("train", "test"):
    parts = [getattr(d, split) for d in datas]
    layouts = {(p.x.shape[1:], p.x.dtype.str, p.y.dtype.str, p.offset.shape, p.count.shape) for p in parts}
    if len(layouts) > 1:
      raise ConfigError(
          f"a sweep needs same-shaped data for every seed; the {split} splits differ: {sorted(map(str, layouts))}"
      )
    rows = max(p.x.shape[0] for p in parts)
    max_count = max(p.max_count for p in parts)
    splits[split] = [_pad_rows(p, rows, max_count) for p in parts]
  padded = [dataclasses.replace(d, train=tr, test=te) for d, tr, te in zip(datas, splits["train"], splits["test"])]
  return jax.tree.map(lambda *a: np.stack(a), *padded)


def stack_states(states: Sequence[SimState]) -> SimState:
  """The seeds' initial states stacked on a leading axis, with one shared (unbatched) round counter."""
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  return stacked._replace(round=states[0].round)


def make_sweep_round(round_fn: Callable) -> Callable:
  """The pure round of all seeds at once: (stacked state, stacked data) -> (state, metrics [seeds, ...])."""
  return jax.vmap(round_fn, in_axes=(STATE_AXES, 0), out_axes=(STATE_AXES, 0))


def make_sweep_evaluate(evaluate_fn: Callable, finetune_epochs: int | None = None) -> Callable:
  """jit of the evaluation of all seeds: (state [seeds, ...], data [seeds, ...], client ids [seeds, C] or None for
  all) -> evaluations [seeds, ...]; `finetune_epochs` as `Algorithm.evaluate_fn` takes it."""
  evaluate = functools.partial(evaluate_fn, finetune_epochs=finetune_epochs)
  return jax.jit(jax.vmap(evaluate, in_axes=(STATE_AXES, 0, 0)))


def make_lr_sweep_evaluate(config: Config, data: data_lib.FederatedData, finetune_epochs: int | None = None
                           ) -> Callable:
  """jit of the evaluation of all (lr, seed) runs: (lrs [L], state [L, S, ...], data [S, ...], client ids [S, C] or
  None) -> evaluations [L, S, ...]. Each lr's algorithm is built with its own (traced) lr, as in
  `make_lr_sweep_round`, so its evaluation fine-tunes with that lr (FedAvg-FT, `eval_finetune_epochs`)."""

  def evaluate_at(lr, state, stacked, ids):
    _, algo = runner.build(with_lr(config, lr), data)  # `data` (host, one seed's) sizes the model only
    evaluate = functools.partial(algo.evaluate_fn, finetune_epochs=finetune_epochs)
    return jax.vmap(evaluate, in_axes=(STATE_AXES, 0, 0))(state, stacked, ids)

  return jax.jit(jax.vmap(evaluate_at, in_axes=(0, STATE_AXES, None, None)))


def _prepare_folder(workdir: paths.Path, config: Config, overwrite: bool, resume: bool) -> None:
  """Makes the sweep folder ready: refuses to mix two runs, clears it for `overwrite`, checks `resume`'s config."""
  if resume and overwrite:
    raise ConfigError("choose one of resume and overwrite")
  paths.check_writable(workdir)
  seed_dirs = [p for p in workdir.glob("*_*") if p.is_dir() and (SEED_DIR.fullmatch(p.name) or
                                                                   LR_DIR.fullmatch(p.name))]
  held = [name for name in RUN_MARKERS if (workdir / name).exists()] + [p.name for p in seed_dirs]
  if held and resume:
    saved = saved_config(workdir)
    saved = None if saved is None else {k: v for k, v in saved.items() if k != "lrs"}  # config.json's record of lrs
    diff = config_lib.trajectory_diff(saved, config.to_dict()) if saved is not None else []
    if diff:
      raise ConfigMismatchError(
          f"the sweep in {workdir} was written by a different config (saved -> now):\n  " + "\n  ".join(diff)
          + "\nresume with the saved config, or pass --overwrite to start over")
    return
  if held and not overwrite:
    raise RunExistsError(
        f"{workdir} already holds a run ({', '.join(held)}); pass --resume to continue it, --overwrite to replace "
        "it, or choose another --out"
    )
  for target in [workdir / name for name in OUTPUTS] + seed_dirs:
    paths.remove(target)
  paths.make_dirs(workdir)


def _mean_std(values: Sequence[float | None]) -> dict[str, Any] | None:
  if any(v is None for v in values):
    return None
  a = np.asarray(values, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def sweep_summary(config: Config, seeds: tuple[int, ...], summaries: list[dict[str, Any]], workdir: paths.Path,
                  wall_time: float) -> dict[str, Any]:
  """summary.json of a sweep: per-seed final mean accuracies and mean ± std over seeds.

  With a diverged seed (lr sweeps record them), the statistics over seeds are None and `diverged_seeds` lists them.
  """
  bad = [s["seed"] for s in summaries if s["status"] != "complete"]
  if bad:
    return {
        "status": "diverged", "algorithm": config.algorithm, "dataset": config.dataset, "seeds": list(seeds),
        "diverged_seeds": bad, "hparams": jsonable(config.hparams), "config": config.to_dict(),
        "final_accuracy_mean_per_seed": [s["final_accuracy_mean"] for s in summaries],
        "final_accuracy_mean": None, "wall_time": round_time(wall_time), "run_dir": str(workdir),
        "seed_dirs": [str(workdir / f"seed_{s}") for s in seeds],
    }
  first = summaries[0]
  over = lambda key: _mean_std([s[key] for s in summaries])
  # Every protocol's final accuracy distribution (FedSpa's masked_global beside local, the fine-tuned ones), over seeds
  protocols = {key: {k: _mean_std([s[key][k] for s in summaries]) for k in first[key]} for key in first
               if key.startswith("final_accuracy_") and key != "final_accuracy_mean" and isinstance(first[key], dict)}
  protocols.update({key: first[key] for key in ("protocol", "finetune_epochs") if key in first})
  return {
      "status": "complete",
      "algorithm": first["algorithm"],
      "dataset": first["dataset"],
      "partition": first["partition"],
      "model": first["model"],
      "num_clients": first["num_clients"],
      "rounds": first["rounds"],
      "seeds": list(seeds),
      "hparams": first["hparams"],
      "config": config.to_dict(),
      "final_accuracy_mean_per_seed": [s["final_accuracy_mean"] for s in summaries],
      "final_accuracy_mean": over("final_accuracy_mean"),
      "final_accuracy": {k: _mean_std([s["final_accuracy"][k] for s in summaries]) for k in first["final_accuracy"]},
      **protocols,
      "final_loss_mean": over("final_loss_mean"),
      "best_accuracy_mean": over("best_accuracy_mean"),
      **{key: over(key) for key in ("bytes_up", "bytes_down", "bytes_total", "flops", "flops_dense", "eval_flops",
                                    "samples")},
      "wall_time": round_time(wall_time),
      "device": first["device"],
      "jax_version": jax.__version__,
      "run_dir": str(workdir),
      "seed_dirs": [str(workdir / f"seed_{s}") for s in seeds],
  }


def format_sweep_record(records: list[dict[str, Any]]) -> str:
  """One terminal line for an evaluated round of all seeds: mean ± std over seeds."""
  acc = np.asarray([r["accuracy_mean"] for r in records])
  loss = np.asarray([r["train_loss"] for r in records])
  comm = np.mean([r["bytes_up"] + r["bytes_down"] for r in records])
  return (
      f"round {records[0]['round']:4d}  acc {acc.mean():.4f} ± {acc.std():.4f} over {len(records)} seeds "
      f"(min {acc.min():.3f}, max {acc.max():.3f})  train loss {loss.mean():.4f}  "
      f"comm {human_bytes(comm)}/seed  {records[0]['wall_time']:.1f}s"
  )


def lr_text(lr: float) -> str:
  """An lr as its shortest exact text (repr, without a trailing ".0"): distinct lrs get distinct names and folders
  (`f"{lr:g}"` would give 0.1 and 0.1000001 the same); 0.01 -> "0.01", 1.0 -> "1", 1e-05 -> "1e-05"."""
  text = repr(float(lr))
  return text[:-2] if text.endswith(".0") else text


def with_lr(config: Config, lr: Any) -> Config:
  """`config` with the clients' learning rate replaced (a float, or a traced scalar inside a vmapped lr sweep)."""
  return dataclasses.replace(config, hparams={**config.hparams, "lr": lr})


def make_lr_sweep_round(config: Config, data: data_lib.FederatedData) -> Callable:
  """The pure round of all (lr, seed) runs: (lrs [L], state [L, S, ...], data [S, ...]) -> (state, metrics [L, S]).

  The algorithm is built inside the traced function with its lr a traced scalar (it enters only through the clients'
  `optax.sgd`), so one program serves every lr; the seeds' data are shared by all lrs (not copied per lr).
  """

  def round_at(lr, state, stacked):
    _, algo = runner.build(with_lr(config, lr), data)  # `data` (host, one seed's) sizes the model only
    return make_sweep_round(algo.round_fn)(state, stacked)

  return jax.vmap(round_at, in_axes=(0, STATE_AXES, None), out_axes=(STATE_AXES, 0))


def sweep(
    config: Config,
    seeds: Sequence[int],
    workdir: paths.PathLike | None = None,
    *,
    lrs: Sequence[float] | None = None,
    echo: Callable[[str], None] | None = print,
    progress: bool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    stopper: preemption.Stopper | None = None,
) -> dict[str, Any]:
  """Runs `config` once per seed (and per learning rate), all runs as one vmapped program; returns the summary.

  Args:
    config: the experiment (its `seed` is replaced by each of `seeds`).
    seeds: distinct integers >= 0.
    workdir: the sweep folder (default: a new `runs/<algorithm>-sweep-<dataset>-<time>`).
    lrs: distinct learning rates > 0 of the clients' SGD (None: the config's). Each (lr, seed) is a run; the lr axis
      is vmapped too, so the whole grid is one program; run (lr, s) equals `run` with that lr and seed. A run that
      diverges is recorded as diverged and the others go on (a too-large lr is a result of a search).
    echo: prints one line per evaluated round (and lr), mean ± std over seeds (None: silent).
    progress: show a tqdm bar (None: only on a terminal).
    overwrite: replace the run or sweep `workdir` holds.
    resume: continue the sweep in `workdir` from its newest checkpoint (starts fresh when there is none); the
      seeds and lrs must be the sweep's own.
    stopper: asked at every dispatch boundary whether to stop (`preemption.Stopper`: a signal or a deadline); a
      stop writes a checkpoint of every run and raises `preemption.Stopped`.

  Returns:
    The summary (also written to summary.json); each seed's own summary is in seed_<s>/summary.json (with `lrs`:
    lr_<lr>/seed_<s>/summary.json, and each lr_<lr>/summary.json is that lr's summary over seeds).

  Raises:
    ConfigError (a ValueError): bad seeds, lrs, config, data options or folder, before anything is compiled.
    FileNotFoundError: the dataset's files are missing.
    TrainingDiverged: without `lrs`, a seed's loss or parameters became NaN or infinite (the sweep stops).
    preemption.Stopped: `stopper` stopped the sweep after its checkpoint was written; `resume=True` continues.
  """
  say = runner.say_for(echo)
  seeds = check_seeds(seeds)
  lr_list = None if lrs is None else check_lrs(lrs)
  runner.check_config(config)
  if config.shard_clients:
    raise ConfigError("a sweep does not support shard_clients (run the seeds separately to shard their cohorts)")
  if lr_list is not None and config.hparams.get("optimizer") is not None:
    raise ConfigError("a sweep over lrs needs the default SGD optimizer (hparams.optimizer is set)")
  if config.hparams.get("dp_target_epsilon") is not None:  # a sweep records epsilon but has no early stop
    raise ConfigError("a sweep runs all its rounds: set rounds for the privacy budget instead of dp_target_epsilon")
  grid = [None] if lr_list is None else list(lr_list)  # the lr axis; None: the config's lr, no axis
  workdir = paths.as_path(workdir) if workdir is not None else default_workdir(
      dataclasses.replace(config, algorithm=f"{config.algorithm}-sweep"))
  _prepare_folder(workdir, config, overwrite, resume)
  try:  # data options, model/data fit: input errors, found before compilation
    try:
      datas = [runner.load_data(dataclasses.replace(config, seed=s)) for s in seeds]
    except TypeError as e:
      raise ConfigError(f"bad data options {config.data_args}: {e}") from e
    algos = [runner.build(config if lr is None else with_lr(config, lr), datas[0])[1] for lr in grid]
    states = [algos[0].init(jax.random.key(s), d) for s, d in zip(seeds, datas)]  # the initial state: of no lr
    for algo in algos[1:]:  # each lr's algorithm resolves its own hyperparameters (FedRep's head) at init
      jax.eval_shape(algo.init, jax.random.key(seeds[0]), datas[0])
    data = stack_data(datas)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  lr_dirs = [workdir] if lr_list is None else [workdir / f"lr_{lr_text(lr)}" for lr in grid]
  runs = [  # run j = (lr index j // S, seed index j % S)
      runner.Run(dataclasses.replace(config if lr is None else with_lr(config, lr), seed=s), lr_dir / f"seed_{s}",
                 algo, d, name=f"seed {s}" if lr is None else f"lr {lr_text(lr)} seed {s}")
      for lr, lr_dir, algo in zip(grid, lr_dirs, algos) for s, d in zip(seeds, datas)
  ]
  batch = _make_batch(config, runs, grid if lr_list is not None else None, states, data)
  resolved = dict(algos[0].hparams) if lr_list is None else {k: v for k, v in algos[0].hparams.items() if k != "lr"}
  describe = lambda start, end: (
      f"{algos[0].name} on {datas[0].name}: {datas[0].num_clients} clients, rounds {start + 1}..{end}, seeds "
      + ", ".join(map(str, seeds)) + ("" if lr_list is None else f", lrs {', '.join(map(lr_text, grid))}")
      + f" -> {workdir}")
  job = job_lib.Job(
      config, workdir, batch,
      # the runs' hyperparameters but their lr, which is in "lrs" (each lr's own are in its runs' records)
      expected={**resume_lib.record(config, resolved), "seeds": list(seeds), "lrs": lr_list and list(lr_list)},
      write_configs=lambda: _write_configs(config, lr_list, runs, workdir, resolved), describe=describe)
  summaries = job_lib.execute(job, resume=resume, stopper=stopper, say=say, progress=progress)
  wall, S = runs[0].totals.wall_time, len(seeds)  # every run's: the sweep's, summed over resumed segments
  per_lr = [sweep_summary(runs[l * S].config, seeds, summaries[l * S:(l + 1) * S], lr_dirs[l], wall)
            for l in range(len(grid))]
  if lr_list is None:
    result = per_lr[0]
  else:
    for lr_dir, summary in zip(lr_dirs, per_lr):
      paths.write_text(lr_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    result = lr_sweep_summary(config, seeds, grid, per_lr, workdir, wall)
  paths.write_text(workdir / "summary.json", json.dumps(result, indent=2) + "\n")
  return result


def _write_configs(config: Config, lrs: tuple[float, ...] | None, runs: list[runner.Run], workdir: paths.Path,
                   resolved: dict[str, Any]):
  """config.json of the sweep (with "lrs"; its resolved hyperparameters without an lr), of each lr folder and of
  each run (with that run's algorithm's own); each run's metrics.jsonl (with the history a resumed run has)."""
  write = lambda path, record: paths.write_text(path, json.dumps(record, indent=2) + "\n")
  write(workdir / "config.json", {**config.to_dict(), config_lib.RESOLVED_KEY: jsonable(resolved),
                                  **({} if lrs is None else {"lrs": list(lrs)})})
  for j, run in enumerate(runs):
    own = jsonable(run.algo.hparams)
    paths.make_dirs(run.workdir)
    if lrs is not None and j % (len(runs) // len(lrs)) == 0:  # the lr's folder, with its first seed
      write(run.workdir.parent / "config.json", {**run.config.to_dict(), "seed": config.seed,
                                                  config_lib.RESOLVED_KEY: own})
    write(run.workdir / "config.json", {**run.config.to_dict(), config_lib.RESOLVED_KEY: own})
    run.log = MetricsLog(run.workdir / "metrics.jsonl", run.history)


def _make_batch(config: Config, runs: list[runner.Run], lrs: list[float] | None, states: list[SimState],
                data: data_lib.FederatedData) -> runner.Batch:
  """The runs as one batch: states [(lrs,) seeds, ...], the seeds' data [seeds, ...] shared by all lrs."""
  seeds_state, algo, S = stack_states(states), runs[0].algo, len(states)
  if lrs is None:
    state, round_fn = seeds_state, make_sweep_round(algo.round_fn)
    evaluate_runs = make_sweep_evaluate(algo.evaluate_fn)
    evaluate_finetuned = make_sweep_evaluate(algo.evaluate_fn, config.eval_finetune_epochs)
  else:  # every lr trains, evaluates and fine-tunes with its own algorithm
    state = stack_states([seeds_state] * len(lrs))  # the initial state does not depend on the lr
    lr_round, lr_values = make_lr_sweep_round(config, runs[0].data), jnp.asarray(lrs, jnp.float32)
    round_fn = lambda state, data: lr_round(lr_values, state, data)
    evaluate_runs, evaluate_finetuned = (
        functools.partial(make_lr_sweep_evaluate(config, runs[0].data, epochs), lr_values)
        for epochs in (None, config.eval_finetune_epochs))

  def evaluate(state, data, r, finetune_epochs=None):
    ids = [runner.eval_ids(run.config, run.data.num_clients, r) for run in runs[:S]]  # each seed its own sample
    if finetune_epochs is not None:  # the local-adaptation protocol: at the final evaluation, of all clients
      return evaluate_finetuned(state, data, None)
    return evaluate_runs(state, data, None if ids[0] is None else np.stack(ids))

  def format_lines(records):
    groups = [[rec for rec in records[l:l + S] if rec is not None] for l in range(0, len(records), S)]
    return [("" if lrs is None else f"lr {lr_text(lrs[l])}  ") + format_sweep_record(group)
            for l, group in enumerate(groups) if group]

  return runner.Batch(runs=runs, state=state, data=jax.device_put(data), round_fn=round_fn, evaluate=evaluate,
                      shape=(S,) if lrs is None else (len(lrs), S), format_lines=format_lines,
                      keep_going=lrs is not None)


def lr_sweep_summary(config: Config, seeds: tuple[int, ...], lrs: list[float], per_lr: list[dict[str, Any]],
                     workdir: paths.Path, wall_time: float) -> dict[str, Any]:
  """summary.json of a sweep over lrs: each lr's summary over seeds, and the lr with the best mean final accuracy.

  The best lr is chosen on the same seeds it is reported on; for an unbiased number, rerun it on other seeds.
  """
  means = [None if s["final_accuracy_mean"] is None else s["final_accuracy_mean"]["mean"] for s in per_lr]
  ranked = [(m, -lr) for lr, m in zip(lrs, means) if m is not None]
  return {
      "status": "complete",
      "algorithm": per_lr[0]["algorithm"],
      "dataset": per_lr[0]["dataset"],
      "lrs": list(lrs),
      "seeds": list(seeds),
      "config": config.to_dict(),
      "final_accuracy_mean_by_lr": {lr_text(lr): s["final_accuracy_mean"] for lr, s in zip(lrs, per_lr)},
      "best_lr": None if not ranked else -max(ranked)[1],
      "by_lr": {lr_text(lr): s for lr, s in zip(lrs, per_lr)},
      "wall_time": round_time(wall_time),
      "run_dir": str(workdir),
  }
