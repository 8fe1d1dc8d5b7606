"""Checkpoints of a simulation: the whole `SimState` plus JSON metadata, written atomically with orbax.

A checkpoint holds everything needed to continue a run: the server state, every client's state, the round, the
simulation key (typed PRNG keys are stored as their key data and re-wrapped on restore), and a JSON item with the
config, the metrics history and the running totals. orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact (the leftover temporary folder is
removed the next time the folder is opened). The folder may be local or in Cloud Storage (`fedspa_jax.paths`; orbax
writes gs:// with tensorstore, which `TENSORSTORE_GCS_HTTP_URL` points at an emulator); on gs:// orbax marks a
complete step with a commit file instead of a rename.

    ckpt = Checkpointer("runs/x/checkpoints")
    ckpt.save(10, state, {"config": ..., "history": [...]})
    state, meta = ckpt.restore(algo.init(key, data))      # the fresh state gives structure, dtypes and shardings
"""

from __future__ import annotations

import json
import os

from typing import Any

import jax
import orbax.checkpoint as ocp

from fedspa_jax import paths

_STATE, _META = "state", "meta"


def _is_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def to_storable(tree: Any) -> Any:
  """`tree` with typed PRNG keys replaced by their uint32 key data."""
  return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def from_storable(tree: Any, like: Any) -> Any:
  """Inverse of `to_storable`: re-wraps the leaves that are typed keys in `like` (with `like`'s key impl)."""
  return jax.tree.map(
      lambda a, ref: jax.random.wrap_key_data(a, impl=jax.random.key_impl(ref)) if _is_key(ref) else a, tree, like
  )


def layout(tree: Any) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a state (after `to_storable`): what a checkpoint must match to be restored."""
  return {
      jax.tree_util.keystr(path): [list(a.shape), str(a.dtype)]
      for path, a in jax.tree_util.tree_flatten_with_path(to_storable(tree))[0]
  }


def _use_ocdbt() -> bool:
  """orbax's OCDBT layout (the default), unless FEDSPA_JAX_CHECKPOINT_OCDBT=0: one zarr folder per array instead.

  OCDBT commits each write with a conditional upload of its manifest (`ifGenerationMatch`); gcp-storage-emulator
  ignores those conditions, and tensorstore then fails now and then with "Malformed StorageGeneration", so
  tests/test_gcs.py writes the plain zarr layout against it. Real Cloud Storage honours them.
  """
  return os.environ.get("FEDSPA_JAX_CHECKPOINT_OCDBT", "1") not in ("0", "false")


class LayoutMismatch(ValueError):
  """A checkpoint's arrays do not have the structure, shapes or dtypes of the state to restore into."""


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def default_asynchronous() -> bool:
  """Whether saves are asynchronous by default: FEDSPA_JAX_SYNC_CHECKPOINTS=1 says no, =0 says yes; unset, yes on
  accelerators and no on CPU (see `Checkpointer`)."""
  setting = os.environ.get("FEDSPA_JAX_SYNC_CHECKPOINTS", "")
  if setting:
    return setting in ("0", "false")
  return jax.default_backend() != "cpu"


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `directory/<round>/`, keeping the newest `keep`.

  Args:
    directory: the checkpoint folder (created on the first save).
    keep: how many of the most recent checkpoints to keep.
    asynchronous: `save` returns once the arrays are copied off the device, and the files are written in a
      background thread while the rounds go on; every other method waits for a write in flight first, so what they
      see is complete; `close` waits too. None (default): `default_asynchronous()`: synchronous on CPU, where an
      asynchronous save costs about twice the state's memory on top of it (orbax keeps zero-copy views of the CPU
      buffers, so the next dispatch cannot donate them and allocates a new state while the write goes on), against
      under one state's worth for a synchronous one (scripts/bench_checkpoint.py; docs/cli.md has the numbers);
      asynchronous on accelerators, where the copy is in host memory and the device's buffers are donated.
  """

  def __init__(self, directory: paths.PathLike, *, keep: int = 2, asynchronous: bool | None = None):
    self.directory = paths.absolute(directory)
    self._keep = keep
    self._asynchronous = default_asynchronous() if asynchronous is None else asynchronous
    self._manager: ocp.CheckpointManager | None = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self._keep, enable_async_checkpointing=self._asynchronous, create=True,
          cleanup_tmp_directories=True
      )
      handlers = {_STATE: ocp.StandardCheckpointHandler(use_ocdbt=_use_ocdbt()), _META: ocp.JsonCheckpointHandler()}
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    return self._manager

  def wait(self) -> None:
    """Returns once the checkpoint being written (asynchronous saving) is complete."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def latest_round(self) -> int | None:
    """The round of the newest complete checkpoint, or None."""
    self.wait()
    if not self.directory.is_dir():
      return None
    return self.manager.latest_step()

  def rounds(self) -> list[int]:
    self.wait()
    if not self.directory.is_dir():
      return []
    return list(self.manager.all_steps())

  def path(self, round: int) -> paths.Path:
    return self.directory / str(round)

  def save(self, round: int, state: Any, meta: dict[str, Any]) -> paths.Path:
    """Writes `state` (any pytree of arrays, typed keys allowed) and JSON-able `meta` as checkpoint `round`.

    A checkpoint that already exists for `round` is kept as it is (a round's state is deterministic).
    """
    if round in self.rounds():
      return self.path(round)
    # A copy: an asynchronous save serializes `meta` later, in its thread, while the run goes on appending to the
    # lists it holds (its metrics history).
    meta = json.loads(json.dumps({**meta, "layout": layout(state)}))
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(to_storable(state)), _META: ocp.args.JsonSave(meta)}
    )
    self.manager.save(round, args=args, force=True)
    if not self._asynchronous:
      self.manager.wait_until_finished()
    return self.path(round)

  def read_meta(self, round: int | None = None) -> dict[str, Any] | None:
    """The JSON metadata of checkpoint `round` (default: the newest), without reading any array; None if none."""
    self.wait()
    round = self.latest_round() if round is None else round
    if round is None:
      return None
    return self.manager.restore(round, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

  def restore(self, like: Any, round: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Checkpoint `round` (default: the newest) as `(state, meta)`.

    Args:
      like: a pytree with the saved state's structure (e.g. a freshly initialised state): gives the structure,
        shapes, dtypes and shardings to restore into, and which leaves are typed keys.
      round: which checkpoint.

    Raises:
      FileNotFoundError: no checkpoint in the folder.
      LayoutMismatch: the checkpoint holds other arrays than `like` (another algorithm, model, population or
        storage layout); nothing is read.
    """
    round = self.latest_round() if round is None else round
    if round is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    saved, want = self.read_meta(round).get("layout"), layout(like)
    if saved != want:
      differ = sorted(k for k in set(want) | set(saved or {}) if (saved or {}).get(k) != want.get(k))
      detail = "; ".join(f"{k}: saved {(saved or {}).get(k)}, expected {want.get(k)}" for k in differ[:3])
      raise LayoutMismatch(
          f"checkpoint {self.path(round)} does not match this run's state"
          f"{' (written before layouts were recorded)' if saved is None else ''}: {detail}"
      )
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(_abstract(to_storable(like))), _META: ocp.args.JsonRestore()}
    )
    out = self.manager.restore(round, args=args)
    return from_storable(out[_STATE], like), out[_META]

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
