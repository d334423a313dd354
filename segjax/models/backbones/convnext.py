"""ConvNeXt backbone (Liu et al., "A ConvNet for the 2020s", CVPR 2022) for dense prediction.

Sizes (the paper's ConvNeXt-T/S/B): stage widths C / blocks per stage = tiny 96-192-384-768 /
3-3-9-3, small 96-192-384-768 / 3-3-27-3, base 128-256-512-1024 / 3-3-27-3.

images [B, H, W, 3] -> stem (a 4x4 convolution at stride 4 with bias, LayerNorm) -> stage 1
-> [downsampling (LayerNorm, 2x2 convolution at stride 2) -> stage] x 3. A block is
x + DropPath(gamma * pwconv2(GELU(pwconv1(LN(dwconv(x)))))): a 7x7 depthwise convolution
(padding 3, bias), LayerNorm, Dense 4C, exact GELU, Dense C, the learned per-channel layer
scale gamma. Every stage's output goes through its own LayerNorm (`norm_{i}`; the
segmentation backbones of mmpretrain and Hugging Face add them), giving features at strides 4,
8, 16, 32. All LayerNorms use epsilon 1e-6. Sides that are not multiples of the stride are
floored, as PyTorch's strided convolutions (52 x 76 -> 13 x 19, 6 x 9, 3 x 4, 1 x 2).

Stochastic depth rates grow linearly from 0 in the first block to `drop_path_rate` in the last
over all stages (`attention.drop_path_rates`). Layer scale starts at `layer_scale_init`: 1e-6
(the paper's, for ImageNet training) or mmseg's 1.0 (its UPerNet configs, which load
pre-trained values anyway; experiments/upernet.py's CPU default from scratch).

Flax names: `downsample_0` (the stem: `conv`, `norm`), `downsample_{1,2,3}` (`norm`,
`conv`), `stages_{i}/blocks_{j}` (`dwconv`, `norm`, `pwconv1`, `pwconv2`, `gamma`),
`norm_{i}`; the names of mmpretrain's, Hugging Face's and timm's files are in
`segjax.weights`.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models import attention
from segjax.models.layers import Conv, DepthwiseConv

SIZES = {  # size -> (stage widths, blocks per stage)
    'tiny': ((96, 192, 384, 768), (3, 3, 9, 3)),
    'small': ((96, 192, 384, 768), (3, 3, 27, 3)),
    'base': ((128, 256, 512, 1024), (3, 3, 27, 3)),
}
EPSILON = 1e-6
KERNEL_INIT = nn.initializers.truncated_normal(0.02)  # the paper's, Conv and Linear alike


def check_config(size, width=0, depths=()):
  """Raises ValueError naming the valid values if a ConvNeXt field is out of range."""
  if size not in SIZES:
    raise ValueError(f'ConvNeXt size must be one of {tuple(SIZES)}, got {size!r}')
  if int(width) != width or width < 0:
    raise ValueError(f'ConvNeXt width must be 0 (the size\'s {SIZES[size][0][0]}) or a '
                     f'positive int, the first stage\'s channels, got {width!r}')
  if depths and (len(depths) != 4 or any(int(d) != d or d < 1 for d in depths)):
    raise ValueError(f'ConvNeXt depths must be () (the size\'s {SIZES[size][1]}) or 4 '
                     f'positive ints, blocks per stage, got {depths!r}')


def stage_widths(size, width=0):
  """Channels of the four stages: the size's, or `width` doubled at each stage."""
  return SIZES[size][0] if not width else tuple(width * 2**i for i in range(4))


class Block(nn.Module):
  """ConvNeXt block. [B, H, W, C] -> [B, H, W, C]."""
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    channels = x.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=KERNEL_INIT, dtype=self.dtype)
    y = DepthwiseConv(7, use_bias=True, kernel_init=KERNEL_INIT, dtype=self.dtype,
                      name='dwconv')(x)
    y = nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name='norm')(y)
    y = dense(attention.MLP_RATIO * channels, name='pwconv1')(y)
    y = dense(channels, name='pwconv2')(attention.gelu(y))
    gamma = self.param('gamma', nn.initializers.constant(self.layer_scale_init), (channels,))
    return x + attention.DropPath(self.drop_path)(y * gamma.astype(y.dtype), train=train)


class Stage(nn.Module):
  """`len(drop_paths)` blocks (`blocks_{j}`), one stochastic depth rate each."""
  drop_paths: tuple
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    for j, rate in enumerate(self.drop_paths):
      x = Block(rate, self.layer_scale_init, self.dtype, name=f'blocks_{j}')(x, train=train)
    return x


class Downsample(nn.Module):
  """The stem (`stem`: conv, then LayerNorm) or a downsampling layer (LayerNorm, then conv):
  a `patch` x `patch` convolution at stride `patch` to `features`. [B, H, W, C] -> [B, H/p,
  W/p, features] (floored)."""
  features: int
  patch: int
  stem: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name='norm')
    conv = Conv(self.features, (self.patch, self.patch), strides=self.patch, padding='VALID',
                kernel_init=KERNEL_INIT, dtype=self.dtype, name='conv')
    return norm(conv(x)) if self.stem else conv(norm(x))


class ConvNeXt(nn.Module):
  """ConvNeXt backbone returning its four stages' normalised features.

  Fields: `size` in SIZES; `width`: 0 for the size's widths, else the first stage's channels
  (doubled at each stage; no published weights fit); `depths`: () for the size's blocks per
  stage, else 4 counts (a smaller model for quick experiments and structure tests);
  `drop_path_rate`: stochastic depth rate of the last block; `layer_scale_init`: the layer
  scales' initial value; `dtype`: compute dtype (parameters stay float32).
  """
  size: str = 'tiny'
  width: int = 0
  depths: tuple = ()
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.size, self.width, tuple(self.depths))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> 4 features [B, H/s, W/s, C_i] at strides s = 4, 8, 16, 32."""
    widths = stage_widths(self.size, self.width)
    depths = tuple(self.depths) or SIZES[self.size][1]
    rates = attention.drop_path_rates(self.drop_path_rate, sum(depths))
    x = images.astype(self.dtype)
    features = []
    for i, (width, depth) in enumerate(zip(widths, depths)):
      x = Downsample(width, 4 if i == 0 else 2, stem=i == 0, dtype=self.dtype,
                     name=f'downsample_{i}')(x)
      first = sum(depths[:i])
      x = Stage(rates[first:first + depth], self.layer_scale_init, self.dtype,
                name=f'stages_{i}')(x, train=train)
      features.append(nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name=f'norm_{i}')(x))
    return features
