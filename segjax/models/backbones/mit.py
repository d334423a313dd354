"""Mix Transformer (MiT), SegFormer's hierarchical encoder (Xie et al., "SegFormer: Simple
and Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021).

Four stages; stage i embeds its input with an overlapping patch embedding (a k x k
convolution with bias at stride s and padding k // 2, k = 7, 3, 3, 3, s = 4, 2, 2, 2, then a
LayerNorm), runs `depths[i]` pre-norm blocks and a final LayerNorm, giving maps at 1/4,
1/8, 1/16 and 1/32 of the input (each side ceil-like: floor((n + 2 (k//2) - k) / s) + 1).
A block is x + DropPath(EfficientAttention(LN(x))), then x + DropPath(MixFFN(LN(x))):

  EfficientAttention   queries from every position; keys and values from the map reduced
                       by an r x r convolution at stride r and a LayerNorm (r = 8, 4, 2, 1;
                       none at r = 1); heads 1, 2, 5, 8; output Dense `proj`
  MixFFN               Dense to 4x width, 3x3 depthwise convolution with bias (its zero
                       padding gives the position information), exact GELU, Dense back

Sizes (widths / depths): b0 32, 64, 160, 256 / 2, 2, 2, 2; b1 64, 128, 320, 512 / 2, 2, 2,
2; b2 the b1 widths / 3, 4, 6, 3; b3 / 3, 4, 18, 3; b4 / 3, 8, 27, 3; b5 / 3, 6, 40, 3.
Encoder parameters: 3.3 M (b0), 13.2, 24.2, 44.1, 60.8, 81.4 M (the paper's Table 1 rounds
b0 to 3.4 M). Stochastic depth grows linearly over all blocks from 0 to `drop_path_rate`.

The two published forms differ only in their LayerNorms' epsilon: Hugging Face
transformers' `SegformerModel` uses PyTorch's default 1e-5, mmsegmentation's
`MixVisionTransformer` 1e-6. ImageNet weights: Hugging Face `nvidia/mit-b{0..5}`
(model.safetensors, loaded by `segjax.weights.huggingface`) and mmseg's
`pretrain/segformer/mit_b{0..5}_20220624-*.pth` (`segjax.weights.mmseg`); they expect
ImageNet normalisation.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models.attention import DropPath, attend, dense_init, drop_path_rates, gelu
from segjax.models.layers import Conv, DepthwiseConv

SIZES = {  # size -> (widths, depths)
    'b0': ((32, 64, 160, 256), (2, 2, 2, 2)),
    'b1': ((64, 128, 320, 512), (2, 2, 2, 2)),
    'b2': ((64, 128, 320, 512), (3, 4, 6, 3)),
    'b3': ((64, 128, 320, 512), (3, 4, 18, 3)),
    'b4': ((64, 128, 320, 512), (3, 8, 27, 3)),
    'b5': ((64, 128, 320, 512), (3, 6, 40, 3)),
}
HEADS = (1, 2, 5, 8)
REDUCTIONS = (8, 4, 2, 1)  # spatial reduction r of the keys and values
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)
MLP_RATIO = 4
EPSILONS = {'hf': 1e-5, 'mmseg': 1e-6}

# mmseg's initialisation: N(0, 2 / fan_out) for convolutions (fan_out / groups for the
# depthwise one, i.e. its fan_in), truncated N(0, 0.02) for Dense layers, zero biases.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def check_size(size):
  if size not in SIZES:
    raise ValueError(f'MiT size must be one of {tuple(SIZES)}, got {size!r}')


class EfficientAttention(nn.Module):
  """Self-attention with spatially reduced keys and values. [B, H, W, D] -> [B, H, W, D]."""
  num_heads: int
  reduction: int
  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, dim = x.shape
    head_dim = dim // self.num_heads
    dense = functools.partial(nn.Dense, dim, kernel_init=dense_init, dtype=self.dtype)
    q = dense(name='query')(x).reshape(batch, height * width, self.num_heads, head_dim)
    source = x
    if self.reduction > 1:
      r = self.reduction
      source = Conv(dim, (r, r), strides=(r, r), padding='VALID', kernel_init=conv_init,
                    dtype=self.dtype, name='sr')(x)
      source = nn.LayerNorm(self.epsilon, dtype=self.dtype, name='sr_norm')(source)
    source = source.reshape(batch, -1, dim)
    k = dense(name='key')(source).reshape(batch, -1, self.num_heads, head_dim)
    v = dense(name='value')(source).reshape(batch, -1, self.num_heads, head_dim)
    out = attend(q, k, v).reshape(batch, height, width, dim)
    return dense(name='proj')(out)


class MixFFN(nn.Module):
  """Dense (4x), 3x3 depthwise convolution, GELU, Dense. [B, H, W, D] -> [B, H, W, D]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    hidden = MLP_RATIO * dim
    x = nn.Dense(hidden, kernel_init=dense_init, dtype=self.dtype, name='fc1')(x)
    x = DepthwiseConv(3, use_bias=True, kernel_init=depthwise_init, dtype=self.dtype,
                      name='dwconv')(x)
    return nn.Dense(dim, kernel_init=dense_init, dtype=self.dtype, name='fc2')(gelu(x))


class Block(nn.Module):
  """A pre-norm MiT block. [B, H, W, D] -> [B, H, W, D]."""
  num_heads: int
  reduction: int
  epsilon: float
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    norm = functools.partial(nn.LayerNorm, self.epsilon, dtype=self.dtype)
    y = EfficientAttention(self.num_heads, self.reduction, self.epsilon, self.dtype,
                           name='attn')(norm(name='norm1')(x))
    x = x + DropPath(self.drop_path)(y, train=train)
    y = MixFFN(self.dtype, name='mlp')(norm(name='norm2')(x))
    return x + DropPath(self.drop_path)(y, train=train)


class MiT(nn.Module):
  """MiT encoder: images [B, H, W, C] -> 4 maps [B, H_i, W_i, widths[i]] at strides 4, 8,
  16, 32. `style`: 'hf' or 'mmseg' (the LayerNorm epsilon, module docstring); `dtype`: the
  compute dtype (parameters stay float32)."""
  size: str = 'b0'
  drop_path_rate: float = 0.0
  style: str = 'hf'
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_size(self.size)
    if self.style not in EPSILONS:
      raise ValueError(f'MiT style must be one of {tuple(EPSILONS)}, got {self.style!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    widths, depths = SIZES[self.size]
    epsilon = EPSILONS[self.style]
    rates = iter(drop_path_rates(self.drop_path_rate, sum(depths)))
    x, features = images.astype(self.dtype), []
    for i, (width, depth) in enumerate(zip(widths, depths)):
      k, s = PATCH_SIZES[i], STRIDES[i]
      x = Conv(width, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2,
               kernel_init=conv_init, dtype=self.dtype, name=f'patch_embed_{i}')(x)
      x = nn.LayerNorm(epsilon, dtype=self.dtype, name=f'patch_norm_{i}')(x)
      for j in range(depth):
        x = Block(HEADS[i], REDUCTIONS[i], epsilon, next(rates), self.dtype,
                  name=f'blocks_{i}_{j}')(x, train=train)
      x = nn.LayerNorm(epsilon, dtype=self.dtype, name=f'norm_{i}')(x)
      features.append(x)
    return features
