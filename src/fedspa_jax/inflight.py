"""A bound on the sharded programs in flight, so that a loop over rounds cannot deadlock XLA:CPU's collectives.

JAX dispatches asynchronously: `for _ in range(R): state, m = algo.round(state, data)` returns from each call before
the round has run, so without a sync the loop runs ahead of the devices. On a CPU mesh of D > 1 devices this aborts
the process (XLA:CPU, jaxlib 0.10): "Termination timeout for `all reduce` ... Expected D threads to join the
rendezvous". XLA:CPU runs each device's part of a program on one shared pool of max(cores, D) threads, and each
part holds its thread while it waits in a collective for the other D - 1. Each launch first takes one of the
device's 32 in-flight slots, and it waits for a free slot on a pool thread. Once a loop has more than 32 programs in
flight on a device, launches that wait for slots hold pool threads, too few are left to seat all D parts of the
oldest program's collective, and the rendezvous times out after 40 s. A bare `jit(shard_map(psum))` loop does the
same: on 2 forced devices it runs with 32 programs in flight and aborts with 33 (8 devices abort too), and it runs
through unbounded when the pool is given more threads (`NPROC=4` for 2 devices, 32 for 8).

The remedy here: the algorithms' entry points send their sharded programs through one `Pacer` per process. Before
a dispatch, it waits for the oldest of its earlier dispatches until fewer than `MAX_IN_FLIGHT` remain, so at most
`MAX_IN_FLIGHT` of them are in flight, far below the 32 slots. Only a mesh of more than one CPU device is paced.
On one device no program has a collective. On accelerators the collectives run on device streams, not on the
host's pool threads, so the runtime's own in-flight limit only slows the loop down.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
from jax.sharding import Mesh

# 2 keeps the host dispatching the next round while the devices run the last one (scripts/bench_inflight.py).
MAX_IN_FLIGHT = 2


class Pacer:
  """Keeps at most `limit` of the dispatches that go through it in flight.

  Attributes:
    limit: the most dispatches in flight, >= 1.
  """

  def __init__(self, limit: int = MAX_IN_FLIGHT):
    if not isinstance(limit, int) or limit < 1:
      raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    self.limit = limit
    self._pending: collections.deque[list[jax.Array]] = collections.deque()

  def wait(self, room: int = 1) -> None:
    """Blocks until at most `limit - room` dispatches are in flight (oldest first)."""
    while self._pending and len(self._pending) > self.limit - room:
      # A donated output was consumed by a later program: that one's outputs stand for it.
      jax.block_until_ready([leaf for leaf in self._pending.popleft() if not leaf.is_deleted()])

  @property
  def tracked(self) -> int:
    """Dispatches not waited for yet (some may have finished): at most `limit`."""
    return len(self._pending)

  def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` dispatched once there is room for it; its outputs are tracked until they are ready."""
    self.wait()
    out = fn(*args, **kwargs)
    concrete = lambda leaf: isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    self._pending.append([leaf for leaf in jax.tree.leaves(out) if concrete(leaf)])
    return out

  def call_and_wait(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` dispatched once there is room for it, and waited for (its outputs may be large, and
    holding them until a later dispatch would keep their memory)."""
    self.wait()
    return jax.block_until_ready(fn(*args, **kwargs))

  def drain(self) -> None:
    """Waits for every dispatch in flight."""
    self.wait(room=self.limit)


# One per process: the thread pool and the devices' in-flight slots are shared by all programs of the process.
PACER = Pacer()


def needs_pacing(mesh: Mesh | None) -> bool:
  """Whether programs over `mesh` must be paced: it has more than one device, and they are CPU devices."""
  return isinstance(mesh, Mesh) and mesh.devices.size > 1 and any(d.platform == "cpu" for d in mesh.devices.flat)


class Paced:
  """A jitted function whose calls go through `pacer`; its other attributes (`lower`, ...) are the function's.

  Attributes:
    fn: the function.
    pacer: the `Pacer` its calls go through.
    wait: wait for each call's outputs at once (for outputs too large to keep alive until a later call).
  """

  def __init__(self, fn: Callable[..., Any], pacer: Pacer = PACER, wait: bool = False):
    self.fn = fn
    self.pacer = pacer
    self.wait = wait

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if self.wait:
      return self.pacer.call_and_wait(self.fn, *args, **kwargs)
    return self.pacer.call(self.fn, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.fn, name)


def paced(fn: Callable[..., Any], mesh: Mesh | None, wait: bool = False) -> Callable[..., Any]:
  """`fn` itself where `mesh` needs no pacing (see `needs_pacing`), else `fn` dispatched through the pacer."""
  return Paced(fn, wait=wait) if needs_pacing(mesh) else fn
