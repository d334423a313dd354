"""Building blocks shared by the models."""
import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import kernels

# The mapped axis that BatchNorm statistics are averaged over while tracing a per-device
# step (`synced_batch_norm`); None under jit, where the statistics are global already.
_BATCH_NORM_AXIS = contextvars.ContextVar('batch_norm_axis', default=None)


@contextlib.contextmanager
def synced_batch_norm(axis_name):
  """BatchNorm layers built (traced) inside average their batch statistics over the mapped
  axis `axis_name` of shard_map / pmap (sync BN); `axis_name` None leaves them per batch.

  A context rather than a model field, so every model keeps `__call__(images, *, train)`.
  """
  token = _BATCH_NORM_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_NORM_AXIS.reset(token)


def batch_norm(use_running_average, dtype=jnp.float32, name=None, epsilon=1e-5, momentum=0.9):
  """BatchNorm, by default with PyTorch's defaults: epsilon 1e-5, momentum 0.1 (0.9 in flax's
  terms; torchvision's MobileNetV3 uses 1e-3 and 0.99).

  Statistics are computed in float32 whatever `dtype`, and kept in float32.
  """
  return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum,
                      epsilon=epsilon, dtype=dtype, axis_name=_BATCH_NORM_AXIS.get(), name=name)


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(value or (1, 1))


def _dot_last(x, kernel, precision, preferred_element_type=None):
  """[..., C] x [C, F] -> [..., F], contracting the channel axis."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


# A stride-1 convolution runs tap by tap (`_conv_by_taps`) when the taps' reads inside the
# input are at most this share of the full convolution's work: atrous convolutions whose
# rate is not small against the feature map (ASPP), and kernels as large as the map (FCN's
# 7x7 fc6 on a 4x4 pool5, 3x3 on a U-Net's 2x2 bottom), where most taps read only padding.
# At 0.6 a 3x3 kernel on a 3x3 map (0.605) stays a convolution: there the products are too
# small for nine of them to beat one convolution.
MAX_TAP_WORK = 0.6


def _tap_windows(size, kernel, dilation, padding_low, out_size):
  """One spatial axis of a stride-1 convolution -> [(tap, input start, output start, output
  stop)] of the taps that read the input: output o of tap t reads input
  o + t * dilation - padding_low, which exists for outputs [start, stop)."""
  windows = []
  for tap in range(kernel):
    shift = tap * dilation - padding_low
    start, stop = max(0, -shift), min(out_size, size - shift)
    if stop > start:
      windows.append((tap, start + shift, start, stop))
  return windows


def _conv_by_taps(inputs, kernel, windows, out_size, precision):
  """Convolution [B, H, W, C] x kernel [kh, kw, C, F] -> [B, out_h, out_w, F] as a sum of
  one matrix product per (row tap, column tap) over the output window it reaches, padded
  to the output: no work is spent on padding. The taps are summed in float32 (as a
  convolution accumulates), then cast to the inputs' dtype."""
  (rows, cols), (out_h, out_w) = windows, out_size
  kh, kw, channels, features = kernel.shape
  # One split, not kernel[i, j] per tap: the gradient of a split is one concatenation, of
  # each indexing a pad to the whole kernel (9 x 19 MB to sum for a 3x3 2048->256 ASPP).
  taps = jax.lax.split(kernel.reshape(kh * kw, channels, features), [1] * (kh * kw))
  y = jnp.zeros((inputs.shape[0], out_h, out_w, features), jnp.float32)
  for i, in_row, row_start, row_stop in rows:
    for j, in_col, col_start, col_stop in cols:
      window = inputs[:, in_row:in_row + row_stop - row_start,
                      in_col:in_col + col_stop - col_start]
      y += jnp.pad(_dot_last(window, taps[i * kw + j][0], precision, jnp.float32),
                   ((0, 0), (row_start, out_h - row_stop), (col_start, out_w - col_stop),
                    (0, 0)))
  return y.astype(inputs.dtype)


class Conv(nn.Conv):
  """`nn.Conv` (same fields, parameters, names and results) that, in the 'cpu' formulation
  (`kernels`: the CPU backend), computes two kinds of convolution with matrix products; the
  others, and all of them elsewhere, run `nn.Conv` unchanged. 2-D inputs [B, H, W, C] only.

  - Non-overlapping windows: 1x1 kernels at any stride, and k x k kernels at stride k
    ('VALID', or 'SAME' on sizes divisible by k; ViT's patch embedding), as one product.
    XLA:CPU runs a 1x1 convolution's weight gradient at 15-45 GFLOP/s and the equivalent
    dot at 50-85 (forward 50-90 vs 85-185; 2-core CPU, ResNet-50 shapes), and adds a layout
    transpose around each convolution; on GPU and TPU both forms are the same GEMM.
  - Stride-1 convolutions whose taps mostly read padding (`MAX_TAP_WORK`), tap by tap over
    the outputs each tap reaches. DeepLab's ASPP at rates 6/12/18 on a 16x16 map reads
    padding for 44%/75%/89% of its taps' positions, which a convolution still multiplies:
    forward and backward of a 2048->256 one took 2.4x (rate 12) and 7x (rate 18) longer on
    XLA:CPU's own convolution (5x and 18x on YNNPACK's); a 7x7 512->1024 convolution on a
    4x4 map 5x, a 3x3 one on a 2x2 map 3.4x (YNNPACK).
  """

  def _non_overlapping_patch(self, inputs):
    """The patch side (1 or k) when the non-overlapping path applies, else None."""
    kernel, strides = _pair(self.kernel_size), _pair(self.strides)
    if not self._plain_2d(inputs) or kernel[0] != kernel[1]:
      return None
    k = kernel[0]
    if k == 1:
      padding = nn.linear.canonicalize_padding(self.padding, 2)
      unpadded = padding in ('SAME', 'VALID') or all(p == (0, 0) for p in padding)
      return 1 if unpadded else None
    if _pair(self.kernel_dilation) != (1, 1) or strides != (k, k):
      return None
    divisible = inputs.shape[1] % k == 0 and inputs.shape[2] % k == 0
    return k if self.padding == 'VALID' or (self.padding == 'SAME' and divisible) else None

  def _sparse_taps(self, inputs):
    """(per-axis `_tap_windows`, output (height, width)) when the tap path applies, else
    None."""
    padding = nn.linear.canonicalize_padding(self.padding, 2)
    kernel, dilation = _pair(self.kernel_size), _pair(self.kernel_dilation)
    if (not self._plain_2d(inputs) or _pair(self.strides) != (1, 1)
        or padding not in ('SAME', 'VALID') and isinstance(padding, str)):
      return None
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(inputs.shape[1:3], spans, (1, 1), padding)
    out_size = tuple(n + low + high - span + 1
                     for n, span, (low, high) in zip(inputs.shape[1:3], spans, padding))
    if min(out_size) < 1:
      return None
    windows = tuple(_tap_windows(n, k, d, low, out)
                    for n, k, d, (low, _), out in zip(inputs.shape[1:3], kernel, dilation,
                                                      padding, out_size))
    reached = [sum(stop - start for *_, start, stop in axis) for axis in windows]
    work = reached[0] * reached[1] / (kernel[0] * kernel[1] * out_size[0] * out_size[1])
    return (windows, out_size) if work <= MAX_TAP_WORK else None

  def _plain_2d(self, inputs):
    return (inputs.ndim == 4 and self.mask is None and self.feature_group_count == 1
            and _pair(self.input_dilation) == (1, 1))

  @nn.compact
  def __call__(self, inputs):
    if kernels.formulation() == 'plain':
      return super().__call__(inputs)
    k = self._non_overlapping_patch(inputs)
    taps = None if k is not None else self._sparse_taps(inputs)
    if k is None and taps is None:
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init,
                        (*_pair(self.kernel_size), inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if taps is not None:
      y = _conv_by_taps(inputs, kernel, *taps, self.precision)
    elif k == 1:
      sh, sw = _pair(self.strides)
      y = _dot_last(inputs[:, ::sh, ::sw], kernel.reshape(-1, self.features), self.precision)
    else:  # [B, H/k, k, W/k, k, C] -> [B, H/k, W/k, k * k * C], kernel's (row, col, C) order
      batch, height, width, channels = inputs.shape
      rows, cols = height // k, width // k
      patches = inputs[:, :rows * k, :cols * k].reshape(batch, rows, k, cols, k, channels)
      patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, -1)
      y = _dot_last(patches, kernel.reshape(-1, self.features), self.precision)
    return y + bias if bias is not None else y


class ConvTranspose(nn.ConvTranspose):
  """`nn.ConvTranspose` (same fields, parameters, names and results) that, in the 'cpu'
  formulation (`kernels`), computes the non-overlapping case, kernel == strides (U-Net's 2x2
  stride-2 up-convolution), as one matrix product and a depth-to-space reshape; other
  configurations, and all of them elsewhere, run `nn.ConvTranspose`. 2-D inputs [B, h, w, C] -> [B, h*k, w*k, F].

  Why: XLA:CPU computes the weight gradient of a stride-2 transposed convolution as a
  dilated convolution at a few GFLOP/s: in a depth-4 U-Net at 8 x 128^2 these four
  gradients took 78% of the train step.
  """

  def _non_overlapping_patch(self, inputs):
    kernel, strides = _pair(self.kernel_size), _pair(self.strides)
    if (inputs.ndim != 4 or self.mask is not None or self.transpose_kernel
        or self.preferred_element_type is not None or _pair(self.kernel_dilation) != (1, 1)
        or kernel != strides or kernel[0] != kernel[1] or self.padding not in ('SAME', 'VALID')):
      return None
    return kernel[0]

  @nn.compact
  def __call__(self, inputs):
    k = self._non_overlapping_patch(inputs) if kernels.formulation() == 'cpu' else None
    if k is None:
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, (k, k, inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    batch, height, width, _ = inputs.shape
    # lax.conv_transpose correlates the stride-dilated input with the kernel, so output
    # offset (a, b) inside a cell takes tap (k-1-a, k-1-b).
    matrix = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(inputs.shape[-1], -1)
    y = _dot_last(inputs, matrix, self.precision).reshape(batch, height, width, k, k, -1)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * k, width * k, -1)
    return y + bias if bias is not None else y


def _depthwise_by_taps(inputs, kernel, strides, dilation, padding):
  """Depthwise convolution [B, H, W, C] x kernel [k, k, 1, C] -> [B, H', W', C] as the sum
  of one strided slice of the padded inputs per tap, times that tap's per-channel weights;
  summed in float32 (as a convolution accumulates), then cast to the inputs' dtype."""
  k, channels = kernel.shape[0], kernel.shape[-1]
  x = jnp.pad(inputs, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h, out_w = ((n - dilation * (k - 1) - 1) // strides + 1 for n in x.shape[1:3])
  # One split, not kernel[i, j] per tap: its gradient is one concatenation (`_conv_by_taps`).
  taps = jax.lax.split(kernel.reshape(k * k, channels).astype(jnp.float32), [1] * (k * k))
  y = jnp.zeros((x.shape[0], out_h, out_w, channels), jnp.float32)
  for i in range(k):
    for j in range(k):
      start = (0, i * dilation, j * dilation, 0)
      stop = (x.shape[0], start[1] + strides * (out_h - 1) + 1,
              start[2] + strides * (out_w - 1) + 1, channels)
      window = jax.lax.slice(x, start, stop, (1, strides, strides, 1))
      y += window.astype(jnp.float32) * taps[i * k + j][0]
  return y.astype(inputs.dtype)


class DepthwiseConv(nn.Module):
  """`kernel` x `kernel` depthwise convolution, padded (kernel - 1) // 2 * dilation on each
  side (PyTorch's): [B, H, W, C] -> [B, ceil(H / strides), ceil(W / strides), C] (odd
  kernels). Its parameters are `nn.Conv`'s with feature_group_count C: 'kernel' [k, k, 1, C]
  and, with `use_bias`, 'bias' [C].

  In the 'cpu' formulation (`kernels`) it is computed tap by tap (`_depthwise_by_taps`),
  elsewhere as one grouped convolution. XLA:CPU computes a grouped convolution's gradients
  through a dense [k, k, C, C] kernel, C times the work: an LR-ASPP MobileNetV3-Large train
  step at 16 x 96^2 took 2.0 s that way, 1.9 s of it in the depthwise convolutions, and
  0.47 s tap by tap; ConvNeXt's 7x7 ones ran 3-9x slower forward and backward (2-core CPU).
  """
  kernel: int
  strides: int = 1
  dilation: int = 1
  use_bias: bool = False
  kernel_init: Callable = nn.linear.default_kernel_init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels, pad = x.shape[-1], (self.kernel - 1) // 2 * self.dilation
    kernel = self.param('kernel', self.kernel_init, (self.kernel, self.kernel, 1, channels))
    bias = self.param('bias', nn.initializers.zeros, (channels,)) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if kernels.formulation() == 'cpu':
      y = _depthwise_by_taps(x, kernel, self.strides, self.dilation, pad)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), ((pad, pad), (pad, pad)),
          rhs_dilation=(self.dilation, self.dilation),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)
    return y if bias is None else y + bias


class ConvBNReLU(nn.Module):
  """3x3 (or `kernel`) convolution without bias, BatchNorm, ReLU. [B, H, W, C] -> [B, H', W', F].

  `dilation` > 1 makes the convolution atrous ('SAME' padding keeps the size at stride 1).
  """
  features: int
  kernel: int = 3
  strides: int = 1
  dilation: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
             padding='SAME', kernel_dilation=self.dilation, use_bias=False,
             dtype=self.dtype)(x)
    return nn.relu(batch_norm(not train, self.dtype)(x))


def resize_to(x, height, width):
  """Bilinear resize of [B, h, w, C] to [B, height, width, C] (half-pixel centres;
  antialiased along a side that shrinks). Upsampling is the same with or without
  antialiasing; it is asked for only where it matters, which keeps the graph exportable
  (ONNX's Resize has no antialiased bilinear mode in jax2onnx)."""
  shrinks = height < x.shape[1] or width < x.shape[2]
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method='bilinear',
                          antialias=shrinks)


def max_pool(x, size, stride, padding=0):
  """size x size max pooling at `stride`, `padding` pixels of -inf on each side; windows
  that do not fit are dropped (as `nn.max_pool` and PyTorch). [B, H, W, C] -> [B, H', W', C]
  with H' = (H + 2 * padding - size) // stride + 1.

  The elementwise maximum of the window's size^2 strided slices rather than a reduce-window:
  XLA:CPU computes a reduce-window's gradient through index (iota) arrays the size of the
  input and a variadic reduce-window (fwd + bwd of 2x2/2 at 8 x 128^2 x 64: 92 ms, this
  13 ms; ResNet's 3x3/2 stem pool at 4 x 128^2 x 64: 72 vs 19 ms). Where a window holds
  tied maxima the gradient is split between them (a reduce-window gives it all to one);
  after a ReLU those ties are zeros, whose gradient the ReLU discards. That is the 'cpu'
  formulation (`kernels`); elsewhere `nn.max_pool` runs.
  """
  if padding:  # explicitly: jax2onnx's max_pool drops a padding argument (ONNX export)
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
  if kernels.formulation() == 'plain':
    return nn.max_pool(x, window_shape=(size, size), strides=(stride, stride))
  out_h, out_w = ((n - size) // stride + 1 for n in x.shape[1:3])
  taps = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(size) for j in range(size)]
  return functools.reduce(jnp.maximum, taps)


max_pool_2x2 = functools.partial(max_pool, size=2, stride=2)


class DoubleConv(nn.Module):
  """Two ConvBNReLU 3x3 layers of `features` channels. [B, H, W, C] -> [B, H, W, features]."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = ConvBNReLU(self.features, dtype=self.dtype)(x, train=train)
    return ConvBNReLU(self.features, dtype=self.dtype)(x, train=train)
