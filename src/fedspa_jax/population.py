"""The client population laid out over a mesh: each device holds its own block of clients' state and samples.

With a `jax.sharding.Mesh` whose "clients" axis has D devices, the K clients are split into D contiguous blocks of
B = ceil(K / D) ids (the population is padded to K_pad = D * B with clients that hold no data and are never
sampled). Device d holds rows [d * B, (d + 1) * B) of the client store and exactly its block's training and test
samples: the flat splits are re-laid block by block, each block padded to the largest block's sample count, with
offsets local to the block. A pod's memory is the sum of its devices': per-device store and data are ~1/D of the
total, and under `jax.distributed` each process places only its own devices' blocks
(`jax.make_array_from_callback`), so no process ever holds another's device arrays. The placed data record their
`Placement` (K, the devices, the strata), and data placed for another placement are refused (`check_placed`): their
offsets would point into another layout's rows.

Two ways to sample a round's cohort (`cohort_sampling`):
  "uniform"     S of the K clients uniformly without replacement, exactly as on one device. The sampled clients'
                state rows and samples are moved to the devices that train them (an all-to-all of the padded
                [S, max_count] samples and the [S] stored rows, an all-gather of the [S] new rows back to their
                owners), the cohort dealt out by size so each device gets a similar share of the work.
  "stratified"  the population is cut into T equal strata of K / T consecutive ids (T = `cohort_strata`, default
                D; a multiple of D that divides K and S) and each stratum samples S / T of its clients. With T a
                multiple of D, each device samples and trains only its own clients: no sample or state row ever
                moves; the only cross-device traffic is the aggregation's all-reduce. Every client is in a cohort
                with probability exactly S / K, as under uniform sampling, so the cohort mean (1/S) sum_k U_k is
                still an unbiased estimate of the population mean. Strata of unequal size cannot give that (the
                clients of a smaller stratum would be sampled more often, with no weight to correct for it), so a K
                that T does not divide is refused (`check_population`). What differs from uniform sampling is
                which clients share a round: the cohort always has S / T clients from each stratum, so two clients
                of the same stratum are less likely, and two of different strata more likely, to be sampled
                together. With a random (or iid) assignment of data to ids this changes little; with ids ordered
                by something that matters (e.g. by class), it is a different sampling design.

Results do not depend on D: client k's keys come from k, the cohort from the round key (and, stratified, from the
stratum index), so a run equals the 1-device run of the same sampling mode up to the order of the float sums in the
aggregation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from fedspa_jax.data.federated import ClientSplit, FederatedData

CLIENT_AXIS = "clients"
SAMPLINGS = ("uniform", "stratified")


@dataclasses.dataclass(frozen=True)
class Placement:
  """How K clients are laid out over the `shards` devices of a mesh's client axis and cut into sampling strata.

  Attributes:
    num_clients: K, the real clients.
    shards: D, devices on the client axis (1 without a mesh).
    strata: T, sampling strata of the "stratified" mode (a multiple of D); D when unused.
    devices: ids of the mesh's devices (empty without a mesh).
  """

  num_clients: int
  shards: int = 1
  strata: int = 1
  devices: tuple[int, ...] = ()

  @property
  def stratum_size(self) -> int:
    """K / T clients per stratum (stratified sampling needs T to divide K: `check_strata`)."""
    return self.num_clients // self.strata

  @property
  def padded(self) -> int:
    """K_pad = D * ceil(K / D); clients K..K_pad-1 are padding (no data, never sampled)."""
    return -(-self.num_clients // self.shards) * self.shards

  @property
  def block(self) -> int:
    """B = K_pad / D: clients per device."""
    return self.padded // self.shards

  def describe(self) -> str:
    """One line for error messages: K, the devices, the blocks and the strata."""
    devices = ""
    if self.devices:
      consecutive = self.devices == tuple(range(self.devices[0], self.devices[0] + len(self.devices)))
      devices = f" ({self.devices[0]}..{self.devices[-1]})" if consecutive else f" {list(self.devices)}"
    return (f"{self.num_clients} clients on {self.shards} device{'s' if self.shards > 1 else ''}{devices} in blocks "
            f"of {self.block} (K_pad {self.padded}), {self.strata} strata")


def make_placement(num_clients: int, mesh: Mesh | None, strata: int | None = None) -> Placement:
  """The placement of K clients on `mesh` (1 shard without one), with `strata` (default: the number of shards)."""
  shards = 1 if mesh is None else mesh.shape[CLIENT_AXIS]
  concrete = mesh is not None and not isinstance(mesh, AbstractMesh)  # an AbstractMesh has no devices
  devices = tuple(int(device.id) for device in mesh.devices.flat) if concrete else ()
  return Placement(num_clients, shards, shards if strata is None else strata, devices)


def check_strata(placement: Placement, cohort_size: int | None = None) -> None:
  """Stratified sampling needs T equal strata: raises ValueError, naming what would work, when T does not divide K.

  With strata of unequal size, the S / T clients each stratum gives per round would make the clients of a smaller
  stratum more likely to be sampled than the others, and the cohort mean a biased estimate.
  """
  k, d, t = placement.num_clients, placement.shards, placement.strata
  if k % t == 0:
    return
  fits = [c for c in range(d, k + 1, d) if k % c == 0 and (cohort_size is None or cohort_size % c == 0)]
  options = [f"a number of clients that is a multiple of {t}", 'cohort_sampling="uniform"']
  if fits:
    options.append(f"cohort_strata={fits[0]}" if len(fits) == 1 else f"cohort_strata in {fits[:6]}")
  raise ValueError(
      f'cohort_sampling="stratified" needs strata of equal size, so that every client is sampled with probability '
      f"S / K as under uniform sampling, but {k} clients do not split into {t} equal strata ({k} / {t} = "
      f"{k / t:.4g}; the clients of a smaller stratum would be sampled more often). Use "
      f"{', '.join(options[:-1])} or {options[-1]}"
  )


def check_population(
    placement: Placement, cohort_size: int, sampling: str, mesh: Mesh | None
) -> None:
  """Clear errors, before anything is compiled, for a population that cannot be laid out or sampled this way."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"cohort_sampling must be one of {SAMPLINGS}, got {sampling!r}")
  k, d, t = placement.num_clients, placement.shards, placement.strata
  if mesh is not None and k < d:
    raise ValueError(f"{k} clients cannot be sharded over {d} devices: each device needs at least one client "
                     f"(use fewer devices or more clients)")
  if t < 1 or t % d:
    raise ValueError(f"cohort_strata must be a positive multiple of the {d} devices on the clients axis, got {t}")
  if sampling != "stratified":
    return
  if cohort_size % t:
    raise ValueError(
        f'cohort_sampling="stratified" draws the same number of clients from each of the {t} strata, so '
        f"clients_per_round must be a multiple of {t}, got {cohort_size} (or set cohort_strata to a divisor)"
    )
  check_strata(placement, cohort_size)


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


def sample_strata(key: jax.Array, placement: Placement, cohort_size: int, strata: jax.Array) -> jax.Array:
  """The cohort's clients in the given strata [n]: [n, S / T] distinct global ids, stratum s from fold_in(key, s).

  Every stratum holds K / T clients, so each client is drawn with probability S / K (`check_strata` refuses a
  placement of unequal strata).
  """
  check_strata(placement)
  per = cohort_size // placement.strata
  size = placement.stratum_size

  def one(s):
    return s * size + sample_cohort(jax.random.fold_in(key, s), size, per)

  return jax.vmap(one)(strata)


def sample_stratified(key: jax.Array, placement: Placement, cohort_size: int) -> jax.Array:
  """[S] distinct ids: S / T clients uniformly from each of the T strata (all strata, stratum by stratum)."""
  return sample_strata(key, placement, cohort_size, jnp.arange(placement.strata, dtype=jnp.int32)).reshape(-1)


# ---- data --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlacedData:
  """A `FederatedData` laid out over a mesh (see the module docstring); what a sharded algorithm's round takes.

  Attributes:
    train, test: flat splits of K_pad clients whose rows are stored block by block ([D * R, ...], each block padded
      to R rows) with offsets local to their block; arrays sharded over the "clients" axis.
    placement: what they were laid out for: K, the D devices (blocks of B, K_pad), the strata. An algorithm takes
      only data placed for its own placement (`check_placed`).
    num_classes, name, mean, std: as in `FederatedData`.
  """

  train: ClientSplit
  test: ClientSplit
  placement: Placement
  num_classes: int
  name: str = "arrays"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @property
  def num_clients(self) -> int:
    """K, the real clients."""
    return self.placement.num_clients

  @property
  def shards(self) -> int:
    """D, the devices the population is laid out over."""
    return self.placement.shards

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return self.train.sample_shape


jax.tree_util.register_dataclass(
    PlacedData, data_fields=["train", "test"], meta_fields=["placement", "num_classes", "name", "mean", "std"]
)


def check_placed(data: PlacedData, placement: Placement) -> None:
  """Raises ValueError, naming both, unless `data` was placed for exactly `placement`.

  The offsets of placed data are local to the blocks of the placement they were made for: under another one (other
  devices, another K) a client's offset would point at another client's rows.
  """
  if data.placement != placement:
    raise ValueError(
        f"this data was placed for {data.placement.describe()}, but this algorithm's placement is "
        f"{placement.describe()}; place the host-side data with this algorithm: algo.place(data)"
    )


def block_rows(split: ClientSplit, placement: Placement) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, int]:
  """Host-side block layout of a split: per block the source rows, and the local offsets and counts [K_pad].

  Returns:
    (rows: D arrays of source row indices, offset [K_pad] local to each block, count [K_pad], R = rows per block).
  """
  count = np.zeros(placement.padded, np.int64)
  count[: placement.num_clients] = np.asarray(split.count, np.int64)
  start = np.zeros(placement.padded, np.int64)
  start[: placement.num_clients] = np.asarray(split.offset, np.int64)
  b = placement.block
  rows, offset = [], np.zeros(placement.padded, np.int64)
  for d in range(placement.shards):
    c, s = count[d * b : (d + 1) * b], start[d * b : (d + 1) * b]
    local = np.cumsum(c) - c
    offset[d * b : (d + 1) * b] = local
    rows.append(np.repeat(s - local, c) + np.arange(int(c.sum()), dtype=np.int64))
  per_block = max(1, max(len(r) for r in rows))
  return rows, offset.astype(np.int32), count.astype(np.int32), per_block


def place_split(split: ClientSplit, placement: Placement, mesh: Mesh) -> ClientSplit:
  """`split` re-laid block by block and sharded over the mesh; each process builds only its own devices' blocks."""
  rows, offset, count, per_block = block_rows(split, placement)
  sharding = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
  x_host, y_host = split.x, split.y

  def block_of(index: tuple, total: int, per: int) -> int:
    start = index[0].start or 0
    if (index[0].stop or total) - start != per:
      raise AssertionError(f"unexpected shard {index} of a [{total}] array over {placement.shards} blocks")
    return start // per

  def rows_of(array: np.ndarray):
    def callback(index):
      d = block_of(index, placement.shards * per_block, per_block)
      out = np.zeros((per_block,) + array.shape[1:], array.dtype)
      out[: len(rows[d])] = array[rows[d]]
      return out[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback((placement.shards * per_block,) + array.shape[1:], sharding, callback)

  def small(array: np.ndarray):
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  return ClientSplit(x=rows_of(np.asarray(x_host)), y=rows_of(np.asarray(y_host)), offset=small(offset),
                     count=small(count), max_count=split.max_count)


def place(data: FederatedData | PlacedData, mesh: Mesh, strata: int | None = None) -> PlacedData:
  """`data` laid out over `mesh`'s client axis (K padded to the placement's K_pad).

  Data already placed are returned as they are if they were placed for this placement, and refused otherwise (they
  hold no host copy to re-lay).
  """
  if not isinstance(data, (FederatedData, PlacedData)):
    raise TypeError(f"data must be a fedspa_jax.data.FederatedData, got {type(data).__name__}")
  placement = make_placement(data.num_clients, mesh, strata)
  if isinstance(data, PlacedData):
    check_placed(data, placement)
    return data
  check_population(placement, 1, "uniform", mesh)
  return PlacedData(
      train=place_split(data.train, placement, mesh), test=place_split(data.test, placement, mesh),
      placement=placement, num_classes=data.num_classes, name=data.name, mean=data.mean, std=data.std,
  )


def per_device_bytes(tree: Any) -> dict[str, int]:
  """The bytes of `tree`'s arrays held by each local device, {device: bytes}."""
  held: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", []):
      held[str(shard.device)] = held.get(str(shard.device), 0) + math.prod(shard.data.shape) * shard.data.dtype.itemsize
  return held
