"""Throughput of vmapped masked client training for each model and convolution choice.

For every (model, conv, clients) it times one jitted call of: vmap over clients of lax.scan over `steps` SGD steps
whose gradients are masked by a fixed random bool mask (density 0.5 on kernels, 1-D leaves dense) with jnp.where.
It reports samples/s, the achieved training FLOP/s (dense training FLOPs from `fedspa_jax.models.flops`: the
masked step still computes densely) and MFU = achieved FLOP/s / this machine's measured float32 matmul FLOP/s.

  python scripts/bench_models.py                                   # every model, auto and xla, 1/10/50 clients
  python scripts/bench_models.py --models lenet5 --clients 10 --convs auto,xla --steps 10
  python scripts/bench_models.py --models cnn --clients 20 --batch 10 --engine   # the engine's client.local_train
  python scripts/bench_models.py --models cnn --clients 20 --batch 10 --cohort map:2  # lax.map, 2 clients at a time
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedspa_jax import models
from fedspa_jax.models import flops

SAMPLE_SHAPES = {"mlp": (28, 28, 1), "lenet5": (28, 28, 1), "cnn": (28, 28, 1), "cifar_cnn": (32, 32, 3),
                 "vgg11": (32, 32, 3), "resnet18": (32, 32, 3)}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_average() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def best_time(fn, *args, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return 2.0 * n**3 / best_time(matmul, a, b, repeats=repeats)


def random_masks(key: jax.Array, params, density: float):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  masks = [jax.random.uniform(k, p.shape) < density if p.ndim >= 2 else jnp.ones(p.shape, bool)
           for k, p in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, masks)


def over_cohort(client, cohort: str):
  """vmap the one-client function over the cohort, or (cohort="map:K") loop over it K clients at a time."""
  if cohort == "vmap":
    return jax.jit(jax.vmap(client))
  k = int(cohort.split(":")[1]) if ":" in cohort else 1
  return jax.jit(lambda *args: jax.lax.map(lambda a: client(*a), args, batch_size=k if k > 1 else None))


def make_minimal_train(model, lr: float, cohort: str = "vmap"):
  """clients' (params, mask, x [steps, B, ...], y [steps, B]) -> params, one masked SGD step per scan step."""

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def client(params, mask, xs, ys):
    def step(p, batch):
      grads = jax.grad(loss_fn)(p, *batch)
      return jax.tree.map(lambda w, m, g: w - lr * jnp.where(m, g, 0.0), p, mask, grads), None

    return jax.lax.scan(step, params, (xs, ys))[0]

  return over_cohort(client, cohort)


def make_engine_train(model, lr: float, batch: int, steps: int, cohort: str = "vmap"):
  """The same work through the engine's `fedspa_jax.client.local_train` (in-graph batch drawing, optax SGD)."""
  from fedspa_jax.client import ClientData, local_train

  apply_fn = lambda p, x: model.apply({"params": p}, x)

  def client(params, mask, xs, ys):
    x = xs.reshape((-1,) + xs.shape[2:])
    y = ys.reshape(-1)
    data = ClientData(x, y, jnp.asarray(y.shape[0], jnp.int32))
    return local_train(params, mask, data, jax.random.key(0), apply_fn=apply_fn, optimizer=optax.sgd(lr),
                       batch_size=batch, local_epochs=None, local_steps=steps).params

  return over_cohort(client, cohort)


def bench_one(name: str, conv: str, clients: int, batch: int, steps: int, repeats: int, engine: bool,
              cohort: str = "vmap"):
  sample_shape = SAMPLE_SHAPES[name]
  kw = {} if name == "mlp" else {"conv": conv}
  model = models.get(name, 10, **kw)
  x0 = jnp.zeros((1,) + sample_shape, jnp.float32)
  keys = jax.random.split(jax.random.key(0), clients)
  params = jax.vmap(lambda k: model.init(k, x0)["params"])(keys)
  masks = jax.vmap(lambda k: random_masks(k, jax.tree.map(lambda p: p[0], params), 0.5))(keys)
  xs = jax.random.normal(jax.random.key(1), (clients, steps, batch) + sample_shape, jnp.float32)
  ys = jax.random.randint(jax.random.key(2), (clients, steps, batch), 0, 10)
  if engine:
    train = make_engine_train(model, 0.01, batch, steps, cohort)
  else:
    train = make_minimal_train(model, 0.01, cohort)
  start = time.perf_counter()
  jax.block_until_ready(train(params, masks, xs, ys))
  first = time.perf_counter() - start
  seconds = best_time(train, params, masks, xs, ys, repeats=repeats)
  samples_per_s = clients * steps * batch / seconds
  train_flops = flops.training_flops(model, sample_shape).dense_per_sample
  return samples_per_s, samples_per_s * train_flops, first


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="lenet5,cnn,cifar_cnn,vgg11,resnet18")
  parser.add_argument("--convs", default="auto,xla", help="comma list of auto, im2col, xla")
  parser.add_argument("--clients", default="1,10,50")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="local steps per timed call")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls; the best is reported")
  parser.add_argument("--engine", action="store_true", help="train with fedspa_jax.client.local_train")
  parser.add_argument("--cohort", default="vmap",
                      help="vmap (the engine's way) or map:K (lax.map over clients, K at a time: better cache use on CPU)")
  args = parser.parse_args(argv)

  peak = matmul_flops_per_s()
  print(f"# date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"# machine: {os.cpu_count()} CPUs, {cpu_model()}; backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); jax {jax.__version__}")
  print(f"# load average before: {load_average()}")
  print(f"# measured float32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")
  print(f"# step: {'engine client.local_train' if args.engine else 'minimal masked SGD'}, batch {args.batch}, "
        f"{args.steps} steps per call, best of {args.repeats}, cohort {args.cohort}")
  print("| model | conv | clients | samples/s | train GFLOP/s | MFU | first call s |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name in args.models.split(","):
    for conv in args.convs.split(","):
      resolved = conv if name == "mlp" else models.conv.resolve_conv(conv)
      label = f"{conv} ({resolved})" if conv == "auto" else conv
      for clients in (int(c) for c in args.clients.split(",")):
        rate, achieved, first = bench_one(name, conv, clients, args.batch, args.steps, args.repeats, args.engine,
                                          args.cohort)
        print(f"| {name} | {label} | {clients} | {rate:,.0f} | {achieved / 1e9:.1f} | {achieved / peak:.1%} "
              f"| {first:.1f} |", flush=True)
  print(f"# load average after: {load_average()}")


if __name__ == "__main__":
  main()
