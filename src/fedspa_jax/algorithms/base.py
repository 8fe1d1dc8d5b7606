"""What every algorithm is: `Algorithm(init, round, evaluate)`, plus the checks and pieces they share."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedspa_jax import accounting, availability, inflight, population, privacy
from fedspa_jax import store as store_lib
from fedspa_jax.client import local_train, make_preprocess
from fedspa_jax.data.federated import FederatedData
from fedspa_jax.evaluation import Personal, make_evaluate, make_evaluate_clients, summaries, with_staleness
from fedspa_jax.models import flops
from fedspa_jax.population import CLIENT_AXIS, PlacedData
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
      the returned one (the argument's buffers are reused). On a mesh of several CPU devices, `round`, `evaluate`
      and `client_states` keep at most `inflight.MAX_IN_FLIGHT` programs in flight, however they are looped.
    evaluate: (state, data, clients=None, finetune_epochs=None) -> per-client test metrics of those clients
      (default all K, in id order) and their summaries; jitted, memory-bounded for any K. `finetune_epochs` E:
      each client first trains E local epochs from the model it is scored with (`fedspa_jax.evaluation`); None:
      the method's own protocol (0 but for FedAvg-FT).
    round_fn: the pure, un-jitted round (for tests, tracing counters and custom jit/sharding).
    client_states: (state, data, clients=None) -> the decoded persistent state of those clients (default all),
      leaves [C, ...]: FedSpa's bool masks, Ditto's personal models, ...
    evaluate_fn: the pure, un-jitted evaluation (state, data, clients=None, finetune_epochs=None) behind
      `evaluate`, without its host-side checks (for vmapping over seeds, as `fedspa_jax.sweep` does).
    place: data -> the data as `round` and `evaluate` take it: `jax.device_put(data)`, or with a mesh the
      population laid out over it (`fedspa_jax.population.place`; each process places only its own devices).
  """

  name: str
  hparams: dict[str, Any]
  init: Callable[..., Any]
  round: Callable[..., Any]
  evaluate: Callable[..., Any]
  round_fn: Callable[..., Any]
  client_states: Callable[..., Any]
  evaluate_fn: Callable[..., Any] | None = None
  place: Callable[..., Any] = jax.device_put
  protocol: str = "own"
  strata: Callable[[int], int] = lambda num_clients: 1  # sampling strata for K clients (the DP accountant's event)


@dataclasses.dataclass(frozen=True)
class Common:
  """Hyperparameters every algorithm shares; `algorithms.get` accepts them for any method.

  Attributes:
    clients_per_round: S, sampled without replacement each round.
    local_epochs: passes over each client's own data per round (ignored when `local_steps` is set).
    local_steps: a fixed number of local steps instead.
    batch_size: local batch size.
    lr, momentum, weight_decay: the clients' SGD (ignored when `optimizer` is given).
    lr_decay: the clients' lr at round t is lr * lr_decay^t, in (0, 1] (1: constant; with `optimizer`, its updates
      are scaled by lr_decay^t).
    clip_norm: each local step's gradient is clipped to this global norm before the optimizer (None: no clipping).
    clip_mode: which gradient `clip_norm` measures, for sparse methods: "masked" (default: the gradient of the active
      coordinates) or "dense" (every coordinate's, the inactive ones included, then masked: as rong-dai/DisPFL's
      `my_model_trainer.py` clips before masking). Dense methods train with no mask: both are the same.
    optimizer: an optax transformation for local training.
    finetune_lr: the lr of fine-tuning at evaluation (`evaluate(..., finetune_epochs=E)`, FedAvg-FT), constant;
      None (default): the clients' lr at the evaluated round, lr * lr_decay^t. Needs the built-in SGD.
    rounds: planned rounds T (schedules use it).
    weighting: "samples" (aggregate weighted by client sample counts) or "uniform" (1 per client). Every algorithm
      sets its own default (`with_defaults`; docs/algorithms.md says why), recorded in its hparams.
    server_lr: server learning rate eta_s.
    mesh: optional `jax.sharding.Mesh` with a "clients" axis: the client population (store and data) is sharded
      over it, each device holding and training its own block of clients (`fedspa_jax.population`); pass the
      data through `algo.place(data)` first. A `jax.sharding.AbstractMesh` (axis sizes, no devices) builds the
      same programs to export or lower for devices this machine lacks (`round_fn` and `evaluate_fn` on shapes;
      `init` and `place` need devices); tests/test_export.py shows how.
    eval_clients_per_batch: clients evaluated together (memory bound of `evaluate`).
    cohort_batch: clients vmapped together. The cohort is sorted by size and run as `lax.map` over groups of this
      many clients, each group costing its own largest client's steps (see `fedspa_jax.round`); None runs the
      whole cohort as one vmapped group. "auto" (default): 1 when the programs are for CPU, where vmapped lanes
      bring no speed and skewed sizes cost up to 2x (docs/benchmarks.md), None for accelerators, which need the
      lanes to fill the device (`target_platform` says which). With `mesh`, per device.
    cohort_sampling: "uniform" (S of the K clients without replacement) or "stratified" (S / T from each of T
      equal strata of consecutive ids; with a mesh, each device samples its own clients and no sample moves); see
      `fedspa_jax.population`.
    cohort_strata: T for "stratified" (default: the devices on the mesh's client axis, 1 without a mesh); a
      multiple of them that divides K and `clients_per_round`.
    platform: the platform the programs are built for, one of `PLATFORMS`; only `cohort_batch="auto"` reads it.
      None (default): the mesh's devices' (an `AbstractMesh`'s `abstract_device`), else `jax.default_backend()`.
      Set it to export (`jax.export`) or cross-compile a program on one platform for another.
    dp_clip, dp_noise_multiplier, dp_delta: client-level DP (`fedspa_jax.privacy`, docs/privacy.md): each
      reporting client's update is clipped to L2 norm `dp_clip`, the sum gets Gaussian noise of std
      `dp_noise_multiplier * dp_clip` and is divided by the expected number of reporting clients (every client
      weighs 1, whatever `weighting` and `aggregation` say); epsilon at `dp_delta` is recorded. None: no DP.
    dp_quantile, dp_clip_lr, dp_count_noise: adaptive clipping (Andrew et al. 2021): the clip follows this
      quantile of the update norms with geometric step `dp_clip_lr`; `dp_count_noise` sigma_b (default S / 20).
    dp_target_epsilon: a run stops, with a checkpoint, at the last round whose epsilon stays within this.
    dropout, dropout_mode: each sampled client drops out with this probability, its update "lost" (it trains) or
      it "never_starts" (`fedspa_jax.availability`).
    straggler_fraction, straggler_work: an available client straggles with this probability and runs
      round(straggler_work * steps) of its local steps.
    availability: a .npy or .csv file of per-client availability probabilities ([K] or [K, rounds]) instead of
      `dropout`.
  """

  clients_per_round: int = 10
  local_epochs: int | None = 1
  local_steps: int | None = None
  batch_size: int = 32
  lr: float = 0.01
  momentum: float = 0.0
  weight_decay: float = 0.0
  lr_decay: float = 1.0
  clip_norm: float | None = None
  clip_mode: str = "masked"
  optimizer: optax.GradientTransformation | None = None
  finetune_lr: float | None = None
  rounds: int = 100
  weighting: str | None = None
  server_lr: float = 1.0
  mesh: jax.sharding.Mesh | None = None
  eval_clients_per_batch: int = 16
  cohort_batch: int | str | None = "auto"
  cohort_sampling: str = "uniform"
  cohort_strata: int | None = None
  platform: str | None = None
  dp_clip: float | None = None
  dp_noise_multiplier: float = 0.0
  dp_delta: float = 1e-5
  dp_quantile: float | None = None
  dp_clip_lr: float = 0.2
  dp_count_noise: float | None = None
  dp_target_epsilon: float | None = None
  dropout: float = 0.0
  dropout_mode: str = "lost"
  straggler_fraction: float = 0.0
  straggler_work: float = 0.5
  availability: str | None = None

  def __post_init__(self):
    check_positive_int("clients_per_round", self.clients_per_round)
    check_local_work(self.batch_size, self.local_epochs, self.local_steps)
    check_positive_int("rounds", self.rounds)
    check_positive_int("eval_clients_per_batch", self.eval_clients_per_batch)
    check_aggregation("mean", self.weighting)
    check_mesh(self.mesh)
    if self.cohort_batch not in (None, "auto"):
      check_positive_int("cohort_batch", self.cohort_batch)
    if self.cohort_sampling not in population.SAMPLINGS:
      raise ValueError(f"cohort_sampling must be one of {population.SAMPLINGS}, got {self.cohort_sampling!r}")
    if self.cohort_strata is not None:
      check_positive_int("cohort_strata", self.cohort_strata)
    check_platform(self.mesh, self.platform)
    if not (isinstance(self.server_lr, (int, float)) and self.server_lr > 0):
      raise ValueError(f"server_lr must be > 0, got {self.server_lr!r}")
    make_optimizer(self.optimizer, self.lr, self.momentum, self.weight_decay)  # validates lr and momentum
    check_lr_decay(self.lr_decay)
    check_clip_norm(self.clip_norm)
    if self.clip_mode not in CLIP_MODES:
      raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
    check_finetune_lr(self.finetune_lr, self.optimizer)
    privacy.check_options(self.dp_clip, self.dp_noise_multiplier, self.dp_delta, self.dp_quantile, self.dp_clip_lr,
                          self.dp_count_noise, self.dp_target_epsilon)
    self.dp_spec()  # adaptive clipping's noise split
    availability.check_options(self.dropout, self.dropout_mode, self.straggler_fraction, self.straggler_work,
                               self.availability)

  def dp_spec(self):
    """The round's `server.DPSpec`, or None without DP."""
    return privacy.make_spec(self.dp_clip, self.dp_noise_multiplier, self.dp_quantile, self.dp_clip_lr,
                             self.dp_count_noise, self.clients_per_round)

  def availability_spec(self):
    """The round's `availability.AvailabilitySpec` (reads the availability file), or None."""
    return availability.make_spec(self.dropout, self.dropout_mode, self.straggler_fraction, self.straggler_work,
                                  self.availability)

  @classmethod
  def with_defaults(cls, common: dict[str, Any], **defaults: Any) -> "Common":
    """`Common(**common)` with an algorithm's own defaults (e.g. `weighting`) for the keys `common` leaves out."""
    return cls(**{**defaults, **common})

  def train_kwargs(self, round: jax.Array | int | None = None) -> dict[str, Any]:
    """Keywords for `client.local_train` in round `round`: optimizer (lr decayed to that round), batch size, epochs
    or steps. `round` may be traced; None: the undecayed lr."""
    scale = None if round is None or self.lr_decay == 1.0 else jnp.float32(self.lr_decay) ** round
    dense = self.clip_mode == "dense"
    return dict(
        optimizer=make_optimizer(self.optimizer, self.lr, self.momentum, self.weight_decay,
                                 clip_norm=None if dense else self.clip_norm, lr_scale=scale),
        batch_size=self.batch_size,
        local_epochs=self.local_epochs,
        local_steps=self.local_steps,
        dense_clip_norm=self.clip_norm if dense else None,
    )

  def finetune_kwargs(self, round: jax.Array | int, epochs: int) -> dict[str, Any]:
    """Keywords for `client.local_train` when a client fine-tunes `epochs` epochs at evaluation after `round` rounds:
    `finetune_lr` if set, else round `round`'s lr."""
    kwargs = {**self.train_kwargs(round), "local_epochs": epochs, "local_steps": None}
    if self.finetune_lr is not None:
      kwargs["optimizer"] = make_optimizer(None, self.finetune_lr, self.momentum, self.weight_decay,
                                           clip_norm=None if self.clip_mode == "dense" else self.clip_norm)
    return kwargs

  def as_dict(self) -> dict[str, Any]:
    """The hyperparameters a run records. Not the mesh or platform: they say where the programs run, and results
    do not depend on them; nor the optimizer, an object."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("optimizer", "mesh", "platform")}


# Which gradient `clip_norm` measures (`Common.clip_mode`).
CLIP_MODES = ("masked", "dense")

# The platforms a program can be built for: jax.export's names, and "gpu" as `jax.default_backend()` says on CUDA.
PLATFORMS = ("cpu", "cuda", "rocm", "gpu", "tpu")


def target_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                    platform: str | None = None) -> str:
  """The platform the programs are built for: `platform`, else the mesh's devices', else `jax.default_backend()`.

  Args:
    mesh: the algorithm's mesh, if any: a `Mesh` names its devices' platform; an `AbstractMesh` names one only
      when built with an `abstract_device`.
    platform: an explicit choice, one of `PLATFORMS` (for exports and cross-compilation); it must agree with a
      mesh that names a platform.

  Returns:
    One of `PLATFORMS`.
  """
  check_platform(mesh, platform)
  return platform or mesh_platform(mesh) or jax.default_backend()


def check_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None, platform: str | None) -> None:
  """Clear errors for an unknown `platform` or one that the mesh's devices contradict (no backend is started)."""
  if platform is None:
    return
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS} (or None: the mesh's or the default backend), "
                     f"got {platform!r}")
  on_mesh = mesh_platform(mesh)
  if on_mesh is not None and accelerator_kind(platform) != accelerator_kind(on_mesh):
    raise ValueError(f"platform {platform!r} does not match the mesh's devices, which are {on_mesh!r}")


def mesh_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None) -> str | None:
  """The platform of a mesh's devices (an `AbstractMesh`'s `abstract_device`); None when it names none."""
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh.devices.flat[0].platform
  device = getattr(mesh, "abstract_device", None)
  return None if device is None else device.platform


def accelerator_kind(platform: str) -> str:
  """"gpu" for the GPU platforms' names ("cuda", "rocm", "gpu"), the name itself for the others."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_cohort_batch(cohort_batch: int | str | None, platform: str) -> int | None:
  """`cohort_batch` with "auto" resolved for the programs' platform: 1 on "cpu", the whole cohort (None) elsewhere.

  Args:
    cohort_batch: "auto", None or a positive int (`Common.cohort_batch`).
    platform: the platform the programs are built for (`target_platform`).

  Returns:
    The clients vmapped together, as `round.make_round` takes it.
  """
  if cohort_batch == "auto":
    return 1 if platform == "cpu" else None
  return cohort_batch


def make_apply_fn(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, x) -> logits for a flax module without mutable collections."""
  return lambda params, x: model.apply({"params": params}, x)


def make_optimizer(
    optimizer: optax.GradientTransformation | None, lr: float, momentum: float, weight_decay: float, *,
    clip_norm: float | None = None, lr_scale: jax.Array | None = None,
) -> optax.GradientTransformation:
  """The clients' optimizer: the given optax transformation (its updates scaled by `lr_scale`), or
  SGD(lr * lr_scale, momentum) with optional weight decay; the gradient clipped to `clip_norm` first."""
  if optimizer is not None:
    parts = [optimizer] if lr_scale is None else [optimizer, optax.scale(lr_scale)]
  else:
    if not isinstance(lr, jax.core.Tracer) and not lr > 0:  # a traced lr: a sweep over lrs (checked before)
      raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    sgd = optax.sgd(lr if lr_scale is None else lr * lr_scale, momentum=momentum or None)
    parts = [optax.add_decayed_weights(weight_decay), sgd] if weight_decay else [sgd]
  if clip_norm is not None:
    parts.insert(0, optax.clip_by_global_norm(clip_norm))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def check_lr_decay(lr_decay: Any) -> None:
  if isinstance(lr_decay, bool) or not isinstance(lr_decay, (int, float)) or not 0.0 < lr_decay <= 1.0:
    raise ValueError(f"lr_decay must be a number in (0, 1] (the lr at round t is lr * lr_decay^t), got {lr_decay!r}")


def check_clip_norm(clip_norm: Any) -> None:
  if clip_norm is None:
    return
  if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not clip_norm > 0:
    raise ValueError(f"clip_norm must be a number > 0 (or null: no clipping), got {clip_norm!r}")


def check_finetune_lr(finetune_lr: Any, optimizer: Any) -> None:
  if finetune_lr is None:
    return
  if isinstance(finetune_lr, bool) or not isinstance(finetune_lr, (int, float)) or not finetune_lr > 0:
    raise ValueError(f"finetune_lr must be a number > 0 (or null: the clients' lr at that round), got {finetune_lr!r}")
  if optimizer is not None:
    raise ValueError("finetune_lr sets the lr of the built-in SGD; with an optax `optimizer`, leave it None")


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


def check_model_fits(model: nn.Module, data: FederatedData) -> None:
  """Raises ValueError, before anything is compiled, when the model cannot consume `data` or emits wrong logits."""
  if not isinstance(data, (FederatedData, PlacedData)):
    raise TypeError(f"data must be a fedspa_jax.data.FederatedData, got {type(data).__name__}")
  x = jax.ShapeDtypeStruct((1, *data.sample_shape), jnp.float32)
  try:
    # An abstract key: with a constant one the initializers would run (and compile) eagerly.
    out = jax.eval_shape(lambda key, x: model.init_with_output(key, x)[0], jax.eval_shape(jax.random.key, 0), x)
  except Exception as e:  # flax and lax raise many types for a shape mismatch
    raise ValueError(
        f"model {type(model).__name__} does not accept inputs of shape {data.sample_shape} "
        f"from dataset {data.name!r}: {e}"
    ) from e
  label_shape = tuple(data.train.y.shape[1:])  # () for labels, (L,) for sequences of next-token labels
  if out.shape != (1, *label_shape, data.num_classes):
    per = f"per sample and label position ({label_shape[0]} positions)" if label_shape else "per sample"
    raise ValueError(
        f"model {type(model).__name__} outputs logits of shape {out.shape[1:]} per sample but dataset "
        f"{data.name!r} has {data.num_classes} classes {per}"
    )
  if data.test.sample_shape != data.sample_shape:
    raise ValueError(f"train samples have shape {data.sample_shape} but test samples {data.test.sample_shape}")


def check_cohort(clients_per_round: Any, data: FederatedData) -> None:
  if not isinstance(clients_per_round, (int, np.integer)) or not 1 <= clients_per_round <= data.num_clients:
    raise ValueError(
        f"clients_per_round must be an integer in [1, {data.num_clients}] for a dataset of "
        f"{data.num_clients} clients, got {clients_per_round!r}"
    )


def check_state_matches(state: Any, data: FederatedData, layout: store_lib.StoreLayout, rows: int) -> None:
  """The client store must hold exactly this algorithm's encoded state for `rows` clients (K, or K_pad on a mesh)."""
  if not isinstance(state, SimState):
    raise TypeError(f"state must be a SimState from this algorithm's init, got {type(state).__name__}")
  leaves = jax.tree.leaves(state.clients)
  if leaves and leaves[0].shape[0] != rows:
    raise ValueError(
        f"state holds {leaves[0].shape[0]} clients but data has {data.num_clients}"
        + (f" (padded to {rows} over the mesh)" if rows != data.num_clients else "")
        + "; call init with this dataset and mesh"
    )
  store_lib.check_store(state.clients, layout, rows)


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
    protocol: str = "own",
    finetune_epochs: int = 0,
    make_peers: Callable[[int], Any] | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_view: Callable[[Any], Any] | None = None,
    dp_public: tuple[str, ...] = (),
    dp_refusal: str | None = None,
) -> Algorithm:
  """Builds an `Algorithm` from the parts that differ between methods.

  Args:
    name, hparams: for the registry and logs (the common hyperparameters are added to `hparams`).
    model: the flax model.
    common: the hyperparameters every algorithm shares.
    init_clients: the initial (decoded) state of a chunk of clients; the store encodes it (bool leaves as bits).
    make_client_fn: preprocess -> one client's update (w, client_state, data, key, round) -> ClientOutput.
    make_personalize: preprocess -> (w, client_state, train_data, key) -> {name: `evaluation.Personal`}, the
      model(s) client k is scored with, `protocol` first.
    account: extra per-round metrics from the params and the cohort's metrics (bytes, FLOPs).
    aggregation: "mean" or "masked_mean".
    protocol: the name of the method's own evaluation protocol (the first model `make_personalize` returns).
    finetune_epochs: the fine-tuning epochs of the method's own protocol (FedAvg-FT's; `evaluate`'s default).
    make_peers: K -> the clients each cohort client reads (`round.make_round`'s `peers`; DisPFL's neighbours), or
      None: a client reads only its own state.
    server_optimizer: the server's step on the aggregated update (default: SGD at `server_lr`); its state is the
      server's own state (FedDST's global mask).
    server_view: ServerState -> what client functions and `make_personalize`'s functions get as the server's model
      (default: its params).
    dp_public: the keys of a dict update that client-level DP leaves uncovered (`server.DPSpec.public`).
    dp_refusal: why client-level DP does not apply to the method (None: it does); with DP options set, building the
      algorithm raises ValueError with it, before anything is compiled.
  """
  check_aggregation(aggregation, common.weighting)
  check_finetune_epochs(finetune_epochs)
  own_finetune_epochs = finetune_epochs
  clients_per_round = common.clients_per_round
  mesh = common.mesh
  dp = common.dp_spec()
  if dp is not None and dp_refusal is not None:
    raise ValueError(f"{name} does not support client-level DP (dp_clip): {dp_refusal}")
  if dp is not None and dp_public:
    dp = dp._replace(public=tuple(dp_public))
  fates = common.availability_spec()
  server_optimizer = optax.sgd(common.server_lr) if server_optimizer is None else server_optimizer
  view = (lambda server: server.params) if server_view is None else server_view
  apply_fn = make_apply_fn(model)
  layout_of = lambda params: store_lib.make_layout(init_clients, params)
  placement_of = lambda data: population.make_placement(data.num_clients, mesh, common.cohort_strata)

  def check_population(data):
    if isinstance(data, PlacedData):  # its offsets are local to the blocks it was placed for
      population.check_placed(data, placement_of(data))
    population.check_population(placement_of(data), clients_per_round, common.cohort_sampling, mesh)

  def init(key: jax.Array, data: FederatedData | PlacedData):
    check_cohort(clients_per_round, data)
    check_population(data)
    check_model_fits(model, data)
    if mesh is None:
      return jax.jit(functools.partial(init_one_device, sample_shape=data.sample_shape,
                                       num_clients=data.num_clients))(key)
    check_devices(mesh, "init")
    return init_sharded(key, data)

  def init_one_device(key, *, sample_shape, num_clients):
    # One program: run eagerly, every initializer and every op on the params would compile on its own.
    k_params, k_clients, k_sim = jax.random.split(key, 3)
    params = model.init(k_params, jnp.zeros((1, *sample_shape), jnp.float32))["params"]
    return SimState(
        server=init_server(params, server_optimizer, dp),
        clients=store_lib.init_store(init_clients, layout_of(params), k_clients, params, num_clients),
        round=jnp.zeros((), jnp.int32),
        key=k_sim,
        participation=jnp.zeros((num_clients,), jnp.int32),
    )

  def init_sharded(key, data):
    # Everything is drawn inside one program: the replicated server state, and each device's own block of the
    # store (client k's state from k, whatever the block). The key enters as host data, so this runs unchanged
    # under jax.distributed (every process passes the same value).
    placement = placement_of(data)
    impl = jax.random.key_impl(key)
    sample = jnp.zeros((1, *data.sample_shape), jnp.float32)

    def build(key_data):
      k_params, k_clients, k_sim = jax.random.split(jax.random.wrap_key_data(key_data, impl=impl), 3)
      params = model.init(k_params, sample)["params"]
      layout = layout_of(params)

      def block(params, k_clients):
        first = jax.lax.axis_index(CLIENT_AXIS) * placement.block
        return store_lib.init_store(init_clients, layout, k_clients, params, placement.block, first=first)

      store = jax.shard_map(block, mesh=mesh, in_specs=(P(), P()), out_specs=P(CLIENT_AXIS), check_vma=False)(
          params, k_clients
      )
      return SimState(
          server=init_server(params, server_optimizer, dp),
          clients=store,
          round=jnp.zeros((), jnp.int32),
          key=k_sim,
          participation=jnp.zeros((placement.padded,), jnp.int32),
      )

    shardings = SimState(server=replicated, clients=by_client, round=replicated, key=replicated,
                         participation=by_client)
    return inflight.paced(jax.jit(build, out_shardings=shardings), mesh)(np.asarray(jax.random.key_data(key)))

  replicated = None if mesh is None else NamedSharding(mesh, P())
  by_client = None if mesh is None else NamedSharding(mesh, P(CLIENT_AXIS))

  def place(data: FederatedData):
    """The data as the round takes it: on the device, or laid out over the mesh (`population.place`)."""
    if mesh is None:
      return jax.device_put(data)
    check_devices(mesh, "place")
    return population.place(data, mesh, common.cohort_strata)

  def check(state, data):
    # Runs at trace time: bad input surfaces here, before compilation.
    if mesh is not None and not isinstance(data, PlacedData):
      raise TypeError("with a mesh, the round and evaluate take the data laid out over it: pass algo.place(data)")
    if mesh is None and isinstance(data, PlacedData):
      raise TypeError("this data is laid out over a mesh; build the algorithm with that mesh")
    check_model_fits(model, data)
    check_cohort(clients_per_round, data)
    check_population(data)
    availability.check_clients(fates, data.num_clients)
    layout = layout_of(state.server.params)
    check_state_matches(state, data, layout, placement_of(data).padded if mesh is not None else data.num_clients)
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
        mesh=mesh,
        cohort_batch=resolve_cohort_batch(common.cohort_batch, target_platform(mesh, common.platform)),
        sampling=common.cohort_sampling,
        strata=common.cohort_strata,
        encode=layout.encode,
        decode=layout.decode,
        dp=dp,
        availability=fates,
        peers=None if make_peers is None else make_peers(data.num_clients),
        server_view=server_view,
    )
    new_state, metrics = run(state, data.train)
    real = jnp.sum(metrics["cohort"] < data.num_clients)
    costs = account(state.server.params, metrics, real, state.round, data.sample_shape)
    if "started" in metrics:  # dropouts: a client that never started sent and received nothing
      costs = accounting.without_unstarted(costs, metrics["started"])
    metrics.update(costs)
    return new_state, metrics

  def evaluate_options(state, data, preprocess, epochs):
    """The keywords of `make_evaluate(_clients)`: personalize, fine-tuning (E epochs at round t's lr), FLOPs."""
    personalize = make_personalize(preprocess)

    def scored(w, state_k, train_k, key):
      models = personalize(w, state_k, train_k, key)
      if next(iter(models)) != protocol:
        raise AssertionError(f"{name}: personalize returned {list(models)}, but its protocol is {protocol!r}")
      return models

    finetune = None
    if epochs:
      kwargs = common.finetune_kwargs(state.round, epochs)

      def finetune(personal: Personal, train_k, key):
        result = local_train(personal.params, personal.mask, train_k, key, apply_fn=apply_fn, preprocess=preprocess,
                             **kwargs)
        return result.params, result.samples

    forward = flops.forward_flops(model, data.sample_shape)

    def forward_flops(personal: Personal):
      if personal.mask is None:
        return jnp.float32(sum(forward.values()))
      return accounting.mask_training_flops(forward, personal.mask) / 3.0

    return dict(clients_per_batch=common.eval_clients_per_batch, finetune=finetune, forward_flops=forward_flops,
                personalize=scored, apply_fn=apply_fn)

  def evaluate_fn(state, data: FederatedData, clients=None, finetune_epochs=None):
    layout = check(state, data)
    epochs = own_finetune_epochs if finetune_epochs is None else finetune_epochs
    preprocess = make_preprocess(data.mean, data.std)
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2)  # 0: cohort, 1: clients
    options = evaluate_options(state, data, preprocess, epochs)
    if mesh is not None:
      return with_staleness(evaluate_sharded(state, data, clients, layout, preprocess, key, options), state.round)
    evaluate_clients = make_evaluate(**options)
    ids = jnp.arange(data.num_clients, dtype=jnp.int32) if clients is None else jnp.asarray(clients, jnp.int32)
    return with_staleness(evaluate_clients(
        view(state.server), lambda i: layout.gather(state.clients, i), ids, state.participation, data.train,
        data.test, key, preprocess,
    ), state.round)

  def evaluate_sharded(state, data, clients, layout, preprocess, key, options):
    # Each device evaluates the clients it holds; the per-client results are gathered, replicated.
    placement = placement_of(data)
    evaluate_clients = make_evaluate_clients(**options)
    every = clients is None

    def body(params, store, participation, train, test, key, ids):
      first = jax.lax.axis_index(CLIENT_AXIS) * placement.block
      gather = lambda rows: layout.gather(store, rows)
      if every:  # my block, every row
        rows = jnp.arange(placement.block, dtype=jnp.int32)
        out = evaluate_clients(params, gather, rows, first + rows, first + rows < data.num_clients, train, test,
                               key, preprocess)
        return {**out, "participation": participation}
      held = (ids >= first) & (ids < first + placement.block)
      rows = jnp.where(held, ids - first, 0)
      out = evaluate_clients(params, gather, rows, ids, held, train, test, key, preprocess)
      out = {**out, "participation": jnp.where(held, jnp.take(participation, rows), 0)}
      # Exactly one device holds each client: the others add zeros (NaN stays NaN).
      return jax.tree.map(lambda a: psum_held(a, held), out)

    ids = jnp.zeros((1,), jnp.int32) if every else jnp.asarray(clients, jnp.int32)
    out_spec = P(CLIENT_AXIS) if every else P()
    out = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS), P(), P()),
        out_specs=out_spec, check_vma=False,
    )(view(state.server), state.clients, state.participation, data.train, data.test, key, ids)
    if every:
      ids = jnp.arange(data.num_clients, dtype=jnp.int32)
      out = jax.tree.map(lambda a: a[: data.num_clients], out)
    out = jax.lax.with_sharding_constraint(out, replicated)
    participated = out.pop("participation") > 0
    return summaries(ids, out, participated)

  # A CPU mesh: a bound on programs in flight.
  jitted_evaluate = inflight.paced(jax.jit(evaluate_fn, static_argnames="finetune_epochs"), mesh)

  def evaluate(state, data: FederatedData, clients=None, finetune_epochs=None):
    check_eval_clients(clients, data.num_clients)
    if finetune_epochs is not None:
      check_finetune_epochs(finetune_epochs)
    ids = None if clients is None else np.asarray(clients, np.int32)
    return jitted_evaluate(state, data, ids, finetune_epochs=finetune_epochs)

  def client_states(state, data: FederatedData, clients=None):
    """The decoded state of `clients` (default: all), leaves [C, ...] (FedSpa: bool masks)."""
    check_eval_clients(clients, data.num_clients)
    ids = np.arange(data.num_clients) if clients is None else np.asarray(clients)
    gather = layout_of(state.server.params).gather
    if mesh is None:
      return gather(state.clients, jnp.asarray(ids, jnp.int32))
    gather_all = inflight.paced(jax.jit(gather, out_shardings=replicated), mesh, wait=True)  # [C, ...]: waited for
    return gather_all(state.clients, np.asarray(ids, np.int32))

  return Algorithm(
      name=name,
      hparams={**common.as_dict(), **hparams, "aggregation": aggregation},
      init=init,
      round=inflight.paced(jax.jit(round_fn, donate_argnums=0), mesh),
      evaluate=evaluate,
      round_fn=round_fn,
      client_states=client_states,
      evaluate_fn=evaluate_fn,
      place=place,
      protocol=protocol,
      strata=lambda num_clients: population.make_placement(num_clients, mesh, common.cohort_strata).strata,
  )


def check_devices(mesh: Any, what: str) -> None:
  """Raises TypeError when `what` would put arrays on an `AbstractMesh`, which has no devices to hold them."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    raise TypeError(f"{what} needs devices, but this algorithm's mesh is an AbstractMesh (for exporting or lowering "
                    "round_fn and evaluate_fn on shapes); build it with a jax.sharding.Mesh to run it")


def psum_held(a: jax.Array, held: jax.Array) -> jax.Array:
  """Sum over the client axis of the entries of `a` [C] where `held` [C], zeros elsewhere (bools: any)."""
  kept = jnp.where(held, a, jnp.zeros((), a.dtype))
  if a.dtype == jnp.bool_:
    return jax.lax.psum(kept.astype(jnp.int32), CLIENT_AXIS) > 0
  return jax.lax.psum(kept, CLIENT_AXIS)


def check_finetune_epochs(epochs: Any) -> None:
  if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
    raise ValueError(f"finetune_epochs must be an integer >= 0, got {epochs!r}")


def dense_training_flops(model: nn.Module, sample_shape: tuple[int, ...], metrics: dict) -> dict[str, jax.Array]:
  """A dense method's round FLOPs: 3 x dense forward per sample trained on, over every training pass
  (`accounting.TRAINING_PASSES`: Ditto's global model, FedRep's head too)."""
  per_sample = flops.training_flops(model, sample_shape).dense_per_sample
  return accounting.round_flops(per_sample, per_sample, accounting.trained_samples(metrics))


def stacked(tree: Any, ids: jax.Array) -> Any:
  """One copy of every leaf per client in `ids` [C], stacked on a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (ids.shape[0], *a.shape)), tree)
