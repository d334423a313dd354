"""UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) on
ConvNeXt (Liu et al., 2022) and Swin Transformer (Liu et al., 2021) backbones, as
mmsegmentation's UPerHead and Hugging Face's UperNetForSemanticSegmentation (which is mmseg's,
converted), so that both sources' checkpoints load whole (`segjax.weights`).

Backbone: `convnext.ConvNeXt` or `swin.SwinTransformer`, giving normalised features at
strides 4, 8, 16, 32 with C, 2C, 4C, 8C channels (C = 96 for -T and -S, 128 for -B).

Head (every conv is conv-BN-ReLU without bias, `channels` = 512 wide):
- PPM on the stride-32 features x: for each of `pool_scales` (1, 2, 3, 6) an adaptive average
  pooling to s x s (PyTorch's bins: floor(i h / s) to ceil((i + 1) h / s)), a 1x1 conv, a
  bilinear resize back to x's size; [x, pooled...] concatenated and fused by a 3x3 conv.
- FPN: 1x1 lateral convs on the stride-4, 8, 16 features; top-down, each level adds the level
  above resized bilinearly to its size; a 3x3 conv on each of those three levels; all four
  (with the PPM output as the top one) resized to stride 4, concatenated and fused by a 3x3
  conv (`fpn_bottleneck`); dropout `dropout` (0.1, mmseg's; Hugging Face's has none, which
  changes nothing at inference); a 1x1 classifier with bias; logits resized to the input.
Every resize is PyTorch's `interpolate(mode='bilinear', align_corners=False)`: half-pixel
centres, never antialiased, also where it shrinks (the 6 x 6 pooling on a smaller map).

`aux_head` adds mmseg's auxiliary FCNHead on the stride-16 features (one 3x3 conv-BN-ReLU of
`aux_channels` = 256, dropout 0.1, 1x1 classifier), whose logits resized to the input are
sown as `intermediates/aux_logits` when training (loss weight `loss.aux_weight`, 0.4 in both
sources' recipes).

Input sides need not be multiples of 32: ConvNeXt floors them at each stride, Swin pads
them (see the backbones), as the references do.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import fcn
from segjax.models import backbones
from segjax.models.backbones import convnext
from segjax.models.backbones import swin
from segjax.models.layers import Conv, ConvBNReLU

BACKBONES = tuple(f'convnext_{size}' for size in convnext.SIZES) + tuple(
    f'swin_{size}' for size in swin.SIZES)
AUX_FEATURES = 2  # the auxiliary head reads the stride-16 features (mmseg's in_index=2)


def layer_id(path, num_layers):
  """mmseg's `LearningRateDecayOptimizerConstructor` layer id of the parameter at flax `path`
  (('backbone', 'stages_0', ...)) with decay_type 'stage_wise' (its `get_stage_id_for_convnext`):
  0 for the stem and downsampling layers (Swin: the patch embedding), i + 1 for stage i's
  blocks, `num_layers` + 1 for everything else (the backbone's output norms and the heads).
  Its learning rate is scaled by decay_rate ** (num_layers + 1 - id)."""
  if path[0] == 'backbone' and len(path) > 1:
    module = path[1]
    if module.startswith('downsample_') or module == 'patch_embed':
      return 0
    if module.startswith('stages_'):
      return int(module[len('stages_'):]) + 1
  return num_layers + 1


def adaptive_average_pool(x, size):
  """PyTorch's `AdaptiveAvgPool2d(size)`: [B, h, w, C] -> [B, size, size, C], output cell i
  averaging input rows floor(i h / size) to ceil((i + 1) h / size) (bins overlap or repeat a
  row where h is not a multiple of size)."""

  def weights(n):
    matrix = np.zeros((size, n), np.float32)
    for i in range(size):
      start, stop = i * n // size, -(-(i + 1) * n // size)
      matrix[i, start:stop] = 1 / (stop - start)
    return matrix

  return jnp.einsum('ih,jw,bhwc->bijc', weights(x.shape[1]), weights(x.shape[2]), x,
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def interpolate(x, height, width):
  """[B, h, w, C] -> [B, height, width, C] as PyTorch's `interpolate(mode='bilinear',
  align_corners=False)`: half-pixel centres, no antialiasing."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method='bilinear',
                          antialias=False)


class UPerHead(nn.Module):
  """PPM + FPN head. Features [B, h_i, w_i, C_i] at strides 4..32 -> scores [B, h_0, w_0,
  num_classes] (module docstring). Modules: `psp_{k}` (one per pool scale), `bottleneck`,
  `lateral_{i}` and `fpn_{i}` (i = 0, 1, 2), `fpn_bottleneck`, `classifier`."""
  num_classes: int
  channels: int = 512
  pool_scales: tuple = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, *, train):
    conv = lambda kernel, name: ConvBNReLU(self.channels, kernel=kernel, dtype=self.dtype,
                                           name=name)
    top = features[-1]
    height, width = top.shape[1:3]
    pooled = [interpolate(conv(1, f'psp_{k}')(adaptive_average_pool(top, scale), train=train),
                          height, width)
              for k, scale in enumerate(self.pool_scales)]
    laterals = [conv(1, f'lateral_{i}')(x, train=train) for i, x in enumerate(features[:-1])]
    laterals.append(conv(3, 'bottleneck')(jnp.concatenate([top] + pooled, axis=-1),
                                          train=train))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + interpolate(laterals[i], *laterals[i - 1].shape[1:3])
    outs = [conv(3, f'fpn_{i}')(x, train=train) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [interpolate(x, *size) for x in outs[1:]]
    x = conv(3, 'fpn_bottleneck')(jnp.concatenate(outs, axis=-1), train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)


def _backbone_module(model):
  family = model.backbone.split('_')[0]
  extra = ({'layer_scale_init': model.layer_scale_init} if family == 'convnext'
           else {'window_size': model.window_size})
  return backbones.hierarchical(model.backbone, drop_path_rate=model.drop_path_rate,
                                dtype=model.dtype, width=model.width,
                                depths=tuple(model.depths), **extra)


class Model(nn.Module):
  """UPerNet. Fields are checked at construction (ValueError naming the valid values).

  `backbone`: one of BACKBONES ('convnext_tiny' ... 'swin_base'); `width`: 0 for the size's
  widths, else the first stage's channels (doubled per stage; no published weights fit);
  `depths`: () for the size's blocks per stage, else 4 counts; `window_size`: Swin's attention
  window, 0 for 7 (12 for the Swin-B models pre-trained at 384); `drop_path_rate`: the
  backbone's stochastic depth rate (last block); `layer_scale_init`: ConvNeXt's initial layer
  scale (1e-6, the paper's; mmseg's configs 1.0); `channels`: the head's width (512);
  `pool_scales`: the PPM's output sides; `dropout`: before the classifiers; `aux_head`,
  `aux_channels`: the auxiliary FCN head and its width; `dtype`: compute dtype (parameters
  stay float32).
  """
  num_classes: int
  backbone: str = 'convnext_tiny'
  width: int = 0
  depths: tuple = ()
  window_size: int = 0
  drop_path_rate: float = 0.3
  layer_scale_init: float = 1e-6
  channels: int = 512
  pool_scales: tuple = (1, 2, 3, 6)
  dropout: float = 0.1
  aux_head: bool = True
  aux_channels: int = 256
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f'unknown UPerNet backbone {self.backbone!r}; use one of {BACKBONES}')
    family, size = self.backbone.split('_')
    if family == 'convnext':
      if self.window_size:
        raise ValueError(f'window_size applies to Swin backbones only; set it to 0 for '
                         f'{self.backbone!r}, got {self.window_size!r}')
      convnext.check_config(size, self.width, tuple(self.depths))
    else:
      swin.check_config(size, self.width, tuple(self.depths), self.window_size)
      if self.layer_scale_init != 1e-6:
        raise ValueError(f'layer_scale_init applies to ConvNeXt backbones only; leave it at '
                         f'1e-6 for {self.backbone!r}, got {self.layer_scale_init!r}')
    for field in ('channels', 'aux_channels'):
      value = getattr(self, field)
      if int(value) != value or value < 1:
        raise ValueError(f'{field} must be a positive int (published: '
                         f'{512 if field == "channels" else 256}), got {value!r}')
    scales = tuple(self.pool_scales)
    if not scales or any(int(s) != s or s < 1 for s in scales):
      raise ValueError(f'pool_scales must be a non-empty tuple of positive ints (published: '
                       f'(1, 2, 3, 6)), got {self.pool_scales!r}')
    for field in ('drop_path_rate', 'dropout'):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f'{field} must be in [0, 1), got {getattr(self, field)!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    features = _backbone_module(self)(images, train=train)
    scores = UPerHead(self.num_classes, self.channels, tuple(self.pool_scales), self.dropout,
                      self.dtype, name='decode_head')(features, train=train)
    height, width = images.shape[1:3]
    if self.aux_head and (train or self.is_initializing()):
      aux = fcn.FCNHead(self.num_classes, self.aux_channels, dropout=self.dropout,
                        dtype=self.dtype, name='aux_head')(features[AUX_FEATURES], train=train)
      if train:
        self.sow('intermediates', 'aux_logits',
                 interpolate(aux.astype(jnp.float32), height, width))
    return interpolate(scores.astype(jnp.float32), height, width)
