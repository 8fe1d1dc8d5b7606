"""What every algorithm is: `Algorithm(init, round, evaluate)`, plus the checks and pieces they share."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedspa_jax import accounting
from fedspa_jax import store as store_lib
from fedspa_jax.client import make_preprocess
from fedspa_jax.data.federated import FederatedData
from fedspa_jax.evaluation import make_evaluate
from fedspa_jax.models import flops
from fedspa_jax.round import SimState, check_aggregation, check_mesh, make_round
from fedspa_jax.server import init_server


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A federated algorithm as three functions over a `SimState`.

  Attributes:
    name: registry name.
    hparams: the hyperparameters it was built with (for logs and configs).
    init: (key, data) -> SimState.
    round: jitted (state, data) -> (state, metrics); one compiled program per round. The state is donated: use
      the returned one (the argument's buffers are reused).
    evaluate: (state, data, clients=None) -> per-client test metrics of those clients (default all K, in id order)
      and their summaries; jitted, memory-bounded for any K.
    round_fn: the pure, un-jitted round (for tests, tracing counters and custom jit/sharding).
    client_states: (state, data, clients=None) -> the decoded persistent state of those clients (default all),
      leaves [C, ...]: FedSpa's bool masks, Ditto's personal models, ...
    evaluate_fn: the pure, un-jitted evaluation (state, data, clients=None) behind `evaluate`, without its host-side
      check of `clients` (for vmapping over seeds, as `fedspa_jax.sweep` does).
  """

  name: str
  hparams: dict[str, Any]
  init: Callable[..., Any]
  round: Callable[..., Any]
  evaluate: Callable[..., Any]
  round_fn: Callable[..., Any]
  client_states: Callable[..., Any]
  evaluate_fn: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class Common:
  """Hyperparameters every algorithm shares; `algorithms.get` accepts them for any method.

  Attributes:
    clients_per_round: S, sampled without replacement each round.
    local_epochs: passes over each client's own data per round (ignored when `local_steps` is set).
    local_steps: a fixed number of local steps instead.
    batch_size: local batch size.
    lr, momentum, weight_decay: the clients' SGD (ignored when `optimizer` is given).
    optimizer: an optax transformation for local training.
    rounds: planned rounds T (schedules use it).
    weighting: "samples" (aggregate weighted by client sample counts) or "uniform" (1 per client). Every algorithm
      sets its own default (`with_defaults`; docs/algorithms.md says why), recorded in its hparams.
    server_lr: server learning rate eta_s.
    mesh: optional `jax.sharding.Mesh` with a "clients" axis to shard the cohort over.
    eval_clients_per_batch: clients evaluated together (memory bound of `evaluate`).
    cohort_batch: clients vmapped together. The cohort is sorted by size and run as `lax.map` over groups of this
      many clients, each group costing its own largest client's steps (see `fedspa_jax.round`); None runs the
      whole cohort as one vmapped group. "auto" (default): 1 on CPU, where vmapped lanes bring no speed and skewed
      sizes cost up to 2x (docs/benchmarks.md), None on accelerators, which need the lanes to fill the device.
      With `mesh`, groups are rounded up to a multiple of the mesh's size.
  """

  clients_per_round: int = 10
  local_epochs: int | None = 1
  local_steps: int | None = None
  batch_size: int = 32
  lr: float = 0.01
  momentum: float = 0.0
  weight_decay: float = 0.0
  optimizer: optax.GradientTransformation | None = None
  rounds: int = 100
  weighting: str | None = None
  server_lr: float = 1.0
  mesh: jax.sharding.Mesh | None = None
  eval_clients_per_batch: int = 16
  cohort_batch: int | str | None = "auto"

  def __post_init__(self):
    check_positive_int("clients_per_round", self.clients_per_round)
    check_local_work(self.batch_size, self.local_epochs, self.local_steps)
    check_positive_int("rounds", self.rounds)
    check_positive_int("eval_clients_per_batch", self.eval_clients_per_batch)
    check_aggregation("mean", self.weighting)
    check_mesh(self.mesh)
    if self.cohort_batch not in (None, "auto"):
      check_positive_int("cohort_batch", self.cohort_batch)
    if not (isinstance(self.server_lr, (int, float)) and self.server_lr > 0):
      raise ValueError(f"server_lr must be > 0, got {self.server_lr!r}")
    make_optimizer(self.optimizer, self.lr, self.momentum, self.weight_decay)  # validates lr and momentum

  @classmethod
  def with_defaults(cls, common: dict[str, Any], **defaults: Any) -> "Common":
    """`Common(**common)` with an algorithm's own defaults (e.g. `weighting`) for the keys `common` leaves out."""
    return cls(**{**defaults, **common})

  def train_kwargs(self) -> dict[str, Any]:
    """Keywords for `client.local_train`: optimizer, batch size, epochs or steps."""
    return dict(
        optimizer=make_optimizer(self.optimizer, self.lr, self.momentum, self.weight_decay),
        batch_size=self.batch_size,
        local_epochs=self.local_epochs,
        local_steps=self.local_steps,
    )

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("optimizer", "mesh")}


def resolve_cohort_batch(cohort_batch: int | str | None) -> int | None:
  """`cohort_batch` with "auto" resolved for the default backend: 1 on CPU, the whole cohort (None) elsewhere."""
  if cohort_batch == "auto":
    return 1 if jax.default_backend() == "cpu" else None
  return cohort_batch


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


def check_state_matches(state: Any, data: FederatedData, layout: store_lib.StoreLayout) -> None:
  """The client store must hold exactly this algorithm's encoded state for the data's K clients."""
  if not isinstance(state, SimState):
    raise TypeError(f"state must be a SimState from this algorithm's init, got {type(state).__name__}")
  leaves = jax.tree.leaves(state.clients)
  if leaves and leaves[0].shape[0] != data.num_clients:
    raise ValueError(
        f"state holds {leaves[0].shape[0]} clients but data has {data.num_clients}; "
        "call init with this dataset"
    )
  store_lib.check_store(state.clients, layout, data.num_clients)


def check_eval_clients(clients: Any, num_clients: int) -> None:
  """`clients` for `evaluate`: None (all K), or distinct ids in [0, K) on the host."""
  if clients is None:
    return
  ids = np.asarray(clients)
  if ids.ndim != 1 or ids.size < 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"clients to evaluate must be a non-empty 1-D array of client ids, got shape {ids.shape}")
  if ids.min() < 0 or ids.max() >= num_clients:
    raise ValueError(f"client ids to evaluate must lie in [0, {num_clients}), got [{ids.min()}, {ids.max()}]")
  if np.unique(ids).size != ids.size:
    raise ValueError("client ids to evaluate must be distinct")


# (key, params, ids [C]) -> the decoded state of clients `ids`, leaves [C, ...] (client k's from fold_in(key, k))
InitClients = Callable[[jax.Array, Any, jax.Array], Any]
# (params, cohort metrics, number of real clients, round, sample shape) -> extra round metrics (bytes, FLOPs, ...)
Account = Callable[[Any, dict, jax.Array], dict]


def assemble(
    *,
    name: str,
    hparams: dict[str, Any],
    model: nn.Module,
    common: Common,
    init_clients: InitClients,
    make_client_fn: Callable[[Callable], Any],
    make_personalize: Callable[[Callable], Any],
    account: Account,
    aggregation: str = "mean",
) -> Algorithm:
  """Builds an `Algorithm` from the parts that differ between methods.

  Args:
    name, hparams: for the registry and logs (the common hyperparameters are added to `hparams`).
    model: the flax model.
    common: the hyperparameters every algorithm shares.
    init_clients: the initial (decoded) state of a chunk of clients; the store encodes it (bool leaves as bits).
    make_client_fn: preprocess -> one client's update (w, client_state, data, key, round) -> ClientOutput.
    make_personalize: preprocess -> (w, client_state, train_data, key) -> the params client k is evaluated with.
    account: extra per-round metrics from the params and the cohort's metrics (bytes, FLOPs).
    aggregation: "mean" or "masked_mean".
  """
  check_aggregation(aggregation, common.weighting)
  clients_per_round = common.clients_per_round
  server_optimizer = optax.sgd(common.server_lr)
  apply_fn = make_apply_fn(model)
  layout_of = lambda params: store_lib.make_layout(init_clients, params)

  def init(key: jax.Array, data: FederatedData):
    check_cohort(clients_per_round, data)
    k_params, k_clients, k_sim = jax.random.split(key, 3)
    params = init_params(model, k_params, data)
    return SimState(
        server=init_server(params, server_optimizer),
        clients=store_lib.init_store(init_clients, layout_of(params), k_clients, params, data.num_clients),
        round=jnp.zeros((), jnp.int32),
        key=k_sim,
        participation=jnp.zeros((data.num_clients,), jnp.int32),
    )

  def check(state, data):
    # Runs at trace time: bad input surfaces here, before compilation.
    check_model_fits(model, data)
    check_cohort(clients_per_round, data)
    layout = layout_of(state.server.params)
    check_state_matches(state, data, layout)
    return layout

  def round_fn(state, data: FederatedData):
    layout = check(state, data)
    preprocess = make_preprocess(data.mean, data.std)
    run = make_round(
        make_client_fn(preprocess),
        num_clients=data.num_clients,
        cohort_size=clients_per_round,
        aggregation=aggregation,
        weighting=common.weighting,
        server_optimizer=server_optimizer,
        mesh=common.mesh,
        cohort_batch=resolve_cohort_batch(common.cohort_batch),
        gather_state=layout.gather,
        scatter_state=layout.scatter,
    )
    new_state, metrics = run(state, data.train)
    real = jnp.sum(metrics["cohort"] < data.num_clients)
    metrics.update(account(state.server.params, metrics, real, state.round, data.sample_shape))
    return new_state, metrics

  def evaluate_fn(state, data: FederatedData, clients=None):
    layout = check(state, data)
    preprocess = make_preprocess(data.mean, data.std)
    evaluate_clients = make_evaluate(
        make_personalize(preprocess), apply_fn, clients_per_batch=common.eval_clients_per_batch
    )
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2)  # 0: cohort, 1: clients
    ids = jnp.arange(data.num_clients, dtype=jnp.int32) if clients is None else jnp.asarray(clients, jnp.int32)
    return evaluate_clients(
        state.server.params, lambda i: layout.gather(state.clients, i), ids, state.participation, data.train,
        data.test, key, preprocess,
    )

  jitted_evaluate = jax.jit(evaluate_fn)

  def evaluate(state, data: FederatedData, clients=None):
    check_eval_clients(clients, data.num_clients)
    return jitted_evaluate(state, data, None if clients is None else np.asarray(clients, np.int32))

  def client_states(state, data: FederatedData, clients=None):
    """The decoded state of `clients` (default: all), leaves [C, ...] (FedSpa: bool masks)."""
    check_eval_clients(clients, data.num_clients)
    ids = np.arange(data.num_clients) if clients is None else np.asarray(clients)
    return layout_of(state.server.params).gather(state.clients, jnp.asarray(ids, jnp.int32))

  return Algorithm(
      name=name,
      hparams={**common.as_dict(), **hparams, "aggregation": aggregation},
      init=init,
      round=jax.jit(round_fn, donate_argnums=0),
      evaluate=evaluate,
      round_fn=round_fn,
      client_states=client_states,
      evaluate_fn=evaluate_fn,
  )


def dense_training_flops(
    model: nn.Module, sample_shape: tuple[int, ...], metrics: dict, sample_keys: tuple[str, ...] = ("samples",)
) -> dict[str, jax.Array]:
  """A dense method's round FLOPs: 3 x dense forward per sample trained on (summed over `sample_keys` metrics)."""
  with jax.ensure_compile_time_eval():  # host-side arithmetic on shapes, even while the round is traced
    per_sample = flops.training_flops(model, sample_shape).dense_per_sample
  samples = sum(metrics[k] for k in sample_keys)
  return accounting.round_flops(per_sample, per_sample, samples, metrics["weight"])


def stacked(tree: Any, ids: jax.Array) -> Any:
  """One copy of every leaf per client in `ids` [C], stacked on a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (ids.shape[0], *a.shape)), tree)
