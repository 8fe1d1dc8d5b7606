"""Federated algorithms, each an `Algorithm(init, round, evaluate)`; `get(name, model=..., **hparams)` builds one.

Every algorithm accepts the shared hyperparameters of `base.Common` (clients_per_round, local_epochs, local_steps,
batch_size, lr, momentum, weight_decay, optimizer, rounds, weighting, server_lr, mesh, eval_clients_per_batch) plus
its own. Presets are registered names with some of those fixed (e.g. "fedspa_fixed" = FedSpa without mask updates).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import types
import typing
from typing import Any, Callable

from fedspa_jax.algorithms.base import Algorithm, Common
from fedspa_jax.algorithms.dense import ditto, fedavg, fedavg_ft, local
from fedspa_jax.algorithms.dispfl import dispfl
from fedspa_jax.algorithms.feddst import feddst
from fedspa_jax.algorithms.fedspa import fedspa
from fedspa_jax.algorithms.prunefl import prunefl
from fedspa_jax.algorithms.split import fedper, fedrep
from fedspa_jax.algorithms.subfedavg import subfedavg

# name -> (factory, preset hyperparameters, one-line description)
_ALGORITHMS: dict[str, tuple[Callable[..., Algorithm], dict[str, Any], str]] = {
    "fedspa": (fedspa, {}, "FedSpa: personalized sparse masks, RigL regrowth (Huang et al. 2022)"),
    "fedspa_fixed": (fedspa, {"update_masks": False}, "FedSpa ablation: fixed random masks"),
    "fedspa_random": (fedspa, {"regrow": "random"}, "FedSpa ablation: random (SET) regrowth"),
    "fedspa_masked_mean": (fedspa, {"aggregation": "masked_mean"}, "FedSpa ablation: masked-mean aggregation"),
    "fedspa_shared_init": (fedspa, {"shared_init_mask": True}, "FedSpa ablation: one shared initial mask"),
    "fedavg": (fedavg, {}, "FedAvg: one global model (McMahan et al. 2017)"),
    "fedavg_ft": (fedavg_ft, {}, "FedAvg, then local fine-tuning before evaluation"),
    "local": (local, {}, "Local: every client trains alone, no communication"),
    "ditto": (ditto, {}, "Ditto: personal models with a proximal pull to the global one (Li et al. 2021)"),
    "fedrep": (fedrep, {}, "FedRep: shared body, personal head trained first (Collins et al. 2021)"),
    "fedper": (fedper, {}, "FedPer: shared body, personal head trained jointly (Arivazhagan et al. 2019)"),
    "subfedavg": (subfedavg, {}, "Sub-FedAvg (unstructured): pruned personal masks (Vahidian et al. 2021)"),
    "dispfl": (dispfl, {}, "DisPFL: decentralized personal sparse models, neighbours' masked average (Dai et al. 2022)"),
    "feddst": (feddst, {}, "FedDST: one sparse global model, clients readjust masks, server aggregates by vote (Bibikar et al. 2022)"),
    "prunefl": (prunefl, {}, "PruneFL: one sparse global model, the server readjusts its mask by squared gradients per cost (Jiang et al. 2022)"),
}


def register(name: str, factory: Callable[..., Algorithm], preset: dict[str, Any] | None = None, doc: str = ""):
  """Adds an algorithm (or a preset of one) to the registry."""
  _ALGORITHMS[name] = (factory, dict(preset or {}), doc)


def names() -> list[str]:
  """The names `get` accepts."""
  return sorted(_ALGORITHMS)


def describe() -> dict[str, str]:
  """{name: one-line description} of every registered algorithm."""
  return {name: _ALGORITHMS[name][2] for name in names()}


def known_hparams(name: str) -> list[str]:
  """Hyperparameters `get(name, ...)` accepts."""
  factory = _ALGORITHMS[name][0]
  params = inspect.signature(factory).parameters
  own = [p for p, v in params.items() if p != "model" and v.kind is not inspect.Parameter.VAR_KEYWORD]
  if any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
    own += [f.name for f in dataclasses.fields(Common)]
  return own


# The annotations `check_hparam_types` checks, and how its messages name them.
_SIMPLE_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _simple_types(hint: Any) -> tuple[type, ...] | None:
  """The types a union of simple types allows (`int | None` -> (int, NoneType)); None for any other annotation."""
  allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
  return allowed if all(t in _SIMPLE_TYPES for t in allowed) else None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
  if value is None or isinstance(value, (bool, str)):
    return type(value) in allowed
  if isinstance(value, numbers.Integral):
    return int in allowed or float in allowed
  if isinstance(value, numbers.Real):
    return float in allowed
  return False


def check_hparam_types(name: str, hparams: dict[str, Any]) -> None:
  """Checks plain values (numbers, strings, booleans, None: what a config holds) against `get(name, ...)`'s
  annotations, where those are simple types or unions of them; other annotations are left to the factory.

  Raises:
    TypeError: naming the first hyperparameter whose value does not fit, and the type it wants.
  """
  factory = _ALGORITHMS[name][0]
  hints = {**typing.get_type_hints(Common), **typing.get_type_hints(factory)}
  for key in known_hparams(name):
    allowed = _simple_types(hints.get(key, Any))
    if key not in hparams or allowed is None or _fits(hparams[key], allowed):
      continue
    spelled = " | ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise TypeError(f"hyperparameter {key} must be {' or '.join(_SIMPLE_TYPES[t] for t in allowed)} ({spelled}), "
                    f"got {hparams[key]!r}")


def get(name: str, *, model, **hparams) -> Algorithm:
  """Builds the algorithm registered as `name` for `model`; unknown names and hyperparameters raise ValueError."""
  if name not in _ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(names())}")
  factory, preset, _ = _ALGORITHMS[name]
  known = known_hparams(name)
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"unknown hyperparameters for {name!r}: {', '.join(unknown)}; known: {', '.join(known)}")
  algo = factory(model=model, **{**preset, **hparams})
  return dataclasses.replace(algo, name=name)


__all__ = [
    "Algorithm",
    "Common",
    "check_hparam_types",
    "describe",
    "dispfl",
    "ditto",
    "fedavg",
    "fedavg_ft",
    "feddst",
    "fedper",
    "fedrep",
    "fedspa",
    "get",
    "known_hparams",
    "local",
    "names",
    "prunefl",
    "register",
    "subfedavg",
]
