"""One experiment from a `Config`: data -> model -> algorithm -> rounds, with evaluation, logs, checkpoints, plots.

    from fedspa_jax import config as config_lib, experiment
    summary = experiment.run(config_lib.load("default"), "runs/x")
    summary = experiment.run(config, "runs/x", resume=True)        # continue from the newest checkpoint
    summary = experiment.sweep(config, [0, 1, 2], "runs/s")        # several seeds as one vmapped program

The run folder (docs/cli.md has the details):

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
a checkpoint of another config) raises ConfigError (a ValueError) before anything is compiled. Metrics come to the host once per
dispatch, one dispatch late (so the device never waits for the host between evaluations), and are checked for NaN:
a diverged run stops with `TrainingDiverged` and never overwrites its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax import accounting, algorithms, client_stats, distributed, models, plots
from fedspa_jax import config as config_lib
from fedspa_jax import resume as resume_lib
from fedspa_jax import data as data_lib
from fedspa_jax.checkpoint import Checkpointer, LayoutMismatch
from fedspa_jax.config import Config, ConfigError
from fedspa_jax.evaluation import protocol_names
from fedspa_jax.logging_utils import MetricsLog, TensorBoardLog, format_record, human_bytes, make_progress
from fedspa_jax.resume import CHECKPOINT_FORMAT  # noqa: F401  (re-exported: the format checkpoints are written in)
from fedspa_jax.round import make_client_mesh
# Re-exported: the run-folder errors are part of what `run` raises.
from fedspa_jax.run_folder import ConfigMismatchError, RunExistsError, default_workdir, prepare_workdir  # noqa: F401


class TrainingDiverged(FloatingPointError):
  """A loss or a parameter became NaN or infinite."""


@dataclasses.dataclass
class Totals:
  """Running totals over all rounds so far (carried in checkpoints)."""

  bytes_up: int = 0
  bytes_down: int = 0
  flops: float | None = None
  flops_dense: float | None = None
  samples: int = 0
  wall_time: float = 0.0
  eval_flops: float = 0.0


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


def build(config: Config, data: data_lib.FederatedData):
  """(model, algorithm) for a config and its data."""
  model = models.get(config.model, num_classes=data.num_classes, **config.model_args)
  hparams = algorithm_hparams(config)
  if config.shard_clients:
    hparams["mesh"] = make_client_mesh()
  return model, algorithms.get(config.algorithm, model=model, **hparams)


def make_multi_round(round_fn: Callable, rounds: int) -> Callable:
  """jit of `rounds` consecutive rounds in one `lax.scan`; metrics come back stacked [rounds, ...]."""

  def multi(state, data):
    return jax.lax.scan(lambda s, _: round_fn(s, data), state, None, length=rounds)

  return jax.jit(multi, donate_argnums=0)


def eval_ids(config: Config, num_clients: int, round: int) -> np.ndarray | None:
  """The clients a periodic evaluation covers: a sample seeded by (seed, round), or None (all)."""
  if config.eval_clients is None or config.eval_clients >= num_clients:
    return None
  rng = np.random.default_rng([config.seed, round, 2])
  return np.sort(rng.choice(num_clients, size=config.eval_clients, replace=False)).astype(np.int32)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _jsonable(value: Any) -> Any:
  try:
    return json.loads(json.dumps(value))
  except TypeError:
    if isinstance(value, dict):
      return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _device() -> str:
  devices = jax.devices()
  return f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind}"


def _next_chunk(r: int, *, config: Config, end: int) -> int:
  """Rounds in the next dispatch: up to the next evaluation, checkpoint or end, aligned to rounds_per_dispatch."""
  stops = [end, (r // config.eval_every + 1) * config.eval_every]
  if config.checkpoint_every:
    stops.append((r // config.checkpoint_every + 1) * config.checkpoint_every)
  fuse = config.rounds_per_dispatch
  return min(fuse - r % fuse, min(stops) - r)


def _consume(metrics: dict[str, Any], first_round: int, totals: Totals, params: Any) -> dict[str, float]:
  """Adds a dispatch's round metrics [n, ...] to `totals`; returns the last round's training loss and accuracy.

  Bytes are exact: the rounds report int32 value counts per client and leaf, multiplied out here in int64
  (`accounting.message_bytes`, with leaf sizes and dtypes from `params`).

  Raises:
    TrainingDiverged: a sampled client's training loss is not finite.
  """
  host = jax.device_get(metrics)
  train = {}
  for j in range(host["weight"].shape[0]):
    real = host["weight"][j] > 0
    loss = host["loss"][j][real]
    if not np.all(np.isfinite(loss)):
      raise TrainingDiverged(f"training diverged in round {first_round + j + 1}: client training losses {loss}")
    totals.bytes_up += accounting.message_bytes(params, host["values_up"][j])
    totals.bytes_down += accounting.message_bytes(params, host["values_down"][j])
    for key in ("flops", "flops_dense"):
      if key in host:
        setattr(totals, key, (getattr(totals, key) or 0.0) + float(host[key][j]))
    if "samples" in host:
      totals.samples += int(np.sum(host["samples"][j][real]))
    train = {"train_loss": float(np.mean(loss)), "train_accuracy": float(np.mean(host["accuracy"][j][real]))}
  return train


def evaluations(evaluate: Callable, config: Config, final: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """One evaluation's results on the host: the method's own protocol, and at the final evaluation with
  `config.eval_finetune_epochs` > 0 the local-adaptation protocol (None otherwise).

  Args:
    evaluate: finetune_epochs -> the (device) evaluation; None: the method's own protocol.
  """
  ev = jax.device_get(evaluate(None))
  finetuned = None
  if final and config.eval_finetune_epochs:
    finetuned = jax.device_get(evaluate(config.eval_finetune_epochs))
  return ev, finetuned


def add_eval_flops(totals: Totals, *evs: dict[str, Any] | None) -> None:
  """Counts the evaluations' FLOPs (test forward passes and fine-tuning) apart from training's."""
  totals.eval_flops += sum(float(ev["flops"]) for ev in evs if ev is not None and "flops" in ev)


def protocol_record(ev: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """The record entries of one evaluation's protocols: `<prefix>accuracy_<stat>` of the method's own, and
  `<prefix>accuracy_<name>_<stat>` of each further one (FedSpa's "masked_global" beside "local")."""
  record = {f"{prefix}accuracy_{k}": float(v) for k, v in ev["accuracy_summary"].items()}
  record[f"{prefix}loss_mean"] = float(ev["loss_summary"]["mean"])
  for name in protocol_names(ev):
    record.update({f"{prefix}accuracy_{name}_{k}": float(v) for k, v in ev[f"accuracy_{name}_summary"].items()})
  return record


def _eval_record(round: int, ev: dict[str, Any], train: dict[str, float], totals: Totals, *,
                 protocol: str | None = None, finetuned: dict[str, Any] | None = None,
                 finetune_epochs: int = 0) -> dict[str, Any]:
  record = {"round": round}
  record.update(protocol_record(ev))
  record["accuracy_mean_participating"] = float(ev["accuracy_summary_participating"]["mean"])
  record.update(
      eval_clients=int(ev["evaluated"]), eval_with_test_data=int(ev["with_test_data"]),
      eval_diverged=int(ev["diverged"]), eval_participating=int(ev["participating"]),
  )
  if protocol is not None:
    record["protocol"] = protocol
  if finetuned is not None:
    record["finetune_epochs"] = finetune_epochs
    record.update(protocol_record(finetuned, "finetuned_"))
    record["finetuned_eval_diverged"] = int(finetuned["diverged"])
  record.update(train)
  record.update(bytes_up=totals.bytes_up, bytes_down=totals.bytes_down, samples=totals.samples)
  if totals.flops is not None:
    record.update(flops=totals.flops, flops_dense=totals.flops_dense)
  record["eval_flops"] = totals.eval_flops
  record["wall_time"] = round_time(totals.wall_time)
  return record


def check_diverged(record: dict[str, Any]) -> None:
  """Raises TrainingDiverged when an evaluated client's model, as the method scores it, has a non-finite loss.

  A model that diverges only when fine-tuned for the evaluation is a result of that protocol, not of training: it is
  counted (`finetuned_eval_diverged`) and the run goes on.
  """
  if record["eval_diverged"]:
    raise TrainingDiverged(
        f"training diverged by round {record['round']}: {record['eval_diverged']} of "
        f"{record['eval_with_test_data']} clients' models score a non-finite loss"
    )


def round_time(seconds: float) -> float:
  return float(f"{seconds:.3f}")


def run(
    config: Config,
    workdir: str | pathlib.Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
    write_plots: bool = True,
    data: data_lib.FederatedData | None = None,
) -> dict[str, Any]:
  """Runs `config` in `workdir` and returns its summary.

  Args:
    config: the experiment.
    workdir: the run folder (default: a new `runs/<algorithm>-<dataset>-<time>`).
    resume: continue from the newest checkpoint in `workdir` (starts fresh when there is none).
    overwrite: replace the run `workdir` holds.
    stop_after: stop (with a checkpoint) after this round, as a preempted job would; `resume` continues.
    on_eval: called with each evaluated round's record (after it is logged, before its checkpoint).
    progress: show a tqdm bar (None: only on a terminal).
    echo: prints one line per evaluated round and a few notes (None: silent).
    write_plots: write the PNG figures at the end.
    data: the dataset, when the caller already loaded it for this config (as `compare` does).

  Returns:
    The summary (also written to summary.json), or, when stopped early, {"status": "stopped", "round", ...}.

  Raises:
    ConfigError (a ValueError): bad config, data options or run folder, before anything is compiled.
    FileNotFoundError: the dataset's files are missing.
    TrainingDiverged: a loss or a parameter became NaN or infinite; the last good checkpoint stays as it is.
  """
  primary = distributed.is_primary()  # under jax.distributed only process 0 writes files and prints
  say = (echo or (lambda line: None)) if primary else (lambda line: None)
  check_config(config)
  workdir = pathlib.Path(workdir) if workdir is not None else default_workdir(config)
  prepare_workdir(workdir, config, resume=resume, overwrite=overwrite, primary=primary)
  distributed.barrier("fedspa_jax.prepare_workdir")
  try:  # data options, model/data fit: still input errors, found before compilation
    try:
      data = load_data(config) if data is None else data
    except TypeError as e:  # an option the data source does not take
      raise ConfigError(f"bad data options {config.data_args}: {e}") from e
    _, algo = build(config, data)
    state = algo.init(jax.random.key(config.seed), data)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
  history, totals = [], Totals()
  expected = resume_lib.record(config, algo.hparams)  # format, sampling, resolved hparams: every checkpoint's meta
  if resume and (latest := ckpt.latest_round()) is not None:
    resume_lib.check(ckpt.read_meta(latest), expected, config, ckpt.path(latest))  # before anything is written
    try:
      state, meta = ckpt.restore(state)
    except LayoutMismatch as e:
      raise ConfigError(f"cannot resume: {e}") from e
    history, totals = meta["history"], Totals(**meta["totals"])
    say(f"resuming {workdir} from round {latest}")
  # The config as given, plus (for the record, not read back) the algorithm's hyperparameters as resolved,
  # defaults included: weighting, FedRep/FedPer's head, ...
  record = {**config.to_dict(), config_lib.RESOLVED_KEY: _jsonable(algo.hparams)}
  metrics_log, tensorboard = None, None
  if primary:
    (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    metrics_log = MetricsLog(workdir / "metrics.jsonl", history)
    tensorboard = TensorBoardLog.create(workdir / "tensorboard")
  start = int(state.round)
  end = config.rounds if stop_after is None else max(start, min(config.rounds, stop_after))
  say(f"{algo.name} on {data.name}: {data.num_clients} clients, rounds {start + 1}..{end} of {config.rounds} "
      f"-> {workdir}")
  bar = make_progress(total=config.rounds, initial=start, desc=algo.name, enable=progress if primary else False)
  device_data = algo.place(data)  # on the device, or laid out over the mesh (each process its own blocks)
  params_like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.server.params)  # for bytes
  steps: dict[int, Callable] = {}
  segment_start, segment_samples, wall_before = time.perf_counter(), totals.samples, totals.wall_time
  ev, finetuned, train, r, pending = None, None, {}, start, None

  def settle() -> None:
    """Takes in the pending dispatch's metrics: totals, NaN check, progress bar."""
    nonlocal pending, train
    if pending is None:
      return
    (first, metrics), pending = pending, None
    train = _consume(metrics, first, totals, params_like) or train
    totals.wall_time = wall_before + time.perf_counter() - segment_start
    elapsed = max(time.perf_counter() - segment_start, 1e-9)
    bar.update(first + jax.tree.leaves(metrics)[0].shape[0] - bar.n)
    parts = [f"acc {history[-1]['accuracy_mean']:.3f}"] if history else []
    parts += [f"{(totals.samples - segment_samples) / elapsed:,.0f} samples/s",
              f"comm {human_bytes(totals.bytes_up + totals.bytes_down)}"]
    bar.set_postfix_str(", ".join(parts))

  try:
    while r < end:
      n = _next_chunk(r, config=config, end=end)
      if n == 1:
        new_state, metrics = algo.round(state, device_data)
        metrics = jax.tree.map(lambda a: a[None], metrics)
      else:
        if n not in steps:
          steps[n] = make_multi_round(algo.round_fn, n)
        new_state, metrics = steps[n](state, device_data)
      settle()  # the previous dispatch's metrics, fetched while this one runs
      state, pending, r = new_state, (r, metrics), r + n
      evaluate = r % config.eval_every == 0 or r == config.rounds
      save = (config.checkpoint_every and r % config.checkpoint_every == 0) or r == end
      if not (evaluate or save):
        continue
      settle()
      if evaluate:
        ids = None if r == config.rounds else eval_ids(config, data.num_clients, r)
        ev, finetuned = evaluations(
            lambda epochs: algo.evaluate(state, device_data, ids, finetune_epochs=epochs), config, r == config.rounds
        )
        add_eval_flops(totals, ev, finetuned)
        record = _eval_record(r, ev, train, totals, protocol=algo.protocol, finetuned=finetuned,
                              finetune_epochs=config.eval_finetune_epochs)
        check_diverged(record)
        history.append(record)
        if metrics_log is not None:
          metrics_log.write(record)
        if tensorboard is not None:
          tensorboard.write(r, record, time.time())
        with bar.external_write_mode():
          say(format_record(record))
        if on_eval is not None:
          on_eval(record)
      if save:
        if not bool(_all_finite((state.server.params, state.clients))):
          raise TrainingDiverged(f"training diverged by round {r}: the model or a client's state holds NaN or inf")
        meta = {**expected, "round": r, "config": config.to_dict(), "history": history,
                "totals": dataclasses.asdict(totals)}
        ckpt.save(r, state, meta)
    settle()
    if r < config.rounds:
      path = ckpt.path(ckpt.latest_round())
      say(f"stopped after round {r}; checkpoint {path}; continue with --resume")
      return {"status": "stopped", "round": r, "checkpoint": str(path), "run_dir": str(workdir)}
    if ev is None:  # the run was complete already: evaluate the restored final state again
      ev, finetuned = evaluations(lambda epochs: algo.evaluate(state, device_data, finetune_epochs=epochs), config,
                                  True)
    summary = _summary(config, algo, data, ev, history, totals, workdir, finetuned=finetuned, state=state)
    clients = _client_arrays(algo, state, data, ev, finetuned)  # every process: decoding masks is a collective
    if primary:
      (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
      np.savez(workdir / "clients.npz", **clients)
      if write_plots:
        plots.plot_run(workdir)
    distributed.barrier("fedspa_jax.run_done")
    return summary
  except TrainingDiverged as e:
    good = ckpt.latest_round()
    where = f"the last good checkpoint is {ckpt.path(good)} (round {good})" if good is not None else (
        "no checkpoint was written before it")
    raise TrainingDiverged(
        f"{e}; {where}. Lower the learning rate (hparams.lr={config.hparams.get('lr')}) or check the data, "
        "and rerun with --overwrite."
    ) from None
  finally:
    bar.close()
    ckpt.close()
    if tensorboard is not None:
      tensorboard.close()


def _summary(config, algo, data, ev, history, totals, workdir, *, finetuned=None, state=None) -> dict[str, Any]:
  best = max(history, key=lambda h: h["accuracy_mean"])
  final = {k: float(v) for k, v in ev["accuracy_summary"].items()}
  participating = {k: float(v) for k, v in ev["accuracy_summary_participating"].items()}
  protocols = {"protocol": algo.protocol}
  for name in protocol_names(ev):
    protocols[f"final_accuracy_{name}"] = {k: float(v) for k, v in ev[f"accuracy_{name}_summary"].items()}
  if finetuned is not None:
    protocols["finetune_epochs"] = config.eval_finetune_epochs
    protocols["final_accuracy_finetuned"] = {k: float(v) for k, v in finetuned["accuracy_summary"].items()}
    for name in protocol_names(finetuned):
      protocols[f"final_accuracy_finetuned_{name}"] = {
          k: float(v) for k, v in finetuned[f"accuracy_{name}_summary"].items()}
  if state is not None:  # the [K, ...] client store as held (padded over a mesh), and per client
    store = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state.clients))
    protocols.update(client_store_bytes=store, client_store_bytes_per_client=store / state.participation.shape[0])
  return {
      "status": "complete",
      "algorithm": algo.name,
      "dataset": data.name,
      "partition": config.partition,
      "model": config.model,
      "num_clients": data.num_clients,
      "rounds": config.rounds,
      "seed": config.seed,
      "hparams": _jsonable(algo.hparams),
      **protocols,
      "final_accuracy_mean": final["mean"],
      "final_accuracy": final,
      "final_accuracy_participating": participating,
      "clients_with_test_data": int(ev["with_test_data"]),
      "clients_diverged": int(ev["diverged"]),
      "clients_participating": int(ev["participating"]),
      "final_loss_mean": float(ev["loss_summary"]["mean"]),
      "best_accuracy_mean": best["accuracy_mean"],
      "best_round": best["round"],
      "client_accuracy": [None if np.isnan(a) else float(a) for a in ev["accuracy"]],
      "bytes_up": totals.bytes_up,
      "bytes_down": totals.bytes_down,
      "bytes_total": totals.bytes_up + totals.bytes_down,
      "flops": totals.flops,
      "flops_dense": totals.flops_dense,
      "eval_flops": totals.eval_flops,
      "samples": totals.samples,
      "wall_time": round_time(totals.wall_time),
      "device": _device(),
      "jax_version": jax.__version__,
      "run_dir": str(workdir),
  }


# Pairwise mask distances are written for populations up to this size ([K, K] int64 entries).
MAX_DISTANCE_CLIENTS = 2000


def _client_arrays(algo, state: Any, data: data_lib.FederatedData, ev: dict[str, Any],
                   finetuned: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
  """What clients.npz holds: per-client accuracy and loss (of every protocol evaluated), test count, participation,
  labels, mask distances."""
  protocols = {f"accuracy_{name}": np.asarray(ev[f"accuracy_{name}"]) for name in protocol_names(ev)}
  if finetuned is not None:
    protocols["accuracy_finetuned"] = np.asarray(finetuned["accuracy"])
    protocols.update({f"accuracy_finetuned_{name}": np.asarray(finetuned[f"accuracy_{name}"])
                      for name in protocol_names(finetuned)})
  arrays = {
      "accuracy": np.asarray(ev["accuracy"]),
      **protocols,
      "loss": np.asarray(ev["loss"]),
      "test_count": np.asarray(ev["count"]),
      "participation": distributed.to_host(state.participation)[: data.num_clients],
      "label_counts": data_lib.client_label_counts(data.train, data.num_classes),
  }
  if data.num_clients <= MAX_DISTANCE_CLIENTS:
    clients = algo.client_states(state, data)
    client_masks = getattr(clients, "mask", clients)  # FedSpa "local" and Sub-FedAvg hold a mask beside models
    if client_stats.is_mask_store(client_masks):
      arrays["hamming"], arrays["active"] = client_stats.mask_distances(client_masks)
    models = client_stats.personal_models(clients, state.server.params)
    if models is not None:  # how far apart the clients' own models are, not just their masks
      arrays["model_distance"], arrays["model_norm"] = client_stats.model_distances(models)
      if hasattr(clients, "trained"):
        arrays["trained"] = np.asarray(jax.device_get(clients.trained))
  return arrays


def sweep(config: Config, seeds, workdir=None, **kwargs) -> dict[str, Any]:
  """Runs `config` once per seed (and per lr with `lrs=`), all runs as one vmapped program; see `fedspa_jax.sweep.sweep`."""
  from fedspa_jax import sweep as sweep_lib  # it builds on this module

  return sweep_lib.sweep(config, seeds, workdir, **kwargs)
