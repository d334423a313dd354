"""ResNet backbone (He et al., 2016) in torchvision's layout, with DeepLab's atrous stages.

ResNet-18/34 stack basic blocks (two 3x3 convolutions); ResNet-50/101 stack bottleneck
blocks (1x1, 3x3, 1x1 with 4x expansion) in the "v1.5" form, where the stride sits on the
3x3 convolution. Stem: 7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max pooling;
then four stages of widths 64, 128, 256, 512 (x4 for bottleneck), the first block of
stages 2-4 halving the resolution, and a 1x1 convolution + BatchNorm projecting the shortcut
where the shape changes. Convolutions have no bias and use PyTorch's explicit padding, so
torchvision's and mmsegmentation's weights give the same outputs once converted
(`segjax.weights.torchvision`, `segjax.weights.mmseg`).

With `output_stride` 16 or 8 the strides of the last stage(s) become 1 and their 3x3
convolutions are dilated instead (DeepLab): OS16 dilates stage 4 by 2; OS8 dilates stage 3
by 2 and stage 4 by 4. By default every block of a dilated stage uses the stage's rate (the
DeepLab papers' convention); `contract_dilation=True` gives the first block of a dilated
stage half the rate (the previous stage's), as torchvision's `replace_stride_with_dilation`
and mmsegmentation's `contract_dilation=True` do for bottleneck blocks (ResNet-50/101), so
their weights give the same outputs. For basic blocks (ResNet-18/34) neither matches:
torchvision refuses to dilate them, and mmsegmentation's BasicBlock dilates its first 3x3
convolution only, where this one dilates both.

`stem='deep'` is the ResNetV1c stem of mmsegmentation (Bag of Tricks, He et al. 2019):
three 3x3 conv-BN-ReLU layers of width/2, width/2 and width channels, the first with stride
2, in place of the 7x7 convolution; the max pooling and stages follow unchanged.
`multi_grid` multiplies the rate of the last stage's blocks, cycled: (1, 2, 4) at OS16
gives rates 2, 4, 8 (a multi-grid stage is never contracted).
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models.layers import Conv, batch_norm, max_pool

DEPTHS = {  # depth -> (block kind, blocks per stage)
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
OUTPUT_STRIDES = (8, 16, 32)
STEMS = ('torchvision', 'deep')
EXPANSION = {'basic': 1, 'bottleneck': 4}

# torchvision's initialisation: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def check_config(depth, output_stride, multi_grid=(1,), width=64, stem='torchvision'):
  """Raises ValueError naming the valid values if a ResNet field is out of range."""
  if stem not in STEMS:
    raise ValueError(f'ResNet stem must be one of {STEMS}, got {stem!r}')
  if int(width) != width or width < 1:
    raise ValueError(f'ResNet width must be a positive int (64 as published), got {width!r}')
  if depth not in DEPTHS:
    raise ValueError(f'ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}')
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'ResNet output_stride must be one of {OUTPUT_STRIDES}, '
                     f'got {output_stride!r}')
  if not multi_grid or any(int(m) != m or m < 1 for m in multi_grid):
    raise ValueError(f'ResNet multi_grid must be a non-empty tuple of positive ints, '
                     f'got {multi_grid!r}')


def stage_strides_and_rates(output_stride):
  """Per-stage (stride, dilation rate) for stages 1-4, e.g. OS16 -> ((1,1),(2,1),(2,1),(1,2))."""
  strides, rates = [], []
  current_stride, rate = 4, 1  # the stem's stride
  for stage in range(4):
    stride = 1 if stage == 0 else 2
    if current_stride * stride > output_stride:
      rate *= stride
      stride = 1
    current_stride *= stride
    strides.append(stride)
    rates.append(rate)
  return tuple(zip(strides, rates))


def block_rates(stage_rate, num_blocks, multi_grid=(1,), contract_dilation=False):
  """Dilation rates of a stage's blocks: `stage_rate` times `multi_grid`, cycled.

  With `contract_dilation` (and no multi-grid) a dilated stage's first block has half the
  rate, e.g. (2, 4, 4) instead of (4, 4, 4) for a rate-4 stage of three blocks.
  """
  rates = [stage_rate * multi_grid[i % len(multi_grid)] for i in range(num_blocks)]
  if contract_dilation and stage_rate > 1 and tuple(multi_grid) == (1,) * len(multi_grid):
    rates[0] = stage_rate // 2
  return tuple(rates)


def stage_widths(width=64):
  """Base widths of stages 1-4: `width` (64 in the paper) doubled at each stage."""
  return tuple(width * 2**stage for stage in range(4))


def stage_channels(depth, width=64):
  """Channels of the features {'stem', 'stage1', ..., 'stage4'} of a ResNet of `depth`."""
  kind, _ = DEPTHS[depth]
  channels = {'stem': width}
  channels.update({f'stage{i + 1}': w * EXPANSION[kind]
                   for i, w in enumerate(stage_widths(width))})
  return channels


def _pad(kernel, rate=1):
  """PyTorch's padding for a `kernel` x `kernel` convolution dilated by `rate`."""
  p = rate * (kernel - 1) // 2
  return ((p, p), (p, p))


def _conv(features, kernel, name, strides=1, rate=1, dtype=jnp.float32):
  """Bias-free `kernel` x `kernel` convolution with PyTorch's padding (created in the caller)."""
  return Conv(features, (kernel, kernel), strides=strides, padding=_pad(kernel, rate),
              kernel_dilation=rate, use_bias=False, kernel_init=conv_init, dtype=dtype,
              name=name)


class _Block(nn.Module):
  """Fields shared by the residual blocks."""
  features: int
  strides: int = 1
  rate: int = 1
  use_running_average: bool = True
  dtype: Any = jnp.float32

  def norm(self):
    """name -> this block's BatchNorm (running averages per `use_running_average`)."""
    return functools.partial(batch_norm, self.use_running_average, self.dtype)


class BasicBlock(_Block):
  """Two 3x3 conv-BN layers plus shortcut, ReLU. [B, H, W, C] -> [B, H/s, W/s, features]."""

  @nn.compact
  def __call__(self, x):
    bn = self.norm()
    y = _conv(self.features, 3, 'conv1', self.strides, self.rate, self.dtype)(x)
    y = nn.relu(bn('bn1')(y))
    y = bn('bn2')(_conv(self.features, 3, 'conv2', 1, self.rate, self.dtype)(y))
    return nn.relu(y + _shortcut(x, self.features, self.strides, bn, self.dtype))


class Bottleneck(_Block):
  """1x1, 3x3 (strided, dilated), 1x1 conv-BN layers plus shortcut, ReLU (ResNet v1.5).

  [B, H, W, C] -> [B, H/s, W/s, 4 * features].
  """

  @nn.compact
  def __call__(self, x):
    bn = self.norm()
    y = nn.relu(bn('bn1')(_conv(self.features, 1, 'conv1', dtype=self.dtype)(x)))
    y = _conv(self.features, 3, 'conv2', self.strides, self.rate, self.dtype)(y)
    y = nn.relu(bn('bn2')(y))
    y = bn('bn3')(_conv(4 * self.features, 1, 'conv3', dtype=self.dtype)(y))
    return nn.relu(y + _shortcut(x, 4 * self.features, self.strides, bn, self.dtype))


def _shortcut(x, features, strides, bn, dtype):
  """Identity, or a strided 1x1 conv + BN when the stride or channel count changes."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return bn('downsample_bn')(_conv(features, 1, 'downsample_conv', strides, dtype=dtype)(x))


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet-18/34/50/101 backbone returning the feature map of every stage.

  Fields: `depth` in (18, 34, 50, 101); `output_stride` in (8, 16, 32); `multi_grid`:
  multipliers of the last stage's dilation rate, cycled over its blocks;
  `contract_dilation`: the first block of a dilated stage takes the previous rate
  (torchvision, mmsegmentation); `stem`: 'torchvision' (7x7 conv) or 'deep' (ResNetV1c's
  three 3x3 convs, `stem_conv{i}` / `stem_bn{i}`); `frozen_bn`: use the running averages even when training
  (and leave them unchanged); `dtype`: compute dtype (parameters stay float32).
  """
  depth: int = 50
  output_stride: int = 32
  width: int = 64
  multi_grid: tuple = (1, 1, 1)
  contract_dilation: bool = False
  stem: str = 'torchvision'
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.depth, self.output_stride, tuple(self.multi_grid), self.width, self.stem)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> {'stem', 'stage1', ..., 'stage4'}: features [B, h, w, C_k].

    'stem' and 'stage1' are at stride 4 (64 and 64 or 256 channels at `width` 64); stages
    2-4 at strides 8, 16, 32 (capped at `output_stride`) with 128, 256, 512 channels (x4 for
    bottleneck), as in torchvision for H and W divisible by 32.
    """
    kind, blocks_per_stage = DEPTHS[self.depth]
    block = BLOCKS[kind]
    use_running_average = not train or self.frozen_bn
    x = images.astype(self.dtype)
    if self.stem == 'torchvision':
      x = _conv(self.width, 7, 'conv1', strides=2, dtype=self.dtype)(x)
      x = nn.relu(batch_norm(use_running_average, self.dtype, 'bn1')(x))
    else:
      for i, (channels, stride) in enumerate(((self.width // 2, 2), (self.width // 2, 1),
                                              (self.width, 1))):
        x = _conv(channels, 3, f'stem_conv{i}', strides=stride, dtype=self.dtype)(x)
        x = nn.relu(batch_norm(use_running_average, self.dtype, f'stem_bn{i}')(x))
    x = max_pool(x, 3, 2, padding=1)
    features = {'stem': x}
    stages = stage_strides_and_rates(self.output_stride)
    for stage, (width, num_blocks, (stride, rate)) in enumerate(
        zip(stage_widths(self.width), blocks_per_stage, stages)):
      grid = tuple(self.multi_grid) if stage == 3 else (1,)
      rates = block_rates(rate, num_blocks, grid, self.contract_dilation)
      for i, block_rate in enumerate(rates):
        x = block(width, strides=stride if i == 0 else 1, rate=block_rate,
                  use_running_average=use_running_average, dtype=self.dtype,
                  name=f'layer{stage + 1}_{i}')(x)
      features[f'stage{stage + 1}'] = x
    return features
