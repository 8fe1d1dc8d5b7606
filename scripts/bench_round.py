"""Throughput of whole federated rounds: rounds/s and training samples/s, one compiled program per round.

    .venv/bin/python scripts/bench_round.py --algorithms fedspa fedavg --model lenet5 --cohorts 10 50 --rounds 5
    .venv/bin/python scripts/bench_round.py --interleave --rounds 20      # plain FedSpa vs DP + 30% stragglers

`--interleave` times, per algorithm and cohort, the plain round against the same round with `--options` (default:
client-level DP with adaptive clipping and 30% stragglers at half their work, issue 30), alternating one round of
each so that both see the same machine load; it prints the median time per round of each, their ratio, and the
samples/s (stragglers train fewer samples, so the two rates differ by more than the times).

Uses real Fashion-MNIST (100 clients, pathological 2 classes) when its files are found, else random uint8 images of
the same shape. Times exclude compilation (one warm-up round) and block on the results. Prints one Markdown row per
(algorithm, cohort) with the machine and date, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time

import jax
import numpy as np

import fedspa_jax as fj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402  (the sibling script: one place that names the machine)


def load_data(num_clients: int) -> fj.data.FederatedData:
  try:
    return fj.data.load("fashion_mnist", num_clients=num_clients, partition="pathological", classes_per_client=2)
  except (FileNotFoundError, ValueError) as e:
    print(f"# Fashion-MNIST not available ({str(e).splitlines()[0]}); using random images of the same shape")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 60000)
    return fj.data.from_arrays(x, y, num_clients=num_clients, partition="iid", seed=0)


DEFAULT_OPTIONS = ("dp_clip=1.0", "dp_noise_multiplier=1.0", "dp_quantile=0.5", "dp_count_noise=2.0",
                   "straggler_fraction=0.3", "straggler_work=0.5")


def interleaved(args) -> None:
  """Plain round vs the round with `args.options`, one round of each in turn; median seconds per round."""
  from fedspa_jax.config import split_override

  options = dict(split_override(item) for item in args.options)
  data = load_data(args.num_clients)
  device_data = jax.device_put(data)
  model = fj.models.get(args.model, num_classes=data.num_classes)
  print(f"# {datetime.date.today()} | {jax.devices()[0].platform}: {bench_models.cpu_model()} x{os.cpu_count()} | "
        f"jax {jax.__version__} | {data.name}, {data.num_clients} clients, {args.model}, batch {args.batch_size}, "
        f"1 local epoch | interleaved, {args.rounds} rounds each | options: {' '.join(args.options)}")
  print("| algorithm | cohort | cohort run | plain s/round | with options s/round | ratio | plain samples/s | "
        "with options samples/s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in args.algorithms:
    for cohort, grouping in itertools.product(args.cohorts, args.cohort_batches):
      cohort_batch = None if grouping == "vmap" else int(grouping)
      common = dict(model=model, clients_per_round=cohort, batch_size=args.batch_size, lr=0.05,
                    rounds=args.rounds + 1, cohort_batch=cohort_batch)
      variants = [fj.algorithms.get(name, **common), fj.algorithms.get(name, **common, **options)]
      states = [algo.init(jax.random.key(0), data) for algo in variants]
      times, samples = [[], []], [0.0, 0.0]
      for r in range(args.rounds + 1):  # round 0 compiles both
        for v, algo in enumerate(variants):
          start = time.perf_counter()
          states[v], metrics = algo.round(states[v], device_data)
          jax.block_until_ready((states[v], metrics))
          if r:
            times[v].append(time.perf_counter() - start)
            samples[v] += float(np.sum(metrics["samples"]))
      plain, other = (float(np.median(t)) for t in times)
      label = "vmap" if cohort_batch is None else f"lax.map of {cohort_batch}"
      rates = [samples[v] / sum(times[v]) for v in range(2)]
      print(f"| {name} | {cohort} | {label} | {plain:.4f} | {other:.4f} | {other / plain:.3f} | {rates[0]:,.0f} | "
            f"{rates[1]:,.0f} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--algorithms", nargs="+", default=["fedspa", "fedavg"])
  parser.add_argument("--model", default="lenet5")
  parser.add_argument("--cohorts", nargs="+", type=int, default=[10])
  parser.add_argument("--num-clients", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--cohort-batches", nargs="+", default=["vmap"],
                      help="'vmap' (whole cohort vmapped) and/or group sizes k for lax.map over k clients")
  parser.add_argument("--interleave", action="store_true",
                      help="time the plain round against the round with --options, alternating rounds")
  parser.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), metavar="KEY=VALUE",
                      help=f"hyperparameters of the compared round (default: {' '.join(DEFAULT_OPTIONS)})")
  args = parser.parse_args()
  if args.interleave:
    return interleaved(args)

  data = load_data(args.num_clients)
  device_data = jax.device_put(data)
  model = fj.models.get(args.model, num_classes=data.num_classes)
  print(f"# {datetime.date.today()} | {jax.devices()[0].platform}: {bench_models.cpu_model()} x{os.cpu_count()} | "
        f"jax {jax.__version__} | {data.name}, {data.num_clients} clients, {args.model}, batch {args.batch_size}, "
        f"1 local epoch")
  print("| algorithm | cohort | cohort run | compile (s) | rounds/s | samples/s | train GFLOP/s |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name in args.algorithms:
    for cohort, grouping in itertools.product(args.cohorts, args.cohort_batches):
      cohort_batch = None if grouping == "vmap" else int(grouping)
      algo = fj.algorithms.get(name, model=model, clients_per_round=cohort, batch_size=args.batch_size, lr=0.05,
                               rounds=args.rounds + 1, cohort_batch=cohort_batch)
      state = algo.init(jax.random.key(0), data)
      start = time.perf_counter()
      state, metrics = algo.round(state, device_data)
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - start
      history = []
      start = time.perf_counter()
      for _ in range(args.rounds):
        state, metrics = algo.round(state, device_data)
        history.append(metrics)  # no host sync inside the timed loop
      jax.block_until_ready((state, history))
      elapsed = time.perf_counter() - start
      samples = sum(float(np.sum(m["samples"])) for m in history)
      flops = sum(float(m["flops"]) for m in history)
      label = "vmap" if cohort_batch is None else f"lax.map of {cohort_batch}"
      print(f"| {name} | {cohort} | {label} | {compile_s:.1f} | {args.rounds / elapsed:.2f} | {samples / elapsed:,.0f} | "
            f"{flops / elapsed / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
  main()
