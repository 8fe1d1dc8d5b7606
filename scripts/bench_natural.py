"""Speed and memory of FedSpa rounds on synthetic data of the natural datasets' real sizes (no accuracies).

    .venv/bin/python scripts/bench_natural.py                         # both datasets, 3 timed rounds each
    .venv/bin/python scripts/bench_natural.py --datasets shakespeare --rounds 5

- shakespeare: 715 clients (TFF's Shakespeare), ~4 M characters as 80-character sequences (50,000 sequences of
  random tokens 1..89, vocabulary 90 with token 0 = padding; each client's last sequence padded from a random
  point, as a snippet's tail is), client sizes lognormal (sigma 1.15: 1 to 1,300 sequences, std/mean 1.4;
  LEAF's Shakespeare users have std/mean ~1.7), 10% of each client's sequences held out for test; LEAF's model
  (`char_lstm`: embedding 8, two LSTM layers of 256).
- femnist: 3,550 writers, 800,000 random 28x28 uint8 images, 62 classes, client sizes lognormal (sigma 0.38:
  225 +- 89, 62 to 726 images per writer; LEAF's FEMNIST has 227 +- 89), 10% held out; the FedAvg CNN (`cnn`, as
  the EMNIST config).

FedSpa (density 0.5, ERK, gradient regrowth), 10 clients per round, 1 local epoch at batch 10 (as LEAF runs them),
the engine's defaults otherwise (cohort_batch="auto": one client at a time on CPU). Each dataset runs in its own
process, so that its peak resident memory (ru_maxrss: data, client store, compiled programs) is its own. One
warm-up round (compilation) is excluded; every timed round blocks on its result. A sample is one sequence for
Shakespeare (80 character positions) and one image for FEMNIST. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

LENGTH = 80


def client_sizes(rng: np.random.Generator, clients: int, total: int, sigma: float) -> np.ndarray:
  """`clients` lognormal sizes (at least 1) summing to `total` exactly."""
  raw = rng.lognormal(0.0, sigma, clients)
  sizes = np.maximum(1, np.floor(raw / raw.sum() * total)).astype(np.int64)
  short = total - int(sizes.sum())
  order = np.argsort(-raw)
  step = 1 if short > 0 else -1
  i = 0
  while short != 0:  # hand out (or take back) the rounding remainder, largest clients first
    k = order[i % clients]
    if sizes[k] + step >= 1:
      sizes[k] += step
      short -= step
    i += 1
  return sizes


def holdout(sizes: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-client (train, test) sizes: `fraction` of each client's samples (rounded down) for test."""
  test = np.floor(sizes * fraction).astype(np.int64)
  return sizes - test, test


def shakespeare_like(seed: int, clients: int = 715, characters: int = 4_000_000, vocab: int = 90):
  import fedspa_jax as fj

  rng = np.random.default_rng(seed)
  sizes = client_sizes(rng, clients, characters // LENGTH, 1.15)

  def split(counts):
    n = int(counts.sum())
    text = rng.integers(1, vocab, (n, LENGTH + 1), dtype=np.int32)
    last = np.cumsum(counts)[counts > 0] - 1
    cut = rng.integers(1, LENGTH + 1, last.size)  # a client's last sequence ends early: its tail is padding
    text[last] = np.where(np.arange(LENGTH + 1)[None, :] > cut[:, None], 0, text[last])
    return fj.data.split_from_flat(text[:, :-1], text[:, 1:], counts)

  train, test = holdout(sizes, 0.1)
  data = fj.data.FederatedData(train=split(train), test=split(test), num_classes=vocab, name="shakespeare_synthetic")
  return data, fj.models.get("char_lstm", vocab_size=vocab)


def femnist_like(seed: int, clients: int = 3550, images: int = 800_000, classes: int = 62):
  import fedspa_jax as fj

  rng = np.random.default_rng(seed)
  sizes = client_sizes(rng, clients, images, 0.38)

  def split(counts):
    n = int(counts.sum())
    x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return fj.data.split_from_flat(x, rng.integers(0, classes, n, dtype=np.int32), counts)

  train, test = holdout(sizes, 0.1)
  data = fj.data.FederatedData(train=split(train), test=split(test), num_classes=classes, name="femnist_synthetic")
  return data, fj.models.get("cnn", num_classes=classes)


BUILDERS = {"shakespeare": shakespeare_like, "femnist": femnist_like}


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parse_cohort_batch(text: str) -> int | str | None:
  if text in ("auto", "none"):
    return None if text == "none" else text
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"--cohort-batch is auto, none or an integer >= 1, got {text!r}")
  return int(text)


def run_one(name: str, rounds: int, seed: int, cohort_batch: int | str | None = "auto") -> dict:
  """Builds the data, runs one warm-up and `rounds` timed FedSpa rounds; returns the measurements."""
  import jax

  import fedspa_jax as fj

  start = time.perf_counter()
  data, model = BUILDERS[name](seed)
  build_s = time.perf_counter() - start
  data_bytes = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(data))
  after_data = peak_rss_bytes()
  device_data = jax.device_put(data)
  algo = fj.algorithms.get("fedspa", model=model, density=0.5, clients_per_round=10, local_epochs=1, batch_size=10,
                           lr=0.05, rounds=rounds + 1, cohort_batch=cohort_batch)
  state = algo.init(jax.random.key(seed), device_data)
  start = time.perf_counter()
  state, metrics = algo.round(state, device_data)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - start
  times, samples = [], []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = algo.round(state, device_data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    samples.append(int(np.sum(metrics["samples"])))
  return {
      "dataset": name, "clients": data.num_clients, "model": type(model).__name__,
      "train_samples": data.train.total, "test_samples": data.test.total, "sample_shape": list(data.sample_shape),
      "data_bytes": data_bytes, "build_s": build_s, "first_round_s": first_s, "round_s": times,
      "round_samples": samples, "peak_rss_after_data": after_data, "peak_rss": peak_rss_bytes(),
      "jax": jax.__version__,
  }


def load() -> str:
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", nargs="+", choices=sorted(BUILDERS), default=["shakespeare", "femnist"])
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cohort-batch", default="auto", type=parse_cohort_batch,
                      help="clients vmapped together: auto (1 on CPU), none (the whole cohort) or k")
  parser.add_argument("--one", choices=sorted(BUILDERS), help=argparse.SUPPRESS)  # the child process
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  if args.one:
    print(json.dumps(run_one(args.one, args.rounds, args.seed, args.cohort_batch)))
    return

  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {cpu()} x{os.cpu_count()} | "
        f"load before: {load()} | cohort_batch {args.cohort_batch}")
  print("| dataset | clients | samples (train / test) | model | data | compile + 1st round (s) | samples/round "
        "| s/round | samples/s | peak RSS |")
  print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name in args.datasets:
    child = subprocess.run([sys.executable, __file__, "--one", name, "--rounds", str(args.rounds),
                            "--seed", str(args.seed), "--cohort-batch", str(args.cohort_batch).lower()],
                           capture_output=True, text=True)
    if child.returncode != 0:
      sys.exit(f"{name}: the measuring process failed:\n{child.stderr[-3000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    total_s, total_samples = sum(r["round_s"]), sum(r["round_samples"])
    per_sample = " (x80 characters)" if name == "shakespeare" else ""
    print(f"| {name} (synthetic) | {r['clients']:,} | {r['train_samples']:,} / {r['test_samples']:,}{per_sample} | "
          f"{r['model']} | {r['data_bytes'] / 2**20:,.0f} MiB | {r['first_round_s']:.1f} | "
          f"{total_samples / len(r['round_s']):,.0f} ({min(r['round_samples']):,}-{max(r['round_samples']):,}) | "
          f"{total_s / len(r['round_s']):.2f} | {total_samples / total_s:,.0f} | "
          f"{r['peak_rss'] / 2**30:.2f} GiB (after data: {r['peak_rss_after_data'] / 2**30:.2f}) |", flush=True)
    print(f"#   {name}: per round {', '.join(f'{n} in {t:.2f} s' for n, t in zip(r['round_samples'], r['round_s']))};"
          f" data built in {r['build_s']:.1f} s; jax {r['jax']}; load now: {load()}", flush=True)


if __name__ == "__main__":
  main()
