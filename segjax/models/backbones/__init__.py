"""Backbones the segmentation families share: ResNet (atrous, torchvision's layout; the
ResNetV1c deep stem), VGG16 (fully convolutional), ViT (timm's layout), MobileNetV3
(torchvision's), SegFormer's MiT, ConvNeXt and Swin. Each returns its features for a
family's decoder; their published weights are read by `segjax.weights`."""
import jax.numpy as jnp

from segjax.models.backbones import convnext
from segjax.models.backbones import mit
from segjax.models.backbones import swin

# The backbones that give four maps at strides 4, 8, 16, 32 for a U-Net or UPerNet decoder.
HIERARCHICAL = (tuple(f'mit_{size}' for size in mit.SIZES)
                + tuple(f'convnext_{size}' for size in convnext.SIZES)
                + tuple(f'swin_{size}' for size in swin.SIZES))


_MODULES = {'mit': mit, 'convnext': convnext, 'swin': swin}


def blocks_per_stage(encoder, depths=()):
  """`depths` if given, else the published blocks per stage of `encoder` (HIERARCHICAL)."""
  family, size = encoder.split('_')
  return tuple(depths) or _MODULES[family].SIZES[size][1]


def hierarchical(encoder, *, drop_path_rate=0.0, dtype=jnp.float32, **fields):
  """The backbone module (flax name 'backbone') `encoder` in HIERARCHICAL names, e.g.
  'convnext_tiny': images [B, H, W, C] -> 4 maps [B, H/s, W/s, C_i], s = 4, 8, 16, 32.
  `fields`: the family's other fields (ConvNeXt's width, depths, layer_scale_init; Swin's
  width, depths, window_size)."""
  if encoder not in HIERARCHICAL:
    raise ValueError(f'unknown hierarchical backbone {encoder!r}; use one of {HIERARCHICAL}')
  family, size = encoder.split('_')
  module = {'mit': mit.MiT, 'convnext': convnext.ConvNeXt, 'swin': swin.SwinTransformer}[family]
  return module(size=size, drop_path_rate=drop_path_rate, dtype=dtype, name='backbone',
                **fields)
