"""Building blocks shared by the models."""
import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def batch_norm(use_running_average, dtype=jnp.float32, name=None):
  """BatchNorm with PyTorch's defaults: epsilon 1e-5, momentum 0.1 (0.9 in flax's terms).

  Statistics are computed in float32 whatever `dtype`, and kept in float32.
  """
  return nn.BatchNorm(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, axis_name=_BATCH_NORM_AXIS.get(), name=name)


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(value or (1, 1))


def _dot_last(x, kernel, precision):
  """[..., C] x [C, F] -> [..., F], contracting the channel axis."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


class Conv(nn.Conv):
  """`nn.Conv` (same fields, parameters, names and results) that computes the convolutions
  whose windows do not overlap as matrix products: 1x1 kernels at any stride, and k x k
  kernels at stride k ('VALID', or 'SAME' on sizes divisible by k; ViT's patch embedding).
  Other configurations run `nn.Conv` unchanged. 2-D inputs [B, H, W, C] only.

  Why: XLA:CPU runs a 1x1 convolution's weight gradient at 15-45 GFLOP/s and the
  equivalent dot at 50-85 (forward 50-90 vs 85-185; 2-core CPU, ResNet-50 shapes), and
  adds a layout transpose around each convolution; on GPU and TPU both forms become the
  same GEMM, so the rewrite costs nothing there.
  """

  def _non_overlapping_patch(self, inputs):
    """The patch side (1 or k) when the fast path applies, else None."""
    kernel, strides = _pair(self.kernel_size), _pair(self.strides)
    if (inputs.ndim != 4 or self.mask is not None or self.feature_group_count != 1
        or _pair(self.input_dilation) != (1, 1) or kernel[0] != kernel[1]):
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

  @nn.compact
  def __call__(self, inputs):
    k = self._non_overlapping_patch(inputs)
    if k is None:
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, (k, k, inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    batch, height, width, channels = inputs.shape
    if k == 1:
      sh, sw = _pair(self.strides)
      patches = inputs[:, ::sh, ::sw]
    else:  # [B, H/k, k, W/k, k, C] -> [B, H/k, W/k, k * k * C], kernel's (row, col, C) order
      rows, cols = height // k, width // k
      patches = inputs[:, :rows * k, :cols * k].reshape(batch, rows, k, cols, k, channels)
      patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, -1)
    y = _dot_last(patches, kernel.reshape(-1, self.features), self.precision)
    return y + bias if bias is not None else y


class ConvTranspose(nn.ConvTranspose):
  """`nn.ConvTranspose` (same fields, parameters, names and results) that computes the
  non-overlapping case, kernel == strides (U-Net's 2x2 stride-2 up-convolution), as one
  matrix product and a depth-to-space reshape; other configurations run
  `nn.ConvTranspose`. 2-D inputs [B, h, w, C] -> [B, h*k, w*k, F].

  Why: XLA:CPU computes the weight gradient of a stride-2 transposed convolution as a
  dilated convolution at a few GFLOP/s: in a depth-4 U-Net at 8 x 128^2 these four
  gradients took 78% of the train step.
  """

  def _non_overlapping_patch(self, inputs):
    kernel, strides = _pair(self.kernel_size), _pair(self.strides)
    if (inputs.ndim != 4 or self.mask is not None or self.transpose_kernel
        or self.preferred_element_type is not None or _pair(self.kernel_dilation) != (1, 1) or kernel != strides
        or kernel[0] != kernel[1] or self.padding not in ('SAME', 'VALID')):
      return None
    return kernel[0]

  @nn.compact
  def __call__(self, inputs):
    k = self._non_overlapping_patch(inputs)
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
    taps = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(inputs.shape[-1], -1)
    y = _dot_last(inputs, taps, self.precision).reshape(batch, height, width, k, k, -1)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * k, width * k, -1)
    return y + bias if bias is not None else y


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
  """Bilinear resize of [B, h, w, C] to [B, height, width, C] (half-pixel centres)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method='bilinear')


max_pool_2x2 = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))


class DoubleConv(nn.Module):
  """Two ConvBNReLU 3x3 layers of `features` channels. [B, H, W, C] -> [B, H, W, features]."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = ConvBNReLU(self.features, dtype=self.dtype)(x, train=train)
    return ConvBNReLU(self.features, dtype=self.dtype)(x, train=train)
