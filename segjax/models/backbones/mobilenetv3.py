"""MobileNetV3-Large and -Small backbones (Howard et al., "Searching for MobileNetV3", ICCV
2019; arXiv 1905.02244) in torchvision's form (`_mobilenet_v3_conf`, width multiplier 1.0),
so that its weights give the same outputs once converted (`segjax.weights.torchvision`).

Stem: a 3x3 stride-2 conv-BN-hardswish of 16 channels. Then the inverted-residual blocks of
the paper's Tables 1 (Large, 15 blocks) and 2 (Small, 11), each: a 1x1 expansion
conv-BN-activation (absent where the expansion keeps the input's width), a k x k depthwise
conv-BN-activation carrying the block's stride, squeeze-and-excitation in some blocks, a
1x1 projection conv-BN without activation, and the input added back where the stride is 1
and the width unchanged. Last: a 1x1 conv-BN-hardswish to six times the last block's width
(960 Large, 576 Small). The ImageNet classifier (pooling, two linear layers) is not part of
the backbone.

torchvision's details, kept: BatchNorm epsilon 1e-3 and momentum 0.01 (0.99 in flax's
terms); hardswish x * relu6(x + 3) / 6 and hardsigmoid relu6(x + 3) / 6; squeeze-and-
excitation as global average pooling, a 1x1 conv with bias to `make_divisible(expanded //
4)` channels, ReLU, a 1x1 conv with bias back, hardsigmoid, times the input; convolutions
otherwise without bias, padded (k - 1) // 2 * dilation on each side as PyTorch's.

`dilated` (torchvision's `dilated=True`, which its segmentation models use): the blocks of
the last stage, from its strided block on, keep stride 1 and dilate their depthwise convs
by 2, so the last features are at stride 16 instead of 32.
"""
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from segjax.models import layers
from segjax.models.backbones import resnet
from segjax.models.layers import Conv


class BlockConfig(NamedTuple):
  """One inverted-residual block: depthwise `kernel`, `expanded` and output `features`
  channels, squeeze-and-excitation, activation ('relu' or 'hardswish'), stride."""
  kernel: int
  expanded: int
  features: int
  squeeze_excite: bool
  activation: str
  stride: int


ARCHS = {  # the paper's Tables 1 and 2, as torchvision's `_mobilenet_v3_conf`
    'mobilenet_v3_large': tuple(BlockConfig(*block) for block in (
        (3, 16, 16, False, 'relu', 1),
        (3, 64, 24, False, 'relu', 2),
        (3, 72, 24, False, 'relu', 1),
        (5, 72, 40, True, 'relu', 2),
        (5, 120, 40, True, 'relu', 1),
        (5, 120, 40, True, 'relu', 1),
        (3, 240, 80, False, 'hardswish', 2),
        (3, 200, 80, False, 'hardswish', 1),
        (3, 184, 80, False, 'hardswish', 1),
        (3, 184, 80, False, 'hardswish', 1),
        (3, 480, 112, True, 'hardswish', 1),
        (3, 672, 112, True, 'hardswish', 1),
        (5, 672, 160, True, 'hardswish', 2),
        (5, 960, 160, True, 'hardswish', 1),
        (5, 960, 160, True, 'hardswish', 1))),
    'mobilenet_v3_small': tuple(BlockConfig(*block) for block in (
        (3, 16, 16, True, 'relu', 2),
        (3, 72, 24, False, 'relu', 2),
        (3, 88, 24, False, 'relu', 1),
        (5, 96, 40, True, 'hardswish', 2),
        (5, 240, 40, True, 'hardswish', 1),
        (5, 240, 40, True, 'hardswish', 1),
        (5, 120, 48, True, 'hardswish', 1),
        (5, 144, 48, True, 'hardswish', 1),
        (5, 288, 96, True, 'hardswish', 2),
        (5, 576, 96, True, 'hardswish', 1),
        (5, 576, 96, True, 'hardswish', 1))),
}
STEM_FEATURES = 16
LAST_EXPANSION = 6  # the last 1x1 conv's width over the last block's
ACTIVATIONS = {'relu': nn.relu, 'hardswish': nn.hard_swish}


def check_config(arch):
  """Raises ValueError naming the valid architectures if `arch` is not one of them."""
  if arch not in ARCHS:
    raise ValueError(f'unknown MobileNetV3 {arch!r}; use one of {tuple(ARCHS)}')


def make_divisible(value, divisor=8):
  """`value` rounded to a multiple of `divisor`, at least `divisor` and not more than 10%
  below `value` (torchvision's `_make_divisible`, from TensorFlow's slim): 18 -> 24."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def blocks(arch):
  """(input channels, BlockConfig) of each inverted-residual block of `arch`, in order."""
  inputs = (STEM_FEATURES,) + tuple(block.features for block in ARCHS[arch][:-1])
  return tuple(zip(inputs, ARCHS[arch]))


def feature_strides(arch, dilated=False):
  """{feature name: its stride in pixels} of the backbone's outputs, in order: 'stem' (2),
  'block1' ... 'blockN', 'last' (32; 16 `dilated`)."""
  strides, stride = {'stem': 2}, 2
  last_stage = _last_stage_start(arch)
  for i, block in enumerate(ARCHS[arch]):
    stride *= 1 if dilated and i >= last_stage else block.stride
    strides[f'block{i + 1}'] = stride
  strides['last'] = stride
  return strides


def _last_stage_start(arch):
  """Index of the last strided block: where the stage `dilated` dilates starts."""
  return max(i for i, block in enumerate(ARCHS[arch]) if block.stride > 1)


class ConvBN(nn.Module):
  """`kernel` x `kernel` convolution without bias ('conv'; a `DepthwiseConv` with
  `depthwise`, whose `features` are the input's), BatchNorm ('bn'), then `activation`
  ('relu', 'hardswish' or None). [B, H, W, C] -> [B, H', W', features] with H' = ceil(H /
  strides) (PyTorch's padding)."""
  features: int
  kernel: int = 1
  strides: int = 1
  dilation: int = 1
  depthwise: bool = False
  activation: Optional[str] = None
  use_running_average: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.depthwise:
      x = layers.DepthwiseConv(self.kernel, self.strides, self.dilation,
                               kernel_init=resnet.conv_init, dtype=self.dtype, name='conv')(x)
    else:
      pad = (self.kernel - 1) // 2 * self.dilation
      x = Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
               padding=((pad, pad), (pad, pad)), kernel_dilation=self.dilation,
               use_bias=False, kernel_init=resnet.conv_init, dtype=self.dtype,
               name='conv')(x)
    x = layers.batch_norm(self.use_running_average, self.dtype, name='bn', epsilon=1e-3,
                          momentum=0.99)(x)
    return ACTIVATIONS[self.activation](x) if self.activation else x


class SqueezeExcitation(nn.Module):
  """x * hardsigmoid(fc2(relu(fc1(mean of x over H, W)))), fc1 and fc2 1x1 convolutions with
  bias through `squeeze` channels. [B, H, W, C] -> [B, H, W, C]."""
  squeeze: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, kernel_size=(1, 1), kernel_init=resnet.conv_init,
                             dtype=self.dtype)
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = nn.relu(conv(self.squeeze, name='fc1')(scale))
    return x * nn.hard_sigmoid(conv(x.shape[-1], name='fc2')(scale))


class InvertedResidual(nn.Module):
  """One block of `config` (module docstring); `dilation` > 1 replaces its stride by a
  dilation of the depthwise conv. [B, H, W, C] -> [B, H/s, W/s, config.features]."""
  config: BlockConfig
  dilation: int = 1
  use_running_average: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    block = self.config
    conv = functools.partial(ConvBN, use_running_average=self.use_running_average,
                             dtype=self.dtype)
    y = x
    if block.expanded != x.shape[-1]:
      y = conv(block.expanded, activation=block.activation, name='expand')(y)
    y = conv(block.expanded, block.kernel, 1 if self.dilation > 1 else block.stride,
             self.dilation, depthwise=True, activation=block.activation, name='depthwise')(y)
    if block.squeeze_excite:
      y = SqueezeExcitation(make_divisible(block.expanded // 4), self.dtype,
                            name='squeeze_excite')(y)
    y = conv(block.features, name='project')(y)
    return y + x if block.stride == 1 and x.shape[-1] == block.features else y


class MobileNetV3(nn.Module):
  """MobileNetV3 backbone returning every layer's features.

  Fields: `arch` in ARCHS; `dilated`: the last stage dilated instead of strided (output
  stride 16); `dtype`: compute dtype (parameters stay float32).
  """
  arch: str = 'mobilenet_v3_large'
  dilated: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.arch)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> {'stem', 'block1', ..., 'blockN', 'last'}: features [B, h, w,
    C_k] at the strides of `feature_strides` (h = ceil(H / stride), as torchvision's)."""
    conv = functools.partial(ConvBN, use_running_average=not train, dtype=self.dtype)
    x = conv(STEM_FEATURES, 3, 2, activation='hardswish', name='stem')(images.astype(self.dtype))
    features = {'stem': x}
    last_stage = _last_stage_start(self.arch)
    for i, block in enumerate(ARCHS[self.arch]):
      dilation = 2 if self.dilated and i >= last_stage else 1
      x = InvertedResidual(block, dilation, not train, self.dtype, name=f'block{i + 1}')(x)
      features[f'block{i + 1}'] = x
    features['last'] = conv(LAST_EXPANSION * x.shape[-1], activation='hardswish',
                            name='last')(x)
    return features
