"""One client's masked local training over its rows of the flat (ragged) data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedspa_jax import masks
from fedspa_jax.algorithms.base import make_apply_fn
from fedspa_jax.client import ClientData, draw_batch, local_train, num_local_steps
from fedspa_jax.evaluation import evaluate_client
from fedspa_jax.models import MLP
from fedspa_jax.permute import permute

MODEL = MLP(num_classes=4, hidden=(16,))
APPLY = make_apply_fn(MODEL)


def make_data(n, before=0, after=0, key=0, fill=0.0):
  """A client with `n` samples at rows before..before+n of a flat split whose other rows hold `fill`."""
  k1, k2 = jax.random.split(jax.random.key(key))
  total = before + n + after
  x = jax.random.normal(k1, (total, 6))
  y = jax.random.randint(k2, (total,), 0, 4).astype(jnp.int32)
  mine = (jnp.arange(total) >= before) & (jnp.arange(total) < before + n)
  x = jnp.where(mine[:, None], x, fill)
  return ClientData(x=x, y=y, offset=jnp.int32(before), count=jnp.int32(n))


def alone(data):
  """The same client stored alone (offset 0, no other rows)."""
  start, n = int(data.offset), int(data.count)
  return ClientData(data.x[start : start + n], data.y[start : start + n], jnp.int32(0), jnp.int32(n))


@pytest.fixture(scope="module")
def params():
  return MODEL.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]


@pytest.mark.parametrize(
    "optimizer", [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adamw(0.01, weight_decay=0.1)]
)
def test_inactive_coordinates_stay_exactly_zero(params, optimizer):
  mask = masks.init_masks(jax.random.key(1), params, masks.uniform_densities(params, 0.3))
  x0 = masks.apply_mask(params, mask)
  result = local_train(
      x0, mask, make_data(40), jax.random.key(2), apply_fn=APPLY, optimizer=optimizer, batch_size=8,
      local_epochs=3,
  )
  for p, m in zip(jax.tree.leaves(result.params), jax.tree.leaves(mask)):
    assert bool(jnp.all(jnp.where(m, True, p == 0.0)))
  changed = [bool(jnp.any(p != p0)) for p, p0 in zip(jax.tree.leaves(result.params), jax.tree.leaves(x0))]
  assert any(changed)
  assert int(result.steps) == 15 and int(result.samples) == 120


def test_a_client_trains_on_exactly_its_own_rows(params):
  # 3 samples between rows of nan: the result equals the client stored alone, and is finite.
  data = make_data(3, before=5, after=7, fill=jnp.nan)
  kwargs = dict(apply_fn=APPLY, optimizer=optax.sgd(0.1), batch_size=4, local_epochs=2)
  a = local_train(params, None, data, jax.random.key(5), **kwargs)
  b = local_train(params, None, alone(data), jax.random.key(5), **kwargs)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a.params, b.params)
  assert int(a.samples) == int(b.samples) == 6
  assert int(a.steps) == 2  # one (partial) batch per epoch, no step past the data
  assert np.isfinite(float(a.loss))


@pytest.mark.parametrize("n", [1, 3, 8, 31, 32, 33, 100])
def test_each_epoch_visits_every_own_sample_once(n):
  # Labels hold the row index: an epoch's batches read the client's rows, each exactly once.
  before, batch = 11, 8
  x = jnp.zeros((before + n + 4, 1))
  data = ClientData(x, jnp.arange(before + n + 4, dtype=jnp.int32), jnp.int32(before), jnp.int32(n))
  per_epoch = -(-n // batch)
  for epoch in range(2):
    rows = []
    for s in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      _, y, w = draw_batch(data, jax.random.key(3), jnp.int32(s), batch)
      rows += [int(r) for r, keep in zip(y, w) if keep]
    assert sorted(rows) == list(range(before, before + n))


def test_permute_is_a_permutation_and_depends_on_the_key():
  for n in [1, 2, 5, 64, 1000, 4097]:
    out = np.asarray(permute(jnp.arange(n, dtype=jnp.int32), jnp.int32(n), jax.random.key(n)))
    assert sorted(out.tolist()) == list(range(n))
  a = permute(jnp.arange(1000, dtype=jnp.int32), jnp.int32(1000), jax.random.key(0))
  b = permute(jnp.arange(1000, dtype=jnp.int32), jnp.int32(1000), jax.random.key(1))
  assert np.mean(np.asarray(a) == np.asarray(b)) < 0.05
  assert np.mean(np.asarray(a) == np.arange(1000)) < 0.05  # not the identity


def test_evaluation_reads_only_own_rows(params):
  data = make_data(3, before=4, after=9, fill=jnp.nan)
  a = evaluate_client(APPLY, params, data, preprocess=lambda x: x, chunk_size=2)
  b = evaluate_client(APPLY, params, alone(data), preprocess=lambda x: x)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  np.testing.assert_allclose(a["accuracy"], b["accuracy"])
  own = alone(data)
  np.testing.assert_allclose(a["accuracy"], np.mean(np.argmax(APPLY(params, own.x), -1) == own.y))


def test_a_client_without_samples_does_no_work_and_has_no_accuracy(params):
  data = make_data(0, before=3, after=3, fill=jnp.nan)
  result = local_train(params, None, data, jax.random.key(0), apply_fn=APPLY, optimizer=optax.sgd(0.1),
                       batch_size=4, local_epochs=2)
  assert int(result.steps) == 0 and int(result.samples) == 0
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), result.params, params)
  ev = evaluate_client(APPLY, params, data, preprocess=lambda x: x)
  assert np.isnan(float(ev["accuracy"])) and int(ev["count"]) == 0


def test_fixed_local_steps_cycle_through_small_clients(params):
  result = local_train(
      params, None, make_data(5, after=15), jax.random.key(0), apply_fn=APPLY, optimizer=optax.sgd(0.1),
      batch_size=4, local_epochs=None, local_steps=7,
  )
  assert int(result.steps) == 7
  # 5 samples in batches of 4: epochs of 4 + 1 samples.
  assert int(result.samples) == 4 + 1 + 4 + 1 + 4 + 1 + 4


def test_num_local_steps():
  assert int(num_local_steps(100, 32, 2, None)) == 8
  assert int(num_local_steps(100, 32, 2, 5)) == 5
  assert int(num_local_steps(0, 32, 2, 5)) == 0
  assert int(num_local_steps(0, 32, 2, None)) == 0


def test_batches_mix_samples_evenly():
  # Over many keys, any two of a client's 12 samples share a batch of 4 about as often as chance (3/11) says.
  n, batch = 12, 4
  keys = jax.random.split(jax.random.key(0), 2000)
  positions = jax.jit(jax.vmap(lambda k: permute(jnp.arange(n, dtype=jnp.int32), jnp.int32(n), k)))(keys)
  group = np.empty((2000, n), int)
  group[np.arange(2000)[:, None], np.asarray(positions)] = np.arange(n)[None, :] // batch  # batch of each sample
  together = (group[:, :, None] == group[:, None, :]).mean(axis=0)[np.triu_indices(n, 1)]
  assert np.all(np.abs(together - 3 / 11) < 0.05), together  # sd ~0.01
