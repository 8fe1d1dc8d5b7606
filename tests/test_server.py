"""Aggregation rules against plain Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspa_jax.server import aggregate, aggregate_masked_mean, aggregate_mean

S = 5


@pytest.fixture(scope="module")
def cohort():
  keys = jax.random.split(jax.random.key(0), 4)
  masks = {"a": jax.random.bernoulli(keys[0], 0.4, (S, 6, 3)), "b": jnp.ones((S, 3), bool)}
  updates = {
      "a": jnp.where(masks["a"], jax.random.normal(keys[1], (S, 6, 3)), 0.0),
      "b": jax.random.normal(keys[2], (S, 3)),
  }
  weights = jnp.array([10.0, 3.0, 0.0, 7.0, 1.0])
  return updates, masks, weights


def loop_mean(updates, weights):
  out = {}
  for name, u in updates.items():
    total = np.zeros(u.shape[1:])
    for k in range(S):
      total += float(weights[k]) * np.asarray(u[k])
    out[name] = total / float(np.sum(weights))
  return out


def loop_masked_mean(updates, masks, weights):
  out = {}
  for name, u in updates.items():
    num, den = np.zeros(u.shape[1:]), np.zeros(u.shape[1:])
    for k in range(S):
      covered = np.asarray(masks[name][k])
      num += np.where(covered, float(weights[k]) * np.asarray(u[k]), 0.0)
      den += np.where(covered, float(weights[k]), 0.0)
    out[name] = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
  return out


@pytest.mark.parametrize("uniform", [False, True])
def test_mean_equals_loop(cohort, uniform):
  updates, _, weights = cohort
  if uniform:
    weights = (weights > 0).astype(jnp.float32)
  got = aggregate_mean(updates, weights)
  for name, expected in loop_mean(updates, weights).items():
    np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-7)


def test_masked_mean_equals_loop(cohort):
  updates, masks, weights = cohort
  got = aggregate_masked_mean(updates, masks, weights)
  for name, expected in loop_masked_mean(updates, masks, weights).items():
    np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-7)
  # Dense leaves: masked_mean is the mean.
  np.testing.assert_allclose(got["b"], aggregate_mean(updates, weights)["b"], rtol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "masked_mean"])
def test_weight_zero_client_changes_nothing(cohort, rule):
  updates, masks, weights = cohort
  real = np.asarray(weights) > 0
  take = lambda tree: jax.tree.map(lambda a: a[real], tree)
  with_pad = aggregate(rule, updates, masks, weights)
  without = aggregate(rule, take(updates), take(masks), weights[real])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), with_pad, without)


def test_all_weights_zero_gives_zero_update(cohort):
  updates, masks, _ = cohort
  zeros = jnp.zeros((S,))
  for rule in ("mean", "masked_mean"):
    out = aggregate(rule, updates, masks, zeros)
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(out))


def test_unknown_rule(cohort):
  updates, masks, weights = cohort
  with pytest.raises(ValueError, match="aggregation"):
    aggregate("median", updates, masks, weights)
