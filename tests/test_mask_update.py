"""Prune-rate schedule and drop-and-grow: hand-checkable selections and exact counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspa_jax import masks
from fedspa_jax.mask_update import cosine_prune_rate, drop_and_grow, prune_and_regrow, select_smallest


def test_cosine_prune_rate_values():
  assert float(cosine_prune_rate(0, 0.5, 10)) == pytest.approx(0.5)
  assert float(cosine_prune_rate(5, 0.5, 10)) == pytest.approx(0.25)
  assert float(cosine_prune_rate(10, 0.5, 10)) == pytest.approx(0.0, abs=1e-7)
  assert float(cosine_prune_rate(11, 0.5, 10)) == 0.0
  assert float(cosine_prune_rate(jnp.int32(0), 0.2, 10)) == pytest.approx(0.2)


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_alpha_outside_unit_interval_is_rejected(alpha):
  with pytest.raises(ValueError, match="alpha"):
    cosine_prune_rate(0, alpha, 10)


@pytest.mark.parametrize("rate", [-0.01, 1.5, float("nan")])
def test_rate_outside_unit_interval_is_rejected(rate):
  params = {"w": jnp.ones((3, 3))}
  mask = masks.dense_mask(params)
  with pytest.raises(ValueError, match="prune rate"):
    prune_and_regrow(mask, params, params, rate, jax.random.key(0))


def test_drop_smallest_magnitudes_grow_largest_gradients():
  # Active: 0, 1, 2, 3 (|param| 0.5, 0.1, 3, 0.2); inactive: 4, 5, 6, 7.
  mask = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  param = jnp.array([0.5, -0.1, 3.0, 0.2, 0, 0, 0, 0])
  # rate 0.5 of 4 active -> drop 2: entries 1 and 3 (smallest |param|).
  # Candidates after drop: 1, 3, 4, 5, 6, 7; largest |grad| among them: 6 (9.0) and 1 (5.0). Entry 2 has the
  # largest gradient of all but is still active, so it cannot be grown.
  grad = jnp.array([0.0, 5.0, 100.0, 0.1, 1.0, -2.0, -9.0, 0.3])
  new = drop_and_grow(mask, param, jnp.abs(grad), jnp.float32(0.5))
  np.testing.assert_array_equal(new, np.array([1, 1, 1, 0, 0, 0, 1, 0], bool))


def test_drop_count_is_ceil_of_rate_times_active():
  mask = jnp.array([1, 1, 1, 0, 0, 0], bool)
  param = jnp.array([1.0, 2.0, 3.0, 0, 0, 0])
  grad = jnp.array([0.0, 0.0, 0.0, 3.0, 2.0, 1.0])
  # ceil(0.2 * 3) = 1: drop entry 0, grow entry 3.
  new = drop_and_grow(mask, param, jnp.abs(grad), jnp.float32(0.2))
  np.testing.assert_array_equal(new, np.array([0, 1, 1, 1, 0, 0], bool))
  # rate 0 changes nothing.
  np.testing.assert_array_equal(drop_and_grow(mask, param, jnp.abs(grad), jnp.float32(0.0)), mask)


def test_ties_break_by_index_without_a_tie_key():
  mask = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  param = jnp.array([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0])
  grad = jnp.array([0, 0, 0, 0, 1.0, 1.0, 1.0, 1.0])
  new = drop_and_grow(mask, param, grad, jnp.float32(0.5))
  np.testing.assert_array_equal(new, np.array([0, 0, 1, 1, 1, 1, 0, 0], bool))


@pytest.mark.parametrize("count", [0, 1, 7, 500, 999, 1000])
def test_random_ties_select_exact_counts_and_respect_the_order(count):
  rng = np.random.default_rng(count)
  keys = jnp.asarray(rng.integers(0, 5, size=1000), jnp.int32)  # five values: heavy ties
  chosen = np.asarray(select_smallest(keys, jnp.int32(count), jax.random.key(count)))
  assert chosen.sum() == count
  if 0 < count < 1000:
    keys = np.asarray(keys)
    assert keys[chosen].max() <= keys[~chosen].min()  # never a larger key before a smaller one


def test_zero_gradient_client_grows_a_uniformly_spread_set():
  # A client with no samples (or dead units) has an all-zero gradient: every candidate ties. Growth must not pile
  # into the first rows of the kernel, as an index tie-break would.
  rows, cols = 100, 20
  mask = masks.init_masks(jax.random.key(0), {"k": jnp.zeros((rows, cols))}, {"k": 0.3})["k"]
  param = jnp.where(mask, jax.random.normal(jax.random.key(1), (rows, cols)), 0.0)
  grad = jnp.zeros((rows, cols))
  update = jax.jit(lambda key: prune_and_regrow({"k": mask}, {"k": param}, {"k": grad}, 0.5, key)["k"])
  kept = reference_kept(mask, param, 0.5).reshape(rows, cols)  # the drop is by magnitude, not random
  grown_rows = []
  for seed in range(5):
    new = np.asarray(update(jax.random.key(seed)))
    assert new.sum() == int(mask.sum())  # counts exact
    assert (new & kept).sum() == kept.sum()
    grown = new & ~kept
    assert grown.sum() == int(np.ceil(0.5 * int(mask.sum())))
    grown_rows.append(np.nonzero(grown)[0])
  grown_rows = np.concatenate(grown_rows)
  # Spread over the rows as a uniform draw would be: each tenth of the rows holds about a tenth of the growth.
  per_block = np.bincount(grown_rows // 10, minlength=10)
  expected = len(grown_rows) / 10
  chi2 = np.sum((per_block - expected) ** 2 / expected)
  assert chi2 < 27.9, per_block  # the 0.999 quantile of chi-square with 9 degrees of freedom
  assert per_block[5:].sum() > 0.4 * len(grown_rows)
  # The index tie-break grows exactly the first inactive entries: all in the first rows.
  first = np.asarray(drop_and_grow(mask, param, grad, jnp.float32(0.5))) & ~kept
  assert np.nonzero(first)[0].max() < rows // 2
  # Different keys grow different sets; the same key the same set.
  a, b = np.asarray(update(jax.random.key(0))), np.asarray(update(jax.random.key(1)))
  assert (a != b).any() and (a == np.asarray(update(jax.random.key(0)))).all()


@pytest.mark.parametrize("regrow", ["gradient", "random"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_counts_preserved_over_many_updates(regrow, density):
  shapes = {"a": (20, 30), "b": (3, 3, 4, 8), "c": (64, 10), "bias": (10,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  densities = masks.erk_densities(params, density)
  mask = masks.init_masks(jax.random.key(0), params, densities)
  expected = masks.count_active(mask)
  update = jax.jit(lambda m, p, g, r, k: prune_and_regrow(m, p, g, r, k, regrow=regrow))
  key = jax.random.key(1)
  for t in range(25):
    key, k1, k2, k3 = jax.random.split(key, 4)
    p = masks.apply_mask(jax.tree.map(lambda x: jax.random.normal(k1, x.shape), params), mask)
    g = jax.tree.map(lambda x: jax.random.normal(k2, x.shape), params)
    rate = [0.0, 0.1, 0.5, 1.0][t % 4]
    new = update(mask, p, g, rate, k3)
    for name in shapes:
      assert int(jnp.sum(new[name])) == int(expected[name]), (name, t)
    assert bool(jnp.all(new["bias"]))
    mask = new
  assert update._cache_size() == 1  # the rate is traced: one program for every rate


def test_rate_one_can_replace_every_active_weight():
  mask = jnp.array([1, 1, 0, 0], bool)
  param = jnp.array([1.0, 2.0, 0, 0])
  grad = jnp.array([0.0, 0.0, 5.0, 4.0])
  np.testing.assert_array_equal(drop_and_grow(mask, param, grad, jnp.float32(1.0)), np.array([0, 0, 1, 1], bool))


def test_unknown_regrow_rule():
  params = {"w": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match="regrow"):
    prune_and_regrow(masks.dense_mask(params), params, params, 0.1, jax.random.key(0), regrow="magic")


def test_public_names_in_masks_module():
  import fedspa_jax as fj

  assert fj.masks.prune_and_regrow is prune_and_regrow
  assert fj.masks.cosine_prune_rate is cosine_prune_rate


def reference_kept(mask, param, rate):
  mask = np.asarray(mask).reshape(-1)
  param = np.abs(np.asarray(param).reshape(-1))
  count = min(int(np.ceil(np.float32(rate) * np.float32(mask.sum()))), int(mask.sum()))
  kept = mask.copy()
  kept[np.argsort(np.where(mask, param, np.inf), kind="stable")[:count]] = False
  return kept


def reference_drop_and_grow(mask, param, grow, rate):
  """numpy, stable argsort: the textbook definition the fast selection must match exactly."""
  mask = np.asarray(mask).reshape(-1)
  param, grow = np.abs(np.asarray(param).reshape(-1)), np.abs(np.asarray(grow).reshape(-1))
  count = min(int(np.ceil(np.float32(rate) * np.float32(mask.sum()))), int(mask.sum()))
  order = np.argsort(np.where(mask, param, np.inf), kind="stable")
  kept = mask.copy()
  kept[order[:count]] = False
  order = np.argsort(np.where(~kept, -grow, np.inf), kind="stable")
  new = kept.copy()
  new[order[:count]] = True
  return new


@pytest.mark.parametrize("seed", range(4))
def test_fast_selection_matches_the_argsort_definition(seed):
  rng = np.random.default_rng(seed)
  n = 5000
  mask = rng.random(n) < 0.3
  # Rounded values create many ties; zeros and repeated magnitudes of both signs too.
  param = np.where(mask, np.round(rng.normal(size=n), 1), 0.0).astype(np.float32)
  grow = np.round(rng.normal(size=n), 1).astype(np.float32)
  for rate in (0.0, 0.05, 0.37, 1.0):
    got = drop_and_grow(jnp.asarray(mask), jnp.asarray(param), jnp.abs(jnp.asarray(grow)), jnp.float32(rate))
    expected = reference_drop_and_grow(mask, param, grow, rate)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # With random tie-breaking: the same drops, and a grown set that differs only among tied gradients.
    got = np.asarray(drop_and_grow(jnp.asarray(mask), jnp.asarray(param), jnp.abs(jnp.asarray(grow)),
                                   jnp.float32(rate), jax.random.key(seed)))
    kept = reference_kept(mask, param, rate)
    assert (got & kept).sum() == kept.sum() and got.sum() == mask.sum()
    magnitudes = np.abs(grow)
    np.testing.assert_array_equal(np.sort(magnitudes[got & ~kept]), np.sort(magnitudes[expected & ~kept]))
