"""Flax models for federated simulation; `get(name, num_classes, **kw)` builds one by name.

Every image model is a `flax.linen` Module applied as `model.apply({"params": params}, x)` to float32 NHWC images
`[batch, H, W, C]` and returns logits `[batch, num_classes]`; the character model `char_lstm` takes token ids
`[batch, length]` and returns logits `[batch, length, vocab_size]` (`num_classes` is its vocabulary size). No model
keeps batch statistics or other mutable collections. The last layer is a Dense named "head"; everything before it
is the body. Convolutional models take `conv="auto" | "im2col" | "xla"` (see `fedspa_jax.models.conv`).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import numpy as np

from fedspa_jax.models import conv, flops
from fedspa_jax.models.char_lstm import CharLSTM
from fedspa_jax.models.cnn import CNN, CifarCNN
from fedspa_jax.models.lenet import LeNet5
from fedspa_jax.models.mlp import MLP
from fedspa_jax.models.resnet import ResNet18
from fedspa_jax.models.vgg import VGG11

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "cnn": CNN,
    "cifar_cnn": CifarCNN,
    "vgg11": VGG11,
    "resnet18": ResNet18,
    "char_lstm": CharLSTM,
}


def names() -> list[str]:
  """The names `get` accepts."""
  return sorted(_MODELS)


def get(name: str, num_classes: int | None = None, **kw) -> nn.Module:
  """Builds the model registered as `name` with `num_classes` outputs (extra keywords go to its constructor).

  `vocab_size=V` is accepted as another name for `num_classes` (a character model's outputs are its vocabulary);
  giving both is an error unless they agree.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
  if "vocab_size" in kw:
    vocab_size = kw.pop("vocab_size")
    if num_classes is not None and num_classes != vocab_size:
      raise ValueError(f"num_classes={num_classes} and vocab_size={vocab_size} disagree (they name the same thing)")
    num_classes = vocab_size
  if num_classes is None:
    raise ValueError(f"model {name!r} needs num_classes (or vocab_size)")
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  return _MODELS[name](num_classes=num_classes, **kw)


__all__ = ["CNN", "CharLSTM", "CifarCNN", "LeNet5", "MLP", "ResNet18", "VGG11", "conv", "flops", "get", "names"]
