"""Flax models for federated simulation; `get(name, num_classes, **kw)` builds one by name."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from fedspa_jax.models.mlp import MLP

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
}


def names() -> list[str]:
  """The names `get` accepts."""
  return sorted(_MODELS)


def get(name: str, num_classes: int, **kw) -> nn.Module:
  """Builds the model registered as `name` with `num_classes` outputs (extra keywords go to its constructor)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return _MODELS[name](num_classes=num_classes, **kw)


__all__ = ["MLP", "get", "names"]
