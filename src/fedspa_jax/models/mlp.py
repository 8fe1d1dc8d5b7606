"""A small multi-layer perceptron (the model of the Synthetic(alpha, beta) experiments)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flattens its input, then Dense-ReLU layers and a Dense classifier head.

  Attributes:
    num_classes: output logits.
    hidden: widths of the hidden layers.
  """

  num_classes: int
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes, name="head")(x)
