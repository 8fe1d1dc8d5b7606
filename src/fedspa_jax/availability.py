"""Clients that drop out or straggle, drawn inside the compiled round.

Real cross-device cohorts lose clients (a phone goes offline) and get partial work from slow ones. Each sampled
client k, in round t, is available with probability p_k(t): a constant `1 - dropout`, or a per-client trace read from
a file (`load_trace`: [K] probabilities, or [K, R] with round t reading column t mod R), the general form of which
the constant is a special case. An available client is a straggler with probability `straggler_fraction`; a
straggler runs round(`straggler_work` * steps) of its local steps, in the same compiled loop
(`client.scale_steps`), and is aggregated as every other client is, with its usual weight: FedAvg's
implementations (PFLlib, FL-bench) aggregate a straggler's partial update so, and FedSpa's paper is silent.

An unavailable client is dropped, in one of two ways (`dropout_mode`):
- "lost": it trains (and keeps what it computed, e.g. its new mask or personal model), but its update never reaches
  the server: its aggregation weight is 0;
- "never_starts": it does no work at all (0 local steps), its state stays exactly as it was, its weight is 0 and it
  does not count as participating.

The draws come from the round's key and the client's id (not its cohort position), so they do not depend on the
device count, and resume and sweeps repeat them exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DROPOUT_MODES = ("lost", "never_starts")


class AvailabilitySpec(NamedTuple):
  """How clients drop out and straggle (hyperparameters of a run).

  Attributes:
    probability: a float (every client, every round) or a float32 array [K] or [K, R] (round t: column t mod R).
    mode: "lost" or "never_starts" (module docstring).
    straggler_fraction: probability that an available client straggles.
    straggler_work: the share of its local steps a straggler runs, in (0, 1].
  """

  probability: Any
  mode: str = "lost"
  straggler_fraction: float = 0.0
  straggler_work: float = 0.5


class ClientFate(NamedTuple):
  """What happens to each cohort client this round, leaves [S].

  Attributes:
    reports: its update reaches the server (a real client that did not drop out).
    started: it trains (reports, or dropped with mode "lost").
    work: the share of its local steps it runs (float32: 1, `straggler_work`, or 0 if it never starts).
    straggler: it straggles (an available client that ran only part of its steps).
  """

  reports: jax.Array
  started: jax.Array
  work: jax.Array
  straggler: jax.Array


def check_options(dropout: Any, mode: Any, straggler_fraction: Any, straggler_work: Any, trace: Any) -> None:
  """One-line errors for the options, before anything is traced."""
  number = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
  if not number(dropout) or not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be a number in [0, 1) (the share of sampled clients lost), got {dropout!r}")
  if mode not in DROPOUT_MODES:
    raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {mode!r}")
  if not number(straggler_fraction) or not 0.0 <= straggler_fraction <= 1.0:
    raise ValueError(f"straggler_fraction must be a number in [0, 1], got {straggler_fraction!r}")
  if not number(straggler_work) or not 0.0 < straggler_work <= 1.0:
    raise ValueError(f"straggler_work must be a number in (0, 1] (the share of its steps a straggler runs), "
                     f"got {straggler_work!r}")
  if trace is not None:
    if not isinstance(trace, str) or not trace:
      raise ValueError(f"availability must be the path of a .npy or .csv file of probabilities, got {trace!r}")
    if dropout:
      raise ValueError("give either dropout or an availability file, not both (the file is the general form)")


def load_trace(path: str) -> np.ndarray:
  """Per-client availability probabilities from a .npy file or a .csv file (one row per client id, one column per
  round, comma-separated): float32 [K] or [K, R], every entry in [0, 1]."""
  try:
    trace = np.load(path) if path.endswith(".npy") else np.loadtxt(path, delimiter=",", ndmin=2)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the availability file {path}: {e}") from None
  trace = np.asarray(trace, np.float32)
  if trace.ndim == 2 and trace.shape[1] == 1:
    trace = trace[:, 0]
  if trace.ndim not in (1, 2) or trace.size == 0:
    raise ValueError(f"the availability file {path} must hold [K] or [K, rounds] probabilities, got shape "
                     f"{trace.shape}")
  if not np.all((trace >= 0.0) & (trace <= 1.0)):
    raise ValueError(f"the availability file {path} holds probabilities outside [0, 1]")
  return trace


def make_spec(dropout: float, mode: str, straggler_fraction: float, straggler_work: float,
              trace: str | None) -> AvailabilitySpec | None:
  """The spec of the options (None when every sampled client always finishes: the round is unchanged)."""
  check_options(dropout, mode, straggler_fraction, straggler_work, trace)
  if trace is None and not dropout and not straggler_fraction:
    return None
  probability = load_trace(trace) if trace is not None else 1.0 - float(dropout)
  return AvailabilitySpec(probability, mode, float(straggler_fraction), float(straggler_work))


def check_clients(spec: AvailabilitySpec | None, num_clients: int) -> None:
  """An availability trace has one row per client."""
  if spec is not None and np.ndim(spec.probability) and spec.probability.shape[0] != num_clients:
    raise ValueError(f"the availability file has {spec.probability.shape[0]} rows but the dataset has "
                     f"{num_clients} clients (one row per client id)")


def round_probabilities(spec: AvailabilitySpec, round: jax.Array) -> jax.Array:
  """p_k(t) of every client in round t: [K], or a scalar for a constant."""
  p = spec.probability
  if not np.ndim(p):
    return jnp.float32(p)
  p = jnp.asarray(p)
  if p.ndim == 1:
    return p
  return jnp.take(p, round % p.shape[1], axis=1)


def expected_reports(spec: AvailabilitySpec | None, round: jax.Array, cohort_size: int) -> jax.Array:
  """The expected number of cohort clients whose update reaches the server: S * mean_k p_k(t) (data-independent)."""
  if spec is None:
    return jnp.float32(cohort_size)
  return jnp.float32(cohort_size) * jnp.mean(round_probabilities(spec, round))


def draw_fate(key: jax.Array, cohort: jax.Array, round: jax.Array, spec: AvailabilitySpec | None,
              num_clients: int) -> ClientFate:
  """Each cohort client's fate this round (ids >= K are padding: they neither report nor start).

  Args:
    key: this round's availability key.
    cohort: [S] client ids.
    round: int32 round index.
    spec: the options (None: every real client reports and does all its work).
    num_clients: K.
  """
  real = cohort < num_clients
  if spec is None:
    return ClientFate(real, real, jnp.ones(cohort.shape, jnp.float32), jnp.zeros(cohort.shape, bool))
  draws = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(key, k), (2,)))(cohort)  # by id, not position
  p = round_probabilities(spec, round)
  p = jnp.take(p, cohort, mode="clip") if p.ndim else p
  available = real & (draws[:, 0] < p)
  straggler = available & (draws[:, 1] < spec.straggler_fraction)
  started = available | (real & (spec.mode == "lost"))
  work = jnp.where(straggler, jnp.float32(spec.straggler_work), 1.0)
  work = jnp.where(started, work, 0.0)
  return ClientFate(available, started, work, straggler)
