"""Convolution as shifted slices + one matmul (im2col), a drop-in for `lax.conv_general_dilated`.

XLA's CPU convolution is slow for the small layers of federated-learning models, and slower still under `vmap`
over clients: per-client kernels turn the batched convolution into a grouped one. Gathering the k*k shifted
windows of the input ("im2col") and contracting them with the reshaped kernel in one `dot_general` is several
times faster on CPU, and under `vmap` the dot simply gains a batch dimension (one batched matmul over the cohort).
Autodiff goes through the slices and the dot, so gradients need no custom rule.

For layers with few output channels and narrow images (LeNet-5's) a second form moves less memory: gather only
the kh shifted *rows* (`[batch, H_out, kh * W_pad * C_in]`) and fold the W direction into a banded ("row
Toeplitz") kernel matrix `[kh * W_pad * C_in, W_out * C_out]` built from the kernel. It does W_pad / kw times the
FLOPs of im2col but writes ~kw times less, and CPUs here have ~30x more matmul FLOP/s than memory bytes/s;
`method="auto"` picks per layer by a small cost model (`_prefer_rows`).

On GPU/TPU XLA's own convolution is the fast one. `conv="auto"` (`conv_general_dilated_auto`) stages out both and
lets the program's target platform pick (`lax.platform_dependent`): im2col when it is lowered for CPU, XLA's
convolution for CUDA, ROCm and TPU. The choice is made where the program is lowered, not where it is traced, so a
program exported (`jax.export`) or cross-compiled on a CPU host for an accelerator holds native convolutions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW/OIHW
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    nhwc = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == tuple(nhwc)
  return tuple(dimension_numbers) == _NHWC


def _pads(padding, in_hw: Sequence[int], k_hw: Sequence[int], strides: Sequence[int]):
  if isinstance(padding, str):
    return lax.padtype_to_pads(in_hw, k_hw, strides, padding)
  return [tuple(p) for p in padding]


def extract_patches(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
                    out_size: Sequence[int]) -> jax.Array:
  """The im2col matrix of an already padded NHWC input.

  Args:
    x: `[batch, H, W, C]`, padded.
    kernel_size: `(kh, kw)`.
    strides: `(sh, sw)`.
    out_size: `(H_out, W_out)`.

  Returns:
    `[batch, H_out, W_out, kh * kw * C]`, last axis in the (i, j, c) order of a flattened HWIO kernel.
  """
  batch, height, width, c = x.shape
  (kh, kw), (sh, sw), (h_out, w_out) = kernel_size, strides, out_size
  if kh == 1 and kw == 1:
    return lax.slice(x, (0, 0, 0, 0), (batch, (h_out - 1) * sh + 1, (w_out - 1) * sw + 1, c), (1, sh, sw, 1))
  if c < 8:
    # Few channels: one concatenate of kh*kw windows would copy c-float chunks through a slow 25-way select
    # (measured 3x slower for LeNet's first layer on CPU); two concatenates of kw then kh pieces fuse with
    # their slices and move larger chunks.
    rows = jnp.concatenate(
        [lax.slice(x, (0, 0, j, 0), (batch, height, j + (w_out - 1) * sw + 1, c), (1, 1, sw, 1))
         for j in range(kw)], axis=-1)  # [batch, H, W_out, kw * c]
    return jnp.concatenate(
        [lax.slice(rows, (0, i, 0, 0), (batch, i + (h_out - 1) * sh + 1, w_out, kw * c), (1, sh, 1, 1))
         for i in range(kh)], axis=-1)
  windows = [
      lax.slice(x, (0, i, j, 0), (batch, i + (h_out - 1) * sh + 1, j + (w_out - 1) * sw + 1, c), (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  return jnp.stack(windows, axis=3).reshape(batch, h_out, w_out, kh * kw * c)


def extract_rows(x: jax.Array, kh: int, sh: int, h_out: int) -> jax.Array:
  """The kh shifted row windows of an already padded NHWC input: `[batch, H_out, kh * W * C]`, (i, w, c) order."""
  batch, _, width, c = x.shape
  rows = [lax.slice(x, (0, i, 0, 0), (batch, i + (h_out - 1) * sh + 1, width, c), (1, sh, 1, 1)) for i in range(kh)]
  return jnp.stack(rows, axis=2).reshape(batch, h_out, kh * width * c)


def banded_kernel(kernel: jax.Array, width: int, w_out: int, sw: int) -> jax.Array:
  """HWIO kernel -> `[kh * width * C_in, W_out * C_out]` with entry ((i, p, c), (q, o)) = kernel[i, p - q*sw, c, o]."""
  kh, kw, c_in, c_out = kernel.shape
  shift = np.zeros((kw, width, w_out), np.float32)  # shift[j, p, q] = 1 where p == q * sw + j
  for j in range(kw):
    shift[j, np.arange(w_out) * sw + j, np.arange(w_out)] = 1.0
  banded = jnp.einsum("jpq,ijco->ipcqo", shift.astype(kernel.dtype), kernel)
  return banded.reshape(kh * width * c_in, w_out * c_out)


# Matmul FLOP/s per byte/s of memory traffic, as measured on the 2-core Xeon this library is tested on (~300
# GFLOP/s float32 matmul, ~9 GB/s elementwise copy); typical CPUs fall between 10 and 50.
_FLOPS_PER_BYTE = 33.0


def _prefer_rows(batch: int, h_out: int, w_out: int, width: int, kw: int, c_out: int, sw: int) -> bool:
  """Whether row windows + banded kernel should beat full im2col for one layer (per-sample cost model).

  Both forms cost `flops / F + bytes / M`; dividing by (H_out * kh * C_in) leaves, in units of bytes / M:
  im2col: W_out*kw * (2*C_out/R + 12) (patches written once, read twice); rows: width * (2*W_out*C_out/R + 12) plus
  the banded matrix and its gradient, 16 * width * W_out * C_out / (batch * H_out) — with R = F / M.
  """
  if sw != 1 and kw <= sw:
    return False
  patches = w_out * kw * (2.0 * c_out / _FLOPS_PER_BYTE + 12.0)
  rows = width * (2.0 * w_out * c_out / _FLOPS_PER_BYTE + 12.0) + 16.0 * width * w_out * c_out / (batch * h_out)
  return rows < patches


def conv_general_dilated_im2col(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    method: str = "auto",
) -> jax.Array:
  """`lax.conv_general_dilated` for 2-D NHWC/HWIO convolutions, computed as shifted slices + one matmul.

  Args:
    lhs: input `[batch, H, W, C_in]`.
    rhs: kernel `[kh, kw, C_in // feature_group_count, C_out]`.
    window_strides: `(sh, sw)`.
    padding: "SAME", "VALID", "SAME_LOWER" or `[(lo, hi), (lo, hi)]`.
    method: "patches" (full im2col), "rows" (row windows + banded kernel; groups of 1 only) or "auto" (by
      `_prefer_rows`).
    Other arguments as `lax.conv_general_dilated`. Dilations other than 1, `batch_group_count` other than 1 and
    layouts other than NHWC/HWIO/NHWC fall back to `lax.conv_general_dilated`.

  Returns:
    `[batch, H_out, W_out, C_out]`, equal to `lax.conv_general_dilated` up to float rounding.
  """
  dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
  if dilated or batch_group_count != 1 or not _is_nhwc(dimension_numbers, lhs.ndim):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)

  # The scope names every op of this path in the program's locations, so a test can tell an im2col program apart.
  with jax.named_scope(IM2COL_SCOPE):
    return _im2col(lhs, rhs, window_strides, padding, feature_group_count, precision, preferred_element_type, method)


def _im2col(lhs, rhs, window_strides, padding, groups, precision, preferred_element_type, method):
  """The NHWC/HWIO body of `conv_general_dilated_im2col`, without the fallbacks."""
  batch, height, width, c_in = lhs.shape
  kh, kw, c_in_group, c_out = rhs.shape
  if c_in_group * groups != c_in:
    raise ValueError(f"input channels {c_in} != kernel input channels {c_in_group} x groups {groups}")
  sh, sw = window_strides
  (pt, pb), (pl, pr) = _pads(padding, (height, width), (kh, kw), (sh, sw))
  x = lhs
  if pt or pb or pl or pr:
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  hp, wp = height + pt + pb, width + pl + pr
  h_out = (hp - kh) // sh + 1
  w_out = (wp - kw) // sw + 1

  if method not in ("auto", "patches", "rows"):
    raise ValueError(f"unknown method {method!r}")
  rows = groups == 1 and (method == "rows" or (
      method == "auto" and _prefer_rows(batch, h_out, w_out, wp, kw, c_out, sw)))
  if rows:
    y = lax.dot_general(extract_rows(x, kh, sh, h_out), banded_kernel(rhs, wp, w_out, sw),
                        (((2,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(batch, h_out, w_out, c_out)
  patches = extract_patches(x, (kh, kw), (sh, sw), (h_out, w_out))
  if groups == 1:
    kernel = rhs.reshape(kh * kw * c_in, c_out)
    return lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)
  patches = patches.reshape(batch, h_out, w_out, kh * kw, groups, c_in_group)
  kernel = rhs.reshape(kh * kw, c_in_group, groups, c_out // groups)
  y = jnp.einsum("bhwkgc,kcgo->bhwgo", patches, kernel, precision=precision,
                 preferred_element_type=preferred_element_type)
  return y.reshape(batch, h_out, w_out, c_out)


def conv_general_dilated_auto(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` computed by im2col on CPU and by XLA's convolution on every other platform.

  Both are traced; the platform the program is lowered for keeps one (`lax.platform_dependent`), so XLA never sees
  the other. Gradients and `vmap` go through the kept branch as through a direct call.

  Args:
    lhs, rhs, *args, **kwargs: as `lax.conv_general_dilated`.

  Returns:
    The convolution, as `lax.conv_general_dilated` returns it.
  """
  im2col = lambda lhs, rhs: conv_general_dilated_im2col(lhs, rhs, *args, **kwargs)
  native = lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  return lax.platform_dependent(lhs, rhs, cpu=im2col, default=native)


class Im2ColConv:
  """Zero-argument factory for flax's `nn.Conv(conv_general_dilated_cls=...)`; calls return the im2col conv."""

  def __call__(self, *args, **kwargs):
    return conv_general_dilated_im2col(*args, **kwargs)


class XlaConv:
  """Zero-argument factory for flax's `nn.Conv(conv_general_dilated_cls=...)`: XLA's own convolution."""

  def __call__(self, *args, **kwargs):
    return lax.conv_general_dilated(*args, **kwargs)


class AutoConv:
  """Zero-argument factory for flax's `nn.Conv(conv_general_dilated_cls=...)`: per target platform (see module)."""

  def __call__(self, *args, **kwargs):
    return conv_general_dilated_auto(*args, **kwargs)


CONV_CHOICES = ("auto", "im2col", "xla")
IM2COL_SCOPE = "im2col_conv"


def resolve_conv(conv: str = "auto", platform: str | None = None) -> str:
  """The implementation a `conv` choice runs on `platform` (default: `jax.default_backend()`), for reports.

  Args:
    conv: "auto", "im2col" or "xla".
    platform: "cpu", "cuda", "rocm", "tpu" (or "gpu"); "auto" is "im2col" on "cpu" and "xla" on the others.

  Returns:
    "im2col" or "xla".
  """
  if conv not in CONV_CHOICES:
    raise ValueError(f"unknown conv {conv!r}; choose one of {CONV_CHOICES}")
  if conv == "auto":
    return "im2col" if (platform or jax.default_backend()) == "cpu" else "xla"
  return conv


def conv_cls(conv: str = "auto") -> Callable[[], Callable[..., jax.Array]]:
  """The `conv_general_dilated_cls` to give `nn.Conv` for a `conv` choice ("auto", "im2col" or "xla")."""
  if conv not in CONV_CHOICES:
    raise ValueError(f"unknown conv {conv!r}; choose one of {CONV_CHOICES}")
  return {"auto": AutoConv, "im2col": Im2ColConv, "xla": XlaConv}[conv]
