"""ResNet-18 (He, Zhang, Ren, Sun, 2016) in its CIFAR form, with GroupNorm instead of BatchNorm.

GroupNorm keeps no running statistics, so per-client training under `vmap` and federated averaging behave as
for any other parameter; Hsieh et al. ("The Non-IID Data Quagmire of Decentralized Machine Learning", 2020) show
it also repairs most of batch normalization's accuracy loss under non-IID data.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedspa_jax.models import layers


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with GroupNorm and an identity (or 1x1 projection) shortcut."""

  features: int
  strides: int = 1
  norm_groups: int = 2
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.conv(self.features, 3, conv=self.conv, strides=self.strides, use_bias=False, name="conv1")(x)
    y = nn.relu(nn.GroupNorm(self.norm_groups, name="norm1")(y))
    y = layers.conv(self.features, 3, conv=self.conv, use_bias=False, name="conv2")(y)
    y = nn.GroupNorm(self.norm_groups, name="norm2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = layers.conv(self.features, 1, conv=self.conv, strides=self.strides, use_bias=False,
                      name="shortcut_conv")(x)
      x = nn.GroupNorm(self.norm_groups, name="shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """3x3 stem (no max pool), four stages of two BasicBlocks (64, 128, 256, 512), global average pool, head.

  11,173,962 parameters for 10 classes (the same count as the BatchNorm version: GroupNorm has a scale and a
  bias per channel too).

  Attributes:
    num_classes: output logits.
    stage_sizes: blocks per stage.
    width: channels of the first stage (doubled per stage).
    norm_groups: GroupNorm groups (2, as Hsieh et al. 2020 use for federated training).
    conv: convolution implementation: "auto", "im2col" or "xla".
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  norm_groups: int = 2
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.conv(self.width, 3, conv=self.conv, use_bias=False, name="stem_conv")(x)
    x = nn.relu(nn.GroupNorm(self.norm_groups, name="stem_norm")(x))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.norm_groups, self.conv,
                       name=f"stage{stage + 1}_block{block + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
