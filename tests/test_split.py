"""FedRep and FedPer: the personal head is any set of top-level params entries, chosen by `head=` or by default."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import accounting

NUM_CLIENTS, COHORT = 12, 4


class Plain(nn.Module):
  """A user's model without an entry named "head": Dense_0, Dense_1 (flax's automatic names)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def data():
  return jax.device_put(fj.data.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, seed=0))


@pytest.fixture(scope="module", params=["fedrep", "fedper"])
def trained(request, data):
  algo = fj.algorithms.get(request.param, model=Plain(), clients_per_round=COHORT, lr=0.05, rounds=10,
                           **({"head_epochs": 2} if request.param == "fedrep" else {}))
  assert algo.hparams["head"] is None  # the default rule, resolved at init
  state0 = algo.init(jax.random.key(0), data)
  first = algo.evaluate(state0, data)
  state, history = jax.tree.map(jax.numpy.copy, state0), []  # rounds donate their state argument
  for _ in range(10):
    state, metrics = algo.round(state, data)
    history.append(metrics)
  return algo, state0, state, history, first, algo.evaluate(state, data)


def test_a_model_without_a_head_entry_trains(trained):
  algo, state0, state, _, first, last = trained
  assert algo.hparams["head"] == ["Dense_1"]  # the last top-level entry, recorded
  assert set(state.clients) == {"Dense_1"} and state.clients["Dense_1"]["kernel"].shape == (NUM_CLIENTS, 16, 10)
  assert float(last["accuracy_summary"]["mean"]) > float(first["accuracy_summary"]["mean"]) + 0.1


def test_only_the_body_is_shared(trained):
  algo, state0, state, history, _, _ = trained
  # The server never moves the head entry; it moves the body.
  np.testing.assert_array_equal(state.server.params["Dense_1"]["kernel"], state0.server.params["Dense_1"]["kernel"])
  assert not np.array_equal(state.server.params["Dense_0"]["kernel"], state0.server.params["Dense_0"]["kernel"])
  body = accounting.dense_bytes(state0.server.params["Dense_0"])
  assert accounting.round_bytes(state0.server.params, history[0]) == {
      "bytes_down": COHORT * body, "bytes_up": COHORT * body}
  head = accounting.dense_bytes(state0.server.params["Dense_1"])
  assert int(np.sum(history[0]["client_state_bytes"])) == head


def test_model_with_a_head_entry_defaults_to_it(data):
  algo = fj.algorithms.get("fedper", model=fj.models.get("mlp", num_classes=10, hidden=(8,)), clients_per_round=2)
  state = algo.init(jax.random.key(0), data)
  assert algo.hparams["head"] == ["head"] and set(state.clients) == {"head"}


def test_explicit_head_names(data):
  algo = fj.algorithms.get("fedper", model=Plain(), head=["Dense_0"], clients_per_round=2)
  assert algo.hparams["head"] == ["Dense_0"]
  state = algo.init(jax.random.key(0), data)
  assert set(state.clients) == {"Dense_0"}


@pytest.mark.parametrize(
    "head, match",
    [
        ("classifier", r"unknown params entries \['classifier'\]; the model's top-level entries are \['Dense_0'"),
        (["Dense_0", "Dense_1"], "takes every top-level params entry"),
    ],
)
def test_head_naming_no_entry_or_every_entry_fails_at_init(data, head, match):
  algo = fj.algorithms.get("fedrep", model=Plain(), head=head)
  with pytest.raises(ValueError, match=match):
    algo.init(jax.random.key(0), data)


@pytest.mark.parametrize("head", [[], "", 3, ["Dense_0", "Dense_0"]])
def test_malformed_head_fails_at_construction(head):
  with pytest.raises(ValueError, match="head"):
    fj.algorithms.get("fedper", model=Plain(), head=head)
