"""U-Net (Ronneberger et al., 2015) with BatchNorm and 'same' padding.

Encoder: `depth` levels of two 3x3 conv-BN-ReLU layers with `features * 2**level`
channels, separated by 2x2 max pooling, then a bottleneck of the same kind. Decoder: at
each level a 2x2 stride-2 transposed convolution halves the channels, its output is
concatenated with the encoder's feature map of that level (the skip connection), and two
3x3 conv-BN-ReLU layers follow. A 1x1 convolution gives the class scores. 'same' padding
(instead of the paper's valid convolutions and cropping) keeps the output at input size;
H and W must be divisible by 2**depth.
"""
import flax.linen as nn
import jax.numpy as jnp

from segjax.models.layers import Conv, ConvTranspose, DoubleConv, max_pool_2x2


class Model(nn.Module):
  num_classes: int
  features: int = 64  # the paper's first-level width
  depth: int = 4  # number of poolings (the paper: 4)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    factor = 2 ** self.depth
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f'U-Net of depth {self.depth} needs H and W divisible by {factor}, '
                       f'got {images.shape[1:3]}')
    x = images.astype(self.dtype)
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
    return Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(jnp.float32)

