"""Plain CNN segmenter: a conv/pool encoder, a per-pixel classifier, bilinear upsampling.

The simplest baseline: `num_stages` stages of two 3x3 conv-BN-ReLU layers, each stage
after the first halving the resolution with 2x2 max pooling (output stride
2**(num_stages-1)) and doubling the width; a 1x1 convolution scores every pixel of the
coarse map, and the scores are resized bilinearly to the input size.
"""
import flax.linen as nn
import jax.numpy as jnp

from segjax.models.layers import Conv, DoubleConv, max_pool_2x2, resize_to


class Model(nn.Module):
  num_classes: int
  features: int = 32
  num_stages: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    x = images.astype(self.dtype)
    for stage in range(self.num_stages):
      if stage:
        x = max_pool_2x2(x)
      x = DoubleConv(self.features * 2 ** stage, dtype=self.dtype)(x, train=train)
    logits = Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
    return resize_to(logits.astype(jnp.float32), *images.shape[1:3])
