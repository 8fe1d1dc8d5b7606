"""Densities, initial masks and mask statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspa_jax import masks

SHAPES = [(7,), (5, 3), (20, 30), (3, 3, 4, 8), (5, 5, 1, 6), (1, 1)]


def make_params(shapes=SHAPES):
  return {f"layer{i}": jnp.zeros(s) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rule", ["uniform", "erk"])
def test_init_masks_exact_counts(density, rule):
  params = make_params()
  densities = (masks.erk_densities if rule == "erk" else masks.uniform_densities)(params, density)
  mask = masks.init_masks(jax.random.key(3), params, densities)
  chex.assert_trees_all_equal_structs(mask, params)
  counts = masks.count_active(mask)
  # The draw hits the target counts exactly (target_counts' rounding is checked by hand in test_references.py and
  # below); 1-D leaves are dense.
  targets = masks.target_counts(params, densities)
  for name, p in params.items():
    assert int(counts[name]) == targets[name], (name, densities[name])
    assert mask[name].dtype == jnp.bool_
  assert int(counts["layer0"]) == 7


def test_uniform_counts_by_hand():
  # SHAPES at density 0.2: (7,) stays dense; 15 * 0.2 = 3; 600 * 0.2 = 120; 288 * 0.2 = 57.6 -> 58; 150 * 0.2 = 30;
  # 1 * 0.2 rounds to 0, but a layer keeps at least one weight.
  mask = masks.init_masks(jax.random.key(1), make_params(), masks.uniform_densities(make_params(), 0.2))
  got = {k: int(v) for k, v in masks.count_active(mask).items()}
  assert got == {"layer0": 7, "layer1": 3, "layer2": 120, "layer3": 58, "layer4": 30, "layer5": 1}


def test_one_dimensional_leaves_stay_dense():
  params = {"dense": {"kernel": jnp.zeros((10, 4)), "bias": jnp.zeros(4)}, "norm": {"scale": jnp.zeros(4)}}
  for densities in (masks.erk_densities(params, 0.2), masks.uniform_densities(params, 0.2)):
    assert densities["dense"]["bias"] == 1.0 and densities["norm"]["scale"] == 1.0
    mask = masks.init_masks(jax.random.key(0), params, densities)
    assert bool(jnp.all(mask["dense"]["bias"])) and bool(jnp.all(mask["norm"]["scale"]))


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.8])
def test_erk_hits_the_overall_density(density):
  params = make_params([(784, 300), (300, 100), (100, 10), (5, 5, 1, 6), (10,)])
  densities = masks.erk_densities(params, density)
  sizes = {k: p.size for k, p in params.items() if p.ndim >= 2}
  achieved = sum(densities[k] * n for k, n in sizes.items()) / sum(sizes.values())
  assert achieved == pytest.approx(density, rel=1e-9)
  assert all(0.0 < densities[k] <= 1.0 for k in sizes)
  # ERK gives small layers more density than large ones.
  assert densities["layer2"] > densities["layer0"]


def test_erk_makes_layers_dense_when_needed():
  params = make_params([(1000, 1000), (2, 3)])
  densities = masks.erk_densities(params, 0.5)
  assert densities["layer1"] == 1.0
  achieved = (densities["layer0"] * 1e6 + 6) / (1e6 + 6)
  assert achieved == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_bad_density_is_rejected(bad):
  with pytest.raises(ValueError, match="density"):
    masks.erk_densities(make_params(), bad)
  with pytest.raises(ValueError, match="density"):
    masks.uniform_densities(make_params(), bad)


def test_client_masks_are_independent_or_shared():
  params = make_params()
  densities = masks.uniform_densities(params, 0.3)
  stacked = masks.init_client_masks(jax.random.key(0), params, densities, 5)
  assert stacked["layer2"].shape == (5, 20, 30)
  counts = masks.count_active(stacked, stacked=True)
  np.testing.assert_array_equal(counts["layer2"], np.full(5, 180))
  assert int(masks.hamming_distance(jax.tree.map(lambda m: m[0], stacked), jax.tree.map(lambda m: m[1], stacked))) > 0
  shared = masks.init_client_masks(jax.random.key(0), params, densities, 5, shared=True)
  distances = masks.pairwise_hamming(shared)
  np.testing.assert_array_equal(distances, np.zeros((5, 5)))


def test_apply_mask_zeros_even_inf_and_nan():
  params = {"w": jnp.array([[jnp.inf, jnp.nan], [1.0, -2.0]])}
  mask = {"w": jnp.array([[False, False], [True, False]])}
  out = masks.apply_mask(params, mask)
  np.testing.assert_array_equal(out["w"], np.array([[0.0, 0.0], [1.0, 0.0]]))


def test_hamming_distance_hand_case():
  a = {"x": jnp.array([True, False, True, True]), "y": jnp.array([[True, False]])}
  b = {"x": jnp.array([True, True, False, True]), "y": jnp.array([[False, False]])}
  assert int(masks.hamming_distance(a, b)) == 3
  stacked = jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)
  np.testing.assert_array_equal(masks.pairwise_hamming(stacked), np.array([[0, 3], [3, 0]]))


def test_pack_words_round_trip():
  params = make_params()
  mask = masks.init_masks(jax.random.key(1), params, masks.uniform_densities(params, 0.4))
  for leaf in jax.tree.leaves(mask):
    words = masks.pack_words(leaf, leaf.shape)
    assert words.dtype == jnp.uint32 and words.shape == (-(-leaf.size // 32),)  # 32 entries per word
    np.testing.assert_array_equal(masks.unpack_words(words, leaf.shape), leaf)
  # Leading (client) axes are kept; bit i of word j is entry 32 j + i.
  stacked = jnp.zeros((3, 40), bool).at[1, 33].set(True)
  words = masks.pack_words(stacked, (40,))
  assert words.shape == (3, 2) and int(words[1, 1]) == 2 and int(words.sum()) == 2


def test_density_report():
  params = make_params([(10, 10)])
  mask = masks.init_masks(jax.random.key(0), params, masks.uniform_densities(params, 0.25))
  report = masks.density_report(mask)
  assert report["['layer0']"] == {"active": 25, "size": 100, "density": 0.25}
  assert float(masks.overall_density(mask)) == pytest.approx(0.25)


def test_random_masks_cover_every_entry_evenly():
  # Entry-wise inclusion frequency over many keys is count/size for every entry (size 13, count 4: p = 4/13).
  from fedspa_jax.permute import random_subset

  keys = jax.random.split(jax.random.key(0), 3000)
  chosen = np.asarray(jax.jit(jax.vmap(lambda k: random_subset(13, 4, k)))(keys))
  assert (chosen.sum(axis=1) == 4).all()
  freq = chosen.mean(axis=0)
  assert np.all(np.abs(freq - 4 / 13) < 0.04), freq  # sd ~0.0084
  pairs = (chosen[:, :, None] & chosen[:, None, :]).mean(axis=0)[np.triu_indices(13, 1)]
  assert np.all(np.abs(pairs - 4 / 13 * 3 / 12) < 0.04), pairs  # no pair of entries sticks together
