"""Communication accounting: exact bytes at any scale, from int32 per-leaf counts multiplied out on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspa_jax import accounting, masks


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
  # Leaves in jax.tree.leaves order: b, k.
  np.testing.assert_array_equal(accounting.state_bytes(params, mask_bits=kernels), [0, 13])
  np.testing.assert_array_equal(
      accounting.state_bytes(params, values=jax.tree.map(lambda _: True, params), mask_bits=kernels), [40, 413]
  )


def test_round_bytes_reads_a_rounds_metrics():
  params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}
  metrics = {"values_down": np.array([[4, 16], [4, 16]]), "values_up": np.array([[4, 8], [0, 0]])}
  assert accounting.round_bytes(params, metrics) == {"bytes_down": 2 * 80, "bytes_up": 16 + 32 + 2}
