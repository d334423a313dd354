"""VGG16 backbone (Simonyan & Zisserman, 2015) in torchvision's layout, fully convolutional.

Five blocks of 3x3 convolutions (with bias, padding 1, ReLU; optional BatchNorm after each
convolution as in torchvision's `vgg16_bn`) of 2, 2, 3, 3, 3 layers and `width` * (1, 2, 4,
8, 8) channels, each block ending in 2x2 max pooling: the pooled maps pool1 ... pool5 are at
strides 2, 4, 8, 16, 32. With `include_fc` the ImageNet classifier's fc6 and fc7 follow as
convolutions (Long et al.'s "convolutionalised" classifier): fc6, the Linear(512*7*7, 4096)
that read pool5's 7x7 grid, becomes a 7x7 convolution; fc7 a 1x1 convolution; each ReLU and
dropout. The 1000-way fc8 (`classifier.6`) is not part of the backbone.

fc6's padding. The original FCN pads the *input* by 100 pixels and runs fc6 unpadded, so
that images smaller than 192 pixels still give an output; every coarse score map then sits
at a layer-specific offset from the image and is cropped back (the Caffe Crop layer). Here
fc6 is padded 'SAME' (3 on each side) and nothing else is: fc6's output has exactly one
cell per pool5 cell, centred on it, so the stride-32, 16 and 8 maps all align with the
input under half-pixel-centred upsampling and no crop offsets are needed; any H, W work.
The weights are the same either way, only the border handling differs (zeros around
pool5 instead of features computed on the 100-pixel zero border).

torchvision key                      flax path (variables['params'] / ['batch_stats'])
features.{i}.weight / .bias          features_{i}/kernel, bias   (O, I, 3, 3) <-> (3, 3, I, O)
features.{i+1}.weight / .bias        features_{i+1}/scale, bias  (BatchNorm, vgg16_bn only)
features.{i+1}.running_mean / _var   features_{i+1}/mean, var    (in 'batch_stats')
classifier.0.weight [4096, 25088]    classifier_0/kernel (7, 7, 512, 4096); the Linear's
                                     inputs are pool5 flattened in (C, H, W) order
classifier.3.weight [4096, 4096]     classifier_3/kernel (1, 1, 4096, 4096)

Convolution indices i follow torchvision's `features` Sequential: vgg16 counts conv, ReLU
(and pool) modules, vgg16_bn also the BatchNorm after each convolution (see `layer_indices`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models import layers

# Configuration "D" of the paper: convolutions per block; block b has width * 2**min(b, 3).
BLOCK_DEPTHS = (2, 2, 3, 3, 3)
FC_KERNEL = 7  # fc6 read pool5's 7x7 grid at ImageNet's 224x224
PUBLISHED_WIDTH = 64

# torchvision's initialisation: convs kaiming_normal_(fan_out, relu), Linear N(0, 0.01).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
fc_init = nn.initializers.normal(0.01)


def block_widths(width=PUBLISHED_WIDTH):
  """Channels of the five blocks: (64, 128, 256, 512, 512) at `width` 64."""
  return tuple(width * 2 ** min(block, 3) for block in range(len(BLOCK_DEPTHS)))


def fc_features(width=PUBLISHED_WIDTH):
  """Channels of fc6 and fc7: 4096 at `width` 64, scaled with the width."""
  return 64 * width


def layer_indices(batch_norm_layers):
  """Per block, torchvision's `features` indices of its convolutions (and of the pool).

  -> ((conv indices of block 1, ...), (pool index of block 1, ...)). Each convolution is
  followed by a ReLU (and first a BatchNorm at index + 1 with `batch_norm_layers`).
  """
  per_conv = 3 if batch_norm_layers else 2
  convs, pools, index = [], [], 0
  for depth in BLOCK_DEPTHS:
    convs.append(tuple(index + per_conv * i for i in range(depth)))
    index += per_conv * depth
    pools.append(index)
    index += 1
  return tuple(convs), tuple(pools)


def check_config(width):
  """Raises ValueError if a VGG field is out of range."""
  if int(width) != width or width < 1:
    raise ValueError(f'VGG width must be a positive int ({PUBLISHED_WIDTH} as published), '
                     f'got {width!r}')


class VGG16(nn.Module):
  """VGG16 features (and fc6/fc7 as convolutions) returning its pooled maps.

  Fields: `batch_norm`: BatchNorm after every convolution (torchvision's vgg16_bn);
  `width`: channels of the first block (64 as published, smaller for quick experiments);
  `include_fc`: also compute fc6/fc7 on pool5; `dropout`: rate after fc6 and fc7 (0.5 in
  the classifier; training only, 'dropout' rng); `dtype`: compute dtype.
  """
  batch_norm: bool = False
  width: int = PUBLISHED_WIDTH
  include_fc: bool = False
  dropout: float = 0.5
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.width)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> {'pool1', ..., 'pool5'} and, with `include_fc`, 'fc7'.

    pool_k: [B, H / 2**k, W / 2**k, C_k] (floor division, as PyTorch's max pooling), with
    C = width * (1, 2, 4, 8, 8); fc7: [B, H / 32, W / 32, 64 * width], aligned with pool5.
    """
    conv_indices, _ = layer_indices(self.batch_norm)
    x = images.astype(self.dtype)
    features = {}
    for block, (channels, indices) in enumerate(zip(block_widths(self.width), conv_indices)):
      for index in indices:
        x = layers.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                        dtype=self.dtype, name=f'features_{index}')(x)
        if self.batch_norm:
          x = layers.batch_norm(not train, self.dtype, name=f'features_{index + 1}')(x)
        x = nn.relu(x)
      x = layers.max_pool_2x2(x)
      features[f'pool{block + 1}'] = x
    if self.include_fc:
      for name, kernel in (('classifier_0', FC_KERNEL), ('classifier_3', 1)):
        x = layers.Conv(fc_features(self.width), (kernel, kernel), padding='SAME',
                        kernel_init=fc_init, dtype=self.dtype, name=name)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
      features['fc7'] = x
    return features
