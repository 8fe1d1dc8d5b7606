"""Federated algorithms, each an `Algorithm(init, round, evaluate)`; `get(name, model=..., **hparams)` builds one."""

from __future__ import annotations

import inspect
from typing import Callable

from fedspa_jax.algorithms.base import Algorithm
from fedspa_jax.algorithms.fedspa import fedspa

_ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "fedspa": fedspa,
}


def names() -> list[str]:
  """The names `get` accepts."""
  return sorted(_ALGORITHMS)


def get(name: str, *, model, **hparams) -> Algorithm:
  """Builds the algorithm registered as `name` for `model`; unknown names and hyperparameters raise ValueError."""
  if name not in _ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(names())}")
  factory = _ALGORITHMS[name]
  known = [p for p in inspect.signature(factory).parameters if p != "model"]
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"unknown hyperparameters for {name!r}: {', '.join(unknown)}; known: {', '.join(known)}")
  return factory(model=model, **hparams)


__all__ = ["Algorithm", "fedspa", "get", "names"]
