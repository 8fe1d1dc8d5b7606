"""What every algorithm is: `Algorithm(init, round, evaluate)`, plus the checks and pieces they share."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedspa_jax.data.federated import FederatedData


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A federated algorithm as three functions over a `SimState`.

  Attributes:
    name: registry name.
    hparams: the hyperparameters it was built with (for logs and configs).
    init: (key, data) -> SimState.
    round: jitted (state, data) -> (state, metrics); one compiled program per round, clients vmapped.
    evaluate: jitted (state, data) -> per-client test metrics [K] and their summaries.
    round_fn: the pure, un-jitted round (for tests, tracing counters and custom jit/sharding).
  """

  name: str
  hparams: dict[str, Any]
  init: Callable[..., Any]
  round: Callable[..., Any]
  evaluate: Callable[..., Any]
  round_fn: Callable[..., Any]


def make_apply_fn(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, x) -> logits for a flax module without mutable collections."""
  return lambda params, x: model.apply({"params": params}, x)


def make_optimizer(
    optimizer: optax.GradientTransformation | None, lr: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """The clients' optimizer: the given optax transformation, or SGD(lr, momentum) with optional weight decay."""
  if optimizer is not None:
    return optimizer
  if not lr > 0:
    raise ValueError(f"lr must be > 0, got {lr!r}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
  sgd = optax.sgd(lr, momentum=momentum or None)
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def check_local_work(batch_size: int, local_epochs: int | None, local_steps: int | None) -> None:
  """Clear errors for the clients' local-training arguments."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  if local_steps is None:
    if not isinstance(local_epochs, (int, np.integer)) or local_epochs < 1:
      raise ValueError(f"local_epochs must be an integer >= 1 (or give local_steps), got {local_epochs!r}")
  elif not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
    raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")


def check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def init_params(model: nn.Module, key: jax.Array, data: FederatedData) -> Any:
  """The model's initial params for `data`'s sample shape, after checking that model and data fit."""
  check_model_fits(model, data)
  x = jnp.zeros((1, *data.sample_shape), jnp.float32)
  return model.init(key, x)["params"]


def check_model_fits(model: nn.Module, data: FederatedData) -> None:
  """Raises ValueError, before anything is compiled, when the model cannot consume `data` or emits wrong logits."""
  if not isinstance(data, FederatedData):
    raise TypeError(f"data must be a fedspa_jax.data.FederatedData, got {type(data).__name__}")
  x = jax.ShapeDtypeStruct((1, *data.sample_shape), jnp.float32)
  try:
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
  except Exception as e:  # flax and lax raise many types for a shape mismatch
    raise ValueError(
        f"model {type(model).__name__} does not accept inputs of shape {data.sample_shape} "
        f"from dataset {data.name!r}: {e}"
    ) from e
  if out.shape != (1, data.num_classes):
    raise ValueError(
        f"model {type(model).__name__} outputs logits of shape {out.shape[1:]} per sample but dataset "
        f"{data.name!r} has {data.num_classes} classes"
    )
  if data.test.sample_shape != data.sample_shape:
    raise ValueError(f"train samples have shape {data.sample_shape} but test samples {data.test.sample_shape}")


def check_cohort(clients_per_round: Any, data: FederatedData) -> None:
  if not isinstance(clients_per_round, (int, np.integer)) or not 1 <= clients_per_round <= data.num_clients:
    raise ValueError(
        f"clients_per_round must be an integer in [1, {data.num_clients}] for a dataset of "
        f"{data.num_clients} clients, got {clients_per_round!r}"
    )


def check_state_matches(state: Any, data: FederatedData) -> None:
  """The client store and the data must have the same number of clients."""
  leaves = jax.tree.leaves(state.clients)
  if leaves and leaves[0].shape[0] != data.num_clients:
    raise ValueError(
        f"state holds {leaves[0].shape[0]} clients but data has {data.num_clients}; "
        "call init with this dataset"
    )
