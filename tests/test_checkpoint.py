"""Checkpoints: exact round trip of a SimState (typed keys included), newest-N retention, atomic writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import checkpoint as fj_checkpoint
from fedspa_jax.checkpoint import Checkpointer, LayoutMismatch, from_storable, to_storable


@pytest.fixture(scope="module")
def state():
  data = fj.data.synthetic(num_clients=4, max_samples_per_client=20, seed=0)
  model = fj.models.get("mlp", num_classes=data.num_classes, hidden=(8,))
  algo = fj.algorithms.get("fedspa", model=model, clients_per_round=2, local_steps=1, local_epochs=None,
                           momentum=0.9, rounds=3)
  return algo.init(jax.random.key(0), data)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_storable_round_trip_of_typed_keys(state):
  stored = to_storable(state)
  assert stored.key.dtype == jnp.uint32
  back = from_storable(stored, state)
  assert jax.dtypes.issubdtype(back.key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(state.key))


def test_save_restore_is_exact_and_keeps_the_newest(state, tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
  assert ckpt.latest_round() is None and ckpt.read_meta() is None
  states = {}
  for r in (1, 2, 3):
    states[r] = state._replace(round=jnp.asarray(r, jnp.int32))
    ckpt.save(r, states[r], {"round": r, "history": [{"round": r, "acc": 0.5}]})
  assert ckpt.rounds() == [2, 3] and ckpt.latest_round() == 3
  restored, meta = ckpt.restore(state)
  assert_trees_equal(to_storable(restored), to_storable(states[3]))
  assert type(restored) is type(state) and type(restored.server) is type(state.server)
  assert meta.pop("layout") == fj_checkpoint.layout(state)
  assert meta == {"round": 3, "history": [{"round": 3, "acc": 0.5}]}
  older, meta = ckpt.restore(state, round=2)
  assert int(older.round) == 2 and meta["round"] == 2
  # A round that exists is not written again.
  ckpt.save(3, state, {"round": "other"})
  assert ckpt.read_meta()["round"] == 3
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]  # no temporary folders left


def changed_everywhere(tree):
  """`tree` with every element of every leaf changed (keys folded, bit words inverted, numbers plus one)."""

  def change(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(leaf, 1)
    return ~leaf if leaf.dtype == jnp.uint32 else leaf + 1

  return jax.tree.map(change, tree)


def test_round_trip_of_states_that_differ_in_every_leaf(state, tmp_path):
  # A restore that mixed up or skipped any leaf (server params, optimizer state, mask words, round, key,
  # participation) would return a leaf of the other state.
  other = changed_everywhere(state)
  for a, b in zip(jax.tree.leaves(to_storable(state)), jax.tree.leaves(to_storable(other))):
    assert a.shape == b.shape and a.dtype == b.dtype and np.all(np.asarray(a) != np.asarray(b))
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
  ckpt.save(1, state, {"round": 1})
  ckpt.save(2, other, {"round": 2})
  for r, saved in ((1, state), (2, other)):
    restored, meta = ckpt.restore(state, round=r)
    assert meta["round"] == r
    assert_trees_equal(to_storable(restored), to_storable(saved))
  ckpt.close()


def test_restore_from_an_empty_folder(state, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path / "none").restore(state)


def test_a_checkpoint_of_another_layout_is_refused_before_reading(state, tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, state, {"round": 1})
  # The same algorithm on another population (8 clients instead of 4): the store rows differ.
  data = fj.data.synthetic(num_clients=8, max_samples_per_client=20, seed=0)
  model = fj.models.get("mlp", num_classes=data.num_classes, hidden=(8,))
  other = fj.algorithms.get("fedspa", model=model, clients_per_round=2, rounds=3).init(jax.random.key(0), data)
  with pytest.raises(LayoutMismatch, match=r"clients.*saved \[\[4, .*expected \[\[8, "):
    ckpt.restore(other)
  # An unpacked bool mask store (the layout before bit packing) is refused the same way.
  bools = state._replace(clients=jax.tree.map(lambda a: jnp.zeros((4, a.shape[1] * 32), bool), state.clients))
  ckpt.save(2, bools, {"round": 2})
  with pytest.raises(LayoutMismatch, match="bool"):
    ckpt.restore(state)
  ckpt.close()


def test_an_asynchronous_save_keeps_the_metadata_as_it_was_when_saved(tmp_path):
  # The run appends to its history right after `save` returns, while the write goes on in orbax's thread.
  history = [{"round": 1}, {"round": 2}]
  ckpt = Checkpointer(tmp_path / "ckpt", asynchronous=True)
  ckpt.save(2, {"w": jnp.arange(100_000.0)}, {"history": history})
  history.append({"round": 3})
  assert ckpt.read_meta(2)["history"] == [{"round": 1}, {"round": 2}]
  ckpt.close()
