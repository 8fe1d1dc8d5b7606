"""fedspa-jax command line (also `python -m fedspa_jax`); docs/cli.md has the details.

    fedspa-jax run                                        # the built-in default (fedspa_jax/configs/default.py)
    fedspa-jax run --config fashion_mnist_pathological --set rounds=50 --out runs/fm
    fedspa-jax run --algorithm fedspa --dataset fashion_mnist --partition pathological --num-clients 100 \\
        --rounds 50 --out runs/x
    fedspa-jax run --out runs/fm --resume                 # continue from the newest checkpoint
    fedspa-jax compare --algorithms fedspa fedavg --config default --out runs/cmp
    fedspa-jax sweep --seeds 0 1 2 --config default --out runs/seeds   # several seeds as one vmapped program
    fedspa-jax plot runs/cmp/fedspa runs/cmp/fedavg --out figs
    fedspa-jax list                                       # algorithms, datasets, models, shipped configs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Callable

# Config fields that have their own flag: (flag, field, type).
_FLAGS = (
    ("--algorithm", "algorithm", str),
    ("--dataset", "dataset", str),
    ("--partition", "partition", str),
    ("--num-clients", "num_clients", int),
    ("--model", "model", str),
    ("--rounds", "rounds", int),
    ("--seed", "seed", int),
    ("--eval-every", "eval_every", int),
    ("--checkpoint-every", "checkpoint_every", int),
    ("--rounds-per-dispatch", "rounds_per_dispatch", int),
    ("--data-dir", "data_dir", str),
)

# Exit statuses (docs/cli.md): 0 done, 1 a bug (with its traceback), 2 bad input, 3 diverged, 75 stopped cleanly with
# a checkpoint (SIGTERM, SIGINT or --deadline; run again with --resume), 130 interrupted without a new checkpoint.
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 75, 130


def _add_config_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("experiment (a config file, then flags, then --set, each overriding the last)")
  group.add_argument("--config", help="shipped config name (see `fedspa-jax list`) or path to a .py config file "
                                      "with get_config(); default: 'default'")
  group.add_argument("--recipe", help="a named recipe (fedspa_jax.recipes, e.g. 'dispfl'): the settings a published code "
                                      "base runs the algorithm with, after the config file and before the flags")
  for flag, field, kind in _FLAGS:
    group.add_argument(flag, dest=field, type=kind, default=None, help=f"config key {field}")
  group.add_argument(
      "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="any config key (rounds=5), algorithm hyperparameter (density=0.2 or hparams.density=0.2), data option "
           "(data.alpha=0.3) or model option (model.hidden=[64]); smoke=true picks the config's tiny variant",
  )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", help="run folder (default: runs/<algorithm>-<dataset>-<time>)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
  mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
  parser.add_argument("--stop-after", type=int, metavar="ROUND",
                      help="stop after this round with a checkpoint (continue later with --resume)")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar (default: only on a terminal)")
  parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG figures")
  parser.add_argument("--quiet", action="store_true", help="no per-round lines")
  _add_deadline_arg(parser)
  multi = parser.add_argument_group(
      "several processes (hosts): every process runs the same command; docs/scaling.md")
  multi.add_argument("--distributed", action="store_true",
                     help="join a jax.distributed job and shard the client population over every process's devices")
  multi.add_argument("--coordinator", metavar="HOST:PORT",
                     help="process 0's address (default: JAX_COORDINATOR_ADDRESS, or detected on TPU/SLURM/MPI)")
  multi.add_argument("--num-processes", type=int, metavar="N", help="default: JAX_NUM_PROCESSES or detected")
  multi.add_argument("--process-id", type=int, metavar="I", help="default: JAX_PROCESS_ID or detected")
  multi.add_argument("--distributed-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="how long to wait for the coordinator and the other processes (default 300)")


def _add_deadline_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--deadline", type=float, metavar="MINUTES",
      help="stop cleanly with a checkpoint before this many minutes from the start have passed (exit status 75; "
           "continue with --resume); SIGTERM and SIGINT stop the same way at any time")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="fedspa-jax", description="Personalized federated learning with sparse masks (FedSpa) in JAX.",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
  )
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run one experiment", description="Run one experiment.")
  _add_config_args(run)
  _add_run_args(run)
  compare = sub.add_parser("compare", help="several algorithms on the same data, partition and seed",
                           description="Run several algorithms on the same data, partition and seed; print a table "
                                       "and write it as comparison.md and comparison.csv. --set ALGO.KEY=VALUE sets "
                                       "one algorithm's hyperparameter.")
  compare.add_argument("--algorithms", nargs="+", metavar="NAME",
                       help="algorithms to compare (space- or comma-separated); with --resume and no --config, "
                            "default: the comparison's own (DIR/config.json)")
  _add_config_args(compare)
  _add_run_args(compare)
  sweep = sub.add_parser("sweep", help="one config, several seeds (and lrs), as one vmapped program",
                         description="Run one config once per seed (and per learning rate with --lrs), all runs as "
                                     "one compiled program (the seed and lr axes vmapped over whole simulations); "
                                     "write seed_<s>/ (or lr_<lr>/seed_<s>/) run files and summaries with mean ± std "
                                     "over seeds; checkpoints of every run together, --resume continues them.")
  sweep.add_argument("--seeds", nargs="+", required=True, metavar="SEED",
                     help="distinct integer seeds >= 0 (space- or comma-separated)")
  sweep.add_argument("--lrs", nargs="+", metavar="LR",
                     help="distinct learning rates > 0 of the clients' SGD (space- or comma-separated; default: the "
                          "config's lr, no lr axis); a run that diverges is recorded and the others go on")
  _add_config_args(sweep)
  sweep.add_argument("--out", help="sweep folder (default: runs/<algorithm>-sweep-<dataset>-<time>)")
  sweep_mode = sweep.add_mutually_exclusive_group()
  sweep_mode.add_argument("--resume", action="store_true", help="continue the sweep in --out from its newest checkpoint")
  sweep_mode.add_argument("--overwrite", action="store_true", help="replace the run or sweep in --out")
  sweep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")
  sweep.add_argument("--quiet", action="store_true", help="no per-round lines")
  _add_deadline_arg(sweep)
  plot = sub.add_parser("plot", help="figures from run folders", description="Draw figures from run folders: one "
                        "folder gets its own figures, several get comparison figures.")
  plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
  plot.add_argument("--out", help="where to write (default: the run folder; required for several runs)")
  sub.add_parser("list", help="algorithms, datasets, models and shipped configs")
  return parser


def resolve_config(args: argparse.Namespace, *, algorithm_names: tuple[str, ...] = ()):
  """The config the arguments describe, and per-algorithm overrides `{name: {key: value}}` (for compare)."""
  from fedspa_jax import config as config_lib
  from fedspa_jax import paths

  overrides, per_algorithm, smoke = [], {}, None
  for item in args.overrides:
    key, value = config_lib.split_override(item)
    prefix = key.split(".", 1)[0]
    if key == "smoke":
      smoke = value
    elif "." in key and prefix in algorithm_names:
      per_algorithm.setdefault(prefix, {})[key.split(".", 1)[1]] = value
    else:
      overrides.append((key, value))
  if smoke is not None and not isinstance(smoke, bool):
    raise config_lib.ConfigError(f"smoke must be true or false, got {smoke!r}")
  saved = paths.as_path(args.out or ".") / "config.json"
  if args.config is None and getattr(args, "resume", False) and args.out:
    paths.check_writable(args.out)  # a gs:// folder: its endpoint and bucket, before reading from it
  if args.config is None and getattr(args, "resume", False) and args.out and saved.is_file():
    # A sweep's record of its lrs, a comparison's of its algorithms: not config fields.
    record = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("lrs", "algorithms", "per_algorithm")}
    config = config_lib.Config.from_dict(record)  # resume: the run's own config
    if smoke is not None:
      config.smoke = smoke
  else:
    config = config_lib.load(args.config or "default", smoke=bool(smoke))
  changes = [(field, getattr(args, field)) for _, field, _ in _FLAGS if getattr(args, field) is not None] + overrides
  if getattr(args, "recipe", None):
    from fedspa_jax import recipes

    if algorithm_names:
      raise config_lib.ConfigError("--recipe sets one algorithm's settings: use it with run or sweep")
    name = next((value for key, value in reversed(changes) if key == "algorithm"), config.algorithm)
    changes = [("algorithm", name)] + recipe_changes(recipes.get(args.recipe).overrides(name), config) + changes
  if not algorithm_names:  # compare gives each of its algorithms the hyperparameters it takes itself
    config = switch_algorithm(config, changes, quiet=getattr(args, "quiet", False))
  return config_lib.apply_overrides(config, changes), per_algorithm


# What a recipe sets that is the experiment's size, not its method: a smoke run keeps its tiny variant's.
_SIZE_KEYS = ("num_clients", "rounds", "hparams.clients_per_round", "hparams.local_epochs", "hparams.batch_size")


def recipe_changes(changes: list[tuple[str, Any]], config) -> list[tuple[str, Any]]:
  """A recipe's `(key, value)` changes for `config`: all of them, or with `smoke` all but its sizes (the smoke
  variant's clients, rounds, cohort, epochs and batch stay; a recipe that trains every client every round, as the
  group's Local does, trains every client of the smoke variant)."""
  if not config.smoke:
    return changes
  every = dict(changes).get("hparams.clients_per_round") == dict(changes).get("num_clients")
  kept = [(key, value) for key, value in changes if key not in _SIZE_KEYS]
  return kept + ([("hparams.clients_per_round", config.num_clients)] if every else [])


def switch_algorithm(config, changes: list[tuple[str, Any]], *, quiet: bool = False):
  """`config` for the algorithm the `(key, value)` changes name last (`--algorithm`, `--set algorithm=`), if another.

  The config's hyperparameters that the new algorithm does not take are dropped, as `compare` does, with one line
  that names them (a config file's FedSpa `density` means nothing to FedAvg). The changes themselves are applied
  after this, so a hyperparameter given with `--set` that the algorithm does not take is still an error.
  """
  from fedspa_jax import compare, distributed

  name = next((value for key, value in reversed(changes) if key == "algorithm"), config.algorithm)
  if name == config.algorithm:
    return config
  config, skipped = compare.for_algorithm(config, name)
  if skipped and not quiet and distributed.is_primary():
    print(compare.skipped_note(name, skipped))
  return config


def make_stopper(args: argparse.Namespace):
  """The `preemption.Stopper` of a command: its --deadline (minutes from now), or none."""
  from fedspa_jax import preemption

  deadline = getattr(args, "deadline", None)
  return preemption.Stopper(None if deadline is None else deadline * 60)


def _run(args) -> int:
  from fedspa_jax import experiment

  config, _ = resolve_config(args)
  if args.distributed:
    config = dataclasses.replace(config, shard_clients=True)  # one mesh over every process's devices
  summary = experiment.run(
      config, args.out, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
      progress=args.progress, echo=None if args.quiet else print, write_plots=args.plots, stopper=args.stopper,
  )
  from fedspa_jax import distributed

  if summary.get("status") == "complete" and distributed.is_primary():
    s = summary["final_accuracy"]
    print(f"done: {summary['algorithm']} on {summary['dataset']}, final accuracy {s['mean']:.4f} ± {s['std']:.4f} "
          f"(p10 {s['p10']:.3f}, worst 10% {s['worst10']:.3f}), best {summary['best_accuracy_mean']:.4f}; "
          f"{summary['bytes_total'] / 2**20:.2f} MiB communicated; {summary['wall_time']:.1f}s -> {summary['run_dir']}")
  return 0


def _compare(args) -> int:
  from fedspa_jax import compare, paths, run_folder
  from fedspa_jax.config import ConfigError

  # `compare --resume --out DIR`: the comparison's own algorithms and per-algorithm settings (DIR/config.json).
  record = compare.saved(args.out) if args.resume and args.out and args.config is None else None
  if args.algorithms:
    names = tuple(n for item in args.algorithms for n in item.split(",") if n)
  elif record is not None:
    names = tuple(record[1])
  else:
    raise ConfigError("compare needs --algorithms (or --resume --out DIR of a comparison, which records its own)")
  config, per_algorithm = resolve_config(args, algorithm_names=names)
  if record is not None:
    per_algorithm = {name: {**record[2].get(name, {}), **per_algorithm.get(name, {})}
                     for name in set(record[2]) | set(per_algorithm) if name in names}
  out = args.out or str(run_folder.default_workdir(dataclasses.replace(config, algorithm="compare")))
  summaries = compare.run(
      config, list(names), out, per_algorithm=per_algorithm, resume=args.resume, overwrite=args.overwrite,
      stop_after=args.stop_after, progress=args.progress, echo=None if args.quiet else print,
      write_plots=args.plots, stopper=args.stopper,
  )
  stopped = [s for s in summaries if s.get("status") == "stopped"]
  if stopped:  # --stop-after: every run stopped with its checkpoint; the table comes with the last round
    print(f"stopped after round {stopped[0]['round']} (--stop-after): no table yet; continue with "
          f"fedspa-jax compare --resume --out {out}")
    return 0
  if args.quiet:
    print((paths.as_path(out) / "comparison.md").read_text())
  print(f"table: {out}/comparison.md, {out}/comparison.csv")
  return 0


def parse_values(items: list[str], convert: Callable[[str], Any], what: str) -> list[Any]:
  """Space- or comma-separated values ("0 1 2" or "0,1,2") converted one by one; ConfigError names `what` it wants."""
  from fedspa_jax.config import ConfigError

  values = []
  for text in (t for item in items for t in item.split(",") if t):
    try:
      values.append(convert(text))
    except ValueError:
      raise ConfigError(f"{what}, got {text!r}") from None
  return values


def parse_seeds(items: list[str]) -> list[int]:
  """--seeds values as integers; ConfigError for anything else."""
  return parse_values(items, int, "seeds must be integers")


def parse_lrs(items: list[str] | None) -> list[float] | None:
  """--lrs values as floats (None when not given); ConfigError for anything else."""
  return None if items is None else parse_values(items, float, "lrs must be numbers")


def _sweep(args) -> int:
  from fedspa_jax import experiment
  from fedspa_jax.config import ConfigError

  if args.seed is not None:
    raise ConfigError("sweep takes --seeds, not --seed")
  seeds = parse_seeds(args.seeds)
  lrs = parse_lrs(args.lrs)
  config, _ = resolve_config(args)
  summary = experiment.sweep(config, seeds, args.out, lrs=lrs, overwrite=args.overwrite, resume=args.resume,
                             progress=args.progress, echo=None if args.quiet else print, stopper=args.stopper)
  if lrs is not None:
    for lr, acc in summary["final_accuracy_mean_by_lr"].items():
      print(f"lr {lr}: " + ("diverged" if acc is None else f"final accuracy {acc['mean']:.4f} ± {acc['std']:.4f} "
                                                           f"over seeds"))
    print(f"done: {summary['algorithm']} on {summary['dataset']}, {len(summary['lrs'])} lrs x "
          f"{len(summary['seeds'])} seeds; best lr {summary['best_lr']} (chosen on these seeds); "
          f"{summary['wall_time']:.1f}s -> {summary['run_dir']}")
    return 0
  acc = summary["final_accuracy_mean"]
  per_seed = ", ".join(f"{a:.4f}" for a in summary["final_accuracy_mean_per_seed"])
  print(f"done: {summary['algorithm']} on {summary['dataset']}, {len(summary['seeds'])} seeds, final accuracy "
        f"{acc['mean']:.4f} ± {acc['std']:.4f} over seeds (per seed {per_seed}); "
        f"{summary['bytes_total']['mean'] / 2**20:.2f} MiB communicated per seed; {summary['wall_time']:.1f}s "
        f"-> {summary['run_dir']}")
  return 0


def _plot(args) -> int:
  from fedspa_jax import plots

  if len(args.runs) == 1:
    paths = plots.plot_run(args.runs[0], args.out)
  else:
    if not args.out:
      from fedspa_jax.config import ConfigError

      raise ConfigError("several runs: pass --out DIR for the comparison figures")
    paths = plots.plot_runs(args.runs, args.out)
  print("\n".join(str(p) for p in paths))
  return 0


def _list(args) -> int:
  from fedspa_jax import algorithms, config, data, models

  describe = getattr(algorithms, "describe", lambda: {n: "" for n in algorithms.names()})()
  print("algorithms:\n" + "\n".join(f"  {n:20s} {d}" for n, d in describe.items()))
  print("datasets:  " + ", ".join(data.dataset_names()) + ", tfds:<name>")
  print("models:    " + ", ".join(models.names()))
  print("configs:   " + ", ".join(config.shipped_names()))
  return 0


def main(argv: list[str] | None = None) -> int:
  """The command line; `argv` None: the process's own arguments (the process exits with the returned status)."""
  args = make_parser().parse_args(argv)
  if getattr(args, "deadline", None) is not None and not args.deadline > 0:
    print(f"fedspa-jax: error: --deadline must be a positive number of minutes, got {args.deadline:g}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
    print(f"fedspa-jax: error: --stop-after must be a round >= 1, got {args.stop_after}", file=sys.stderr)
    return EXIT_BAD_INPUT
  args.stopper = make_stopper(args)  # the deadline counts from here
  if args.command not in ("run", "compare", "sweep"):
    return _main(args)
  # From the start: a notice during start-up stops after the first dispatch. As the process's own command line, a
  # decided stop keeps ignoring signals while the process exits, so its status stays 75.
  with args.stopper.handle_signals(exiting=argv is None):
    return _main(args)


def _main(args: argparse.Namespace) -> int:
  from fedspa_jax import distributed

  if getattr(args, "distributed", False):
    try:  # before anything touches a device
      distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             timeout_s=args.distributed_timeout)
    except distributed.DistributedError as e:
      print(f"fedspa-jax: error: {e}", file=sys.stderr)
      return EXIT_BAD_INPUT
    args.stopper.reclaim_signals()
  elif any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes", "process_id")):
    print("fedspa-jax: error: --coordinator, --num-processes and --process-id need --distributed", file=sys.stderr)
    return EXIT_BAD_INPUT
  from fedspa_jax import preemption
  from fedspa_jax.config import ConfigError
  from fedspa_jax.data.tfds_sources import MissingDependencyError
  from fedspa_jax.records import TrainingDiverged

  command = {"run": _run, "compare": _compare, "sweep": _sweep, "plot": _plot, "list": _list}[args.command]
  try:
    return command(args)
  except preemption.Stopped as e:
    print(f"fedspa-jax: {e} (exit status {EXIT_STOPPED})", file=sys.stderr)
    return EXIT_STOPPED
  except TrainingDiverged as e:
    print(f"fedspa-jax: error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  # Bad input, missing data (TFDS's not prepared: a FileNotFoundError) or a reader package to install; other errors
  # are bugs: they keep their traceback.
  except (ConfigError, FileNotFoundError, MissingDependencyError) as e:
    print(f"fedspa-jax: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("fedspa-jax: interrupted; continue with --resume (from the newest checkpoint)", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
  sys.exit(main())
