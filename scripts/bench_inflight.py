"""What the bound on sharded programs in flight (`fedspa_jax.inflight`) costs: rounds per second of one loop,
paced against blocked on every round and against the old unpaced loop, on one device and on a 2-device mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python scripts/bench_inflight.py

Workloads: the issue's (FedAvg, MLP, Synthetic(1, 1) with K=100, S=8, 1 local step at batch 8: a round of almost
no compute, the worst case for any sync) and FedSpa (density 0.5) on the same data for 1 local epoch at batch 8.
Loops, each timed over --rounds rounds (then blocked), interleaved in one process in a rotating order, --reps
times, after one untimed pass of each. Short loops close in time share the machine's load, so each rep's time is
also compared with the same rep's unpaced time:
  unpaced     the old path: the jitted round, never blocked. On the mesh it is blocked every 25 rounds, since more
              than 32 programs in flight abort the process there (with the default --rounds 25, never).
  paced k     at most k rounds in flight (`inflight.Pacer(k)`); k = MAX_IN_FLIGHT is what the library does on a
              CPU mesh. On one device the library does not pace; the row shows what pacing would cost there.
  blocked     `jax.block_until_ready` on every round.
The load average is printed before and after: on a shared machine, compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

import fedspa_jax as fj
from fedspa_jax import inflight
from fedspa_jax.round import make_client_mesh

SAFE_CHUNK = 25  # the old loop on a mesh: blocked this often, well below the runtime's 32 programs in flight


def loadavg() -> str:
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def make_loops(jitted, sharded: bool, limits: tuple[int, ...]) -> dict:
  """name -> loop(state, data, rounds) -> state, each ending blocked."""

  def unpaced(state, data, rounds):
    for i in range(rounds):
      state, _ = jitted(state, data)
      if sharded and (i + 1) % SAFE_CHUNK == 0:
        jax.block_until_ready(state)
    return jax.block_until_ready(state)

  def paced(limit):
    def loop(state, data, rounds):
      call = inflight.Paced(jitted, pacer=inflight.Pacer(limit))
      for _ in range(rounds):
        state, _ = call(state, data)
      call.pacer.drain()
      return jax.block_until_ready(state)
    return loop

  def blocked(state, data, rounds):
    for _ in range(rounds):
      state, metrics = jitted(state, data)
      jax.block_until_ready((state, metrics))
    return state

  return {"unpaced": unpaced, **{f"paced {k}": paced(k) for k in limits}, "blocked": blocked}


def bench(name: str, mesh, data, hparams: dict, rounds: int, reps: int, limits: tuple[int, ...]) -> None:
  model = fj.models.get("mlp", num_classes=data.num_classes)
  # rounds: FedSpa's prune rate stays > 0 (and its cost the same) for every timed round
  algo = fj.algorithms.get(name, model=model, mesh=mesh, rounds=10**6, **hparams)
  jitted = algo.round.fn if isinstance(algo.round, inflight.Paced) else algo.round  # the bare jitted round
  placed = algo.place(data)
  state = algo.init(jax.random.key(0), placed)
  state, _ = jitted(state, placed)  # compile
  loops = make_loops(jitted, mesh is not None and mesh.devices.size > 1, limits)
  times: dict[str, list[float]] = {k: [] for k in loops}
  for loop in loops.values():  # warm-up, not timed
    state = loop(state, placed, min(rounds, SAFE_CHUNK))
  names = list(loops)
  for rep in range(reps):
    for loop_name in names[rep % len(names):] + names[: rep % len(names)]:  # each loop first in turn
      loop = loops[loop_name]
      start = time.perf_counter()
      state = loop(state, placed, rounds)
      times[loop_name].append((time.perf_counter() - start) / rounds)
  where = "1 device (no mesh)" if mesh is None else f"mesh of {mesh.devices.size} CPU devices"
  print(f"\n{name}, {where}: ms per round over {reps} x {rounds} rounds: median, min; median of each rep's "
        "time / the same rep's unpaced time")
  for loop_name, ts in times.items():
    ratio = statistics.median(t / u for t, u in zip(ts, times["unpaced"]))
    print(f"  {loop_name:10s} {1e3 * statistics.median(ts):7.3f} {1e3 * min(ts):7.3f}   {ratio:5.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=SAFE_CHUNK, help="rounds per timed loop")
  parser.add_argument("--reps", type=int, default=40)
  parser.add_argument("--limits", type=int, nargs="+", default=[1, inflight.MAX_IN_FLIGHT, 8])
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
        f"MAX_IN_FLIGHT={inflight.MAX_IN_FLIGHT}; load average {loadavg()}")
  data = fj.data.synthetic(1.0, 1.0, num_clients=100, seed=0)
  common = dict(clients_per_round=8, batch_size=8)
  workloads = [("fedavg", dict(common, local_steps=1)), ("fedspa", dict(common, local_epochs=1, density=0.5))]
  meshes = [None] + ([make_client_mesh(jax.devices()[:2])] if jax.device_count() >= 2 else [])
  for name, hparams in workloads:
    for mesh in meshes:
      bench(name, mesh, data, hparams, args.rounds, args.reps, tuple(dict.fromkeys(args.limits)))
  print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
  main()
