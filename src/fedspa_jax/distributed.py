"""Running one simulation across several processes (hosts) with `jax.distributed`.

Every process runs the same command. `initialize` connects them (coordinator address, number of processes and this
process's id from arguments, or from the environment as JAX detects it on TPU pods, SLURM and Open MPI, or from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); afterwards `jax.devices()` lists every process's
devices, the client mesh spans them all, and each process places only its own devices' blocks of the population.
Files are written once, by process 0 (`is_primary`); checkpoints are written and restored by all processes
together (orbax).

On CPU the processes' collectives run over gloo (TCP), so several processes on one machine, each with forced host
devices, simulate a multi-host job (`scripts/multihost_local.sh`).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
  """The processes could not be connected (bad arguments, or the coordinator is unreachable)."""


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def resolve(coordinator: str | None, num_processes: int | None, process_id: int | None) -> tuple:
  """(coordinator, num_processes, process_id) from the arguments, else JAX_* environment variables, else None."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise DistributedError(
        "give all three of the coordinator address, the number of processes and this process's id "
        "(--coordinator HOST:PORT --num-processes N --process-id I, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID), or none of them on a cluster JAX detects (TPU pods, SLURM, Open MPI)"
    )
  if num_processes is not None:
    if num_processes < 1:
      raise DistributedError(f"the number of processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"the process id must lie in [0, {num_processes}), got {process_id}")
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"the coordinator address must be HOST:PORT, got {coordinator!r}")
  return coordinator, num_processes, process_id


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until `address` (HOST:PORT) accepts TCP connections; raises DistributedError after `timeout_s`.

  JAX itself aborts the process (SIGABRT, a C++ stack trace) when it cannot register with the coordinator; this
  check gives a one-line error instead, before JAX is asked to connect.
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"cannot reach the coordinator at {address} within {timeout_s:g} s ({e}); is process 0 running, and "
            "is the address right?"
        ) from None
      time.sleep(0.2)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
  """Connects this process to the others (`jax.distributed.initialize`); call it before anything touches a device.

  Args:
    coordinator: HOST:PORT of process 0's coordination service (None: environment / cluster auto-detection).
    num_processes: the number of processes.
    process_id: this process's index, 0 for the coordinator.
    timeout_s: how long to wait for the coordinator (process > 0) and for all processes to register.

  Raises:
    DistributedError: incomplete or bad arguments, or the coordinator unreachable within `timeout_s`.
  """
  coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
  # CPU devices of different processes talk over gloo (TCP); accelerators use their own interconnect.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is not None and process_id != 0:
    wait_for_coordinator(coordinator, timeout_s)
  kwargs = {"initialization_timeout": int(max(1, timeout_s))}
  if coordinator is not None:
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise DistributedError(f"jax.distributed.initialize failed: {e}") from e


def is_primary() -> bool:
  """True on the process that writes files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """Numpy copies of `tree`'s arrays, gathered from every process when they are not all held here."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(one, tree)
