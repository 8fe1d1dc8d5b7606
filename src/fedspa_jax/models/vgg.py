"""VGG-11 (Simonyan & Zisserman, 2015, configuration "A") for 32x32 images, without batch normalization."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from fedspa_jax.models import layers

VGG11_FEATURES = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
  """Eight 3x3 SAME convolutions with five 2x2 max pools, then dense 512 - dense 512 - head.

  The CIFAR variant used in personalized-FL work (e.g. DisPFL): a 32x32 input pools down to 1x1x512, so the
  classifier is small; 9,750,922 parameters for 10 classes. Pools round up (-inf padding) so 28x28 inputs also
  reach 1x1. No batch normalization (see docs/models.md) and no dropout (the engine's local training is
  deterministic given its key).

  Attributes:
    num_classes: output logits.
    features: conv widths, "M" for a max pool.
    hidden: widths of the dense layers before the head.
    conv: convolution implementation: "auto", "im2col" or "xla".
  """

  num_classes: int
  features: Sequence[int | str] = VGG11_FEATURES
  hidden: Sequence[int] = (512, 512)
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    index = 0
    for position, f in enumerate(self.features):
      if f == "M":
        x = nn.relu(layers.max_pool(x, ceil=True))
      else:
        index += 1
        x = layers.conv(int(f), 3, conv=self.conv, padding="SAME", name=f"conv{index}")(x)
        next_is_pool = position + 1 < len(self.features) and self.features[position + 1] == "M"
        if not next_is_pool:  # before a pool, ReLU comes after it (same values, a quarter of the work)
          x = nn.relu(x)
    x = layers.dense_stack(layers.flatten(x), self.hidden)
    return nn.Dense(self.num_classes, name="head")(x)
