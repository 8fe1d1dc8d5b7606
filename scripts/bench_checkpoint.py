"""What a checkpoint costs next to the rounds it protects: synchronous vs orbax's asynchronous saving.

    .venv/bin/python scripts/bench_checkpoint.py [--clients 100 10000] [--repeats 5]

For FedSpa on LeNet-5 (Fashion-MNIST shapes, random data) at each population size K: the median time of one round
(10 clients, 1 local epoch of 60 samples), of one synchronous `Checkpointer.save` (what `run` does), and of the part
of an asynchronous orbax save that blocks the caller (the device-to-host copy; the write goes on in a thread). The
run loop saves every `checkpoint_every` rounds (default 10), so a save's share of the run is save / (10 x round).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

import fedspa_jax as fj
from fedspa_jax import checkpoint
from fedspa_jax.data.federated import FederatedData, split_from_flat


def make_data(num_clients: int, per_client: int) -> FederatedData:
  rng = np.random.default_rng(0)
  split = lambda m: split_from_flat(rng.integers(0, 256, (m * num_clients, 28, 28, 1), dtype=np.uint8),
                                    rng.integers(0, 10, m * num_clients).astype(np.int32), [m] * num_clients)
  return FederatedData(train=split(per_client), test=split(10), num_classes=10, name="random-28x28",
                       mean=(0.286,), std=(0.353,))


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clients", type=int, nargs="+", default=[100, 10000])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
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

    def one_round():
      holder["state"], metrics = algo.round(holder["state"], placed)
      jax.block_until_ready((holder["state"], metrics))

    round_s = median_time(one_round, args.repeats)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(checkpoint.to_storable(holder["state"])))
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint.Checkpointer(f"{tmp}/sync", keep=2)
      step = iter(range(1, 10**6))
      sync_s = median_time(lambda: ckpt.save(next(step), holder["state"], {"round": 0}), args.repeats)
      ckpt.close()
      options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True, create=True)
      manager = ocp.CheckpointManager(f"{tmp}/async", options=options, item_names=("state",))
      blocked = []
      for i in range(args.repeats):
        manager.wait_until_finished()  # the previous write, before timing this one's blocking part
        start = time.perf_counter()
        manager.save(i, args=ocp.args.Composite(state=ocp.args.StandardSave(checkpoint.to_storable(holder["state"]))))
        blocked.append(time.perf_counter() - start)
      manager.wait_until_finished()
      manager.close()
    async_s = statistics.median(blocked)
    print(f"K={K:>6}: state {nbytes / 2**20:7.2f} MiB; round {round_s * 1e3:7.1f} ms; sync save {sync_s * 1e3:7.1f} ms "
          f"({sync_s / (10 * round_s):.0%} of 10 rounds); async save blocks {async_s * 1e3:7.1f} ms "
          f"({async_s / (10 * round_s):.0%})")


if __name__ == "__main__":
  main()
