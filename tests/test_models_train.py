"""Every registered model trains one FedSpa round in the engine (tiny data of the model's input shape)."""

import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import config as config_lib

SAMPLE_SHAPE = {"mlp": (28, 28, 1), "lenet5": (28, 28, 1), "cnn": (28, 28, 1), "cifar_cnn": (32, 32, 3),
                "vgg11": (32, 32, 3), "resnet18": (32, 32, 3), "char_lstm": (80,)}


# The two large models keep their layer structure at a fraction of their width, to keep compilation and the
# suite short; every other model is tested at its real size.
NARROW = {"resnet18": {"width": 8}, "vgg11": {"features": (8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"),
                                              "hidden": (32, 32)}}


# Models that a shipped config trains end to end in the suite (the CIFAR/EMNIST configs on TFDS look-alikes in
# test_data_tfds_configs.py, Fashion-MNIST's LeNet-5 in test_experiment.py, the natural datasets' CNN and char_lstm
# on LEAF files in test_data_natural.py): trained there, not again here.
END_TO_END = {config_lib.load(name).model for name in config_lib.shipped_names()
              if config_lib.load(name).dataset in ("cifar10", "cifar100", "emnist_letters", "fashion_mnist", "femnist",
                                                   "shakespeare")}


def test_every_model_is_covered():
  assert sorted(SAMPLE_SHAPE) == fj.models.names()
  assert {"lenet5", "cnn", "cifar_cnn", "resnet18", "char_lstm"} <= END_TO_END  # what the end-to-end tests train


@pytest.mark.parametrize("name", sorted(set(SAMPLE_SHAPE) - END_TO_END))
def test_model_trains_one_fedspa_round(name):
  rng = np.random.default_rng(0)
  shape = SAMPLE_SHAPE[name]
  x = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
  y = rng.integers(0, 10, 12)
  data = fj.data.from_arrays(x, y, num_clients=3, partition="iid", seed=0, mean=(0.5,) * shape[-1],
                             std=(0.25,) * shape[-1])
  model = fj.models.get(name, num_classes=data.num_classes, **NARROW.get(name, {}))
  algo = fj.algorithms.get("fedspa", model=model, density=0.3, clients_per_round=2, local_steps=1,
                           local_epochs=None, batch_size=2, lr=0.01, rounds=2)
  state = algo.init(jax.random.key(0), data)
  new, metrics = algo.round(jax.tree.map(jax.numpy.copy, state), data)
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.server.params,
                         new.server.params)
  assert any(jax.tree.leaves(changed))
  counts_before = fj.masks.count_active(algo.client_states(state, data), stacked=True)
  counts_after = fj.masks.count_active(algo.client_states(new, data), stacked=True)
  jax.tree.map(np.testing.assert_array_equal, counts_before, counts_after)
