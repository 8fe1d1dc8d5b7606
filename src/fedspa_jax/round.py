"""One federated round as one pure function: sample, gather, client updates in work-sized groups, aggregate, scatter.

The round never loops over clients in Python and never syncs with the host: the cohort is drawn in-graph from
`fold_in(key, round)` (a uniform subset, in O(S^2) work, independent of K), the cohort's persistent state is
gathered from the [K, ...] store (and decoded, e.g. mask bits unpacked), its samples are read from the flat data by
offset, the client function runs over the cohort, the server aggregates (padding clients weigh 0), and the updated
client state is encoded and scattered back into the store, which the jitted round donates: a round costs O(S * P),
not O(K * P). Client k's randomness is `fold_in(round key, k)`, so a client's work does not depend on its position
in the cohort.

Work follows the samples: each client runs exactly its own number of local steps (a traced loop bound, see
`client.local_train`). The cohort is sorted by size and run as `lax.map` over groups of `cohort_batch` clients,
vmapped within a group, so a group costs its own largest client's steps times its width: with groups of one, the
round's work is exactly the cohort's samples; with one group (`cohort_batch=None`), every lane runs to the cohort's
largest client. The algorithms' default ("auto") is groups of one on CPU and one group on accelerators. With a
`jax.sharding.Mesh`, each group's client axis is sharded over the mesh's "clients" axis (groups padded to a
multiple of its size with weight-0 clients).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedspa_jax.client import CLIENT_DATA_AXES, ClientData
from fedspa_jax.server import AGGREGATIONS, WEIGHTINGS, ServerState, aggregate, server_update

CLIENT_AXIS = "clients"


class SimState(NamedTuple):
  """Everything a simulation carries from round to round.

  Attributes:
    server: the shared model and server optimizer state.
    clients: persistent per-client state, leaves [K, ...] (FedSpa: mask bits packed in uint32 words).
    round: int32 scalar, rounds completed.
    key: PRNG key of the simulation.
    participation: int32 [K], rounds in which each client was sampled.
  """

  server: ServerState
  clients: Any
  round: jax.Array
  key: jax.Array
  participation: jax.Array


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
  """[cohort_size] distinct client ids, a uniformly random subset of [0, num_clients).

  Floyd's algorithm: for j = K - S, ..., K - 1, draw t uniform in [0, j] and take t, or j if t is taken already.
  O(S^2) work and O(S) memory, whatever K is (a permutation of all K ids would cost O(K log K) every round).
  """
  start = num_clients - cohort_size

  def take(i, chosen):
    j = start + i
    t = jax.random.randint(jax.random.fold_in(key, i), (), 0, j + 1, dtype=jnp.int32)
    return chosen.at[i].set(jnp.where(jnp.any(chosen == t), j, t))

  return jax.lax.fori_loop(0, cohort_size, take, jnp.full((cohort_size,), -1, jnp.int32))


def client_keys(key: jax.Array, cohort: jax.Array) -> jax.Array:
  """One key per client, derived from its id (not its cohort position)."""
  return jax.vmap(lambda k: jax.random.fold_in(key, k))(cohort)


def gather_clients(tree: Any, cohort: jax.Array) -> Any:
  """Rows `cohort` of every [K, ...] leaf (ids past K-1 are clipped; they only occur for weight-0 padding)."""
  return jax.tree.map(lambda a: jnp.take(a, cohort, axis=0, mode="clip"), tree)


def scatter_clients(tree: Any, cohort: jax.Array, rows: Any) -> Any:
  """Writes `rows` [S, ...] into rows `cohort` of every [K, ...] leaf; ids past K-1 are dropped."""
  return jax.tree.map(lambda a, r: a.at[cohort].set(r.astype(a.dtype), mode="drop"), tree, rows)


def group_size_for(cohort_size: int, cohort_batch: int | None, mesh: Mesh | None) -> int:
  """Clients vmapped together: `cohort_batch` (default: the whole cohort), a multiple of the mesh's client axis."""
  group = cohort_size if cohort_batch is None else min(cohort_batch, cohort_size)
  if mesh is None:
    return group
  shards = mesh.shape[CLIENT_AXIS]
  return -(-group // shards) * shards


def cohort_size_for(cohort_size: int, mesh: Mesh | None, cohort_batch: int | None = None) -> int:
  """The padded cohort size: a multiple of the group size (itself a multiple of the mesh's client axis)."""
  group = group_size_for(cohort_size, cohort_batch, mesh)
  return -(-cohort_size // group) * group


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
    group_size: int,
    mesh: Mesh | None = None,
) -> tuple[ServerState, Any, dict[str, jax.Array]]:
  """The cohort's part of a round: client updates in groups, aggregation and the server step.

  Args:
    client_fn: one client's update.
    server: server state.
    cohort_state: the cohort's client state, leaves [S, ...] (S a multiple of `group_size`).
    cohort_data: the flat training split's x and y, with the cohort's offset [S] and count [S].
    weights: [S] aggregation weights (0 for padding clients).
    keys: [S] client keys.
    round: int32 round index.
    aggregation: "mean" or "masked_mean".
    server_optimizer: optax transformation applied to the aggregated update.
    group_size: clients vmapped together; groups run one after another (`lax.map`), in one program.
    mesh: optional mesh whose "clients" axis shards each group.

  Returns:
    (new server state, new cohort state [S, ...], per-client metrics [S]).
  """
  x, y, offset, count = cohort_data
  per_client = (cohort_state, offset, count, keys)

  def run_group(group):
    state_g, offset_g, count_g, keys_g = shard_cohort(group, mesh)
    if group_size == 1 and mesh is None:
      # One client: call it unbatched, so its loops and conds stay scalar (a vmapped lane of one would turn every
      # loop step into a select over the whole carry, and every cond into both branches).
      one = lambda a: a[0]
      out = client_fn(server.params, jax.tree.map(one, state_g), ClientData(x, y, one(offset_g), one(count_g)),
                      one(keys_g), round)
      return jax.tree.map(lambda a: a[None], out)
    data_g = ClientData(x, y, offset_g, count_g)
    return jax.vmap(client_fn, in_axes=(None, 0, CLIENT_DATA_AXES, 0, None))(
        server.params, state_g, data_g, keys_g, round
    )

  num_groups = weights.shape[0] // group_size
  if num_groups == 1:
    out = run_group(per_client)
  else:
    split = lambda a: a.reshape((num_groups, group_size) + a.shape[1:])
    merge = lambda a: a.reshape((num_groups * group_size,) + a.shape[2:])
    out = jax.tree.map(merge, jax.lax.map(run_group, jax.tree.map(split, per_client)))
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
    gather_state: Callable[[Any, jax.Array], Any] | None = None,
    scatter_state: Callable[[Any, jax.Array, Any], Any] | None = None,
) -> Callable[[SimState, Any], tuple[SimState, dict[str, jax.Array]]]:
  """Builds `round(state, train) -> (state, metrics)`, pure and jit-able.

  Args:
    client_fn: one client's update (vmapped over each group of the cohort).
    num_clients: K.
    cohort_size: S clients sampled per round.
    aggregation: "mean" or "masked_mean".
    weighting: "samples" (weights = sample counts) or "uniform" (1 per client with training data).
    server_optimizer: optax transformation for the server step (optax.sgd(server_lr) by default upstream).
    mesh: optional mesh with a "clients" axis.
    cohort_batch: clients vmapped together (None: the whole cohort); see the module docstring.
    gather_state: (store, ids [S]) -> the clients' state [S, ...] (default `gather_clients`; e.g. unpacks bits).
    scatter_state: (store, ids [S], rows) -> the store with rows written (default `scatter_clients`).

  Returns:
    A function of (SimState, flat training split with x, y, offset [K], count [K]) returning the new state and
    metrics: "cohort" [S_pad] (ids in execution order, largest client first; K marks padding), "weight" [S_pad],
    and each client metric [S_pad].
  """
  group = group_size_for(cohort_size, cohort_batch, mesh)
  padded = cohort_size_for(cohort_size, mesh, cohort_batch)
  gather_state = gather_state or gather_clients
  scatter_state = scatter_state or scatter_clients

  def round_fn(state: SimState, train: Any) -> tuple[SimState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.key, state.round)
    cohort = sample_cohort(jax.random.fold_in(key, 0), num_clients, cohort_size)
    cohort = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), num_clients, jnp.int32)])
    count = jnp.where(cohort < num_clients, jnp.take(train.count, cohort, mode="clip"), 0)
    order = jnp.argsort(-count, stable=True)  # largest first: groups of similar work
    cohort, count = cohort[order], count[order]
    offset = jnp.take(train.offset, cohort, mode="clip")
    # A client without training data sends a zero update and weighs 0 under either rule.
    weights = count.astype(jnp.float32) if weighting == "samples" else (count > 0).astype(jnp.float32)
    keys = client_keys(jax.random.fold_in(key, 1), cohort)
    server, cohort_state, metrics = run_cohort(
        client_fn,
        state.server,
        gather_state(state.clients, cohort),
        ClientData(train.x, train.y, offset, count),
        weights,
        keys,
        state.round,
        aggregation=aggregation,
        server_optimizer=server_optimizer,
        group_size=group,
        mesh=mesh,
    )
    new_state = SimState(
        server=server,
        clients=scatter_state(state.clients, cohort, cohort_state),
        round=state.round + 1,
        key=state.key,
        participation=state.participation.at[cohort].add(1, mode="drop"),
    )
    return new_state, {"cohort": cohort, "weight": weights, **metrics}

  return round_fn


def check_aggregation(aggregation: str, weighting: str) -> None:
  """Clear errors for the aggregation rule and client weighting, raised before anything is traced."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
