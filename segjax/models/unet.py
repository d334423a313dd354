"""U-Net (Ronneberger et al., 2015) with BatchNorm and 'same' padding, on its own encoder or on
a published hierarchical one.

The paper's encoder (`encoder=''`): `depth` levels of two 3x3 conv-BN-ReLU layers with
`features * 2**level` channels, separated by 2x2 max pooling, then a bottleneck of the same
kind. Decoder: at each level a 2x2 stride-2 transposed convolution halves the channels, its
output is concatenated with the encoder's feature map of that level (the skip connection),
and two 3x3 conv-BN-ReLU layers follow. A 1x1 convolution gives the class scores. 'same'
padding (instead of the paper's valid convolutions and cropping) keeps the output at input
size; H and W must be divisible by 2**depth.

`encoder` one of `backbones.HIERARCHICAL` ('mit_b0' ... 'mit_b5', 'convnext_tiny' ...,
'swin_tiny' ...) puts the decoder on SegFormer's MiT, ConvNeXt or Swin (segjax/models/
backbones/; their ImageNet weights load with `init_from`: Hugging Face nvidia/mit-b*,
facebook/convnext-*, microsoft/swin-*, timm's convnext_* / swin_*, mmseg's mit_b*.pth and
pretrain/swin_*.pth, mmpretrain's ConvNeXt), as segmentation_models_pytorch's Unet on its
'mit_b*' encoders: from the stride-32 map, each decoder block resizes bilinearly to the
next encoder map (strides 16, 8, 4), concatenates it and applies two 3x3 conv-BN-ReLU
layers; two more blocks without skips reach strides 2 and 1. Block widths are `features` x
8, 4, 2, 1, 1/2 (smp's 256, 128, 64, 32, 16 at features 32). Any H and W. `depth` does not
apply.
"""
import flax.linen as nn
import jax.numpy as jnp

from segjax.models import backbones
from segjax.models.layers import Conv, ConvTranspose, DoubleConv, max_pool_2x2, resize_to

ENCODERS = ('',) + backbones.HIERARCHICAL
_HIERARCHICAL_WIDTHS = (8, 4, 2, 1, 0.5)  # decoder block widths, in units of `features`


class Model(nn.Module):
  num_classes: int
  features: int = 64  # the paper's first-level width
  depth: int = 4  # number of poolings (the paper: 4)
  encoder: str = ''  # '' (the paper's) or one of backbones.HIERARCHICAL
  drop_path_rate: float = 0.0  # a transformer encoder's stochastic depth
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(f"U-Net encoder must be '' (the paper's) or one of {ENCODERS[1:]}, got "
                       f'{self.encoder!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    if self.encoder:
      x = self._hierarchical(images, train)
    else:
      x = self._paper(images.astype(self.dtype), train)
    return Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(jnp.float32)

  def _paper(self, x, train):
    factor = 2 ** self.depth
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'U-Net of depth {self.depth} needs H and W divisible by {factor}, '
                       f'got {x.shape[1:3]}')
    skips = []
    for level in range(self.depth):
      x = DoubleConv(self.features * 2 ** level, dtype=self.dtype)(x, train=train)
      skips.append(x)
      x = max_pool_2x2(x)
    x = DoubleConv(self.features * 2 ** self.depth, dtype=self.dtype)(x, train=train)
    for level in reversed(range(self.depth)):
      width = self.features * 2 ** level
      x = ConvTranspose(width, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = DoubleConv(width, dtype=self.dtype)(x, train=train)
    return x

  def _hierarchical(self, images, train):
    features = backbones.hierarchical(self.encoder, drop_path_rate=self.drop_path_rate,
                                      dtype=self.dtype)(images, train=train)
    x, skips = features[-1], features[-2::-1]  # stride 32; then strides 16, 8, 4
    height, width = images.shape[1:3]
    targets = [s.shape[1:3] for s in skips] + [(-(-height // 2), -(-width // 2)),
                                               (height, width)]
    for i, (target, scale) in enumerate(zip(targets, _HIERARCHICAL_WIDTHS)):
      x = resize_to(x, *target)
      if i < len(skips):
        x = jnp.concatenate([x, skips[i]], axis=-1)
      x = DoubleConv(int(self.features * scale), dtype=self.dtype)(x, train=train)
    return x
