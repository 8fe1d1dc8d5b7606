"""What a checkpoint costs next to the rounds it protects: synchronous vs asynchronous saving, interleaved.

    .venv/bin/python scripts/bench_checkpoint.py [--clients 100 10000] [--repeats 5]

For FedSpa on LeNet-5 (Fashion-MNIST shapes, random data) at each population size K, in one process and interleaved
(none, sync, async, none, sync, ...) so that all three see the same machine: the wall time of a span of 10 rounds
(10 clients, 1 local epoch of 60 samples each) followed by a save, as the run loop does with the default
`checkpoint_every` of 10, with `fedspa_jax.checkpoint.Checkpointer` as `run` uses it:
- none: no save (the baseline);
- sync: a synchronous save;
- async: an asynchronous save; its write goes on in a thread during the next span, so the span's time includes what
  the write takes from the rounds (on a small CPU the two share the cores). Each span starts after the previous
  write is complete, as `run` makes sure before the next save.
Also printed: the blocking part of the asynchronous save alone. Reported: medians over `--repeats` spans.

Memory (peak RSS, sampled every millisecond by a thread reading /proc/self/statm): for each mode, the highest RSS
from the start of its span to the end of its write, above the RSS before that span, as a multiple of the state's
bytes; the largest over the repeats. Memory does not depend on the machine's load, so it is meaningful on a busy
machine where the times are not. `--modes` picks which ways to save (default all three).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import jax
import numpy as np

import fedspa_jax as fj
from fedspa_jax import checkpoint
from fedspa_jax.data.federated import FederatedData, split_from_flat


def make_data(num_clients: int, per_client: int) -> FederatedData:
  rng = np.random.default_rng(0)
  split = lambda m: split_from_flat(rng.integers(0, 256, (m * num_clients, 28, 28, 1), dtype=np.uint8),
                                    rng.integers(0, 10, m * num_clients).astype(np.int32), [m] * num_clients)
  return FederatedData(train=split(per_client), test=split(10), num_classes=10, name="random-28x28",
                       mean=(0.286,), std=(0.353,))


class PeakRSS:
  """The process's resident set size, sampled every millisecond in a thread; `peak_since(mark)` after `mark()`."""

  def __init__(self):
    self._page, self._peak, self._stop = os.sysconf("SC_PAGE_SIZE"), 0, threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def now(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _sample(self) -> None:
    while not self._stop.is_set():
      self._peak = max(self._peak, self.now())
      time.sleep(0.001)

  def mark(self) -> int:
    """Resets the peak; returns the RSS now."""
    rss = self.now()
    self._peak = rss
    return rss

  def peak(self) -> int:
    time.sleep(0.005)  # one more sample
    return max(self._peak, self.now())

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clients", type=int, nargs="+", default=[100, 10000])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--modes", nargs="+", default=["none", "sync", "async"], choices=["none", "sync", "async"])
  args = parser.parse_args()
  rss = PeakRSS()
  print(f"jax {jax.__version__}, {jax.default_backend()}: {len(jax.devices())} device(s)")
  for K in args.clients:
    data = make_data(K, 60)
    algo = fj.algorithms.get("fedspa", model=fj.models.get("lenet5", num_classes=10), density=0.5,
                             clients_per_round=10, local_epochs=1, batch_size=20, lr=0.05, rounds=1000)
    placed = algo.place(data)
    state = algo.init(jax.random.key(0), placed)
    state, _ = algo.round(state, placed)
    jax.block_until_ready(state)
    holder = {"state": state}

    def span():
      for _ in range(10):
        holder["state"], metrics = algo.round(holder["state"], placed)
      jax.block_until_ready((holder["state"], metrics))

    nbytes = sum(a.nbytes for a in jax.tree.leaves(checkpoint.to_storable(holder["state"])))
    times = {mode: [] for mode in args.modes}
    peaks = {mode: [] for mode in args.modes}
    blocked = []
    with tempfile.TemporaryDirectory() as tmp:
      savers = {"sync": checkpoint.Checkpointer(f"{tmp}/sync", keep=2, asynchronous=False),
                "async": checkpoint.Checkpointer(f"{tmp}/async", keep=2, asynchronous=True)}
      step = iter(range(1, 10**6))
      for _ in range(args.repeats):
        for mode in args.modes:
          for saver in savers.values():
            saver.wait()  # no write of the previous span still going
          before_rss = rss.mark()
          start = time.perf_counter()
          span()
          if mode != "none":
            before = time.perf_counter()
            savers[mode].save(next(step), holder["state"], {"round": 0})
            if mode == "async":
              blocked.append(time.perf_counter() - before)
              span()  # the next span, beside the write; timed with this one
              savers[mode].wait()
          times[mode].append(time.perf_counter() - start)
          peaks[mode].append(rss.peak() - before_rss)
      for saver in savers.values():
        saver.close()
    memory = ", ".join(f"{mode} {max(p) / 2**20:+.1f} MiB ({max(p) / nbytes:.2f}x the state)"
                       for mode, p in peaks.items())
    print(f"K={K:>6}: state {nbytes / 2**20:7.2f} MiB; peak RSS above the span's start: {memory}")
    if set(args.modes) != {"none", "sync", "async"}:
      continue
    none = statistics.median(times["none"])
    sync = statistics.median(times["sync"]) - none
    asyn = statistics.median(times["async"]) - 2 * none  # two spans: the save's and the one beside its write
    print(f"K={K:>6}: state {nbytes / 2**20:7.2f} MiB; 10 rounds {none:6.3f} s; a sync save adds {sync:+6.3f} s "
          f"({sync / none:+.0%}); an async save adds {asyn:+6.3f} s ({asyn / none:+.0%}), of which it blocks "
          f"{statistics.median(blocked) * 1e3:.0f} ms")
  rss.close()


if __name__ == "__main__":
  main()
