"""How the engine scales: clients (K up to 60,000 and 1,000,000), skewed client sizes, and a PyTorch client loop.

    .venv/bin/python scripts/bench_scale.py                                  # every section, printed as Markdown
    .venv/bin/python scripts/bench_scale.py --write-docs                     # ... and written into docs/benchmarks.md
    .venv/bin/python scripts/bench_scale.py --sections scale million         # some sections only
    .venv/bin/python scripts/bench_scale.py --quick                          # smoke test, tiny sizes (~4 min for all)
    .venv/bin/python -m pip install -e ".[bench]"                            # PyTorch, for the `torch` section

Sections (each prints one Markdown table and its targets):
  scale    FedSpa LeNet-5 on Fashion-MNIST (iid), 10 clients per round, a fixed number of local steps (the same work
           per round at every K), at K = 100, 1,000, 10,000, 60,000; each K in its own subprocess, so its peak RSS
           is its own. Targets: s/round at the largest K within 1.3x of the smallest; peak RSS at 60,000 <= 2 GiB.
  million  1,000,000 Synthetic(1, 1) clients (at most 5 samples each), MLP, FedSpa, 10 clients per round, then
           `algo.evaluate` of every client (twice: the 1st compiles); in a subprocess. Target: peak RSS <= 16 GiB.
  skew     useful samples/s (samples the clients really trained on, per second) with pathological (2 classes) and
           dirichlet (alpha 0.1) client sizes, 100 clients, 1 local epoch, cohort_batch None, 1 and 2, interleaved.
           Target: dirichlet / pathological >= 0.75 for each cohort_batch.
  shard    K = 10,000 Fashion-MNIST clients on 8 forced CPU devices: per-device store and data bytes against one
           device, s/round and collective bytes of each cohort placement ("uniform": samples and state rows move to
           the device that trains them; "stratified": each device samples its own clients). Target: store per
           device <= 1/8 of the 1-device store plus padding.
  torch    the whole FedSpa round (10 clients x 600 samples, 1 epoch, batch 32) against a plain sequential PyTorch
           loop doing the same dense LeNet-5 training (2 threads), interleaved in one process (a subprocess with one
           XLA CPU device per core): FedSpa on one device and sharded over the cores. Target: JAX/torch >= 1.

Times exclude compilation (one warm-up round first), have no host sync inside the timed loop and block at the end.
Run it on a quiet machine: the load average at start and end is reported with the results.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

import fedspa_jax as fj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402  (the sibling script: one place that names the machine)

SECTIONS = ("scale", "million", "skew", "torch", "shard")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
BEGIN, END = "<!-- bench_scale:begin -->", "<!-- bench_scale:end -->"
GIB = 2**30

# Full and --quick sizes of every section.
FULL = dict(
    scale_clients=[100, 1_000, 10_000, 60_000], scale_rounds=10, scale_steps=5,
    million_clients=1_000_000, million_rounds=10,
    skew_blocks=5, skew_rounds=4, skew_cohort_batches=[None, 1, 2],
    torch_blocks=5, torch_rounds=3,
    shard_clients=10_000, shard_cohort=16, shard_rounds=10,
)
QUICK = dict(
    scale_clients=[100, 1_000], scale_rounds=2, scale_steps=5,
    million_clients=20_000, million_rounds=2,
    skew_blocks=1, skew_rounds=1, skew_cohort_batches=[None, 2],
    torch_blocks=2, torch_rounds=1,
    shard_clients=1_000, shard_cohort=16, shard_rounds=2,
)


def log(message: str) -> None:
  print(f"# {message}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
  """This process's peak resident set size (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tree_bytes(tree) -> int:
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def verdict(ok: bool) -> str:
  return "met" if ok else "NOT met"


def timed(fn, *args, **kwargs):
  """(fn's result, seconds), blocking on the result."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def warm_up(algo, state, data):
  """One round, compilation included: (state, seconds)."""
  start = time.perf_counter()
  state, metrics = algo.round(state, data)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def run_rounds(algo, state, data, rounds: int):
  """`rounds` rounds with no host sync between them: (state, per-round metrics, seconds)."""
  history = []
  start = time.perf_counter()
  for _ in range(rounds):
    state, metrics = algo.round(state, data)  # the state is donated: only the returned one is used
    history.append(metrics)
  jax.block_until_ready((state, history))
  return state, history, time.perf_counter() - start


def total(history, key: str) -> int:
  return int(sum(np.sum(np.asarray(m[key])) for m in history))


def load_fashion_mnist(num_clients: int, partition: str, **partition_args) -> fj.data.FederatedData:
  """Real Fashion-MNIST (no download, no partition cache, so the load is timed in full), else random images."""
  try:
    return fj.data.load("fashion_mnist", num_clients=num_clients, partition=partition, download=False, cache=False,
                        **partition_args)
  except (FileNotFoundError, ValueError) as e:
    log(f"Fashion-MNIST not available ({str(e).splitlines()[0]}); using random images of the same shape")
    rng = np.random.default_rng(0)
    x, x_test = (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) for n in (60_000, 10_000))
    y, y_test = (rng.integers(0, 10, n) for n in (60_000, 10_000))
    return fj.data.from_arrays(x, y, x_test, y_test, num_clients=num_clients, partition=partition, seed=0,
                               name="random images", **partition_args)


def fedspa(model, **kwargs):
  hparams = dict(density=0.5, clients_per_round=10, batch_size=32, lr=0.05)
  return fj.algorithms.get("fedspa", model=model, **{**hparams, **kwargs})


# ---- one measurement in a subprocess (peak RSS of that measurement alone) ----------------------------------------


def one_scale(num_clients: int, rounds: int, local_steps: int) -> dict:
  """FedSpa LeNet-5 on Fashion-MNIST (iid) with K clients and a fixed number of local steps."""
  start = time.perf_counter()
  data = jax.block_until_ready(jax.device_put(load_fashion_mnist(num_clients, "iid")))  # the numpy copy is freed
  load_s = time.perf_counter() - start
  rss_load = peak_rss_bytes()
  model = fj.models.get("lenet5", num_classes=data.num_classes)
  algo = fedspa(model, local_steps=local_steps, local_epochs=None, rounds=rounds + 1)
  state, init_s = timed(algo.init, jax.random.key(0), data)
  rss_init = peak_rss_bytes()
  state, first_s = warm_up(algo, state, data)
  state, history, elapsed = run_rounds(algo, state, data, rounds)
  return dict(num_clients=num_clients, load_s=load_s, init_s=init_s, first_s=first_s, round_s=elapsed / rounds,
              store_bytes=tree_bytes(state.clients), data_bytes=tree_bytes(data),
              samples=total(history, "samples") / rounds, rss_load=rss_load, rss_init=rss_init)


def one_million(num_clients: int, rounds: int) -> dict:
  """FedSpa MLP on Synthetic(1, 1) with K clients of at most 5 samples, then one evaluation of all of them."""
  start = time.perf_counter()
  data = fj.data.synthetic(alpha=1.0, beta=1.0, num_clients=num_clients, max_samples_per_client=5)
  generate_s = time.perf_counter() - start
  data = jax.block_until_ready(jax.device_put(data))
  model = fj.models.get("mlp", num_classes=data.num_classes)
  algo = fedspa(model, local_epochs=1, rounds=rounds + 1)
  state, init_s = timed(algo.init, jax.random.key(0), data)
  state, first_s = warm_up(algo, state, data)
  state, _, elapsed = run_rounds(algo, state, data, rounds)
  evaluation, evaluate_first_s = timed(algo.evaluate, state, data)
  _, evaluate_s = timed(algo.evaluate, state, data)
  return dict(num_clients=num_clients, samples=data.train.total + data.test.total, generate_s=generate_s,
              init_s=init_s, first_s=first_s, round_s=elapsed / rounds, evaluate_first_s=evaluate_first_s,
              evaluate_s=evaluate_s, evaluated=int(evaluation["evaluated"]), store_bytes=tree_bytes(state.clients),
              data_bytes=tree_bytes(data))




def in_subprocess(section: str, env: dict | None = None, **kwargs) -> dict:
  """Runs `ONE[section](**kwargs)` in a fresh Python process (with `env` added); its result plus its peak RSS."""
  request = json.dumps({"section": section, **kwargs})
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", request], capture_output=True, text=True,
                        env={**os.environ, **(env or {})})
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr)
    raise RuntimeError(f"the subprocess for {request} failed with exit code {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one(request: str) -> None:
  kwargs = json.loads(request)
  result = ONE[kwargs.pop("section")](**kwargs)
  print(json.dumps({**result, "peak_rss_bytes": peak_rss_bytes()}), flush=True)


# ---- sections: each returns its Markdown --------------------------------------------------------------------------


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def collective_bytes(hlo: str) -> dict[str, int]:
  """Per-device bytes of every collective's result in compiled (partitioned) HLO text, by collective kind."""
  found: dict[str, int] = {}
  for line in hlo.splitlines():
    if " = " not in line:
      continue
    rhs = line.split(" = ", 1)[1]
    for kind in COLLECTIVES:
      match = re.search(rf"\s{kind}(-start)?\(", rhs)
      if match:
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", rhs[: match.start()])
        size = sum(DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in shapes)
        found[kind] = found.get(kind, 0) + size
        break
  return found


def one_shard(num_clients: int, rounds: int, local_steps: int, cohort: int) -> dict:
  """FedSpa LeNet-5 on K Fashion-MNIST (iid) clients: 1 device against the population sharded over all devices."""
  from fedspa_jax import population

  host = load_fashion_mnist(num_clients, "iid")
  model = fj.models.get("lenet5", num_classes=host.num_classes)
  mesh = fj.round.make_client_mesh()
  common = dict(local_steps=local_steps, local_epochs=None, rounds=rounds + 1, clients_per_round=cohort)
  variants = {"1 device": fedspa(model, **common),
              "uniform": fedspa(model, mesh=mesh, **common),
              "stratified": fedspa(model, mesh=mesh, cohort_sampling="stratified", **common)}
  out = {}
  for name, algo in variants.items():
    log(f"shard: {name}")
    data = algo.place(host)
    state = jax.block_until_ready(algo.init(jax.random.key(0), data))
    per_device = lambda tree: max(population.per_device_bytes(tree).values())
    start = time.perf_counter()
    traffic = collective_bytes(algo.round.lower(state, data).compile().as_text())
    compile_s = time.perf_counter() - start
    state, first_s = warm_up(algo, state, data)
    state, history, elapsed = run_rounds(algo, state, data, rounds)
    out[name] = dict(store_total=tree_bytes(state.clients), store_device=per_device(state.clients),
                     data_device=per_device(data), compile_s=compile_s, first_s=first_s, round_s=elapsed / rounds, traffic=traffic,
                     samples=total(history, "samples") / rounds)
  return {"variants": out, "devices": jax.device_count()}


def section_shard(sizes: dict) -> list[str]:
  devices, k, cohort = 8, sizes["shard_clients"], sizes["shard_cohort"]
  rounds, steps = sizes["shard_rounds"], sizes["scale_steps"]
  result = in_subprocess("shard", env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
                         num_clients=k, rounds=rounds, local_steps=steps, cohort=cohort)
  v = result["variants"]
  one = v["1 device"]
  lines = [
      f"### The population sharded over {devices} devices",
      "",
      f"FedSpa (density 0.5), LeNet-5, Fashion-MNIST iid, K = {k:,} clients, {cohort} per round, {steps} local steps "
      f"at batch 32, on {devices} forced XLA CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{devices}`; they share this machine's cores, so s/round shows the overhead of the sharded program, not a "
      "speed-up). `1 device`: no mesh. `uniform` and `stratified`: `mesh=make_client_mesh()` with that "
      "`cohort_sampling`. Per-device bytes: the largest of the devices' shards. Collective bytes: the per-device "
      "result sizes of every collective in the compiled round (its partitioned HLO), summed by kind.",
      "",
      "| placement | store per device | store total | data per device | compile (s) | s/round | "
      "collective bytes per round and device |",
      "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for name, r in v.items():
    traffic = ", ".join(f"{kind} {format_bytes(n)}" for kind, n in sorted(r["traffic"].items())) or "none"
    lines.append(f"| {name} | {format_bytes(r['store_device'])} | {format_bytes(r['store_total'])} | "
                 f"{format_bytes(r['data_device'])} | {r['compile_s']:.1f} | {r['round_s']:.3f} | {traffic} |")
  share = v["uniform"]["store_device"] / one["store_device"]
  padded = -(-k // devices) * devices
  lines += ["", f"Store per device / 1-device store: {share:.4f} (target: 1/{devices} plus padding = "
                f"{padded / k / devices:.4f}: {verdict(share <= padded / k / devices + 1e-9)})."]
  return lines


def section_scale(sizes: dict) -> list[str]:
  rounds, steps = sizes["scale_rounds"], sizes["scale_steps"]
  lines = [
      "### Clients: K from 100 to 60,000",
      "",
      f"FedSpa (density 0.5), LeNet-5, Fashion-MNIST iid, 10 clients per round, {steps} local steps at batch 32 "
      f"(the same work per round at every K), s/round over {rounds} rounds after a warm-up round. Each K runs in its "
      "own process: peak RSS is that process's (JAX, data, state, compiled round). Load = read the IDX files, "
      "partition (no cache), copy to the device; init = `algo.init` until the state is ready (its compilation "
      "and drawing K clients' masks included).",
      "",
      "| K | load (s) | init (s) | compile + 1st round (s) | s/round | peak RSS | peak RSS after load, init | "
      "client store | data |",
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  results = []
  for k in sizes["scale_clients"]:
    log(f"scale: K = {k:,}")
    r = in_subprocess("scale", num_clients=k, rounds=rounds, local_steps=steps)
    results.append(r)
    lines.append(f"| {k:,} | {r['load_s']:.2f} | {r['init_s']:.2f} | {r['first_s']:.1f} | {r['round_s']:.3f} | "
                 f"{format_bytes(r['peak_rss_bytes'])} | {format_bytes(r['rss_load'])}, "
                 f"{format_bytes(r['rss_init'])} | {format_bytes(r['store_bytes'])} | "
                 f"{format_bytes(r['data_bytes'])} |")
  smallest, largest = results[0], results[-1]
  ratio = largest["round_s"] / smallest["round_s"]
  lines += ["", f"s/round at K = {largest['num_clients']:,} / at K = {smallest['num_clients']:,}: {ratio:.2f}x "
                f"(target <= 1.3x: {verdict(ratio <= 1.3)})."]
  for r in results:
    if r["num_clients"] == 60_000:
      rss = r["peak_rss_bytes"]
      lines.append(f"Peak RSS at K = 60,000: {format_bytes(rss)} (target <= 2 GiB: {verdict(rss <= 2 * GIB)}).")
  return lines


def section_million(sizes: dict) -> list[str]:
  k, rounds = sizes["million_clients"], sizes["million_rounds"]
  log(f"million: K = {k:,}")
  r = in_subprocess("million", num_clients=k, rounds=rounds)
  rss = r["peak_rss_bytes"]
  return [
      f"### {k:,} clients",
      "",
      f"Synthetic(1, 1) (60 features, 10 classes, at most 5 samples per client: 4 train, 1 test), MLP (one hidden "
      f"layer of 64), FedSpa (density 0.5), 10 clients per round, 1 local epoch at batch 32; s/round over {rounds} "
      "rounds after a warm-up round; then `algo.evaluate(state, data)` over every client, twice (the first call "
      "compiles). One process; peak RSS is its own.",
      "",
      "| quantity | value |",
      "| --- | ---: |",
      f"| clients | {r['num_clients']:,} |",
      f"| samples (train + test) | {r['samples']:,} |",
      f"| data generation (s) | {r['generate_s']:.1f} |",
      f"| init (s) | {r['init_s']:.2f} |",
      f"| compile + 1st round (s) | {r['first_s']:.1f} |",
      f"| s/round | {r['round_s']:.4f} |",
      f"| evaluate all, 1st call incl. compile (s) | {r['evaluate_first_s']:.1f} |",
      f"| evaluate all (s) | {r['evaluate_s']:.1f} |",
      f"| clients evaluated | {r['evaluated']:,} |",
      f"| client store | {format_bytes(r['store_bytes'])} |",
      f"| data on the device | {format_bytes(r['data_bytes'])} |",
      f"| peak RSS | {format_bytes(rss)} |",
      "",
      f"Peak RSS {format_bytes(rss)} (target <= 16 GiB: {verdict(rss <= 16 * GIB)}).",
  ]


def cohort_label(cohort_batch: int | None) -> str:
  return "None (one vmapped group)" if cohort_batch is None else f"{cohort_batch}"


def section_skew(sizes: dict) -> list[str]:
  blocks, rounds = sizes["skew_blocks"], sizes["skew_rounds"]
  partitions = {
      "pathological": dict(classes_per_client=2),
      "dirichlet": dict(alpha=0.1),
  }
  datasets = {p: jax.device_put(load_fashion_mnist(100, p, **args)) for p, args in partitions.items()}
  model = fj.models.get("lenet5", num_classes=10)
  configs = [(p, cb) for cb in sizes["skew_cohort_batches"] for p in partitions]
  algos, states, compile_s = {}, {}, {}
  for c in configs:
    partition, cohort_batch = c
    log(f"skew: compiling {partition}, cohort_batch {cohort_batch}")
    algos[c] = fedspa(model, local_epochs=1, rounds=blocks * rounds + 1, cohort_batch=cohort_batch)
    states[c] = algos[c].init(jax.random.key(0), datasets[partition])
    states[c], compile_s[c] = warm_up(algos[c], states[c], datasets[partition])
  samples = {c: 0 for c in configs}
  seconds = {c: 0.0 for c in configs}
  for block in range(blocks):
    log(f"skew: block {block + 1} of {blocks}")
    for c in configs[block % len(configs):] + configs[: block % len(configs)]:  # rotate: no fixed position
      states[c], history, elapsed = run_rounds(algos[c], states[c], datasets[c[0]], rounds)
      samples[c] += total(history, "samples")
      seconds[c] += elapsed
  rate = {c: samples[c] / seconds[c] for c in configs}
  lines = [
      "### Skewed client sizes",
      "",
      "FedSpa (density 0.5), LeNet-5, Fashion-MNIST, 100 clients, 10 per round, 1 local epoch at batch 32. "
      "Pathological: 2 classes and 600 samples per client; dirichlet: alpha 0.1, so client sizes are very uneven. "
      f"Every configuration runs the same sequence of rounds, in {blocks} interleaved blocks of {rounds} rounds "
      "(compilation excluded). Useful samples/s = samples the clients trained on (`metrics[\"samples\"]`, no "
      "padding) per second.",
      "",
      "| partition | cohort_batch | compile + 1st round (s) | samples/round | s/round | useful samples/s |",
      "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for c in configs:
    n = blocks * rounds
    lines.append(f"| {c[0]} | {cohort_label(c[1])} | {compile_s[c]:.1f} | {samples[c] / n:,.0f} | "
                 f"{seconds[c] / n:.3f} | {rate[c]:,.0f} |")
  lines.append("")
  for cohort_batch in sizes["skew_cohort_batches"]:
    ratio = rate[("dirichlet", cohort_batch)] / rate[("pathological", cohort_batch)]
    lines.append(f"- cohort_batch {cohort_label(cohort_batch)}: dirichlet / pathological = {ratio:.2f} "
                 f"(target >= 0.75: {verdict(ratio >= 0.75)})")
  return lines


def make_torch_lenet5(torch):
  """fedspa's LeNet-5 (models/lenet.py) in PyTorch: 28x28 inputs zero-padded to 32x32 by conv1, pool, then ReLU."""
  nn = torch.nn
  return nn.Sequential(
      nn.Conv2d(1, 6, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
      nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
      nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
  )


def torch_round(torch, global_model, x, y, offset, count, clients, batch_size: int, lr: float) -> int:
  """One FedAvg-style round, client after client: a fresh copy of the model, 1 epoch of SGD, the mean update applied.

  Returns the number of samples trained on.
  """
  functional = torch.nn.functional
  updates, samples = [], 0
  for k in clients:
    model = copy.deepcopy(global_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    xs, ys = x[offset[k] : offset[k] + count[k]], y[offset[k] : offset[k] + count[k]]
    order = torch.randperm(len(ys))
    for i in range(0, len(ys), batch_size):
      batch = order[i : i + batch_size]
      optimizer.zero_grad()
      functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
      optimizer.step()
    samples += len(ys)
    updates.append([p.detach() for p in model.parameters()])
  with torch.no_grad():
    for i, p in enumerate(global_model.parameters()):
      p.copy_(torch.stack([u[i] for u in updates]).mean(0))
  return samples


def one_torch(blocks: int, rounds: int) -> dict:
  """JAX FedSpa on 1 device, FedSpa with the cohort sharded over every host device, and the torch loop, interleaved."""
  import torch

  torch.set_num_threads(2)
  torch.manual_seed(0)
  host = load_fashion_mnist(100, "pathological", classes_per_client=2)
  model = fj.models.get("lenet5", num_classes=10)
  variants = {"one": fedspa(model, local_epochs=1, rounds=blocks * rounds + 1),
              "sharded": fedspa(model, local_epochs=1, rounds=blocks * rounds + 1, mesh=fj.round.make_client_mesh())}
  runs, compile_s = {}, {}
  for name, algo in variants.items():
    data = algo.place(host)
    state = algo.init(jax.random.key(0), data)
    state, compile_s[name] = warm_up(algo, state, data)
    runs[name] = [algo, state, data]

  # The same samples for torch, normalised once up front (NCHW float32), as a torch Dataset would hold them.
  train = host.train
  mean, std = np.asarray(host.mean, np.float32), np.asarray(host.std, np.float32)
  x = torch.from_numpy(np.ascontiguousarray(((train.x / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)))
  y = torch.from_numpy(np.asarray(train.y, np.int64))
  offset, count = np.asarray(train.offset).tolist(), np.asarray(train.count).tolist()
  torch_model = make_torch_lenet5(torch)
  jax_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(runs["one"][1].server.params))
  torch_params = sum(p.numel() for p in torch_model.parameters())
  if jax_params != torch_params:
    raise AssertionError(f"torch LeNet-5 has {torch_params} parameters, fedspa's {jax_params}")
  rng = np.random.default_rng(0)
  draw = lambda: rng.choice(train.num_clients, 10, replace=False)

  def torch_block() -> tuple[int, float]:
    start = time.perf_counter()
    samples = sum(torch_round(torch, torch_model, x, y, offset, count, draw(), 32, 0.05) for _ in range(rounds))
    return samples, time.perf_counter() - start

  torch_block()  # warm-up: allocator, OpenMP threads
  rates = {"one": [], "sharded": [], "torch": []}
  for block in range(blocks):
    print(f"[bench_scale] torch: block {block + 1} of {blocks}", file=sys.stderr, flush=True)
    for name, run in runs.items():
      algo, state, data = run
      run[1], history, elapsed = run_rounds(algo, state, data, rounds)
      rates[name].append(total(history, "samples") / elapsed)
    samples, elapsed = torch_block()
    rates["torch"].append(samples / elapsed)
  return {"rates": rates, "compile_s": compile_s, "devices": jax.device_count(), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "params": torch_params}


def section_torch(sizes: dict) -> list[str]:
  try:
    import torch  # noqa: F401
  except ImportError:
    message = ('PyTorch is not installed; skipped. Install it with `.venv/bin/python -m pip install -e ".[bench]"` '
               "(or `pip install torch`).")
    log(message)
    return ["### FedSpa round against a PyTorch client loop", "", message]
  cores = os.cpu_count() or 1
  # One XLA CPU device per core (set before JAX starts, so in a subprocess): the sharded variant trains one client
  # per core at a time, where a single device runs the small LeNet-5 kernels on one core at a time.
  result = in_subprocess("torch", env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={cores}"},
                         blocks=sizes["torch_blocks"], rounds=sizes["torch_rounds"])
  rates = result["rates"]
  median = {name: statistics.median(values) for name, values in rates.items()}
  ratio = {name: median[name] / median["torch"] for name in ("one", "sharded")}
  row = lambda label, name, compile_s: (
      f"| {label} | {compile_s} | {median[name]:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[name])} |")
  return [
      "### FedSpa round against a PyTorch client loop",
      "",
      "Fashion-MNIST, 100 clients (pathological, 2 classes, 600 samples each), 10 clients per round, 1 local epoch "
      "of SGD at batch 32 (lr 0.05), LeNet-5. JAX: the whole FedSpa round (density 0.5: masked training, the dense "
      "gradient batch and mask update, aggregation), one compiled program, either on one XLA CPU device or with the "
      f"population sharded over {result['devices']} XLA CPU devices, one per core "
      f"(`XLA_FLAGS=--xla_force_host_platform_device_count={result['devices']}` and `shard_clients=true`: each "
      "device trains its share of the cohort, one client at a time). PyTorch "
      f"{result['torch']} ({result['torch_threads']} threads): a sequential loop over the 10 clients, each a fresh "
      f"copy of the same dense LeNet-5 ({result['params']:,} parameters) trained for 1 epoch over its own 600 samples "
      "(already normalised float tensors), then the mean of the models. All three interleaved in one process: "
      f"{sizes['torch_blocks']} blocks of {sizes['torch_rounds']} rounds of each; medians over the blocks.",
      "",
      "| implementation | compile (s) | samples/s (median) | per block |",
      "| --- | ---: | ---: | --- |",
      row("fedspa-jax FedSpa round, 1 device", "one", f"{result['compile_s']['one']:.1f}"),
      row(f"fedspa-jax FedSpa round, {result['devices']} CPU devices", "sharded",
          f"{result['compile_s']['sharded']:.1f}"),
      row("PyTorch dense loop", "torch", "-"),
      "",
      f"JAX / torch = {ratio['sharded']:.2f} with one device per core (target >= 1.0: "
      f"{verdict(ratio['sharded'] >= 1.0)}); {ratio['one']:.2f} on one device.",
  ]


ONE = {"scale": one_scale, "million": one_million, "torch": one_torch, "shard": one_shard}
RUN = {"shard": section_shard, "scale": section_scale, "million": section_million, "skew": section_skew, "torch": section_torch}


# ---- the report ---------------------------------------------------------------------------------------------------


def load_average() -> str:
  try:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write_docs(path: str, block: str) -> None:
  """Puts `block` between the bench_scale markers of `path`, or appends it with the markers."""
  with open(path) as f:
    text = f.read()
  marked = f"{BEGIN}\n{block.rstrip()}\n{END}"
  pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
  if pattern.search(text):
    text = pattern.sub(lambda _: marked, text)
  else:
    text = text.rstrip("\n") + "\n\n" + marked + "\n"
  with open(path, "w") as f:
    f.write(text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script, not a benchmark")
  parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
  parser.add_argument("--docs", default=DOCS, help=argparse.SUPPRESS)
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement in this subprocess, JSON out
  args = parser.parse_args(argv)
  if args.one:
    run_one(args.one)
    return

  sizes = QUICK if args.quick else FULL
  given = sys.argv[1:] if argv is None else argv
  command = " ".join([".venv/bin/python scripts/bench_scale.py", *map(shlex.quote, given)])
  load_start = load_average()
  outputs = []
  for name in args.sections:
    lines = RUN[name](sizes)
    print("\n".join(lines) + "\n", flush=True)
    outputs.append("\n".join(lines))
  load_end = load_average()
  header = [
      "## Scale: clients, skewed sizes, PyTorch",
      "",
      "```bash",
      command,
      "```",
      "",
      f"Machine: {jax.devices()[0].platform} `{bench_models.cpu_model()}`, {os.cpu_count()} cores, "
      f"{format_bytes(memory_bytes())}; JAX {jax.__version__}; {datetime.date.today()}. "
      f"Load average (1, 5, 15 min): {load_start} at start, {load_end} at end."
      + (" **--quick smoke run: sizes too small to mean anything.**" if args.quick else ""),
  ]
  print(header[-1])
  if args.write_docs:
    write_docs(args.docs, "\n\n".join(["\n".join(header), *outputs]))
    log(f"wrote {args.docs}")


if __name__ == "__main__":
  main()
