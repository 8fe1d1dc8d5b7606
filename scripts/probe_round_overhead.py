"""Where a LeNet-5 round's time goes on CPU: a bare fori_loop of SGD steps against whole FedAvg/FedSpa rounds.

    .venv/bin/python scripts/probe_round_overhead.py

Prints samples/s of (1) 190 LeNet-5 SGD steps at batch 32 in one `fori_loop` with nothing around them, (2) the
FedAvg round, FedSpa (gradient regrowth) and FedSpa with random regrowth (10 clients x 600 Fashion-MNIST samples,
1 local epoch), (3) one client's `local_train`. Compilation excluded; run on a quiet machine.
"""
import time, jax, jax.numpy as jnp, numpy as np, optax, fedspa_jax as fj
from fedspa_jax.algorithms.base import make_apply_fn
data = fj.data.load("fashion_mnist", num_clients=100, partition="pathological", classes_per_client=2)
dd = jax.device_put(data)
model = fj.models.get("lenet5", num_classes=10)
apply = make_apply_fn(model)
params = model.init(jax.random.key(0), jnp.zeros((1,28,28,1)))["params"]
pre = fj.client.make_preprocess(data.mean, data.std)
opt = optax.sgd(0.05)
# 1) bare loop: 190 steps of fwd/bwd on fixed-size batches, fori_loop, sequential slices
@jax.jit
def bare(p, x, y):
  def step(i, p):
    xb = jax.lax.dynamic_slice_in_dim(x, (i % 180) * 32, 32); yb = jax.lax.dynamic_slice_in_dim(y, (i % 180) * 32, 32)
    g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, pre(xb)), yb).mean())(p)
    return jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
  return jax.lax.fori_loop(0, 190, step, p)
x, y = dd.train.x, dd.train.y
def t(f, *a, n=5):
  jax.block_until_ready(f(*a)); s=time.perf_counter()
  for _ in range(n): out = f(*a)
  jax.block_until_ready(out); return (time.perf_counter()-s)/n
tb = t(bare, params, x, y)
print(f"bare fori 190 steps: {tb:.3f}s -> {190*32/tb:,.0f} samples/s")
for name in ["fedavg", "fedspa"]:
  for extra in [{}, {"regrow": "random"}] if name == "fedspa" else [{}]:
    algo = fj.algorithms.get(name, model=model, clients_per_round=10, batch_size=32, lr=0.05, rounds=100, **extra)
    st = algo.init(jax.random.key(0), data)
    st, m = algo.round(st, dd); jax.block_until_ready(m)
    s = time.perf_counter(); n = 5
    for _ in range(n): st, m = algo.round(st, dd)
    jax.block_until_ready(st); el = (time.perf_counter()-s)/n
    print(f"{name} {extra}: {el:.3f}s/round -> {6000/el:,.0f} samples/s")
# 3) local_train alone for 1 client, 600 samples
from fedspa_jax.client import local_train, ClientData
lt = jax.jit(lambda p, k: local_train(p, None, ClientData(x, y, jnp.int32(0), jnp.int32(600)), k, apply_fn=apply, optimizer=opt, batch_size=32, preprocess=pre).params)
tl = t(lt, params, jax.random.key(0))
print(f"local_train 1 client 600 samples: {tl:.4f}s -> {600/tl:,.0f} samples/s")
