"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, 1998) with ReLU and max pooling, as used in federated benchmarks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax.models import layers


class LeNet5(nn.Module):
  """conv 5x5x6 - pool - conv 5x5x16 - pool - dense 120 - dense 84 - head.

  The network expects 32x32 images as in the paper: smaller inputs (MNIST's 28x28) are zero-padded to 32x32 by
  the first convolution, so both 28x28x1 and 32x32x3 inputs give a 5x5x16 feature map (61,706 parameters for
  28x28x1 with 10 classes, 62,006 for 32x32x3).

  Attributes:
    num_classes: output logits.
    conv: convolution implementation: "auto" (im2col on CPU, XLA elsewhere), "im2col" or "xla".
  """

  num_classes: int
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    pad = ((max(0, 32 - height) // 2,) * 2, (max(0, 32 - width) // 2,) * 2)
    x = nn.relu(layers.max_pool(layers.conv(6, 5, conv=self.conv, padding=pad, name="conv1")(x)))
    x = nn.relu(layers.max_pool(layers.conv(16, 5, conv=self.conv, padding="VALID", name="conv2")(x)))
    x = layers.dense_stack(layers.flatten(x), (120, 84))
    return nn.Dense(self.num_classes, name="head")(x)
