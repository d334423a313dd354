"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015; arXiv 1411.4038).

Backbones: VGG16 / VGG16-BN (`vgg.VGG16` with fc6/fc7 as 7x7 and 1x1 convolutions, as in
the paper) or ResNet-18/34/50/101 (`resnet.ResNet`, torchvision's layout). Head output at
stride 32: fc7 for VGG; for ResNet the 3x3 conv-BN-ReLU-dropout of an FCN head on stage4
(below), since a ResNet has no fc6/fc7 to convolutionalise.

Variants (`variant`):
  '32s'  a 1x1 score layer on the stride-32 head output, upsampled 32x to the input.
  '16s'  the stride-32 scores upsampled 2x plus 1x1 scores of the stride-16 features
         (pool4 / stage3), the sum upsampled 16x.
  '8s'   as 16s, then the fused scores upsampled 2x plus 1x1 scores of the stride-8
         features (pool3 / stage2), the sum upsampled 8x.
  '8s_atrous' (ResNet only; torchvision's `fcn_resnet50/101`, mmsegmentation's `fcn_r*-d8`):
         the backbone's stages 3 and 4 dilated instead of strided (output stride 8), an
         FCN head on stage4, its scores upsampled 8x. No skips.
The skip score layers start at zero (the paper: the skip net then starts from the coarser
net's predictions), as do all class-scoring layers (the paper found random init neither
better nor faster). `skip_scales` multiplies the stride-16 and stride-8 features before
their score layers: (0.01, 0.0001) is the reference "FCN-8s at-once" training, which
trains all streams together from VGG16.

Upsampling (`upsample`):
  'transposed'  the paper's: the 2x upsamplings between fusions are learnable transposed
                convolutions (kernel 4, stride 2, no bias, C -> C classes) initialised to
                bilinear interpolation; the final upsampling to the input is fixed bilinear
                interpolation ("final layer deconvolutional filters are fixed to bilinear
                interpolation, while intermediate upsampling layers are initialized to
                bilinear upsampling, and then learned", Sec. 4.3). The input of a learned
                layer is edge-padded by one cell and its output cropped so that at init it
                equals `layers.resize_to` (half-pixel centres, clamped edges) exactly,
                borders included (Caffe pads with zeros, which darkens the borders). 16s and
                8s need H and W divisible by 32; 32s and 8s_atrous have no learned layer.
  'bilinear'    every upsampling is a fixed bilinear resize (`layers.resize_to`) to the
                next feature map's size or the input's; any H and W. The reference
                implementation fixes all its interpolation kernels, with no loss of
                accuracy.

FCN head (ResNet; torchvision's FCNHead, mmsegmentation's FCNHead): `head_convs` 3x3
conv-BN-ReLU of in/4 channels (512 for ResNet-50/101), with `head_concat_input` the input
concatenated to their output and fused by one more 3x3 conv-BN-ReLU, dropout, 1x1 scores.
torchvision: 1 conv, no concat; mmsegmentation: 2 convs and concat.

Auxiliary head (`aux_head`): an FCN head (1 conv, in/4 channels, dropout 0.1) on the
stride-16 features (pool4 / stage3; stage3 is at stride 8 in '8s_atrous', as in
torchvision and mmsegmentation). When training, its logits resized to the input (float32
[B, H, W, num_classes]) are sown as `intermediates/aux_logits`; the model's output is the
main logits in both modes.

Known differences from the published networks: fc6 is padded 'SAME' instead of the input
being padded by 100 pixels (see `vgg`). torchvision's and mmsegmentation's dilated ResNets
give the first block of a dilated stage the previous stage's rate: `contract_dilation=True`
(the default) does the same; False gives every block the stage's rate (DeepLab's convention).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.backbones import resnet
from segjax.models.backbones import vgg
from segjax.models.layers import Conv, ConvBNReLU, resize_to

BACKBONES = ('vgg16', 'vgg16_bn', 'resnet18', 'resnet34', 'resnet50', 'resnet101')
VARIANTS = ('32s', '16s', '8s', '8s_atrous')
UPSAMPLING = ('transposed', 'bilinear')
PUBLISHED_WIDTH = 64
# Features fused by the 16s and 8s variants (strides 16 and 8), and the auxiliary head's input.
SKIP_FEATURES = {'vgg': ('pool4', 'pool3'), 'resnet': ('stage3', 'stage2')}
NUM_SKIPS = {'32s': 0, '16s': 1, '8s': 2, '8s_atrous': 0}
DEFAULT_DROPOUT = {'vgg': 0.5, 'resnet': 0.1}  # after fc6/fc7 (VGG); in the FCN head (ResNet)
AUX_DROPOUT = 0.1


def family(backbone):
  """'vgg16_bn' -> 'vgg', 'resnet50' -> 'resnet'."""
  return 'vgg' if backbone.startswith('vgg') else 'resnet'


def bilinear_kernel(factor):
  """1-D weights [2 * factor] of bilinear upsampling by `factor` as a transposed convolution.

  Tap t weighs 1 - |t - c| / factor with c = factor - 0.5, the kernel's centre (FCN's
  `upsample_filt` for even kernel sizes), e.g. factor 2 -> [0.25, 0.75, 0.75, 0.25].
  """
  taps = np.arange(2 * factor)
  return 1 - np.abs(taps - (factor - 0.5)) / factor


def bilinear_init(factor):
  """Initialiser of a [2f, 2f, C, C] transposed-conv kernel: bilinear per class, no mixing."""

  def init(key, shape, dtype=jnp.float32):
    del key
    taps = bilinear_kernel(factor)
    kernel = np.zeros(shape, np.float32)
    channels = np.arange(shape[2])
    kernel[:, :, channels, channels] = np.outer(taps, taps)[..., None]
    return jnp.asarray(kernel, dtype)

  return init


class LearnedUpsample(nn.Module):
  """Transposed convolution upsampling by `factor`: [B, h, w, C] -> [B, h*f, w*f, C].

  out[f*p + t] += x[p] * kernel[t] (PyTorch's ConvTranspose2d semantics; kernel [2f, 2f, C,
  C], no bias), on the input edge-padded by one cell and cropped by 3f/2, so that at init
  (`bilinear_init`) it is bilinear upsampling with half-pixel centres. Computed as a 2x2
  convolution giving the f x f outputs of every coarse cell, then depth-to-space: the
  same result as XLA's dilated-input transposed convolution without its f^2 multiplies
  by zero.
  """
  factor: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    f, (batch, height, width, channels) = self.factor, x.shape
    kernel = self.param('kernel', bilinear_init(f), (2 * f, 2 * f, channels, channels))
    # kernel[a*f + r] acts on the cell a steps before the output cell (a in {0, 1}); as a
    # correlation over (previous, current) cells that is tap 1 - a.
    taps = kernel.reshape(2, f, 2, f, channels, channels)[::-1, :, ::-1]
    taps = taps.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, channels, f * f * channels)
    # Edge padding by one cell as concatenated edge slices: jnp.pad(mode='edge') emits
    # zero-sized broadcasts for the unpadded axes, which jax2onnx converts wrongly (ONNX).
    x = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
    padded = jnp.concatenate([x[:, :, :1], x, x[:, :, -1:]], axis=2)
    y = jax.lax.conv_general_dilated(
        padded.astype(self.dtype), taps.astype(self.dtype), (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y.reshape(batch, height + 1, width + 1, f, f, channels)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height + 1) * f, (width + 1) * f,
                                              channels)
    start = f // 2
    return y[:, start:start + height * f, start:start + width * f]


class FCNHead(nn.Module):
  """FCN head: [B, h, w, C] -> scores [B, h, w, num_classes].

  `convs` 3x3 conv-BN-ReLU of `features` channels (0: C // 4, torchvision's choice);
  with `concat_input` the input is concatenated to their output and fused by another 3x3
  conv-BN-ReLU (mmsegmentation); dropout at `dropout`; a zero-initialised 1x1 classifier.
  """
  num_classes: int
  features: int = 0
  convs: int = 1
  concat_input: bool = False
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    features = self.features or x.shape[-1] // 4
    y = x
    for i in range(self.convs):
      y = ConvBNReLU(features, dtype=self.dtype, name=f'conv{i}')(y, train=train)
    if self.concat_input:
      y = ConvBNReLU(features, dtype=self.dtype, name='conv_cat')(
          jnp.concatenate([x, y], axis=-1), train=train)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return score_layer(self.num_classes, 'classifier', self.dtype)(y)


def score_layer(num_classes, name, dtype):
  """A 1x1 class-scoring convolution with bias, zero-initialised (the paper's choice)."""
  return Conv(num_classes, (1, 1), kernel_init=nn.initializers.zeros, dtype=dtype,
              name=name)


class Model(nn.Module):
  """FCN-32s / 16s / 8s (and torchvision's atrous FCN) on VGG16 or ResNet.

  Fields (checked at construction, ValueError naming the valid values): `backbone` in
  BACKBONES; `variant` in VARIANTS; `upsample` in UPSAMPLING; `aux_head`: the auxiliary
  FCN head; `width`: backbone base width (64 as published; published weights need 64);
  `dropout`: None for the published rate, 0.5 after fc6 and fc7 (VGG) or 0.1 in the FCN
  head (ResNet); `skip_scales`: factors on the stride-16 and stride-8 features before their
  score layers; `head_convs`, `head_concat_input`: the ResNet FCN head's form;
  `contract_dilation`: '8s_atrous' dilates as torchvision does (see `resnet.ResNet`);
  `backbone_stem`: 'torchvision' or 'deep' (mmsegmentation's ResNetV1c); `dtype`:
  compute dtype (parameters and logits stay float32).
  """
  num_classes: int
  backbone: str = 'vgg16'
  variant: str = '8s'
  upsample: str = 'transposed'
  aux_head: bool = False
  width: int = PUBLISHED_WIDTH
  dropout: Optional[float] = None
  skip_scales: tuple = (1.0, 1.0)
  head_convs: int = 1
  head_concat_input: bool = False
  contract_dilation: bool = True
  backbone_stem: str = 'torchvision'
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._check_fields()
    super().__post_init__()

  def _check_fields(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f'unknown FCN backbone {self.backbone!r}; use one of {BACKBONES}')
    if self.variant not in VARIANTS:
      raise ValueError(f'unknown FCN variant {self.variant!r}; use one of {VARIANTS}')
    if self.upsample not in UPSAMPLING:
      raise ValueError(f'unknown FCN upsample {self.upsample!r}; use one of {UPSAMPLING}')
    is_vgg = family(self.backbone) == 'vgg'
    if is_vgg and self.variant == '8s_atrous':
      raise ValueError("FCN variant '8s_atrous' needs a ResNet backbone (resnet18, resnet34, "
                       "resnet50, resnet101); with VGG use '32s', '16s' or '8s'")
    if is_vgg and (self.head_convs != 1 or self.head_concat_input):
      raise ValueError('head_convs and head_concat_input shape the ResNet FCN head; a VGG '
                       'FCN scores fc7 with a 1x1 convolution: leave them at 1 and False')
    if int(self.head_convs) != self.head_convs or self.head_convs < 1:
      raise ValueError(f'head_convs must be a positive int, got {self.head_convs!r}')
    if self.dropout is not None and not 0 <= self.dropout < 1:
      raise ValueError(f'dropout must be in [0, 1) or None (published rate), '
                       f'got {self.dropout!r}')
    if len(self.skip_scales) != 2 or any(s <= 0 for s in self.skip_scales):
      raise ValueError(f'skip_scales must be two positive factors (stride-16, stride-8 '
                       f'features), got {self.skip_scales!r}')
    if is_vgg and self.backbone_stem != 'torchvision':
      raise ValueError(f'backbone_stem {self.backbone_stem!r} is a ResNet stem; a VGG '
                       "backbone needs backbone_stem='torchvision'")
    if is_vgg:
      vgg.check_config(self.width)
    else:
      resnet.check_config(self.depth, self.output_stride, width=self.width,
                          stem=self.backbone_stem)

  @property
  def depth(self):
    """ResNet depth of `backbone` ('resnet50' -> 50)."""
    return int(self.backbone[len('resnet'):])

  @property
  def output_stride(self):
    """Stride of the coarsest scores: 8 for '8s_atrous', else 32."""
    return 8 if self.variant == '8s_atrous' else 32

  def _dropout(self):
    return DEFAULT_DROPOUT[family(self.backbone)] if self.dropout is None else self.dropout

  def _features(self, images, train):
    """Backbone features, plus 'head': the stride-32 (stride-8 atrous) scores."""
    if family(self.backbone) == 'vgg':
      features = vgg.VGG16(batch_norm=self.backbone == 'vgg16_bn', width=self.width,
                           include_fc=True, dropout=self._dropout(), dtype=self.dtype,
                           name='backbone')(images, train=train)
      features['head'] = score_layer(self.num_classes, 'score_fr', self.dtype)(
          features['fc7'])
    else:
      features = resnet.ResNet(depth=self.depth, output_stride=self.output_stride,
                               width=self.width, contract_dilation=self.contract_dilation,
                               stem=self.backbone_stem, dtype=self.dtype,
                               name='backbone')(images, train=train)
      features['head'] = FCNHead(self.num_classes, convs=self.head_convs,
                                 concat_input=self.head_concat_input,
                                 dropout=self._dropout(), dtype=self.dtype,
                                 name='head')(features['stage4'], train=train)
    return features

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    height, width = images.shape[1:3]
    num_skips = NUM_SKIPS[self.variant]
    if self.upsample == 'transposed' and num_skips and (height % 32 or width % 32):
      raise ValueError(f"FCN-{self.variant} with upsample='transposed' needs H and W "
                       f'divisible by 32, got {(height, width)}; resize or pad the images, '
                       "or use upsample='bilinear'")
    features = self._features(images, train)
    skip_names = SKIP_FEATURES[family(self.backbone)]
    scores, upsample_name = features['head'], 'upscore2'
    for skip, scale in tuple(zip(skip_names, self.skip_scales))[:num_skips]:
      skip_scores = score_layer(self.num_classes, f'score_{skip}', self.dtype)(
          features[skip] * scale)
      if self.upsample == 'transposed':
        scores = LearnedUpsample(2, self.dtype, name=upsample_name)(scores)
      else:
        scores = resize_to(scores, *skip_scores.shape[1:3])
      scores = scores + skip_scores
      upsample_name = f'upscore_{skip}'
    logits = resize_to(scores.astype(jnp.float32), height, width)

    if self.aux_head and (train or self.is_initializing()):
      aux_input = features[skip_names[0]]
      aux = FCNHead(self.num_classes, dropout=AUX_DROPOUT, dtype=self.dtype,
                    name='aux_head')(aux_input, train=train)
      if train:
        self.sow('intermediates', 'aux_logits',
                 resize_to(aux.astype(jnp.float32), height, width))
    return logits
