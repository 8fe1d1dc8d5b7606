"""FLOPs of the models' convolutions and dense layers, dense and sparse, per sample.

Counting rule: a multiply-add is 2 FLOPs. A convolution costs `2 * H_out * W_out * kh * kw * (C_in / groups) *
C_out`, a dense layer `2 * in * out` (times any extra leading positions). Bias additions, normalization,
activations and pooling are not counted: they are linear in the activations, not in the weights, and below 2% of
the total for every model here.

Recurrent layers (`nn.RNN` over a flax cell) count each of the cell's kernels as a dense layer applied once per
time step: an LSTM layer with input width `n`, `h` units and `T` steps costs `T * 4 * 2 * (n * h + h * h)` (the
four gates' input and recurrent kernels; the gate nonlinearities and the cell update are not counted, like other
activations). Embedding lookups cost nothing (no multiply-adds).

Training follows RigL's accounting (Evci et al., "Rigging the Lottery", 2020): a step costs 3x the forward pass
(forward, gradient with respect to the activations, gradient with respect to the weights), and a layer of
density d costs d times its dense FLOPs. A mask update that regrows by gradient (RigL) computes one dense weight
gradient on a batch at the sparse point: sparse forward + sparse activation gradient + dense weight gradient
= `2 * f_sparse + f_dense` per sample of that batch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.recurrent import DenseParams


class LayerShape(NamedTuple):
  """A weight layer met while tracing the model: its kind, input and output shapes (batch of 1), kernel shape."""

  kind: str  # "conv" or "dense"
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  feature_group_count: int


def layer_shapes(model: nn.Module, sample_shape: Sequence[int]) -> dict[str, LayerShape]:
  """Traces `model` (no FLOPs run: `jax.eval_shape`) and records every `nn.Conv` and `nn.Dense` call.

  Args:
    model: a flax module.
    sample_shape: one sample's shape, e.g. `(28, 28, 1)`.

  Returns:
    `{path: LayerShape}` in call order; `path` is the layer's "/"-joined module path in the params, e.g.
    "conv1", "stage1_block1/conv2" or "lstm1/cell/hi", so `params[...path...]["kernel"]` is its kernel. A layer
    inside an `nn.RNN` has the time steps as an extra axis in its input and output shapes ([1, T, ...]).
  """
  found: dict[str, LayerShape] = {}
  steps: list[int] = []  # time steps of the enclosing `nn.RNN`s: a cell's layers are traced for one step only

  def per_sequence(shape: tuple[int, ...]) -> tuple[int, ...]:
    time = math.prod(steps)
    return shape if time == 1 else (shape[0], time, *shape[1:])

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.RNN):
      time_major = kwargs.get("time_major")
      time_major = module.time_major if time_major is None else time_major
      steps.append(int(args[0].shape[0 if time_major else -2]))
      try:
        return next_fun(*args, **kwargs)
      finally:
        steps.pop()
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    path = "/".join(module.scope.path)
    if isinstance(module, nn.Conv):
      kernel = module.variables["params"]["kernel"]
      found[path] = LayerShape("conv", per_sequence(tuple(args[0].shape)), per_sequence(tuple(out.shape)),
                               tuple(kernel.shape), module.feature_group_count)
    elif isinstance(module, nn.Dense):
      kernel = module.variables["params"]["kernel"]
      found[path] = LayerShape("dense", per_sequence(tuple(args[0].shape)), per_sequence(tuple(out.shape)),
                               tuple(kernel.shape), 1)
    elif isinstance(module, DenseParams):  # the gate kernels of flax's fused cells (OptimizedLSTMCell)
      kernel = out[0]
      rows = tuple(args[0].shape[:-1])
      found[path] = LayerShape("dense", per_sequence(tuple(args[0].shape)), per_sequence(rows + kernel.shape[-1:]),
                               tuple(kernel.shape), 1)
    return out

  x = jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32)  # as the engine feeds models (token ids too)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.init, jax.eval_shape(jax.random.key, 0), x)
  return found


def _dense_flops(layer: LayerShape) -> float:
  if layer.kind == "conv":
    *window, c_in_group, c_out = layer.kernel_shape
    positions = math.prod(layer.output_shape[1:-1])
    return 2.0 * positions * math.prod(window) * c_in_group * c_out
  d_in, d_out = layer.kernel_shape
  positions = math.prod(layer.input_shape[1:-1])
  return 2.0 * positions * d_in * d_out


def forward_flops(model: nn.Module, sample_shape: Sequence[int]) -> dict[str, float]:
  """Dense forward FLOPs per sample of every conv and dense layer.

  Args:
    model: a flax module.
    sample_shape: one sample's shape, e.g. `(28, 28, 1)`.

  Returns:
    `{layer path: FLOPs}` (see `layer_shapes` for the paths); `sum(...values())` is the model's forward cost.
  """
  return {path: _dense_flops(layer) for path, layer in layer_shapes(model, sample_shape).items()}


def _kernel_density(densities: Any, path: str) -> float:
  if densities is None:
    return 1.0
  if isinstance(densities, (int, float)):
    return float(densities)
  node = densities
  for name in path.split("/"):
    node = node[name]
  value = node["kernel"] if isinstance(node, Mapping) else node
  return float(np.asarray(value))  # numpy: a float while a round is traced too


def sparse_forward_flops(model: nn.Module, sample_shape: Sequence[int], densities: Any) -> dict[str, float]:
  """Forward FLOPs per sample of every layer with its kernel at the given density.

  Args:
    model: a flax module.
    sample_shape: one sample's shape.
    densities: per-leaf densities with the params' structure (a float per leaf, 1.0 for dense leaves; only the
      "kernel" leaves are read), or one float for every kernel, or None for dense.

  Returns:
    `{layer path: FLOPs}`.
  """
  return _at_densities(forward_flops(model, sample_shape), densities)


def _at_densities(dense: Mapping[str, float], densities: Any) -> dict[str, float]:
  return {path: _kernel_density(densities, path) * f for path, f in dense.items()}


class TrainingFlops(NamedTuple):
  """Training cost: `per_sample` for each sample trained on, `regrow` once per mask update (per client)."""

  per_sample: float  # 3 x sparse forward
  regrow: float  # regrow_batch x (2 x sparse forward + dense forward)
  dense_per_sample: float  # 3 x dense forward: the dense-training reference

  def total(self, samples: int | float, mask_updates: int | float = 1) -> float:
    """FLOPs of training on `samples` samples with `mask_updates` gradient-based mask updates."""
    return self.per_sample * samples + self.regrow * mask_updates

  def dense_total(self, samples: int | float) -> float:
    """FLOPs of dense training on `samples` samples."""
    return self.dense_per_sample * samples


def training_flops(model: nn.Module, sample_shape: Sequence[int], densities: Any = None, *,
                   regrow_batch: int = 0) -> TrainingFlops:
  """Training FLOPs of `model` with kernels at `densities`, by RigL's accounting (see the module docstring).

  Args:
    model: a flax module.
    sample_shape: one sample's shape, e.g. `(32, 32, 3)`.
    densities: per-leaf densities with the params' structure, one float, or None (dense).
    regrow_batch: samples in the batch whose dense gradient drives gradient-based regrowth (0: none, e.g. SET).

  Returns:
    `TrainingFlops(per_sample, regrow, dense_per_sample)`.
  """
  per_layer = forward_flops(model, sample_shape)  # the model traced once, for both
  dense = sum(per_layer.values())
  sparse = sum(_at_densities(per_layer, densities).values())
  return TrainingFlops(per_sample=3.0 * sparse, regrow=regrow_batch * (2.0 * sparse + dense),
                       dense_per_sample=3.0 * dense)
