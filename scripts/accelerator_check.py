"""The accelerator smoke benchmark: whole FedSpa rounds, 100 clients per round vmapped, LeNet-5 and the CNN.

    bash scripts/accelerator_check.sh            # on a GPU/TPU machine (any backend works; CPU is slow)
    .venv/bin/python scripts/accelerator_check.py --quick      # tiny sizes: checks the script runs

Prints, per model, compile time and samples/s of the whole round (local training of every sampled client, mask
updates, aggregation) with `cohort_batch="auto"` (the whole cohort vmapped on an accelerator) and `conv="auto"`
(XLA convolutions on an accelerator, im2col on CPU), then with the population sharded over every device when there
are several. The data are random 28x28x1 images with Fashion-MNIST's shapes and sizes (600 samples per client):
the machine may have no internet and no dataset, and the cost does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import fedspa_jax as fj
from fedspa_jax.data.federated import FederatedData, split_from_flat


def make_data(num_clients: int, per_client: int, seed: int = 0) -> FederatedData:
  rng = np.random.default_rng(seed)
  split = lambda m: split_from_flat(rng.integers(0, 256, (m * num_clients, 28, 28, 1), dtype=np.uint8),
                                    rng.integers(0, 10, m * num_clients).astype(np.int32), [m] * num_clients)
  return FederatedData(train=split(per_client), test=split(max(1, per_client // 6)), num_classes=10,
                       name="random-28x28", mean=(0.286,), std=(0.353,))


def measure(model_name: str, data: FederatedData, cohort: int, rounds: int, mesh) -> dict:
  model = fj.models.get(model_name, num_classes=10)
  algo = fj.algorithms.get("fedspa", model=model, density=0.5, clients_per_round=cohort, local_epochs=1,
                           batch_size=32, lr=0.05, rounds=rounds + 2, mesh=mesh)
  placed = algo.place(data)
  state = algo.init(jax.random.key(0), placed)
  start = time.perf_counter()
  state, metrics = algo.round(state, placed)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - start
  rates = []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = algo.round(state, placed)
    jax.block_until_ready((state, metrics))
    rates.append(float(np.sum(np.asarray(metrics["samples"]))) / (time.perf_counter() - start))
  return {"model": model_name, "devices": 1 if mesh is None else mesh.size, "compile_s": round(compile_s, 2),
          "samples_per_s": round(statistics.median(rates)), "per_round": [round(r) for r in rates]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
  parser.add_argument("--models", nargs="+", default=["lenet5", "cnn"])
  args = parser.parse_args()
  clients, cohort, per_client, rounds = (16, 8, 64, 2) if args.quick else (200, 100, 600, 5)
  devices = jax.devices()
  print(f"backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}; JAX {jax.__version__}",
        flush=True)
  data = make_data(clients, per_client)
  meshes = [None] + ([fj.round.make_client_mesh()] if len(devices) > 1 and cohort % len(devices) == 0 else [])
  for model_name in args.models:
    for mesh in meshes:
      print(json.dumps(measure(model_name, data, cohort, rounds, mesh)), flush=True)


if __name__ == "__main__":
  main()
