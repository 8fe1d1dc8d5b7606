"""A ready accelerator check: devices, compile times, samples/s of FedSpa and FedAvg rounds, a PyTorch loop, memory.

    bash scripts/accelerator_check.sh                      # on a GPU or TPU machine (target: under 5 min on one GPU)
    bash scripts/accelerator_check.sh --quick --allow-cpu  # tiny sizes on CPU (LeNet-5, 3 clients per round)
    bash scripts/accelerator_check.sh --models cnn --cohorts 1000 --algorithms fedspa   # one case

For LeNet-5 and the CNN (FedAvg's), FedSpa (density 0.5) and FedAvg, at 10, 100 and 1,000 clients per round on one
device, it prints: the round's compile time; samples/s of whole rounds (every sampled client's local training, mask
updates, aggregation; one compiled program each, `conv="auto"` and `cohort_batch="auto"`); the same clients trained
by a sequential PyTorch loop on the same GPU (`scripts/bench_scale.py`'s loop: a dense copy of the model per client,
1 epoch of SGD, the mean; skipped with a note without torch or CUDA; a sequential loop's rate does not depend on
how many clients a round has, so it times at most 100 of them); the program's memory (XLA's memory analysis) and
the device's peak memory so far (`memory_stats()`, "n/a" where the device has none); the share of the vmapped lanes
that train real samples (lanes = clients vmapped together x their group's most steps x batch, from the rounds'
per-client step and sample counts). Cases run smallest cohort first, so the device peak grows with them.

Checks, each printed PASS or FAIL; the exit status is 1 when one fails, else 0:
- an accelerator is found (`jax.default_backend()` is not "cpu"), unless `--allow-cpu`;
- every round's metrics (real clients) and the server model after the rounds are finite;
- samples/s is positive;
- on an accelerator, the round's program holds native convolutions (`stablehlo.convolution` in its lowering). On
  CPU `conv="auto"` picks the im2col convolution (no native ones), so there the check is skipped.
A case that raises (a compile error, out of memory) is a failed check; the other cases still run.

No data and no internet: the images are random 28x28x1 uint8 (Fashion-MNIST's shape), K = 1,000 clients whose
sizes are uniform in [64, 320] (skewed like a real partition, so the lane share means something). Where the whole
cohort does not fit in device memory (by the compiled program's memory analysis), the cohort runs in groups
(`cohort_batch`) that fit, and the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import inspect
import os
import sys
import time
import traceback

import jax
import numpy as np

import fedspa_jax as fj
from fedspa_jax.algorithms.base import resolve_cohort_batch
from fedspa_jax.data.federated import FederatedData, split_from_flat
from fedspa_jax.round import group_size_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale  # noqa: E402  (the sibling script's PyTorch client loop and LeNet-5)

MODELS = ("lenet5", "cnn")
ALGORITHMS = ("fedspa", "fedavg")


@dataclasses.dataclass(frozen=True)
class Sizes:
  clients: int           # K, the population
  models: tuple
  cohorts: tuple         # clients per round, one case each
  samples: tuple         # (fewest, most) samples per client, uniform in between
  batch_size: int
  rounds: int            # timed rounds per case, after one warm-up round
  torch_clients: int     # the PyTorch loop trains at most this many of a round's clients


FULL = Sizes(clients=1_000, models=MODELS, cohorts=(10, 100, 1_000), samples=(64, 320), batch_size=32, rounds=3,
             torch_clients=100)
# Two compiles (FedSpa and FedAvg, LeNet-5): the script's every step on tiny sizes.
QUICK = Sizes(clients=8, models=("lenet5",), cohorts=(3,), samples=(4, 20), batch_size=8, rounds=1, torch_clients=2)


def format_bytes(n: float | None) -> str:
  return "n/a" if n is None else bench_scale.format_bytes(n)


class Checks:
  """Every check's outcome, printed as it is made."""

  def __init__(self):
    self.passed, self.failed = 0, []

  def record(self, ok: bool, what: str) -> bool:
    print(f"  {'PASS' if ok else 'FAIL'}: {what}", flush=True)
    if ok:
      self.passed += 1
    else:
      self.failed.append(what)
    return ok

  def skip(self, what: str) -> None:
    print(f"  SKIP: {what}", flush=True)


def make_data(sizes: Sizes, seed: int = 0) -> FederatedData:
  """Random 28x28x1 images and labels; client sizes uniform in `sizes.samples`, test splits of 1/6 of that."""
  rng = np.random.default_rng(seed)
  low, high = sizes.samples

  def split(count):
    n = int(np.sum(count))
    return split_from_flat(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                           rng.integers(0, 10, n).astype(np.int32), count)

  count = rng.integers(low, high + 1, sizes.clients)
  return FederatedData(train=split(count), test=split(np.maximum(count // 6, 1)), num_classes=10,
                       name="random-28x28", mean=(0.286,), std=(0.353,))


def device_memory(device) -> dict:
  """The device's allocator statistics, {} where it has none (CPU)."""
  try:
    return dict(device.memory_stats() or {})
  except Exception:  # some backends raise instead of returning None
    return {}


def program_bytes(compiled) -> tuple[int | None, int | None]:
  """(arguments + outputs + temporaries - donated aliases, temporaries + outputs - aliases) of a compiled program."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None, None
  if m is None:
    return None, None
  new = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return m.argument_size_in_bytes + new, new


def native_convolutions(lowered) -> int:
  """How many native convolutions the lowered program holds."""
  return lowered.as_text().count("stablehlo.convolution")


def real_lane_share(metrics: list[dict], group: int, batch_size: int, num_clients: int) -> float:
  """Samples trained / lane slots run: each group of `group` vmapped clients runs its most steps in every lane.

  The round orders the (padded) cohort largest first and runs consecutive groups, so the metrics' per-client
  `steps` [padded cohort], in that order, give each group's lanes.
  """
  samples = lanes = 0
  for m in metrics:
    steps = np.asarray(m["steps"]).reshape(-1, group)
    lanes += int(np.sum(steps.max(axis=1))) * group * batch_size
    samples += int(np.sum(np.where(np.asarray(m["cohort"]) < num_clients, np.asarray(m["samples"]), 0)))
  return samples / max(lanes, 1)


def non_finite(metrics: list[dict], params, num_clients: int) -> list[str]:
  """Names of the float metrics (real clients) and of the server model that hold a NaN or an infinity."""
  bad = set()
  for m in metrics:
    real = np.asarray(m["cohort"]) < num_clients
    for key, value in m.items():
      value = np.asarray(value)
      if not np.issubdtype(value.dtype, np.floating):
        continue
      if value.shape[:1] == real.shape:
        value = value[real]
      if not np.all(np.isfinite(value)):
        bad.add(f"metric {key!r}")
  if not all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(params)):
    bad.add("server model")
  return sorted(bad)


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def build(name: str, model_name: str, cohort: int, cohort_batch, sizes: Sizes, lr: float):
  model = fj.models.get(model_name, num_classes=10)
  hparams = dict(density=0.5) if name == "fedspa" else {}
  return fj.algorithms.get(name, model=model, clients_per_round=cohort, local_epochs=1, batch_size=sizes.batch_size,
                           lr=lr, rounds=sizes.rounds + 2, cohort_batch=cohort_batch, **hparams)


def vmapped_group(cohort: int, cohort_batch) -> int:
  """Clients vmapped together in the round's program, with "auto" resolved as the algorithms do on this backend."""
  # resolve_cohort_batch takes the target platform once the export work of issue 19 lands; before, only the choice.
  with_platform = "platform" in inspect.signature(resolve_cohort_batch).parameters
  resolved = resolve_cohort_batch(cohort_batch, jax.default_backend()) if with_platform else (
      resolve_cohort_batch(cohort_batch))
  return group_size_for(cohort, resolved)


def smaller_group(group: int, needs: int | None, stats: dict) -> int | None:
  """Clients to vmap together when `group` of them need `needs` bytes beyond the arguments; None when they fit.

  They fit within 90% of the device's free memory (`stats`: its `memory_stats()`), or when either is unknown. Else
  the group shrinks in proportion to 80% of the free memory, at least by half.
  """
  if group == 1 or needs is None or "bytes_limit" not in stats:
    return None
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  if needs <= 0.9 * free:
    return None
  return max(1, min(group // 2, int(group * 0.8 * free / needs)))


def compile_case(name: str, model_name: str, cohort: int, data, sizes: Sizes, lr: float, device):
  """Builds, initialises and compiles one case, with the cohort in groups that fit in device memory.

  Returns (state, compiled, lowered, compile seconds, group, note).
  """
  cohort_batch, note = "auto", ""
  while True:
    algo = build(name, model_name, cohort, cohort_batch, sizes, lr)
    state = algo.init(jax.random.key(0), data)
    start = time.perf_counter()
    lowered = algo.round.lower(state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    group = vmapped_group(cohort, cohort_batch)
    stats = device_memory(device)
    _, needs = program_bytes(compiled)
    smaller = smaller_group(group, needs, stats)
    if smaller is None:
      return state, compiled, lowered, compile_s, group, note
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    note = (f"{group} clients vmapped need {format_bytes(needs)} of {format_bytes(free)} free device memory: "
            f"cohort_batch={smaller}")
    print(f"  {note}", flush=True)
    cohort_batch = smaller


def torch_rate(torch, torch_device, model_name: str, host: FederatedData, clients, sizes: Sizes, lr: float,
               jax_params) -> float:
  """Samples/s of bench_scale's sequential PyTorch loop training `clients` on `torch_device`."""
  model = TORCH_MODELS[model_name](torch).to(torch_device)
  ours, theirs = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(jax_params)), sum(
      p.numel() for p in model.parameters())
  if ours != theirs:
    raise AssertionError(f"the torch {model_name} has {theirs} parameters, fedspa-jax's {ours}")
  train = host.train
  mean, std = np.asarray(host.mean, np.float32), np.asarray(host.std, np.float32)
  x = torch.from_numpy(np.ascontiguousarray(((train.x / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)))
  x, y = x.to(torch_device), torch.from_numpy(np.asarray(train.y, np.int64)).to(torch_device)
  offset, count = np.asarray(train.offset).tolist(), np.asarray(train.count).tolist()
  run = lambda ids: bench_scale.torch_round(torch, model, x, y, offset, count, ids, sizes.batch_size, lr)
  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
  run(clients[:1])  # warm-up: cuDNN, the allocator
  sync()
  start = time.perf_counter()
  samples = run(clients)
  sync()
  return samples / (time.perf_counter() - start)


def make_torch_cnn(torch):
  """fedspa-jax's CNN (models/cnn.py, VALID padding) in PyTorch: conv 5x5x32, pool, conv 5x5x64, pool, 512, head."""
  nn = torch.nn
  return nn.Sequential(
      nn.Conv2d(1, 32, 5), nn.MaxPool2d(2), nn.ReLU(),
      nn.Conv2d(32, 64, 5), nn.MaxPool2d(2), nn.ReLU(),
      nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10),
  )


TORCH_MODELS = {"lenet5": bench_scale.make_torch_lenet5, "cnn": make_torch_cnn}


def find_torch(torch_device: str):
  """(torch, None) where it can run on `torch_device`, else (None, why it is skipped)."""
  try:
    import torch
  except ImportError:
    return None, 'PyTorch is not installed (the "bench" extra: pip install -e ".[bench]")'
  if torch_device == "cuda" and not torch.cuda.is_available():
    return None, f"PyTorch {torch.__version__} has no CUDA device here"
  return torch, None


def print_devices() -> None:
  devices = jax.devices()
  print(f"JAX {jax.__version__} (jaxlib {importlib.metadata.version('jaxlib')}), backend {jax.default_backend()}, "
        f"{jax.process_count()} process(es), {len(devices)} device(s):")
  for d in devices:
    limit = device_memory(d).get("bytes_limit")
    print(f"  {d.id}: {d.platform} {d.device_kind}" + (f", {format_bytes(limit)} for JAX" if limit else ""))


def run_case(name, model_name, cohort, data, host, sizes, args, checks, torch, device, row):
  """One (algorithm, model, cohort) case: compile, time, check; fills `row`."""
  label = f"{model_name} {name} S={cohort}"
  state, compiled, lowered, compile_s, group, note = compile_case(name, model_name, cohort, data, sizes, args.lr,
                                                                  device)
  convs = native_convolutions(lowered)
  total_bytes, _ = program_bytes(compiled)
  state, _ = compiled(state, data)  # warm-up round
  jax.block_until_ready(state)
  history = []
  start = time.perf_counter()
  for _ in range(sizes.rounds):
    state, metrics = compiled(state, data)  # the state is donated: only the returned one is used
    history.append(metrics)
  jax.block_until_ready((state, history))
  elapsed = time.perf_counter() - start
  history = jax.device_get(history)
  samples = sum(int(np.sum(m["samples"])) for m in history)
  rate = samples / elapsed
  share = real_lane_share(history, group, sizes.batch_size, data.num_clients)
  peak = device_memory(device).get("peak_bytes_in_use")
  row.update(compile_s=compile_s, rate=rate, share=share, group=group, program=total_bytes, peak=peak, note=note)
  print(f"  compile {compile_s:.1f} s; {sizes.rounds} rounds of {samples / sizes.rounds:,.0f} samples: "
        f"{rate:,.0f} samples/s; cohort_batch {group}: {share:.0%} of lanes real; program {format_bytes(total_bytes)}"
        f", device peak so far {format_bytes(peak)}; {convs} native convolutions", flush=True)
  bad = non_finite(history, state.server.params, data.num_clients)
  checks.record(not bad, f"{label}: metrics and model finite" + (f" (non-finite: {', '.join(bad)})" if bad else ""))
  checks.record(rate > 0, f"{label}: samples/s positive ({rate:,.0f})")
  if jax.default_backend() == "cpu":
    checks.skip(f"{label}: native convolutions ({convs}; on CPU conv=auto picks im2col)")
  else:
    checks.record(convs > 0, f"{label}: the {jax.default_backend()} program holds native convolutions ({convs})")
  if torch is not None and name == args.algorithms[-1]:  # once per model and cohort
    clients = np.random.default_rng(cohort).choice(data.num_clients, cohort, replace=False)
    clients = clients[: sizes.torch_clients].tolist()
    row["torch"] = torch_rate(torch, args.torch_device, model_name, host, clients, sizes, args.lr, state.server.params)
    print(f"  PyTorch sequential loop, {len(clients)} clients: {row['torch']:,.0f} samples/s", flush=True)
    if args.torch_device == "cuda":
      torch.cuda.empty_cache()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script, not a benchmark")
  parser.add_argument("--allow-cpu", action="store_true", help="run (and pass) without an accelerator")
  parser.add_argument("--models", nargs="+", choices=MODELS, help="default lenet5 cnn (quick: lenet5)")
  parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
  parser.add_argument("--cohorts", nargs="+", type=int, help="clients per round (default 10 100 1000; quick: 3)")
  parser.add_argument("--lr", type=float, default=0.05, help="the clients' SGD learning rate (default 0.05)")
  parser.add_argument("--torch-device", choices=("cuda", "cpu"), default="cuda",
                      help="where the PyTorch loop runs (default cuda, the GPU JAX uses; cpu: to test this script)")
  args = parser.parse_args(argv)
  sizes = QUICK if args.quick else FULL
  if args.models:
    sizes = dataclasses.replace(sizes, models=tuple(args.models))
  if args.cohorts:
    if min(args.cohorts) < 1 or max(args.cohorts) > sizes.clients:
      parser.error(f"--cohorts must be between 1 and {sizes.clients} clients")
    sizes = dataclasses.replace(sizes, cohorts=tuple(args.cohorts))

  start = time.perf_counter()
  print_devices()
  checks = Checks()
  backend = jax.default_backend()
  if backend == "cpu" and not args.allow_cpu:
    checks.record(False, "an accelerator is found: JAX sees only CPU devices. Install the jax for the chip "
                  '(pip install -e ".[cuda12]" on an NVIDIA GPU, ".[tpu]" on a TPU VM; docs/scaling.md), '
                  "or pass --allow-cpu")
    print("RESULT: FAIL (1 check failed)")
    return 1
  checks.record(True, f"an accelerator is found ({backend})" if backend != "cpu" else "CPU allowed (--allow-cpu)")

  torch, why = find_torch(args.torch_device)
  if torch is None:
    print(f"PyTorch comparison skipped: {why}.")
  else:
    where = torch.cuda.get_device_name(0) if args.torch_device == "cuda" else "CPU"
    print(f"PyTorch {torch.__version__} on {where}")
  device = jax.devices()[0]
  host = make_data(sizes)
  data = jax.device_put(host)
  print(f"data: {sizes.clients:,} clients of {sizes.samples[0]}-{sizes.samples[1]} random 28x28x1 images "
        f"({host.train.total:,} samples), batch {sizes.batch_size}, 1 local epoch, lr {args.lr}; "
        f"{sizes.rounds} timed rounds after 1 warm-up round")

  rows = []
  for cohort in sizes.cohorts:
    for model_name in sizes.models:
      for name in args.algorithms:
        row = dict(model=model_name, algorithm=name, cohort=cohort)
        rows.append(row)
        print(f"{model_name} {name}, {cohort:,} clients per round:", flush=True)
        try:
          run_case(name, model_name, cohort, data, host, sizes, args, checks, torch, device, row)
        except Exception as e:  # noqa: BLE001  (one failing case must not hide the others' results)
          traceback.print_exc(limit=3)
          kind = "out of device memory" if is_out_of_memory(e) else type(e).__name__
          checks.record(False, f"{model_name} {name} S={cohort} ran ({kind}: {str(e).splitlines()[0][:200]})")

  print_table(rows, torch is not None, sizes.torch_clients, args.torch_device)
  print(f"\ntotal {time.perf_counter() - start:.0f} s; checks: {checks.passed} passed, {len(checks.failed)} failed")
  if checks.failed:
    print(f"RESULT: FAIL ({len(checks.failed)} check(s) failed)")
    for what in checks.failed:
      print(f"  - {what}")
    return 1
  print("RESULT: PASS")
  return 0


def print_table(rows: list[dict], with_torch: bool, torch_clients: int, torch_device: str) -> None:
  fmt = lambda value, spec: "-" if value is None else format(value, spec)
  print("\n| model | algorithm | clients/round | cohort_batch | compile (s) | samples/s | PyTorch samples/s | "
        "real lanes | program memory | device peak so far |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  torch_rates = {(r["model"], r["cohort"]): r.get("torch") for r in rows}
  for r in rows:
    torch_rate_ = torch_rates.get((r["model"], r["cohort"])) if with_torch else None
    torch_cell = "skipped" if not with_torch else fmt(torch_rate_, ",.0f")
    print(f"| {r['model']} | {r['algorithm']} | {r['cohort']:,} | {fmt(r.get('group'), 'd')} | "
          f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('rate'), ',.0f')} | {torch_cell} | "
          f"{fmt(r.get('share'), '.0%')} | {format_bytes(r.get('program'))} | {format_bytes(r.get('peak'))} |")
  if with_torch:
    where = "the same GPU" if torch_device == "cuda" else "the CPU (--torch-device cpu)"
    print(f"\nPyTorch: bench_scale.py's dense sequential loop (FedAvg's work) over at most {torch_clients} of the "
          f"round's clients, on {where}.")


if __name__ == "__main__":
  sys.exit(main())
