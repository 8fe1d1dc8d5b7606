"""One client's masked local training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedspa_jax import masks
from fedspa_jax.algorithms.base import make_apply_fn
from fedspa_jax.client import ClientData, local_train, num_local_steps
from fedspa_jax.evaluation import evaluate_client
from fedspa_jax.models import MLP

MODEL = MLP(num_classes=4, hidden=(16,))
APPLY = make_apply_fn(MODEL)


def make_data(n_valid, n_max, key=0, fill=0.0):
  k1, k2 = jax.random.split(jax.random.key(key))
  x = jax.random.normal(k1, (n_max, 6))
  y = jax.random.randint(k2, (n_max,), 0, 4)
  x = jnp.where(jnp.arange(n_max)[:, None] < n_valid, x, fill)
  return ClientData(x=x, y=y.astype(jnp.int32), count=jnp.int32(n_valid))


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
      x0, mask, make_data(40, 40), jax.random.key(2), apply_fn=APPLY, optimizer=optimizer, batch_size=8,
      local_epochs=3,
  )
  for p, m, p0 in zip(jax.tree.leaves(result.params), jax.tree.leaves(mask), jax.tree.leaves(x0)):
    assert bool(jnp.all(jnp.where(m, True, p == 0.0)))
  changed = [bool(jnp.any(p != p0)) for p, p0 in zip(jax.tree.leaves(result.params), jax.tree.leaves(x0))]
  assert any(changed)
  assert int(result.steps) == 15 and int(result.samples) == 120


def test_padding_never_enters_training(params):
  # A client with 3 samples padded to 10 with nan trains exactly as the same client stored without padding.
  padded = make_data(3, 10, fill=jnp.nan)
  exact = ClientData(padded.x[:3], padded.y[:3], jnp.int32(3))
  kwargs = dict(apply_fn=APPLY, optimizer=optax.sgd(0.1), batch_size=4, local_epochs=2)
  a = local_train(params, None, padded, jax.random.key(5), **kwargs)
  b = local_train(params, None, exact, jax.random.key(5), **kwargs)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a.params, b.params)
  assert int(a.samples) == int(b.samples) == 6
  assert int(a.steps) == 2  # of ceil(10 / 4) * 2 = 6 scan steps, only one per epoch holds data
  assert np.isfinite(float(a.loss))


def test_padding_never_enters_evaluation(params):
  padded = make_data(3, 10, fill=jnp.nan)
  exact = ClientData(padded.x[:3], padded.y[:3], jnp.int32(3))
  a = evaluate_client(APPLY, params, padded, preprocess=lambda x: x, chunk_size=4)
  b = evaluate_client(APPLY, params, exact, preprocess=lambda x: x)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  np.testing.assert_allclose(a["accuracy"], b["accuracy"])
  logits = APPLY(params, exact.x)
  np.testing.assert_allclose(a["accuracy"], np.mean(np.argmax(logits, -1) == exact.y))


def test_fixed_local_steps_cycle_through_small_clients(params):
  result = local_train(
      params, None, make_data(5, 20), jax.random.key(0), apply_fn=APPLY, optimizer=optax.sgd(0.1), batch_size=4,
      local_epochs=None, local_steps=7,
  )
  assert int(result.steps) == 7
  # 5 samples in batches of 4: epochs of 4 + 1 samples.
  assert int(result.samples) == 4 + 1 + 4 + 1 + 4 + 1 + 4


def test_num_local_steps():
  assert num_local_steps(100, 32, 2, None) == 8
  assert num_local_steps(100, 32, 2, 5) == 5
