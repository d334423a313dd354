"""LR-ASPP, Lite Reduced Atrous Spatial Pyramid Pooling (Howard et al., "Searching for
MobileNetV3", ICCV 2019; arXiv 1905.02244), on MobileNetV3-Large or -Small: the real-time
family.

Backbone: `mobilenetv3.MobileNetV3`, by default `dilated` (its last stage at stride 16, as
torchvision's segmentation models). The head is torchvision's LRASPPHead, so its
`lraspp_mobilenet_v3_large` checkpoint loads whole (`segjax.weights`):
  - on the high features (the backbone's last 1x1 conv: 960 channels Large, 576 Small,
    stride 16): a 1x1 conv-BN-ReLU to `inter_channels` (PyTorch's BatchNorm defaults),
    times a gate of the same width: global average pooling, a 1x1 conv without bias, a
    sigmoid (the paper's squeeze-and-excitation-like branch);
  - the product resized bilinearly to the low features' size and scored by a 1x1 conv with
    bias; the low features scored by another, and the two scores summed;
  - the sum resized bilinearly (half-pixel centres, as align_corners=False) to the input.
The low features are torchvision's pick: the output of the block that first reaches stride
8 (block 4 of Large, 40 channels; block 2 of Small, 24 channels), not the last block at
that stride. No auxiliary head, no dropout.

Known differences from the paper, as torchvision's: the gate pools globally, where the
paper pools with a large kernel and stride (49x49, stride (16, 20), on its Cityscapes
crops), and the backbone keeps its full last stage, where the paper's segmentation models
halve the channels of its last blocks ("reduced tail").
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models.backbones import mobilenetv3
from segjax.models.layers import Conv, ConvBNReLU, resize_to

LOW_STRIDE = 8  # the low features' stride


def low_feature(arch):
  """The backbone feature the head takes as the low features: the first at stride 8."""
  return next(name for name, stride in mobilenetv3.feature_strides(arch).items()
              if stride == LOW_STRIDE)


class Model(nn.Module):
  """LR-ASPP on MobileNetV3. Fields are checked at construction (ValueError naming the fix).

  `backbone`: 'mobilenet_v3_large' or 'mobilenet_v3_small'; `inter_channels`: width of the
  gated high-feature branch (128 as torchvision's); `dilated`: the backbone's last stage
  dilated (high features at stride 16) rather than strided (32); `dtype`: compute dtype
  (parameters and logits stay float32).
  """
  num_classes: int
  backbone: str = 'mobilenet_v3_large'
  inter_channels: int = 128
  dilated: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.backbone not in mobilenetv3.ARCHS:
      raise ValueError(f'unknown LR-ASPP backbone {self.backbone!r}; use one of '
                       f'{tuple(mobilenetv3.ARCHS)}')
    if (not isinstance(self.inter_channels, int) or isinstance(self.inter_channels, bool)
        or self.inter_channels < 1):
      raise ValueError(f'inter_channels must be a positive int (128 as torchvision\'s), '
                       f'got {self.inter_channels!r}')
    if not isinstance(self.dilated, bool):
      raise ValueError(f'dilated must be True (stride 16, torchvision\'s) or False, '
                       f'got {self.dilated!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    features = mobilenetv3.MobileNetV3(self.backbone, self.dilated, self.dtype,
                                       name='backbone')(images, train=train)
    low, high = features[low_feature(self.backbone)], features['last']
    x = ConvBNReLU(self.inter_channels, kernel=1, dtype=self.dtype, name='project')(
        high, train=train)
    gate = Conv(self.inter_channels, (1, 1), use_bias=False, dtype=self.dtype, name='gate')(
        jnp.mean(high, axis=(1, 2), keepdims=True))
    x = resize_to(x * nn.sigmoid(gate), *low.shape[1:3])
    scores = (Conv(self.num_classes, (1, 1), dtype=self.dtype, name='low_classifier')(low)
              + Conv(self.num_classes, (1, 1), dtype=self.dtype, name='high_classifier')(x))
    return resize_to(scores.astype(jnp.float32), *images.shape[1:3])
