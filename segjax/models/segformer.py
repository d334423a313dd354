"""SegFormer (Xie et al., NeurIPS 2021): the MiT encoder and the all-MLP decoder.

The decoder maps each of the encoder's four maps (strides 4, 8, 16, 32) to `channels`,
upsamples them bilinearly (half-pixel centres, PyTorch's align_corners=False) to the
stride-4 map, concatenates them, fuses them with a 1x1 convolution without bias +
BatchNorm + ReLU, then dropout and a 1x1 classifier; the stride-4 logits are upsampled
bilinearly to the input. `channels` is 256 for b0 and b1, 768 for b2-b5 (the paper's C).

`style` selects one of the two published forms (their checkpoints load whole):
  'hf'     Hugging Face transformers' `SegformerForSemanticSegmentation` (the official
           NVlabs code): each map is projected by a Dense layer with bias, the projections
           are concatenated from the stride-32 map down; encoder LayerNorm epsilon 1e-5.
  'mmseg'  mmsegmentation's `SegformerHead`: each map by a 1x1 convolution without bias +
           BatchNorm + ReLU, concatenated from the stride-4 map up; epsilon 1e-6.

Parameters with 150 classes (ADE20K): b0 3.75 M ('hf'; the paper's 3.8 M), b1 13.7, b2
27.5, b3 47.3, b4 64.1, b5 84.7 M.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models.attention import dense_init
from segjax.models.backbones import mit
from segjax.models.layers import Conv, ConvBNReLU, resize_to

STYLES = ('hf', 'mmseg')


def decoder_channels(size):
  """The paper's decoder width C of an MiT size."""
  return 256 if size in ('b0', 'b1') else 768


class AllMLPDecoder(nn.Module):
  """Four maps [B, H_i, W_i, C_i] (strides 4-32) -> logits [B, H_0, W_0, num_classes]."""
  num_classes: int
  channels: int
  style: str = 'hf'
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, *, train):
    height, width = features[0].shape[1:3]
    projected = []
    for i, x in enumerate(features):
      if self.style == 'hf':
        x = nn.Dense(self.channels, kernel_init=dense_init, dtype=self.dtype,
                     name=f'linear_{i}')(x)
      else:
        x = ConvBNReLU(self.channels, kernel=1, dtype=self.dtype, name=f'convs_{i}')(
            x, train=train)
      projected.append(resize_to(x, height, width))
    if self.style == 'hf':
      projected = projected[::-1]
    x = ConvBNReLU(self.channels, kernel=1, dtype=self.dtype, name='fuse')(
        jnp.concatenate(projected, axis=-1), train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)


class Model(nn.Module):
  """SegFormer-B0..B5. images [B, H, W, C] -> logits [B, H, W, num_classes] (float32).

  Fields: `size` 'b0'-'b5'; `style` 'hf' or 'mmseg' (module docstring); `channels`: the
  decoder width, 0 for the paper's; `drop_path_rate`: the encoder's stochastic depth in its
  last block (the recipes' 0.1); `dropout`: before the classifier (0.1); `dtype`: compute
  dtype (parameters stay float32).
  """
  num_classes: int
  size: str = 'b0'
  style: str = 'hf'
  channels: int = 0
  drop_path_rate: float = 0.1
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def __post_init__(self):
    mit.check_size(self.size)
    if self.style not in STYLES:
      raise ValueError(f'SegFormer style must be one of {STYLES}, got {self.style!r}')
    if int(self.channels) != self.channels or self.channels < 0:
      raise ValueError(f'SegFormer channels must be 0 (the paper\'s width for the size) or '
                       f'positive, got {self.channels!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    features = mit.MiT(self.size, self.drop_path_rate, self.style, self.dtype,
                       name='backbone')(images, train=train)
    logits = AllMLPDecoder(self.num_classes, self.channels or decoder_channels(self.size),
                           self.style, self.dropout, self.dtype, name='decode_head')(
                               features, train=train)
    return resize_to(logits, *images.shape[1:3]).astype(jnp.float32)
