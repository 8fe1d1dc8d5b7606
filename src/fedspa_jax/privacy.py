"""Client-level differential privacy: the options, and the accountant (host side, outside the compiled round).

The round releases, every round, the DP-FedAvg aggregate of the cohort's clipped updates with Gaussian noise
(`server.DPSpec`, `server.dp_release`). This module says what that costs in (epsilon, delta), with Google's
`dp_accounting` (the RDP accountant), never a hand-written bound:

- The cohort is S clients drawn uniformly without replacement from K: the event of one round is
  `SampledWithoutReplacementDpEvent(K, S, GaussianDpEvent(z / 2))` (with stratified sampling, S / T of each stratum of
  K / T: the strata a client is not in do not depend on it), composed over the rounds (`SelfComposedDpEvent`).
- A fixed-size sample fixes the dataset size, so neighbouring populations differ by replacing one client
  (`NeighboringRelation.REPLACE_ONE`, the relation the accountant requires for this event). Replacing one client's
  clipped update by another's moves the sum by up to 2C, so noise of std z * C is a Gaussian mechanism of noise
  multiplier z / 2 relative to that sensitivity. With adaptive clipping, the count of clients below the clip moves by
  up to 1 under replacement, and its noise sigma_b with the sum's z_delta compose to the same z / 2 (Andrew et al.'s
  rule, `server.sum_noise_multiplier`).
- Dropouts are not credited: a client that drops out at random only lowers what is learned about it, so the epsilon
  reported is an upper bound for runs with dropouts.

`epsilon_record` is what a run records after each evaluated round and in its summary; `last_round_within` is how
far `dp_target_epsilon` lets a run go.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from fedspa_jax.server import DPSpec


def _number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_options(
    clip: Any, noise_multiplier: Any, delta: Any, quantile: Any, clip_lr: Any, count_noise: Any, target_epsilon: Any
) -> None:
  """One-line errors for the DP options, before anything is traced."""
  if clip is not None and (not _number(clip) or not 0 < clip < math.inf):
    raise ValueError(f"dp_clip must be a number > 0 (the L2 norm each client's update is clipped to), got {clip!r}")
  if not _number(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
    raise ValueError(f"dp_noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
  if clip is None:
    for name, value, off in (("dp_noise_multiplier", noise_multiplier, 0), ("dp_quantile", quantile, None),
                             ("dp_target_epsilon", target_epsilon, None)):
      if value != off:
        raise ValueError(f"{name}={value!r} needs dp_clip: noise only bounds what a client reveals when its update "
                         "is clipped")
  if not _number(delta) or not 0.0 < delta < 1.0:
    raise ValueError(f"dp_delta must be a number in (0, 1), got {delta!r}")
  if quantile is not None and (not _number(quantile) or not 0.0 < quantile < 1.0):
    raise ValueError(f"dp_quantile (adaptive clipping's target quantile) must be in (0, 1) or null, got {quantile!r}")
  if not _number(clip_lr) or not clip_lr > 0:
    raise ValueError(f"dp_clip_lr must be a number > 0, got {clip_lr!r}")
  if count_noise is not None and (not _number(count_noise) or not count_noise > 0):
    raise ValueError(f"dp_count_noise must be a number > 0 or null (cohort / 20), got {count_noise!r}")
  if target_epsilon is not None:
    if not _number(target_epsilon) or not target_epsilon > 0:
      raise ValueError(f"dp_target_epsilon must be a number > 0 or null, got {target_epsilon!r}")
    if not noise_multiplier > 0:
      raise ValueError("dp_target_epsilon needs dp_noise_multiplier > 0: without noise epsilon is infinite")


def make_spec(clip: float | None, noise_multiplier: float, quantile: float | None, clip_lr: float,
              count_noise: float | None, clients_per_round: int) -> DPSpec | None:
  """The round's DP spec (None without `dp_clip`); sigma_b defaults to clients_per_round / 20 (Andrew et al.).

  Raises:
    ValueError: adaptive clipping whose count noise leaves nothing for the sum (sigma_b <= z / 2).
  """
  if clip is None:
    return None
  count_noise = clients_per_round / 20.0 if count_noise is None else float(count_noise)
  if quantile is not None and noise_multiplier > 0 and not 2.0 * count_noise > noise_multiplier:
    raise ValueError(f"adaptive clipping needs dp_count_noise > dp_noise_multiplier / 2 = {noise_multiplier / 2:g}, "
                     f"got {count_noise:g} (the sum's noise is (z^-2 - (2 sigma_b)^-2)^-1/2)")
  return DPSpec(float(clip), float(noise_multiplier), None if quantile is None else float(quantile), float(clip_lr),
                count_noise)


def round_event(population: int, sample: int, noise_multiplier: float):
  """One round's `dp_accounting` event: a uniform sample of `sample` of `population` clients without replacement,
  then the Gaussian sum (multiplier z / 2 under replace-one neighbours; module docstring)."""
  import dp_accounting  # the accountant is host-side only: importing it never touches the compiled core

  return dp_accounting.SampledWithoutReplacementDpEvent(
      population, sample, dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))


@functools.lru_cache(maxsize=64)
def one_round(population: int, sample: int, noise_multiplier: float):
  """The RDP accountant after one round (replace-one neighbours). Its RDP curve is computed once: sampling without
  replacement costs seconds per curve, and a run asks for epsilon after every evaluated round."""
  import dp_accounting

  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  accountant.compose(round_event(population, sample, noise_multiplier))
  return accountant


@functools.lru_cache(maxsize=4096)
def epsilon(population: int, sample: int, noise_multiplier: float, rounds: int, delta: float) -> float:
  """Epsilon at `delta` after `rounds` rounds (RDP accountant, replace-one neighbours); inf without noise.

  The same number as composing `SelfComposedDpEvent(round_event(...), rounds)` into a fresh `RdpAccountant` and
  asking `get_epsilon(delta)` (tests/test_privacy.py checks it): the accountant composes an event `rounds` times by
  multiplying its RDP curve by `rounds`, which is done here on the cached curve of one round.
  """
  from dp_accounting.rdp import rdp_privacy_accountant

  if rounds <= 0:
    return 0.0
  if not noise_multiplier > 0:
    return math.inf
  accountant = one_round(population, sample, noise_multiplier)
  return float(rdp_privacy_accountant.compute_epsilon(accountant._orders, rounds * accountant._rdp, delta)[0])


def sampling_of(hparams: dict[str, Any], num_clients: int, strata: int) -> tuple[int, int]:
  """(population, sample) of one client's sampling: (K, S), or (K / T, S / T) with stratified sampling."""
  cohort = int(hparams["clients_per_round"])
  if hparams.get("cohort_sampling") == "stratified" and strata > 1:
    return num_clients // strata, cohort // strata
  return num_clients, cohort


def run_epsilon(hparams: dict[str, Any], num_clients: int, rounds: int, strata: int = 1) -> float | None:
  """Epsilon at the run's `dp_delta` after `rounds` rounds, or None when the run has no DP noise."""
  if hparams.get("dp_clip") is None or not hparams.get("dp_noise_multiplier"):
    return None
  population, sample = sampling_of(hparams, num_clients, strata)
  return epsilon(population, sample, float(hparams["dp_noise_multiplier"]), int(rounds), float(hparams["dp_delta"]))


def epsilon_record(algo: Any, num_clients: int, rounds: int) -> dict[str, float]:
  """{"dp_epsilon", "dp_delta"} after `rounds` rounds of `algo` (its sampling), {} without DP noise."""
  eps = run_epsilon(algo.hparams, num_clients, rounds, getattr(algo, "strata", lambda k: 1)(num_clients))
  return {} if eps is None else {"dp_epsilon": eps, "dp_delta": float(algo.hparams["dp_delta"])}


def last_round_within(algo: Any, num_clients: int, rounds: int) -> int | None:
  """The last round r <= `rounds` with epsilon(r) <= `dp_target_epsilon` (None: no target, or all fit).

  Epsilon grows with the rounds, so a bisection over r finds it.
  """
  target = algo.hparams.get("dp_target_epsilon")
  if target is None:
    return None
  strata = getattr(algo, "strata", lambda k: 1)(num_clients)
  spent = lambda r: run_epsilon(algo.hparams, num_clients, r, strata)
  if spent(rounds) <= target:
    return None
  low, high = 0, rounds  # spent(low) <= target < spent(high)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if spent(mid) <= target else (low, mid)
  return low
