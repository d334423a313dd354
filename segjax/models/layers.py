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
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
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
