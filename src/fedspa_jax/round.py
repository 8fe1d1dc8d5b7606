"""One federated round as one pure function: sample, gather, vmapped client updates, aggregate, scatter.

The round never loops over clients in Python and never syncs with the host: the cohort is drawn in-graph from
`fold_in(key, round)`, the cohort's data and persistent state are gathered from the [K, ...] stores, the client
function is vmapped over the cohort, the server aggregates (padding clients weigh 0), and the updated client state is
scattered back. Client k's randomness is `fold_in(round key, k)`, so a client's work does not depend on its position
in the cohort. With a `jax.sharding.Mesh` the cohort axis is sharded over the mesh's "clients" axis (padded to a
multiple of its size with weight-0 clients).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedspa_jax.client import ClientData
from fedspa_jax.server import AGGREGATIONS, WEIGHTINGS, ServerState, aggregate, server_update

CLIENT_AXIS = "clients"


class SimState(NamedTuple):
  """Everything a simulation carries from round to round.

  Attributes:
    server: the shared model and server optimizer state.
    clients: persistent per-client state, leaves [K, ...] (FedSpa: masks).
    round: int32 scalar, rounds completed.
    key: PRNG key of the simulation.
  """

  server: ServerState
  clients: Any
  round: jax.Array
  key: jax.Array


class ClientOutput(NamedTuple):
  """What one client's update returns.

  Attributes:
    update: U_k = x_0 - x_final, the pytree the server aggregates.
    coverage: bool pytree of the coordinates U_k may touch (its mask), or None when dense.
    state: the client's new persistent state.
    metrics: dict of per-client scalars.
  """

  update: Any
  coverage: Any
  state: Any
  metrics: dict[str, jax.Array]


# (server params, client state, data, key, round) -> ClientOutput
ClientFn = Callable[[Any, Any, ClientData, jax.Array, jax.Array], ClientOutput]


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
  """[cohort_size] distinct client ids drawn uniformly without replacement."""
  return jax.random.permutation(key, num_clients)[:cohort_size].astype(jnp.int32)


def client_keys(key: jax.Array, cohort: jax.Array) -> jax.Array:
  """One key per client, derived from its id (not its cohort position)."""
  return jax.vmap(lambda k: jax.random.fold_in(key, k))(cohort)


def gather_clients(tree: Any, cohort: jax.Array) -> Any:
  """Rows `cohort` of every [K, ...] leaf (ids past K-1 are clipped; they only occur for weight-0 padding)."""
  return jax.tree.map(lambda a: jnp.take(a, cohort, axis=0, mode="clip"), tree)


def scatter_clients(tree: Any, cohort: jax.Array, rows: Any) -> Any:
  """Writes `rows` [S, ...] into rows `cohort` of every [K, ...] leaf; ids past K-1 are dropped."""
  return jax.tree.map(lambda a, r: a.at[cohort].set(r.astype(a.dtype), mode="drop"), tree, rows)


def cohort_size_for(cohort_size: int, mesh: Mesh | None) -> int:
  """The padded cohort size: a multiple of the mesh's client-axis size."""
  if mesh is None:
    return cohort_size
  shards = mesh.shape[CLIENT_AXIS]
  return -(-cohort_size // shards) * shards


def make_client_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) whose single axis "clients" shards the cohort."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (CLIENT_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def check_mesh(mesh: Mesh | None) -> None:
  """The round shards over a mesh axis named "clients" with automatic (GSPMD) sharding."""
  if mesh is None:
    return
  if CLIENT_AXIS not in mesh.axis_names:
    raise ValueError(f'the mesh needs an axis named "{CLIENT_AXIS}", got axes {mesh.axis_names}')
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[CLIENT_AXIS]
  if axis_type != AxisType.Auto:
    raise ValueError(
        f'the mesh axis "{CLIENT_AXIS}" must be of type AxisType.Auto, got {axis_type}; '
        "build the mesh with fedspa_jax.round.make_client_mesh() or jax.make_mesh(..., axis_types=(AxisType.Auto,))"
    )


def shard_cohort(tree: Any, mesh: Mesh | None) -> Any:
  """Constrains the leading (cohort) axis of every leaf to the mesh's client axis."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def run_cohort(
    client_fn: ClientFn,
    server: ServerState,
    cohort_state: Any,
    cohort_data: ClientData,
    weights: jax.Array,
    keys: jax.Array,
    round: jax.Array,
    *,
    aggregation: str,
    server_optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    cohort_batch: int | None = None,
) -> tuple[ServerState, Any, dict[str, jax.Array]]:
  """The cohort's part of a round: vmapped client updates, aggregation and the server step.

  Args:
    client_fn: one client's update.
    server: server state.
    cohort_state: the cohort's client state, leaves [S, ...].
    cohort_data: the cohort's data, leaves [S, N_max, ...] and count [S].
    weights: [S] aggregation weights (0 for padding clients).
    keys: [S] client keys.
    round: int32 round index.
    aggregation: "mean" or "masked_mean".
    server_optimizer: optax transformation applied to the aggregated update.
    mesh: optional mesh whose "clients" axis shards the cohort.
    cohort_batch: None vmaps the whole cohort at once; an int k runs it as `lax.map` over groups of k vmapped
      clients (still one program, same results). On CPU this keeps a group's working set in cache: measured 1.5x
      faster for the FedAvg CNN with k=2 (docs/models.md). Not combined with `mesh`.

  Returns:
    (new server state, new cohort state [S, ...], per-client metrics [S]).
  """
  cohort_state, cohort_data, weights, keys = shard_cohort((cohort_state, cohort_data, weights, keys), mesh)
  if cohort_batch is None:
    out = jax.vmap(client_fn, in_axes=(None, 0, 0, 0, None))(server.params, cohort_state, cohort_data, keys, round)
  else:
    one = lambda args: client_fn(server.params, *args, round)
    out = jax.lax.map(one, (cohort_state, cohort_data, keys), batch_size=cohort_batch)
  delta = aggregate(aggregation, out.update, out.coverage, weights)
  return server_update(server, delta, server_optimizer), out.state, out.metrics


def make_round(
    client_fn: ClientFn,
    *,
    num_clients: int,
    cohort_size: int,
    aggregation: str = "mean",
    weighting: str = "samples",
    server_optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    cohort_batch: int | None = None,
) -> Callable[[SimState, Any], tuple[SimState, dict[str, jax.Array]]]:
  """Builds `round(state, train) -> (state, metrics)`, pure and jit-able.

  Args:
    client_fn: one client's update (vmapped over the cohort).
    num_clients: K.
    cohort_size: S clients sampled per round.
    aggregation: "mean" or "masked_mean".
    weighting: "samples" (weights = sample counts) or "uniform" (1 per client).
    server_optimizer: optax transformation for the server step (optax.sgd(server_lr) by default upstream).
    mesh: optional mesh with a "clients" axis.
    cohort_batch: see `run_cohort`.

  Returns:
    A function of (SimState, ClientSplit-like train data with x [K, N_max, ...], y, count) returning the new state
    and metrics: "cohort" [S_pad] (ids; K marks padding), "weight" [S_pad], and each client metric [S_pad].
  """
  padded = cohort_size_for(cohort_size, mesh)

  def round_fn(state: SimState, train: Any) -> tuple[SimState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.key, state.round)
    cohort = sample_cohort(jax.random.fold_in(key, 0), num_clients, cohort_size)
    cohort = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), num_clients, jnp.int32)])
    real = cohort < num_clients
    data = gather_clients(ClientData(train.x, train.y, train.count), cohort)
    base = data.count.astype(jnp.float32) if weighting == "samples" else jnp.ones((padded,), jnp.float32)
    weights = jnp.where(real, base, 0.0)
    keys = client_keys(jax.random.fold_in(key, 1), cohort)
    server, cohort_state, metrics = run_cohort(
        client_fn,
        state.server,
        gather_clients(state.clients, cohort),
        data,
        weights,
        keys,
        state.round,
        aggregation=aggregation,
        server_optimizer=server_optimizer,
        mesh=mesh,
        cohort_batch=cohort_batch,
    )
    clients = scatter_clients(state.clients, cohort, cohort_state)
    new_state = SimState(server=server, clients=clients, round=state.round + 1, key=state.key)
    return new_state, {"cohort": cohort, "weight": weights, **metrics}

  return round_fn


def check_aggregation(aggregation: str, weighting: str) -> None:
  """Clear errors for the aggregation rule and client weighting, raised before anything is traced."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
