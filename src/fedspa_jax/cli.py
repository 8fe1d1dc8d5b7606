"""Command line: `fedspa-jax run ...` (also `python -m fedspa_jax`)."""

from __future__ import annotations

import argparse
import json
import sys

from fedspa_jax import experiment


def parse_value(text: str):
  """`--set key=value` values: JSON when it parses (numbers, true/false, null, lists), else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fedspa-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run one experiment")
  defaults = experiment.Config()
  run.add_argument("--algorithm", default=defaults.algorithm)
  run.add_argument("--dataset", default=defaults.dataset)
  run.add_argument("--partition", default=defaults.partition)
  run.add_argument("--num-clients", type=int, default=defaults.num_clients)
  run.add_argument("--model", default=defaults.model)
  run.add_argument("--rounds", type=int, default=defaults.rounds)
  run.add_argument("--eval-every", type=int, default=defaults.eval_every)
  run.add_argument("--seed", type=int, default=defaults.seed)
  run.add_argument("--data-dir", default=None)
  run.add_argument(
      "--set", action="append", default=[], metavar="KEY=VALUE",
      help="algorithm hyperparameter (e.g. --set density=0.2); data.KEY=VALUE for the data source",
  )
  return parser


def config_from_args(args: argparse.Namespace) -> experiment.Config:
  config = experiment.Config(
      algorithm=args.algorithm, dataset=args.dataset, partition=args.partition, num_clients=args.num_clients,
      model=args.model, rounds=args.rounds, eval_every=args.eval_every, seed=args.seed, data_dir=args.data_dir,
  )
  for item in args.set:
    if "=" not in item:
      raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    if key.startswith("data."):
      config.data_args[key[5:]] = parse_value(value)
    elif key.startswith("model."):
      config.model_args[key[6:]] = parse_value(value)
    else:
      config.hparams[key] = parse_value(value)
  return config


def main(argv: list[str] | None = None) -> int:
  args = make_parser().parse_args(argv)
  if args.command == "run":
    config = config_from_args(args)
    try:
      summary = experiment.run(config, log=lambda r: print(experiment.format_record(r), flush=True))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
      print(f"fedspa-jax: error: {e}", file=sys.stderr)
      return 2
    print(experiment.summary_json({k: v for k, v in summary.items() if k != "config"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
