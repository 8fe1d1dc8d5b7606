"""Stopping a run cleanly before it is killed: on SIGTERM or SIGINT, or before a deadline, with a checkpoint.

Preemptible machines get SIGTERM about 30 s before they go; batch schedulers (SLURM, Kubernetes Jobs) kill at a
wall-time limit. A `Stopper` turns both into a stop at the next dispatch boundary: the rounds already dispatched
finish, the run writes a checkpoint at the round it reached and flushes its records, and the command exits with
`EXIT_STOPPED` (75, sysexits' EX_TEMPFAIL: "try again"), which a scheduler can tell from a failure (1, 2, 3) and
requeue. `--resume` continues exactly from that checkpoint.

    stopper = Stopper(deadline_s=3300)             # 55 minutes from now
    with stopper.handle_signals():                 # SIGTERM, SIGINT -> a stop at the next boundary
      experiment.run(config, out, stopper=stopper)  # raises Stopped after writing the checkpoint

A signal only sets a flag (nothing unsafe runs inside the handler); a second SIGINT interrupts at once
(KeyboardInterrupt), for a person at a terminal who does not want to wait, unless the stop is already decided: from
the moment `should_stop` says stop, every further SIGTERM and SIGINT is ignored, and the command line keeps ignoring
them while the process exits (`handle_signals(exiting=True)`), so a scheduler that signals again during the
checkpoint or the interpreter's teardown still sees exit status 75, not 143 or 130. With several processes (`jax.distributed`)
every process asks `should_stop` at every boundary and they agree through the coordination service (each posts its
own flag, then waits at a barrier, then reads all flags), so all of them stop at the same round, even when the
signal reached only one of them, and their collective checkpoint is consistent.

A deadline stops at the first boundary after which the next dispatch and the checkpoint might not fit: when the time
left is less than twice the longest time between two boundaries so far (a dispatch, plus the evaluation and
checkpoint it may end with). The first gap counts from the Stopper's creation (the command's start), so it includes
start-up and compilation and bounds the first dispatch from above: a deadline shorter than start-up plus two
dispatches stops at the first boundary, not after the scheduler's kill. Give the deadline a margin of a minute or so
below the scheduler's limit, for the final checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from typing import Iterator

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: stopped with a checkpoint; run again with --resume

_KV_PREFIX = "fedspa_jax_stop"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOPPERS = itertools.count()


class Stopped(Exception):
  """A run stopped cleanly (signal or deadline) after writing a checkpoint at `round`; `--resume` continues it."""

  def __init__(self, round: int, reason: str, checkpoint: str | None = None):
    self.round, self.reason, self.checkpoint = round, reason, checkpoint
    where = f"; checkpoint {checkpoint}" if checkpoint else ""
    super().__init__(f"stopped after round {round} ({reason}){where}; continue with --resume")


class Stopper:
  """Decides, at each dispatch boundary, whether a run stops there (a signal came, or the deadline is near).

  Args:
    deadline_s: seconds from now by which the run must have stopped (None: no deadline).
    clock: the time source (seconds; tests pass a fake one).
  """

  def __init__(self, deadline_s: float | None = None, *, clock=time.monotonic):
    if deadline_s is not None and not deadline_s > 0:
      raise ValueError(f"the deadline must be positive, got {deadline_s}")
    self._clock, now = clock, clock()
    self._deadline = None if deadline_s is None else now + deadline_s
    self._requested: str | None = None
    self._decided: str | None = None  # the reason a `should_stop` gave; from then on signals are ignored
    self._last_check = now  # the first gap counts from here: start-up and compilation bound the first dispatch
    self._longest_gap = 0.0
    self._checks = 0
    self._id = next(_STOPPERS)  # with _checks, names each barrier once (every process creates its stoppers alike)

  def request(self, reason: str) -> None:
    """Asks for a stop at the next boundary (what a signal does); the first reason is kept."""
    if self._requested is None:
      self._requested = reason

  @property
  def requested(self) -> str | None:
    return self._requested

  def _local_reason(self) -> str | None:
    now = self._clock()
    self._longest_gap = max(self._longest_gap, now - self._last_check)
    self._last_check = now
    if self._requested is not None:
      return self._requested
    if self._deadline is not None and self._deadline - now < 2 * self._longest_gap:
      return "deadline"
    return None

  def should_stop(self, round: int) -> str | None:
    """The reason to stop at this boundary (after `round`), or None; every process must call it at every boundary.

    With several processes the answer is the same on all of them: any process's reason stops them all.
    """
    import jax

    reason = self._local_reason()
    self._checks += 1
    if jax.process_count() > 1:
      reason = _agree(reason, f"{self._id}_{self._checks}_{round}")
    self._decided = self._decided or reason
    return reason

  @property
  def decided(self) -> str | None:
    """The reason of the stop `should_stop` decided, or None."""
    return self._decided

  def _on_signal(self, signum, frame) -> None:
    if self._decided is not None:
      return  # the run is stopping with its checkpoint: nothing more to ask, nothing to interrupt
    if signum == signal.SIGINT and self._requested is not None:
      raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait
    self.request(signal.Signals(signum).name)

  @contextlib.contextmanager
  def handle_signals(self, *, exiting: bool = False) -> Iterator["Stopper"]:
    """SIGTERM and SIGINT request a stop while inside; a second SIGINT raises KeyboardInterrupt (until a stop is
    decided: then both are ignored). Restores the old handlers on exit, unless `exiting` (the process ends after
    the block, as the command line does) and a stop was decided: then SIGTERM and SIGINT stay ignored, so the exit
    status stays EXIT_STOPPED. Only in the main thread (elsewhere Python cannot set handlers, and nothing is
    installed)."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, signal.SIG_IGN if exiting and self._decided is not None else handler)

  def reclaim_signals(self) -> None:
    """Takes SIGTERM and SIGINT back inside `handle_signals`: `jax.distributed.initialize` installs its own SIGTERM
    handler (its preemption notifier), which would swallow the notice."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == self._on_signal:
      for s in _SIGNALS:
        signal.signal(s, self._on_signal)


def _agree(reason: str | None, tag: str) -> str | None:
  """Every process's `reason` posted, a barrier, then the first process's reason that is set (None when none is)."""
  import jax
  from jax._src import distributed as jax_distributed  # the coordination service's key-value store and barriers

  client = jax_distributed.global_state.client
  me, count = jax.process_index(), jax.process_count()
  if reason is not None:
    client.key_value_set(f"{_KV_PREFIX}/{tag}/{me}", reason)
  client.wait_at_barrier(f"{_KV_PREFIX}_{tag}", 600_000)
  posted = dict(client.key_value_dir_get(f"{_KV_PREFIX}/{tag}/"))
  reasons = [posted.get(f"{_KV_PREFIX}/{tag}/{i}") for i in range(count)]
  return next((r for r in reasons if r), None)
