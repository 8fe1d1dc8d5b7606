"""The one run loop: a batch of runs, advanced by fused dispatches, with metrics, evaluations, NaN checks and files.

A batch is one run, or several runs stacked on leading axes that advance as one program (a sweep's lrs x seeds).
`experiment.run` makes a batch of one, `sweep.sweep` stacks seeds and lrs; both hand it to `job.execute` (the run
wrapper: checkpoints, resume, stops), which goes through `loop` and `finish`, so a feature of the loop is written
once:

    batch = Batch(runs=[Run(config, workdir, algo, data)], state=state, data=algo.place(data),
                  round_fn=algo.round_fn, evaluate=lambda s, d, r: algo.evaluate(s, d, eval_ids(config, K, r)))
    state, ev = loop(batch, end=config.rounds)       # metrics.jsonl of every run, one line per evaluation
    summaries = finish(batch, state, ev)             # summary.json and clients.npz of every run

Metrics come to the host once per dispatch, one dispatch late (so the device never waits for the host between
evaluations), and are checked for NaN: a diverged run stops the batch with `TrainingDiverged`, or, with
`keep_going` (a sweep over lrs), is recorded as diverged while the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax import algorithms, distributed, models, paths, preemption, privacy
from fedspa_jax import config as config_lib
from fedspa_jax import data as data_lib
from fedspa_jax.config import Config, ConfigError
from fedspa_jax.logging_utils import MetricsLog, TensorBoardLog, format_record, human_bytes, make_progress
from fedspa_jax.records import (Totals, TrainingDiverged, add_eval_flops, check_diverged, client_analysis,
                                client_arrays, consume, eval_record, run_summary)


def algorithm_hparams(config: Config) -> dict[str, Any]:
  """`config.hparams` plus `rounds` (when the algorithm takes it and the config does not set it)."""
  hparams = dict(config.hparams)
  if "rounds" in algorithms.known_hparams(config.algorithm):
    hparams.setdefault("rounds", config.rounds)
  return hparams


def check_config(config: Config) -> None:
  """Every check that needs no data: field types, algorithm, dataset, model and their arguments.

  Raises:
    ConfigError (a ValueError): with the known names listed.
  """
  try:
    _check_config(config)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def _check_config(config: Config) -> None:
  config_lib.check_fields(config)
  if config.algorithm not in algorithms.names():
    raise ConfigError(f"unknown algorithm {config.algorithm!r}; known algorithms: {', '.join(algorithms.names())}")
  algorithms.check_hparam_types(config.algorithm, config.hparams)  # `--set lr=fast`: names the key and its type
  data_lib.loader.canonical_name(config.dataset)  # raises, listing the known datasets
  if config.model not in models.names():
    raise ConfigError(f"unknown model {config.model!r}; known models: {', '.join(models.names())}")
  try:
    placeholder = models.get(config.model, num_classes=2, **config.model_args)
  except TypeError as e:
    raise ConfigError(f"bad model arguments {config.model_args} for model {config.model!r}: {e}") from e
  try:
    algorithms.get(config.algorithm, model=placeholder, **algorithm_hparams(config))
  except ValueError as e:
    if "unknown hyperparameters" in str(e):
      raise ConfigError(f"{e}; config keys: {', '.join(config_lib.field_names())}") from e
    raise
  except TypeError as e:
    raise ConfigError(f"bad hyperparameters for {config.algorithm!r}: {e}") from e


def load_data(config: Config) -> data_lib.FederatedData:
  """The federated dataset a config names (host-side numpy)."""
  return data_lib.load(
      config.dataset, num_clients=config.num_clients, partition=config.partition, seed=config.seed,
      data_dir=config.data_dir, **config.data_args,
  )


def build(config: Config, data: data_lib.FederatedData, *, mesh: Any = None):
  """(model, algorithm) for a config and its data; with a `mesh`, the clients are sharded over it."""
  model = models.get(config.model, num_classes=data.num_classes, **config.model_args)
  hparams = algorithm_hparams(config)
  if mesh is not None:
    hparams["mesh"] = mesh
  return model, algorithms.get(config.algorithm, model=model, **hparams)


def eval_ids(config: Config, num_clients: int, round: int) -> np.ndarray | None:
  """The clients evaluated after `round`: a sample seeded by (seed, round), or None (all; always after the last)."""
  if config.eval_clients is None or config.eval_clients >= num_clients or round >= config.rounds:
    return None
  rng = np.random.default_rng([config.seed, round, 2])
  return np.sort(rng.choice(num_clients, size=config.eval_clients, replace=False)).astype(np.int32)


@dataclasses.dataclass
class Run:
  """One run of a batch: what its records and files need, and what the loop keeps for it.

  Attributes:
    config, workdir, algo, data: its config, folder, algorithm and (host-side) dataset.
    name: prefixes its divergence messages ("seed 3"); empty for a batch of one.
    history, totals: its evaluated records and running totals so far (a resumed run's from its checkpoint).
    log, tensorboard: where its records go (None: nowhere).
  """

  config: Config
  workdir: paths.Path
  algo: Any
  data: data_lib.FederatedData
  name: str = ""
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  totals: Totals = dataclasses.field(default_factory=Totals)
  log: MetricsLog | None = None
  tensorboard: TensorBoardLog | None = None
  train: dict[str, float] = dataclasses.field(default_factory=dict)  # the last round's training loss and accuracy
  diverged: str | None = None  # why, once it has


@dataclasses.dataclass
class Batch:
  """Runs that advance together, one program per dispatch.

  Attributes:
    runs: the runs, in row-major order of `shape`.
    state: every run's `SimState`; the round counter is shared (all runs are at the same round).
    data: the runs' data on the device, as `round_fn` and `evaluate` take it.
    round_fn: pure (state, data) -> (state, metrics) of one round of every run; metrics lead with the run axes.
    evaluate: (state, data, round, finetune_epochs=None) -> every run's evaluation after `round` (all clients after
      the last round); with `finetune_epochs`, of all clients under the local-adaptation protocol.
    shape: the run axes that lead every leaf of `state` but its round counter (one run: none).
    format_lines: an evaluated round's records, one per run (None for a diverged run) -> the lines to print.
    keep_going: a diverged run is recorded and the others go on (default: the batch stops, TrainingDiverged).
  """

  runs: list[Run]
  state: Any
  data: Any
  round_fn: Callable
  evaluate: Callable
  shape: tuple[int, ...] = ()
  format_lines: Callable[[list[dict[str, Any] | None]], list[str]] = (
      lambda records: [format_record(r) for r in records if r is not None])
  keep_going: bool = False

  def pick(self, tree: Any, j: int, axis: int = 0) -> Any:
    """Run j's part of a pytree whose run axes start at `axis`."""
    if not self.shape:
      return tree
    index = tuple(int(i) for i in np.unravel_index(j, self.shape))
    return jax.tree.map(lambda a: a[(slice(None),) * axis + index], tree)

  def run_state(self, state: Any, j: int) -> Any:
    """Run j's `SimState` (the round counter is shared)."""
    return self.pick(state._replace(round=None), j)._replace(round=state.round)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree: Any) -> bool:
  """Whether every float in `tree` is finite (the guard before a checkpoint overwrites an older, good one)."""
  return bool(_all_finite(tree))


def make_multi_round(round_fn: Callable, rounds: int) -> Callable:
  """jit of `rounds` consecutive rounds in one `lax.scan`; metrics come back stacked [rounds, ...]."""

  def multi(state, data):
    return jax.lax.scan(lambda s, _: round_fn(s, data), state, None, length=rounds)

  return jax.jit(multi, donate_argnums=0)


def make_dispatch(round_fn: Callable) -> Callable[[int], Callable]:
  """n -> the jitted dispatch of n rounds, (state, data) -> (state, metrics [n, ...]), each n compiled once."""
  one = jax.jit(round_fn, donate_argnums=0)

  def one_round(state, data):
    state, metrics = one(state, data)
    return state, jax.tree.map(lambda a: a[None], metrics)

  cache = {1: one_round}

  def dispatch(n: int) -> Callable:
    if n not in cache:
      cache[n] = make_multi_round(round_fn, n)
    return cache[n]

  return dispatch


def next_chunk(r: int, *, config: Config, end: int) -> int:
  """Rounds in the next dispatch: up to the next evaluation, checkpoint or end, aligned to rounds_per_dispatch."""
  stops = [end, (r // config.eval_every + 1) * config.eval_every]
  if config.checkpoint_every:
    stops.append((r // config.checkpoint_every + 1) * config.checkpoint_every)
  fuse = config.rounds_per_dispatch
  return min(fuse - r % fuse, min(stops) - r)


def say_for(echo: Callable[[str], None] | None) -> Callable[[str], None]:
  """`echo`, or silence (None, or a process of a distributed job but the first: only process 0 prints)."""
  return echo if echo is not None and distributed.is_primary() else (lambda line: None)


def loop(
    batch: Batch,
    *,
    end: int,
    save: Callable[[int, Any], None] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    say: Callable[[str], None] = lambda line: None,
    progress: bool | None = None,
    stopper: preemption.Stopper | None = None,
) -> tuple[Any, dict[str, Any] | None]:
  """Advances every run of `batch` from its state's round to `end`: dispatches, metrics, evaluations, NaN checks.

  Args:
    batch: the runs (their histories and totals grow in place; `batch.state` is donated: use the returned one).
    end: the round to stop after.
    save: called as save(round, state) at every `checkpoint_every` round and at `end` (None: no checkpoints).
    on_eval: called with each evaluated record (after it is logged and printed).
    say: prints one line per evaluated round and the divergence notes.
    progress: show a tqdm bar (None: only on a terminal; never on processes other than the first).
    stopper: asked at every dispatch boundary before `end`; when it says stop, the loop settles, saves (`save` must
      be given) and raises `preemption.Stopped`, without evaluating: a round due for evaluation is evaluated first
      when the run resumes from that checkpoint (its runs' histories end before it), so the checkpoint comes as
      soon as the dispatch is done.

  Returns:
    (the state after `end`, the last evaluation with the run axes first, or None when no round was evaluated).

  Raises:
    TrainingDiverged: a run's loss became NaN or infinite (unless `batch.keep_going`).
    preemption.Stopped: `stopper` stopped the loop (after the checkpoint at the round reached was written).
  """
  if stopper is not None and save is None:
    raise ValueError("a loop that can be stopped needs `save`: a stop writes a checkpoint")
  config, runs = batch.runs[0].config, batch.runs
  chunks = config if save is not None else dataclasses.replace(config, checkpoint_every=0)
  dispatch = make_dispatch(batch.round_fn)
  params_like = jax.eval_shape(lambda p: batch.pick(p, 0), batch.state.server.params)  # leaf sizes, for bytes
  state, r = batch.state, int(batch.state.round)
  desc = runs[0].algo.name + (f" x{len(runs)}" if len(runs) > 1 else "")
  bar = make_progress(total=config.rounds, initial=r, desc=desc, enable=progress if distributed.is_primary() else False)
  segment_start, wall_before = time.perf_counter(), [run.totals.wall_time for run in runs]
  samples_before = sum(run.totals.samples for run in runs)
  ev, pending = None, None

  def diverge(run: Run, why: str) -> None:
    if not batch.keep_going:
      raise TrainingDiverged(f"{run.name}: {why}" if run.name else why)
    if run.diverged is None:
      run.diverged = why
      with bar.external_write_mode():
        say(f"{run.name} diverged: {why} (recorded; the other runs go on)")

  def settle() -> None:
    """Takes in the pending dispatch's metrics [n, *run axes, ...]: totals, NaN checks, progress bar."""
    nonlocal pending
    if pending is None:
      return
    (first, metrics), pending = pending, None
    host = jax.device_get(metrics)
    elapsed = time.perf_counter() - segment_start
    for j, run in enumerate(runs):
      if run.diverged is None:
        try:
          run.train = consume(batch.pick(host, j, axis=1), first, run.totals, params_like) or run.train
        except TrainingDiverged as e:
          diverge(run, str(e))
      run.totals.wall_time = wall_before[j] + elapsed
    bar.update(first + jax.tree.leaves(host)[0].shape[0] - bar.n)
    accuracies = [run.history[-1]["accuracy_mean"] for run in runs if run.history and run.diverged is None]
    parts = [f"acc {np.mean(accuracies):.3f}"] if accuracies else []
    parts += [f"{(sum(run.totals.samples for run in runs) - samples_before) / max(elapsed, 1e-9):,.0f} samples/s",
              f"comm {human_bytes(np.mean([run.totals.bytes_up + run.totals.bytes_down for run in runs]))}"]
    bar.set_postfix_str(", ".join(parts))

  def evaluate() -> None:
    nonlocal ev
    ev = evaluations(batch, state, r)
    records = []
    for j, run in enumerate(runs):
      record = None
      if not run.diverged:
        ev_j = batch.pick(ev, j)
        add_eval_flops(run.totals, ev_j)
        record = eval_record(r, ev_j, run.train, run.totals, finetune_epochs=run.config.eval_finetune_epochs)
        record.update(privacy.epsilon_record(run.algo, run.data.num_clients, r))
        try:
          check_diverged(record)
        except TrainingDiverged as e:
          diverge(run, str(e))
          record = None
      if record is not None:
        run.history.append(record)
        if run.log is not None:
          run.log.write(record)
        if run.tensorboard is not None:
          run.tensorboard.write(r, record, time.time())
      records.append(record)
    with bar.external_write_mode():
      for line in batch.format_lines(records):
        say(line)
    for record in records:
      if on_eval is not None and record is not None:
        on_eval(record)

  try:
    if r and (r % config.eval_every == 0 or r == config.rounds) and any(
        run.diverged is None and (not run.history or run.history[-1]["round"] < r) for run in runs):
      evaluate()  # the evaluation a stop left to the resumed run (it saved first)
    while r < end:
      n = next_chunk(r, config=chunks, end=end)
      new_state, metrics = dispatch(n)(state, batch.data)
      settle()  # the previous dispatch's metrics, fetched while this one runs
      state, pending, r = new_state, (r, metrics), r + n
      evaluating = r % config.eval_every == 0 or r == config.rounds
      saving = save is not None and ((config.checkpoint_every and r % config.checkpoint_every == 0) or r == end)
      stopping = stopper.should_stop(r) if stopper is not None and r < end else None  # on every process
      if not (evaluating or saving or stopping):
        continue
      settle()
      if stopping:  # the checkpoint first; this round's evaluation is the resumed run's first work
        save(r, state)
        raise preemption.Stopped(r, stopping)
      if evaluating:
        evaluate()
      if saving:
        save(r, state)
    settle()
    return state, ev
  finally:
    bar.close()


def evaluations(batch: Batch, state: Any, r: int) -> dict[str, Any]:
  """The batch's evaluation after round `r` on the host; after the last round with `eval_finetune_epochs` E > 0, its
  "finetuned" entry holds the local-adaptation protocol's (every client fine-tuned for E epochs, then scored)."""
  config = batch.runs[0].config
  ev = jax.device_get(batch.evaluate(state, batch.data, r))
  if r >= config.rounds and config.eval_finetune_epochs:
    ev["finetuned"] = jax.device_get(batch.evaluate(state, batch.data, r, config.eval_finetune_epochs))
  return ev


def finish(batch: Batch, state: Any, ev: dict[str, Any] | None,
           say: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
  """Every run's summary.json, then its clients.npz (written by process 0); returns the runs' summaries.

  `ev` is the loop's last evaluation; None (the runs were complete already) evaluates the final state again. Every
  summary.json is written before the optional per-client analysis (`records.client_analysis`, pairwise distances);
  when that fails (out of memory, say), the failure is said and recorded in summary.json ("client_analysis_error"),
  and clients.npz holds everything but the analysis.
  """
  if ev is None:
    ev = evaluations(batch, state, batch.runs[0].config.rounds)
  summaries, complete = [], []
  for j, run in enumerate(batch.runs):
    if run.diverged:
      summary = {"status": "diverged", "error": run.diverged, "seed": run.config.seed,
                 "lr": run.config.hparams.get("lr"), "final_accuracy_mean": None, "run_dir": str(run.workdir)}
    else:
      state_j = batch.run_state(state, j)
      summary = run_summary(run.config, run.algo, run.data, batch.pick(ev, j), run.history, run.totals, run.workdir,
                            state_j)
      summary.update(privacy.epsilon_record(run.algo, run.data.num_clients, int(state_j.round)))
      complete.append(j)
    if distributed.is_primary():
      paths.write_text(run.workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    summaries.append(summary)
  for j in complete:
    run, ev_j, state_j = batch.runs[j], batch.pick(ev, j), batch.run_state(state, j)
    clients = client_arrays(run.algo, state_j, run.data, ev_j)
    try:
      clients.update(client_analysis(run.algo, state_j, run.data))  # every process: a collective
    except Exception as e:  # noqa: BLE001  (the summary stands; what failed is said and recorded)
      error = f"{type(e).__name__}: {e}".splitlines()[0]
      say(f"{run.workdir}: the per-client analysis (mask and model distances) failed, {error}; summary.json is "
          "complete and clients.npz holds the rest")
      summaries[j]["client_analysis_error"] = error
      if distributed.is_primary():
        paths.write_text(run.workdir / "summary.json", json.dumps(summaries[j], indent=2) + "\n")
    if distributed.is_primary():
      paths.save_npz(run.workdir / "clients.npz", **clients)
  return summaries
