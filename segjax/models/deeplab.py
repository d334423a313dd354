"""DeepLab v3 (Chen et al., 2017) and v3+ (Chen et al., 2018) on the atrous ResNet backbone
or a hierarchical one (ConvNeXt, Swin, MiT).

Backbone: `resnet.ResNet` at output stride 16 or 8 (its last stage(s) dilated instead of
strided), with `multi_grid` multiplying the rates of the last stage's blocks. Or, with
`encoder` one of `backbones.HIERARCHICAL` ('convnext_tiny', 'swin_tiny', 'mit_b0', ...),
that backbone's four maps (strides 4, 8, 16, 32) in place of the ResNet's stages: it is not
dilated, so the ASPP reads stride 32 (`output_stride=32`) with the OS16 rates halved, (3,
6, 9), the same field of view in input pixels (not a published setting); v3+'s decoder
reads the stride-4 map. Its ImageNet weights load with `init_from` (segjax.weights).

ASPP (atrous spatial pyramid pooling) on the stride-OS features: a 1x1 conv, one 3x3 conv
per atrous rate (the paper's 6, 12, 18 at OS16, doubled at OS8), and image pooling (global
average, 1x1 conv, bilinear upsampling back), each conv-BN-ReLU of `aspp_features`
channels; the branches are concatenated, projected by a 1x1 conv-BN-ReLU and dropped out.
For ablations, `aspp=False` replaces the ASPP by one 1x1 conv-BN-ReLU of the same width
(and the same dropout): no atrous context, no image pooling.

v3: a 1x1 convolution scores the ASPP output, and the scores are resized to the input size
(as in the paper). v3+: a decoder projects the backbone's stride-4 'stage1' features to
`low_level_features` (48) channels by a 1x1 conv-BN-ReLU, upsamples the ASPP output to
stride 4, concatenates the two, applies two 3x3 conv-BN-ReLU of `decoder_features`; the
1x1 classifier follows and the scores are resized to the input size.

`head` selects the form of the published implementations, so their checkpoints load whole
(`segjax.weights`):
  'paper'        as above.
  'torchvision'  torchvision's DeepLabHead (v3 only): the ASPP as above with dropout 0.5
                 after the projection, then a 3x3 conv-BN-ReLU before the classifier.
  'mmseg'        mmsegmentation's ASPPHead (v3) and DepthwiseSeparableASPPHead (v3+):
                 branches concatenated as [pool, 1x1, atrous...], a 3x3 projection, no
                 dropout there but before the classifier; in v3+ the atrous branches and
                 the two decoder convs are depthwise-separable (3x3 depthwise conv-BN-ReLU,
                 1x1 conv-BN-ReLU). Its recipes use 512 ASPP and decoder channels.
`aux_head` adds the auxiliary FCN head of both (one 3x3 conv-BN-ReLU of C/4 on stage 3,
dropout 0.1, 1x1 classifier), whose logits are sown as `intermediates/aux_logits` when
training (loss weight `loss.aux_weight`).

`frozen_bn` freezes every BatchNorm (backbone and head): they normalise with their running
averages even when training and leave them unchanged, as in the paper's OS8 fine-tuning.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models import backbones
from segjax.models import fcn
from segjax.models.backbones import resnet
from segjax.models.layers import Conv, ConvBNReLU, batch_norm, resize_to

PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # output stride -> ASPP atrous rates
ENCODER_STRIDE = 32  # a hierarchical encoder's last map
ENCODER_RATES = (3, 6, 9)  # the OS16 rates halved, for stride 32
VARIANTS = ('v3', 'v3plus')
# The head's form: the papers', torchvision's DeepLabHead (v3) or mmsegmentation's ASPPHead
# (v3) / DepthwiseSeparableASPPHead (v3+); see the module docstring.
HEADS = ('paper', 'torchvision', 'mmseg')


def aspp_rates_for(output_stride, rates=(), allow_custom=False):
  """ASPP atrous rates: the paper's for `output_stride` if `rates` is empty, else `rates`.

  Raises ValueError if `output_stride` is not 8 or 16, or if `rates` are not positive ints
  or differ from the paper's rates for `output_stride` while `allow_custom` is False.
  """
  if output_stride not in PAPER_RATES:
    raise ValueError(f'DeepLab output_stride must be 8 or 16, got {output_stride!r}; '
                     f'use 16 (ASPP rates {PAPER_RATES[16]}) or 8 (rates {PAPER_RATES[8]})')
  paper, rates = PAPER_RATES[output_stride], tuple(rates)
  if not rates:
    return paper
  if any(int(r) != r or r < 1 for r in rates):
    raise ValueError(f'aspp_rates must be positive ints, got {rates!r}')
  if rates == paper or allow_custom:
    return rates
  other = [os for os, os_rates in PAPER_RATES.items() if os_rates == rates]
  what = (f'are the OS{other[0]} rates but output_stride is {output_stride}' if other
          else f"are not the paper's rates for output_stride {output_stride}")
  raise ValueError(f'aspp_rates {rates} {what}; use {paper} or set allow_custom_rates=True')


class SeparableConvBNReLU(nn.Module):
  """Depthwise-separable conv-BN-ReLU (mmsegmentation's DepthwiseSeparableConvModule): a
  3x3 depthwise conv (dilated by `dilation`, 'SAME' padding) + BN + ReLU, then a 1x1 conv +
  BN + ReLU to `features`. [B, H, W, C] -> [B, H, W, features]."""
  features: int
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = Conv(x.shape[-1], (3, 3), padding='SAME', kernel_dilation=self.dilation,
             feature_group_count=x.shape[-1], use_bias=False, dtype=self.dtype,
             name='depthwise')(x)
    x = nn.relu(batch_norm(not train, self.dtype, name='depthwise_bn')(x))
    return ConvBNReLU(self.features, kernel=1, dtype=self.dtype, name='pointwise')(
        x, train=train)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling. [B, h, w, C] -> [B, h, w, features].

  Branches (each conv-BN-ReLU of `features`): 1x1 conv; a 3x3 conv dilated by each of
  `rates` (depthwise-separable with `separable`); image pooling (global average, 1x1 conv,
  upsampled back to h x w). Their concatenation ([pool, 1x1, atrous...] with `pool_first`,
  mmsegmentation's order; else [1x1, atrous..., pool]) is projected by a conv-BN-ReLU of
  `project_kernel` (1, or mmsegmentation's 3), then dropout at `dropout` (training only,
  'dropout' rng). `frozen_bn`: BatchNorm uses its running averages when training.
  """
  rates: tuple
  features: int = 256
  dropout: float = 0.1
  frozen_bn: bool = False
  pool_first: bool = False
  separable: bool = False
  project_kernel: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    bn_train = train and not self.frozen_bn
    conv = functools.partial(ConvBNReLU, self.features, dtype=self.dtype)
    atrous = functools.partial(SeparableConvBNReLU, self.features, dtype=self.dtype) \
        if self.separable else conv
    pooled = conv(kernel=1, name='pool')(jnp.mean(x, axis=(1, 2), keepdims=True),
                                         train=bn_train)
    pooled = jnp.broadcast_to(pooled, (*x.shape[:3], pooled.shape[-1]))
    branches = [conv(kernel=1, name='conv1x1')(x, train=bn_train)]
    branches += [atrous(dilation=rate, name=f'atrous{i}')(x, train=bn_train)
                 for i, rate in enumerate(self.rates)]
    branches = [pooled] + branches if self.pool_first else branches + [pooled]
    x = conv(kernel=self.project_kernel, name='project')(jnp.concatenate(branches, axis=-1),
                                                         train=bn_train)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class Decoder(nn.Module):
  """DeepLab v3+ decoder. ASPP output [B, h, w, C], low-level [B, h4, w4, C_low]
  -> [B, h4, w4, features].

  The low-level features are projected to `low_level_features` by a 1x1 conv-BN-ReLU, the
  ASPP output is resized bilinearly to h4 x w4, the two are concatenated, and two 3x3
  conv-BN-ReLU of `features` follow (depthwise-separable with `separable`, as
  mmsegmentation's). `frozen_bn` as in ASPP.
  """
  low_level_features: int = 48
  features: int = 256
  frozen_bn: bool = False
  separable: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, low_level, *, train):
    bn_train = train and not self.frozen_bn
    low_level = ConvBNReLU(self.low_level_features, kernel=1, dtype=self.dtype,
                           name='low_level_project')(low_level, train=bn_train)
    x = jnp.concatenate([resize_to(x, *low_level.shape[1:3]), low_level], axis=-1)
    block = SeparableConvBNReLU if self.separable else ConvBNReLU
    x = block(self.features, dtype=self.dtype, name='conv1')(x, train=bn_train)
    return block(self.features, dtype=self.dtype, name='conv2')(x, train=bn_train)


class Model(nn.Module):
  """DeepLab v3 / v3+. Fields are checked at construction (ValueError naming the fix).

  `variant`: 'v3' or 'v3plus'; `head`: 'paper', 'torchvision' or 'mmseg' (module
  docstring); `backbone_depth`: ResNet depth (18, 34, 50, 101); `backbone_width`: the
  ResNet's base width (64 as published; published weights need 64); `encoder`: '' for the
  ResNet, else one of `backbones.HIERARCHICAL` in its place (module docstring; the
  ResNet's fields then do not apply); `backbone_stem`:
  'torchvision' (7x7) or 'deep' (mmsegmentation's ResNetV1c); `output_stride`: 8 or 16;
  `multi_grid`: rate multipliers of the last stage's blocks; `contract_dilation`: see
  `resnet.ResNet` (torchvision's and mmsegmentation's dilated ResNets set it);
  `aspp_rates`: () for the paper's rates at `output_stride`, other rates only with
  `allow_custom_rates`; `aspp_features`, `low_level_features`, `decoder_features`: widths
  of the ASPP, the v3+ low-level projection and the v3+ decoder convs; `aspp`: False for a
  1x1 conv-BN-ReLU in its place (ablations, head 'paper' only); `aux_head`: an auxiliary
  FCN head on stage 3 (as `fcn.Model`'s); `frozen_bn`: see the module docstring;
  `dropout`: rate after the ASPP projection ('paper', 'torchvision': 0.5 there) or before
  the classifier ('mmseg'); `dtype`: compute dtype.
  """
  num_classes: int
  variant: str = 'v3plus'
  head: str = 'paper'
  backbone_depth: int = 50
  backbone_width: int = 64
  backbone_stem: str = 'torchvision'
  encoder: str = ''
  drop_path_rate: float = 0.0  # a hierarchical encoder's stochastic depth
  output_stride: int = 16
  multi_grid: tuple = (1, 2, 4)
  contract_dilation: bool = False
  aspp_rates: tuple = ()
  allow_custom_rates: bool = False
  aspp_features: int = 256
  aspp: bool = True
  low_level_features: int = 48
  decoder_features: int = 256
  aux_head: bool = False
  frozen_bn: bool = False
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f'unknown DeepLab variant {self.variant!r}; use one of {VARIANTS}')
    if self.head not in HEADS:
      raise ValueError(f'unknown DeepLab head {self.head!r}; use one of {HEADS}')
    if self.head == 'torchvision' and self.variant != 'v3':
      raise ValueError("torchvision has no DeepLab v3+: head='torchvision' needs "
                       "variant='v3'")
    if self.head != 'paper' and not self.aspp:
      raise ValueError(f"aspp=False (the ablation) needs head='paper', got {self.head!r}")
    if self.encoder:
      self._check_encoder()
      super().__post_init__()
      return
    aspp_rates_for(self.output_stride, self.aspp_rates, self.allow_custom_rates)
    if self.backbone_depth not in resnet.DEPTHS:
      raise ValueError(f'backbone_depth must be one of {sorted(resnet.DEPTHS)}, '
                       f'got {self.backbone_depth!r}')
    resnet.check_config(self.backbone_depth, self.output_stride, tuple(self.multi_grid),
                        self.backbone_width, self.backbone_stem)
    super().__post_init__()

  def _check_encoder(self):
    if self.encoder not in backbones.HIERARCHICAL:
      raise ValueError(f"DeepLab encoder must be '' (the atrous ResNet) or one of "
                       f'{backbones.HIERARCHICAL}, got {self.encoder!r}')
    if self.output_stride != ENCODER_STRIDE:
      raise ValueError(f'encoder {self.encoder!r} is not dilated: its last map is at stride '
                       f'{ENCODER_STRIDE}; set output_stride={ENCODER_STRIDE}, got '
                       f'{self.output_stride!r}')
    if self.head == 'torchvision':
      raise ValueError("head='torchvision' is torchvision's ResNet model; use head='paper' "
                       f'or mmseg with encoder {self.encoder!r}')
    rates = tuple(self.aspp_rates)
    if rates and rates != ENCODER_RATES and not self.allow_custom_rates:
      raise ValueError(f'aspp_rates {rates} with encoder {self.encoder!r}: use () or '
                       f'{ENCODER_RATES} (stride 32), or set allow_custom_rates=True')

  def _backbone(self, images, train):
    """{'stage1'..'stage4': the backbone's maps} and the ASPP's rates."""
    if not self.encoder:
      features = resnet.ResNet(depth=self.backbone_depth, output_stride=self.output_stride,
                               width=self.backbone_width, multi_grid=tuple(self.multi_grid),
                               contract_dilation=self.contract_dilation,
                               stem=self.backbone_stem, frozen_bn=self.frozen_bn,
                               dtype=self.dtype, name='backbone')(images, train=train)
      return features, aspp_rates_for(self.output_stride, self.aspp_rates,
                                      self.allow_custom_rates)
    maps = backbones.hierarchical(self.encoder, drop_path_rate=self.drop_path_rate,
                                  dtype=self.dtype)(images, train=train)
    stages = dict(zip(('stage1', 'stage2', 'stage3', 'stage4'), maps))
    return stages, tuple(self.aspp_rates) or ENCODER_RATES

  def _aspp(self, rates, x, train):
    """The ASPP of this model's head on the stride-OS features x."""
    if self.head == 'mmseg':
      aspp = ASPP(rates, self.aspp_features, 0.0, self.frozen_bn, pool_first=True,
                  separable=self.variant == 'v3plus', project_kernel=3, dtype=self.dtype,
                  name='aspp')
    else:
      aspp = ASPP(rates, self.aspp_features, self.dropout, self.frozen_bn, dtype=self.dtype,
                  name='aspp')
    return aspp(x, train=train)

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    features, rates = self._backbone(images, train)
    bn_train = train and not self.frozen_bn
    if self.aspp:
      x = self._aspp(rates, features['stage4'], train)
    else:
      x = ConvBNReLU(self.aspp_features, kernel=1, dtype=self.dtype, name='head_project')(
          features['stage4'], train=bn_train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.variant == 'v3plus':
      x = Decoder(self.low_level_features, self.decoder_features, self.frozen_bn,
                  separable=self.head == 'mmseg', dtype=self.dtype,
                  name='decoder')(x, features['stage1'], train=train)
    if self.head == 'torchvision':
      x = ConvBNReLU(self.aspp_features, dtype=self.dtype, name='head_conv')(x, train=bn_train)
    elif self.head == 'mmseg':
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
    height, width = images.shape[1:3]
    if self.aux_head and (train or self.is_initializing()):
      aux = fcn.FCNHead(self.num_classes, dropout=fcn.AUX_DROPOUT, dtype=self.dtype,
                        name='aux_head')(features['stage3'], train=bn_train)
      if train:
        self.sow('intermediates', 'aux_logits',
                 resize_to(aux.astype(jnp.float32), height, width))
    return resize_to(logits.astype(jnp.float32), height, width)
