"""Communication accounting: exact bytes at any scale, from int32 per-leaf counts multiplied out on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting, masks
from fedspa_jax.data.federated import FederatedData, split_from_flat


def shapes(**leaves):
  return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in leaves.items()}


def test_a_message_above_2_pow_31_bytes_is_exact():
  # 2**29 + 3 float32 values (just over 2 GiB) in one leaf, plus a bias: no arrays are allocated.
  params = {"big": {"kernel": jax.ShapeDtypeStruct((2**15, 2**14 + 1), jnp.float32)}, "bias": shapes(b=(7,))["b"]}
  size = 2**15 * (2**14 + 1)
  assert accounting.dense_bytes(params) == 4 * size + 28
  values = accounting.static_values(params)
  assert values.dtype == np.int32
  assert accounting.message_bytes(params, values) == 4 * size + 28 > 2**31
  # 1000 clients each sending it: 8.6 TB, exact to the byte.
  cohort = np.broadcast_to(values, (1000, 2))
  assert accounting.message_bytes(params, cohort) == 1000 * (4 * size + 28)


def test_sparse_message_bytes_are_exact_and_match_the_host_formula():
  params = {"layer": {"kernel": jax.ShapeDtypeStruct((2**16, 2**15), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((2**15,), jnp.float32)}}
  densities = {"layer": {"kernel": 0.5, "bias": 1.0}}
  size = 2**31
  with pytest.raises(ValueError, match="below 2\\*\\*31 entries"):
    accounting.static_values(params, densities)  # a 2**31-entry leaf cannot be counted in int32
  params["layer"]["kernel"] = jax.ShapeDtypeStruct((2**16, 2**15 - 1), jnp.float32)
  size = 2**16 * (2**15 - 1)
  active = round(0.5 * size)
  expected = active * 4 + min(-(-size // 8), active * 4) + 2**15 * 4  # values + bitmap (cheaper) + dense bias
  assert accounting.sparse_bytes(params, densities) == expected > 2**31
  values = accounting.static_values(params, densities)
  assert accounting.message_bytes(params, values) == expected
  assert accounting.message_bytes(params, np.stack([values, values, np.zeros_like(values)])) == 2 * expected


def test_mask_bytes_take_the_cheaper_of_bitmap_and_index_list():
  assert accounting.mask_bytes(1000, 10) == 10 * 2  # 10 two-byte indices < 125-byte bitmap
  assert accounting.mask_bytes(1000, 500) == 125  # bitmap
  assert accounting.mask_bytes(1000, 1000) == 0  # dense: no mask
  np.testing.assert_array_equal(accounting.mask_bytes(1000, np.array([0, 10, 500, 1000])), [0, 20, 125, 0])


def test_count_values_and_per_client():
  mask = {"a": jnp.array([[True, False], [True, True]]), "b": jnp.ones((3,), bool)}
  np.testing.assert_array_equal(accounting.count_values(mask), [3, 3])
  rows = accounting.per_client(jnp.array([3, 3], jnp.int32), jnp.array([True, False, True]))
  np.testing.assert_array_equal(rows, [[3, 3], [0, 0], [3, 3]])


@pytest.mark.parametrize(
    "cohort, real, expected",
    [
        ([4, 0, 2, 7, 7], 3, [True, True, True, False, False]),  # padding (id K=7) at the end
        ([7, 3, 7, 1], 2, [False, True, False, True]),  # padding anywhere
        ([5, 2, 6], 3, [True, True, True]),  # no padding
    ],
)
def test_real_clients_are_the_slots_of_smallest_id(cohort, real, expected):
  got = accounting.real_clients(jnp.array(cohort, jnp.int32), jnp.int32(real))
  np.testing.assert_array_equal(got, expected)


def test_state_bytes_per_leaf():
  params = {"k": jnp.zeros((10, 10)), "b": jnp.zeros((10,))}
  kernels = jax.tree_util.tree_map_with_path(masks.is_maskable, params)
  # Leaves in jax.tree.leaves order: b, k. A mask is stored in uint32 words: 100 entries take 4 words, 10 take 1.
  np.testing.assert_array_equal(accounting.state_bytes(params, mask_bits=kernels), [0, 16])
  every_leaf = jax.tree.map(lambda _: True, params)
  np.testing.assert_array_equal(accounting.state_bytes(params, mask_bits=every_leaf), [4, 16])
  np.testing.assert_array_equal(accounting.state_bytes(params, values=every_leaf, mask_bits=kernels), [40, 416])


def test_round_bytes_reads_a_rounds_metrics():
  params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}
  metrics = {"values_down": np.array([[4, 16], [4, 16]]), "values_up": np.array([[4, 8], [0, 0]])}
  assert accounting.round_bytes(params, metrics) == {"bytes_down": 2 * 80, "bytes_up": 16 + 32 + 2}


@pytest.fixture(scope="module")
def tiny_data():
  return fj.data.synthetic(1.0, 1.0, num_clients=4, max_samples_per_client=12, seed=0)


@pytest.mark.parametrize("name", ["fedspa", "fedspa_local", "subfedavg", "ditto", "fedrep", "fedavg"])
def test_client_state_bytes_equal_the_store_bytes_per_client(name, tiny_data):
  # The store packs every bool leaf (a whole mask, dense leaves included) into uint32 words and keeps the rest as
  # is; the metric must count exactly what it holds. Leaf sizes 10*16, 16, 16*10, 10 cover partial words.
  model = fj.models.get("mlp", num_classes=tiny_data.num_classes, hidden=(16,))
  local = {"personal_model": "local"} if name == "fedspa_local" else {}
  algo = fj.algorithms.get(name.removesuffix("_local"), model=model, clients_per_round=2, local_steps=1,
                           local_epochs=None, batch_size=4, rounds=2, **local)
  state = algo.init(jax.random.key(0), tiny_data)
  leaves = [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(state.clients)]
  stored = sum(leaf.nbytes for leaf in jax.tree.leaves(state.clients)) // tiny_data.num_clients
  if name == "fedavg":  # no state: the store holds only an int32 placeholder per client, which keeps the [K] axis
    assert leaves == [((tiny_data.num_clients,), jnp.int32)]
    stored = 0
  _, metrics = algo.round(state, tiny_data)
  assert int(np.sum(metrics["client_state_bytes"])) == stored


def test_lenet5_fedspa_state_is_7728_bytes_per_client():
  # README and docs/scaling.md: FedSpa's LeNet-5 state is 7.5 KiB per client (61,706 weights in uint32 words).
  images = split_from_flat(np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int32), [2, 2])
  data = FederatedData(train=images, test=images, num_classes=10)
  algo = fj.algorithms.get("fedspa", model=fj.models.get("lenet5", num_classes=10), clients_per_round=1, rounds=1)
  state = algo.init(jax.random.key(0), data)
  assert sum(leaf.nbytes for leaf in jax.tree.leaves(state.clients)) == 2 * 7728
  every_leaf = jax.tree.map(lambda _: True, state.server.params)
  assert int(np.sum(accounting.state_bytes(state.server.params, mask_bits=every_leaf))) == 7728
  assert round(7728 / 1024, 1) == 7.5
