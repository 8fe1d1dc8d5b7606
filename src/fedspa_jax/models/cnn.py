"""Small CNNs of the federated-learning literature.

- `CNN`: the two-convolution network of FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", 2017) for 28x28 images.
- `CifarCNN`: the CIFAR network of LG-FedAvg (Liang et al., 2020) and FedRep (Collins et al., 2021).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fedspa_jax.models import layers


class CNN(nn.Module):
  """conv 5x5x32 - pool - conv 5x5x64 - pool - dense 512 - head (FedAvg's MNIST CNN).

  With `padding="VALID"` (the default, PyTorch's `Conv2d` default that most federated code bases use) a 28x28x1
  input gives a 4x4x64 feature map and 582,026 parameters for 10 classes; `padding="SAME"` keeps 7x7x64 and
  gives the 1,663,370 parameters that the FedAvg paper reports.

  Attributes:
    num_classes: output logits.
    padding: "VALID" or "SAME" for both convolutions.
    conv: convolution implementation: "auto", "im2col" or "xla".
  """

  num_classes: int
  padding: str = "VALID"
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(layers.max_pool(layers.conv(32, 5, conv=self.conv, padding=self.padding, name="conv1")(x)))
    x = nn.relu(layers.max_pool(layers.conv(64, 5, conv=self.conv, padding=self.padding, name="conv2")(x)))
    x = layers.dense_stack(layers.flatten(x), (512,))
    return nn.Dense(self.num_classes, name="head")(x)


class CifarCNN(nn.Module):
  """conv 5x5x64 - pool - conv 5x5x64 - pool - dense 120 - dense 64 - head, VALID padding.

  307,842 parameters for 32x32x3 inputs and 10 classes.

  Attributes:
    num_classes: output logits.
    conv: convolution implementation: "auto", "im2col" or "xla".
  """

  num_classes: int
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(layers.max_pool(layers.conv(64, 5, conv=self.conv, padding="VALID", name="conv1")(x)))
    x = nn.relu(layers.max_pool(layers.conv(64, 5, conv=self.conv, padding="VALID", name="conv2")(x)))
    x = layers.dense_stack(layers.flatten(x), (120, 64))
    return nn.Dense(self.num_classes, name="head")(x)
