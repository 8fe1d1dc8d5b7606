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

Options, off by default (the round is then exactly the plain one): clients that drop out or straggle
(`fedspa_jax.availability`: a dropped client weighs 0, a straggler runs part of its steps), and client-level
differential privacy of the aggregate (`server.DPSpec`: clipping, noise). The round key's children: 0 the cohort,
1 the clients, 2 evaluation, 3 the DP noise, 4 the clients' availability.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from fedspa_jax.population import (CLIENT_AXIS, Placement, make_placement, sample_cohort, sample_strata,
                                   sample_stratified)

from fedspa_jax.availability import AvailabilitySpec, ClientFate, draw_fate, expected_reports
from fedspa_jax.client import CLIENT_DATA_AXES, ClientData
from fedspa_jax.server import (AGGREGATIONS, WEIGHTINGS, DPSpec, ServerState, aggregate, aggregate_parts, dp_parts,
                               dp_release, dp_split, finish_aggregate, server_update)


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
# (key, client ids [L]) -> the ids [L, N] of the other clients whose stored state each of them reads (DisPFL's
# neighbours); client k's from fold_in(key, k), so they do not depend on its cohort position or device.
PeersFn = Callable[[jax.Array, jax.Array], jax.Array]
# The round key's streams, fold_in(round key, i): 0 the cohort, 1 the clients, 2 evaluation, DP_STREAM the DP
# noise (`server.dp_release`), 4 dropouts and stragglers (`availability.draw_fate`), PEERS_STREAM the neighbours
# `peers` draws.
DP_STREAM = 3
FATE_STREAM = 4
PEERS_STREAM = 5


def with_peers(own: Any, peer_rows: Any, peer_ids: jax.Array) -> tuple[Any, Any]:
  """(own [L, ...], peers [L, N, ...]): the client state a round hands a client function when it reads its peers.

  Args:
    own: the cohort's decoded state, leaves [L, ...].
    peer_rows: the peers' decoded state, leaves [L * N, ...], row-major over `peer_ids`.
    peer_ids: int32 [L, N].
  """
  return own, jax.tree.map(lambda a: a.reshape(peer_ids.shape + a.shape[1:]), peer_rows)


def client_keys(key: jax.Array, cohort: jax.Array) -> jax.Array:
  """One key per client, derived from its id (not its cohort position)."""
  return jax.vmap(lambda k: jax.random.fold_in(key, k))(cohort)


def gather_clients(tree: Any, cohort: jax.Array) -> Any:
  """Rows `cohort` of every [K, ...] leaf (ids past K-1 are clipped; they only occur for weight-0 padding)."""
  return jax.tree.map(lambda a: jnp.take(a, cohort, axis=0, mode="clip"), tree)


def scatter_clients(tree: Any, cohort: jax.Array, rows: Any) -> Any:
  """Writes `rows` [S, ...] into rows `cohort` of every [K, ...] leaf; ids past K-1 are dropped."""
  return jax.tree.map(lambda a, r: a.at[cohort].set(r.astype(a.dtype), mode="drop"), tree, rows)


def group_size_for(cohort_size: int, cohort_batch: int | None) -> int:
  """Clients vmapped together: `cohort_batch`, at most the cohort (None: the whole cohort)."""
  return cohort_size if cohort_batch is None else min(cohort_batch, cohort_size)


def padded_size(size: int, group: int) -> int:
  """`size` rounded up to a multiple of `group`."""
  return -(-size // group) * group


def make_client_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all, across processes) whose single axis "clients" shards the population."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (CLIENT_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def check_mesh(mesh: Mesh | None) -> None:
  """The population is sharded over a mesh axis named "clients"."""
  if mesh is None:
    return
  if not isinstance(mesh, (Mesh, AbstractMesh)):  # an AbstractMesh: for programs exported or lowered, not run
    raise TypeError(f"mesh must be a jax.sharding.Mesh (or an AbstractMesh to export for), got {type(mesh).__name__}")
  if CLIENT_AXIS not in mesh.axis_names:
    raise ValueError(f'the mesh needs an axis named "{CLIENT_AXIS}", got axes {mesh.axis_names}')
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[CLIENT_AXIS]
  if axis_type != AxisType.Auto:
    raise ValueError(
        f'the mesh axis "{CLIENT_AXIS}" must be of type AxisType.Auto, got {axis_type}; '
        "build the mesh with fedspa_jax.round.make_client_mesh() or jax.make_mesh(..., axis_types=(AxisType.Auto,))"
    )


def draw_cohort(key: jax.Array, placement: Placement, cohort_size: int, sampling: str) -> jax.Array:
  """[S] distinct client ids: uniform over all K, or S / T from each stratum (`fedspa_jax.population`)."""
  if sampling == "stratified":
    return sample_stratified(key, placement, cohort_size)
  return sample_cohort(key, placement.num_clients, cohort_size)


def client_weights(count: jax.Array, weighting: str) -> jax.Array:
  """Aggregation weights: sample counts, or 1 per client with training data (a client without data weighs 0)."""
  return count.astype(jnp.float32) if weighting == "samples" else (count > 0).astype(jnp.float32)


def run_groups(
    client_fn: ClientFn,
    params: Any,
    per_client: tuple[Any, jax.Array, jax.Array, jax.Array] | tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array],
    x: jax.Array,
    y: jax.Array,
    round: jax.Array,
    group_size: int,
) -> ClientOutput:
  """Every client's update: `lax.map` over groups of `group_size` clients, vmapped within a group.

  Args:
    client_fn: one client's update.
    params: the server params.
    per_client: (state [S, ...], offset [S], count [S], keys [S]) and optionally work [S] (the share of its local
      steps each client runs), S a multiple of `group_size`.
    x, y: the flat samples the offsets point into.
    round: int32 round index.
    group_size: clients vmapped together; a group of one runs unbatched.

  Returns:
    The stacked `ClientOutput` [S, ...].
  """

  def run_group(group):
    state_g, offset_g, count_g, keys_g, *work_g = group
    work_g = work_g[0] if work_g else None
    if group_size == 1:
      # One client: call it unbatched, so its loops and conds stay scalar (a vmapped lane of one would turn every
      # loop step into a select over the whole carry, and every cond into both branches).
      one = lambda a: None if a is None else a[0]
      out = client_fn(params, jax.tree.map(one, state_g), ClientData(x, y, one(offset_g), one(count_g), one(work_g)),
                      one(keys_g), round)
      return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(client_fn, in_axes=(None, 0, CLIENT_DATA_AXES, 0, None))(
        params, state_g, ClientData(x, y, offset_g, count_g, work_g), keys_g, round
    )

  num_groups = per_client[1].shape[0] // group_size
  if num_groups == 1:
    return run_group(per_client)
  split = lambda a: a.reshape((num_groups, group_size) + a.shape[1:])
  merge = lambda a: a.reshape((num_groups * group_size,) + a.shape[2:])
  return jax.tree.map(merge, jax.lax.map(run_group, jax.tree.map(split, per_client)))


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
    dp: DPSpec | None = None,
    dp_key: jax.Array | None = None,
    expected: jax.Array | None = None,
    server_view: Callable[[ServerState], Any] | None = None,
) -> tuple[ServerState, Any, dict[str, jax.Array]]:
  """The cohort's part of a round on one device: client updates in groups, aggregation and the server step.

  Args:
    client_fn: one client's update.
    server: server state.
    cohort_state: the cohort's client state, leaves [S, ...] (S a multiple of `group_size`).
    cohort_data: the flat training split's x and y, with the cohort's offset [S], count [S] and optionally work [S].
    weights: [S] aggregation weights (0 for padding clients).
    keys: [S] client keys.
    round: int32 round index.
    aggregation: "mean" or "masked_mean".
    server_optimizer: optax transformation applied to the aggregated update.
    group_size: clients vmapped together; groups run one after another (`lax.map`), in one program.
    dp: client-level DP of the aggregate (None: the aggregation rule); the clients with weight > 0 report.
    dp_key: the round's noise key (with `dp`).
    expected: the expected number of reporting clients, the DP estimator's denominator (with `dp`).
    server_view: what the client functions get from the server (default: its params).

  Returns:
    (new server state, new cohort state [S, ...], per-client metrics [S]).
  """
  x, y, offset, count, work = cohort_data
  per_client = (cohort_state, offset, count, keys) + (() if work is None else (work,))
  shared = server.params if server_view is None else server_view(server)
  out = run_groups(client_fn, shared, per_client, x, y, round, group_size)
  if dp is None:
    delta = aggregate(aggregation, out.update, out.coverage, weights)
    return server_update(server, delta, server_optimizer), out.state, out.metrics
  private, public = dp_split(out.update, dp.public)
  (total, below), norms = dp_parts(private, weights > 0, server.clip)
  delta, clip = dp_release(total, below, server.clip, dp_key, dp, expected)
  if public is not None:  # the mask's messages, aggregated by the method's rule (not covered: DPSpec.public)
    delta = {**delta, **aggregate(aggregation, public, dp_split(out.coverage, dp.public)[1], weights)}
  metrics = {**out.metrics, "update_norm": norms, "dp_clip": server.clip}
  return server_update(server._replace(clip=clip), delta, server_optimizer), out.state, metrics


def keep_unstarted(new_rows: Any, old_rows: Any, started: jax.Array) -> Any:
  """The cohort's state rows, with those of clients that never started put back as they were."""
  return jax.tree.map(lambda n, o: jnp.where(started.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new_rows, old_rows)


def fate_metrics(fate: ClientFate, real: jax.Array) -> dict[str, jax.Array]:
  """Per-client round metrics [S] of dropouts and stragglers (0 for padding); "started": the client did its work
  (it reports, or its update was lost after training)."""
  return {"dropped": (real & ~fate.reports).astype(jnp.int32), "straggler": fate.straggler.astype(jnp.int32),
          "started": (real & fate.started).astype(jnp.int32)}


def identity(tree: Any) -> Any:
  return tree


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
    sampling: str = "uniform",
    strata: int | None = None,
    encode: Callable[[Any], Any] = identity,
    decode: Callable[[Any], Any] = identity,
    dp: DPSpec | None = None,
    availability: AvailabilitySpec | None = None,
    peers: PeersFn | None = None,
    server_view: Callable[[ServerState], Any] | None = None,
) -> Callable[[SimState, Any], tuple[SimState, dict[str, jax.Array]]]:
  """Builds `round(state, train) -> (state, metrics)`, pure and jit-able.

  Args:
    client_fn: one client's update (vmapped over each group of the cohort).
    num_clients: K.
    cohort_size: S clients sampled per round.
    aggregation: "mean" or "masked_mean".
    weighting: "samples" (weights = sample counts) or "uniform" (1 per client with training data).
    server_optimizer: optax transformation for the server step (optax.sgd(server_lr) by default upstream).
    mesh: optional mesh with a "clients" axis: the population is sharded over it (`fedspa_jax.population`); the
      state's store and the training split must then be laid out by `population.place` / the algorithm's init.
    cohort_batch: clients vmapped together (None: the whole cohort; with a mesh, per device); see the module
      docstring.
    sampling: "uniform" or "stratified" (`fedspa_jax.population`).
    strata: strata of the stratified sampling (default: the mesh's client axis size, 1 without a mesh).
    encode: decoded state rows -> stored rows (e.g. mask bits packed into words).
    decode: stored rows -> decoded rows.
    dp: client-level DP of the aggregate (`server.DPSpec`; the state's server must carry its clip: `init_server`).
    availability: dropouts and stragglers (`fedspa_jax.availability`).
    peers: optional; each cohort client then also reads the stored state of the clients `peers` names for it, as
      the store holds them at the start of the round (before any cohort client writes): the client function's
      state argument is the pair (own state, peers' states [N, ...]) (`with_peers`), and it returns its own new
      state. With a mesh the peers' rows are gathered from the devices that hold them (one psum of S * N rows).
    server_view: ServerState -> what the client functions get as their first argument (default: the params; FedDST
      also hands them the global mask its server optimizer's state keeps).

  Returns:
    A function of (SimState, flat training split with x, y, offset, count) returning the new state and metrics:
    "cohort" [S_pad] (ids in execution order; K marks padding), "weight" [S_pad], and each client metric [S_pad];
    with `availability` also "dropped", "straggler" and "started" [S_pad]; with `dp` "update_norm" [S_pad] (before
    clipping) and "dp_clip" (the clip norm of the round).
  """
  placement = make_placement(num_clients, mesh, strata)
  if mesh is not None:
    return make_sharded_round(
        client_fn, placement=placement, mesh=mesh, cohort_size=cohort_size, aggregation=aggregation,
        weighting=weighting, server_optimizer=server_optimizer, cohort_batch=cohort_batch, sampling=sampling,
        encode=encode, decode=decode, dp=dp, availability=availability, peers=peers, server_view=server_view,
    )
  group = group_size_for(cohort_size, cohort_batch)
  padded = padded_size(cohort_size, group)

  def round_fn(state: SimState, train: Any) -> tuple[SimState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.key, state.round)
    cohort = draw_cohort(jax.random.fold_in(key, 0), placement, cohort_size, sampling)
    cohort = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), num_clients, jnp.int32)])
    count = jnp.where(cohort < num_clients, jnp.take(train.count, cohort, mode="clip"), 0)
    order = jnp.argsort(-count, stable=True)  # largest first: groups of similar work
    cohort, count = cohort[order], count[order]
    offset = jnp.take(train.offset, cohort, mode="clip")
    weights = client_weights(count, weighting)
    fate = draw_fate(jax.random.fold_in(key, FATE_STREAM), cohort, state.round, availability, num_clients)
    weights = jnp.where(fate.reports, weights, 0.0)
    keys = client_keys(jax.random.fold_in(key, 1), cohort)
    old_rows = decode(gather_clients(state.clients, cohort))
    cohort_rows = old_rows
    if peers is not None:
      peer_ids = peers(jax.random.fold_in(key, PEERS_STREAM), jnp.minimum(cohort, num_clients - 1))
      peer_rows = decode(gather_clients(state.clients, peer_ids.reshape(-1)))
      cohort_rows = with_peers(old_rows, peer_rows, peer_ids)
    server, cohort_state, metrics = run_cohort(
        client_fn,
        state.server,
        cohort_rows,
        ClientData(train.x, train.y, offset, count, None if availability is None else fate.work),
        weights,
        keys,
        state.round,
        aggregation=aggregation,
        server_optimizer=server_optimizer,
        group_size=group,
        dp=dp,
        dp_key=jax.random.fold_in(key, DP_STREAM),
        expected=expected_reports(availability, state.round, cohort_size),
        server_view=server_view,
    )
    if availability is not None:
      cohort_state = keep_unstarted(cohort_state, old_rows, fate.started)
      metrics = {**metrics, **fate_metrics(fate, cohort < num_clients)}
    new_state = SimState(
        server=server,
        clients=scatter_clients(state.clients, cohort, encode(cohort_state)),
        round=state.round + 1,
        key=state.key,
        participation=state.participation.at[cohort].add(fate.started.astype(jnp.int32), mode="drop"),
    )
    return new_state, {"cohort": cohort, "weight": weights, **metrics}

  return round_fn


def deal_order(size: int, shards: int) -> jax.Array:
  """Positions of a largest-first list dealt to `shards` devices in snake order, device-major [shards * size/shards].

  Device e gets positions e, 2D-1-e, 2D+e, ...: every device a similar share of the work.
  """
  rows = size // shards
  grid = jnp.arange(size, dtype=jnp.int32).reshape(rows, shards)
  grid = jnp.where((jnp.arange(rows) % 2 == 1)[:, None], grid[:, ::-1], grid)
  return grid.T.reshape(-1)


def make_sharded_round(
    client_fn: ClientFn,
    *,
    placement: Placement,
    mesh: Mesh,
    cohort_size: int,
    aggregation: str,
    weighting: str,
    server_optimizer: optax.GradientTransformation,
    cohort_batch: int | None,
    sampling: str,
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    dp: DPSpec | None = None,
    availability: AvailabilitySpec | None = None,
    peers: PeersFn | None = None,
    server_view: Callable[[ServerState], Any] | None = None,
) -> Callable[[SimState, Any], tuple[SimState, dict[str, jax.Array]]]:
  """The round over a population sharded on `mesh` (see `make_round` and `fedspa_jax.population`).

  One `shard_map` over the "clients" axis: device d holds store rows and samples of clients [d*B, (d+1)*B) and
  trains L = S_pad / D cohort clients. "uniform": every device draws the same cohort, the cohort is sorted by size
  and dealt out in snake order, each client's stored row and padded samples go to its device by an all-to-all, and
  the new rows come back by an all-gather. "stratified": each device draws S / D clients from its own strata and
  nothing moves. Aggregation: partial sums per device, one all-reduce (with DP, of the clipped sums; the noise is
  drawn once from the replicated key, so every device adds the same).
  """
  num_clients, shards, block = placement.num_clients, placement.shards, placement.block
  stratified = sampling == "stratified"
  per_device = -(-cohort_size // shards)
  group = group_size_for(per_device, cohort_batch)
  local = padded_size(per_device, group)  # L
  padded = local * shards  # S_pad
  pad_id = placement.padded  # past every block: owned by no device
  spec, replicated = PartitionSpec(CLIENT_AXIS), PartitionSpec()

  def body(count_max, server, store, participation, x, y, offset, count, key, round):
    d = jax.lax.axis_index(CLIENT_AXIS)
    first = d * block
    k_cohort, k_clients = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    if stratified:
      per_shard = placement.strata // shards
      ids = sample_strata(k_cohort, placement, cohort_size, d * per_shard + jnp.arange(per_shard)).reshape(-1)
      ids = jnp.concatenate([ids, jnp.full((local - ids.shape[0],), pad_id, jnp.int32)])
      rows = ids - first
      mine = jnp.where(ids < num_clients, jnp.take(count, rows, mode="clip"), 0)
      order = jnp.argsort(-mine, stable=True)
      ids, rows, mine = ids[order], rows[order], mine[order]
      state_rows = jax.tree.map(lambda a: jnp.take(a, rows, axis=0, mode="clip"), store)
      data = (x, y, jnp.take(offset, rows, mode="clip"), mine)
    else:
      cohort = sample_cohort(k_cohort, num_clients, cohort_size)
      cohort = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), pad_id, jnp.int32)])
      owned = (cohort >= first) & (cohort < first + block)
      rows_all = jnp.where(owned, cohort - first, 0)
      sizes = jax.lax.psum(jnp.where(owned, jnp.take(count, rows_all), 0), CLIENT_AXIS)
      order = jnp.argsort(-sizes, stable=True)
      dealt = order[deal_order(padded, shards)]  # device-major: device e trains dealt[e*L:(e+1)*L]
      cohort, rows_all = cohort[dealt], rows_all[dealt]
      ids = jax.lax.dynamic_slice_in_dim(cohort, d * local, local)
      mine = jax.lax.dynamic_slice_in_dim(sizes[dealt], d * local, local)
      source = jnp.minimum(ids // block, shards - 1)  # the device that holds each of my clients

      def move(rows_out):
        """[S_pad, ...] rows (by cohort slot, meaningful where this device owns the client) -> my [L, ...] rows."""
        received = jax.lax.all_to_all(rows_out.reshape((shards, local) + rows_out.shape[1:]), CLIENT_AXIS, 0, 0)
        pick = source.reshape((1, local) + (1,) * (received.ndim - 2))
        return jnp.take_along_axis(received, pick, axis=0)[0]

      state_rows = jax.tree.map(lambda a: move(jnp.take(a, rows_all, axis=0)), store)
      within = jnp.arange(count_max, dtype=jnp.int32)[None, :]
      sample_rows = jnp.take(offset, rows_all)[:, None] + jnp.minimum(within, jnp.take(count, rows_all)[:, None] - 1)
      sample_rows = jnp.clip(sample_rows, 0, x.shape[0] - 1)
      x_mine = move(jnp.take(x, sample_rows.reshape(-1), axis=0).reshape((padded, count_max) + x.shape[1:]))
      y_mine = move(jnp.take(y, sample_rows.reshape(-1), axis=0).reshape((padded, count_max) + y.shape[1:]))
      data = (x_mine.reshape((local * count_max,) + x.shape[1:]), y_mine.reshape((local * count_max,) + y.shape[1:]),
              jnp.arange(local, dtype=jnp.int32) * count_max, mine)

    weights = client_weights(mine, weighting)
    fate = draw_fate(jax.random.fold_in(key, FATE_STREAM), ids, round, availability, num_clients)
    weights = jnp.where(fate.reports, weights, 0.0)
    keys = client_keys(k_clients, ids)
    x_d, y_d, offset_d, count_d = data
    old_rows = decode(state_rows)
    cohort_rows = old_rows
    if peers is not None:
      peer_ids = peers(jax.random.fold_in(key, PEERS_STREAM), jnp.minimum(ids, num_clients - 1))  # [L, N]
      cohort_rows = with_peers(old_rows, decode(gather_rows_anywhere(store, peer_ids.reshape(-1), first, block)),
                               peer_ids)
    shared = server.params if server_view is None else server_view(server)
    per_client = (cohort_rows, offset_d, count_d, keys) + (() if availability is None else (fate.work,))
    out = run_groups(client_fn, shared, per_client, x_d, y_d, round, group)
    extra = {}
    if dp is None:
      numerator, denominator = aggregate_parts(aggregation, out.update, out.coverage, weights)
      numerator, denominator = jax.lax.psum((numerator, denominator), CLIENT_AXIS)
      new_server = server_update(server, finish_aggregate(numerator, denominator), server_optimizer)
    else:
      private, public = dp_split(out.update, dp.public)
      (total, below), norms = dp_parts(private, weights > 0, server.clip)
      total, below = jax.lax.psum((total, below), CLIENT_AXIS)
      released, clip = dp_release(total, below, server.clip, jax.random.fold_in(key, DP_STREAM), dp,
                                  expected_reports(availability, round, cohort_size))
      if public is not None:  # the mask's messages, aggregated by the method's rule (not covered: DPSpec.public)
        numerator, denominator = aggregate_parts(aggregation, public, dp_split(out.coverage, dp.public)[1], weights)
        numerator, denominator = jax.lax.psum((numerator, denominator), CLIENT_AXIS)
        released = {**released, **finish_aggregate(numerator, denominator)}
      new_server = server_update(server._replace(clip=clip), released, server_optimizer)
      extra = {"update_norm": norms}
    client_state = out.state
    if availability is not None:
      client_state = keep_unstarted(client_state, old_rows, fate.started)
      extra.update(fate_metrics(fate, ids < num_clients))
    new_rows = encode(client_state)
    gathered = lambda a: jax.lax.all_gather(a, CLIENT_AXIS, tiled=True)
    if stratified:
      write = jnp.where(ids < num_clients, ids - first, block)
      new_rows_all = new_rows
    else:
      every = jax.lax.all_gather(ids, CLIENT_AXIS, tiled=True)
      write = jnp.where((every >= first) & (every < first + block), every - first, block)
      new_rows_all = jax.tree.map(lambda r: jax.lax.all_gather(r, CLIENT_AXIS, tiled=True), new_rows)
    store = jax.tree.map(lambda a, r: a.at[write].set(r.astype(a.dtype), mode="drop"), store, new_rows_all)
    started = fate.started.astype(jnp.int32)
    participation = participation.at[write].add(started if stratified else gathered(started), mode="drop")
    metrics = {"cohort": jnp.where(ids < num_clients, ids, num_clients), "weight": weights, **out.metrics, **extra}
    metrics = jax.tree.map(gathered, metrics)
    if dp is not None:
      metrics["dp_clip"] = server.clip
    return new_server, store, participation, metrics

  def round_fn(state: SimState, train: Any) -> tuple[SimState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.key, state.round)
    run = jax.shard_map(
        functools.partial(body, max(1, train.max_count)),
        mesh=mesh,
        in_specs=(replicated, spec, spec, spec, spec, spec, spec, replicated, replicated),
        out_specs=(replicated, spec, spec, replicated),
        check_vma=False,
    )
    server, clients, participation, metrics = run(
        state.server, state.clients, state.participation, train.x, train.y, train.offset, train.count, key,
        state.round,
    )
    new_state = SimState(server=server, clients=clients, round=state.round + 1, key=state.key,
                         participation=participation)
    return new_state, metrics

  return round_fn


def gather_rows_anywhere(store: Any, ids: jax.Array, first: jax.Array, block: int) -> Any:
  """Inside a `shard_map` over the client axis: stored rows `ids` [R] (mine) of a store sharded in blocks.

  Every device asks for its own ids; each row is taken by the one device that holds it (zeros elsewhere) and one
  psum hands every device every asked row, of which it keeps its own: O(D * R) rows per device.
  """
  every = jax.lax.all_gather(ids, CLIENT_AXIS, tiled=True)  # [D * R], device-major
  held = (every >= first) & (every < first + block)
  rows = jnp.where(held, every - first, 0)

  def leaf(a):
    taken = jnp.take(a, rows, axis=0)
    kept = jnp.where(held.reshape((-1,) + (1,) * (a.ndim - 1)), taken, jnp.zeros((), a.dtype))
    total = jax.lax.psum(kept, CLIENT_AXIS)
    return jax.lax.dynamic_slice_in_dim(total, jax.lax.axis_index(CLIENT_AXIS) * ids.shape[0], ids.shape[0])

  return jax.tree.map(leaf, store)


def check_aggregation(aggregation: str, weighting: str) -> None:
  """Clear errors for the aggregation rule and client weighting, raised before anything is traced."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
