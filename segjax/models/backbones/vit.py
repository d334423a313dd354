"""Vision Transformer encoder (Dosovitskiy et al., 2021) in timm's `VisionTransformer` layout.

Sizes (timm's vit_{tiny,small,base,large}_patch{16,8}_224): width D / depth / heads =
tiny 192/12/3, small 384/12/6, base 768/12/12, large 1024/24/16; MLP ratio 4.

images [B, H, W, C] -> patch embedding (a `patch_size` x `patch_size` convolution with
stride `patch_size` and bias) -> tokens [B, h*w, D] with h = H / patch_size -> prepend the
class token -> add learned position embeddings [1, 1 + h*w, D] -> dropout -> `depth`
pre-norm blocks (x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))) -> final LayerNorm.
Returns the patch tokens [B, h, w, D] (class token dropped): what the linear and the mask
transformer decoders of `segjax.models.segmenter` read.

`stem='conv'` replaces the patch embedding by the convolutional stem of Xiao et al., "Early
Convolutions Help Transformers See Better" (NeurIPS 2021; their ViT_C models): log2(p)
3x3 stride-2 convolutions without bias, each followed by BatchNorm and ReLU, whose
channels double up to D (patch 16, D = 192: 24, 48, 96, 192, the paper's ViT_C-1GF stem;
patch 8: 48, 96, 192), then a 1x1 convolution with bias to D. It gives the same h x w
token grid; everything after it is unchanged. The paper reports that it makes ViTs
train faster, more stably and less sensitively to the optimiser. `stem_convs_per_stage`
> 1 adds stride-1 3x3 convolutions of the stage's width after each stride-2 one (the
paper's larger stems interleave such layers); with 2, a small ViT learns the shapes
dataset from scratch far faster than with the patch embedding or the 1-per-stage stem
(trials in experiments/segmenter.py). Padding is
'SAME' (the extra zero row/column after an even input; PyTorch's padding=1 pads one each
side), which only matters to imported weights, and none are published for this stem.

Details as timm: LayerNorm epsilon 1e-6; attention is one qkv Dense of 3D outputs with bias
(split as [3, heads, D / heads]), softmax(q k^T / sqrt(D / heads)) computed in float32, and
an output Dense `proj`; the MLP is fc1 (4D), exact (erf) GELU, fc2. Stochastic depth
(drop path) rates grow linearly from 0 in the first block to `drop_path_rate` in the last;
it drops whole residual branches per example, draws from the 'dropout' rng, and acts only
when training. `dropout` (as Segmenter's encoder) applies after the position embedding, to
the attention weights and after the attention projection, fc1's activation and fc2.

Position embeddings are stored for the square grid of `pretrained_image_size` (224 ->
14 x 14 at patch 16), as in the published checkpoints. An input of another grid uses them
resampled as timm's `resample_abs_pos_embed` does: the class token's embedding is kept and
the grid part is resized bicubically with antialiasing (Keys' a = -0.5, weights
renormalised at the borders; what PyTorch's `interpolate(mode='bicubic', antialias=True)`
and PIL compute).

`style='mmseg'` follows mmsegmentation's `VisionTransformer` where it differs from timm's:
the patch embedding has no bias; other grids resize the position embeddings with PyTorch's
plain `interpolate(mode='bicubic', align_corners=False)` (a = -0.75, edge pixels repeated,
no antialiasing); an input whose sides are not multiples of the patch size is padded with
zeros at the bottom and right to the next multiple (its PatchEmbed padding='corner'; zeros
are the mean colour after normalisation), where 'timm' refuses it.

Published weights: timm's safetensors files on the Hugging Face hub, downloaded by the user,
e.g. `timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k` -> model.safetensors (also small,
base, large; `vit_base_patch8_224.augreg_in21k_ft_in1k`; the `_384` variants with
`pretrained_image_size=384`), loaded by `segjax.weights.timm` (which resamples a
checkpoint's position embeddings to `pretrained_image_size`). They expect images
normalised with mean = std = (0.5, 0.5, 0.5). The conv stem has no published weights.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.attention import Attention, DropPath, Mlp, dense_init, drop_path_rates
from segjax.models.layers import Conv, ConvBNReLU

SIZES = {  # size -> (width D, depth, heads)
    'tiny': (192, 12, 3),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}
PATCH_SIZES = (8, 16)
STEMS = ('patch', 'conv')
STYLES = ('timm', 'mmseg')
EPSILON = 1e-6  # timm's LayerNorm epsilon for ViT

def check_config(size, patch_size, pretrained_image_size=224, depth=0, stem='patch',
                 stem_convs_per_stage=1):
  """Raises ValueError naming the valid values if a ViT field is out of range."""
  if size not in SIZES:
    raise ValueError(f'ViT size must be one of {tuple(SIZES)}, got {size!r}')
  if stem not in STEMS:
    raise ValueError(f'ViT stem must be one of {STEMS}, got {stem!r}')
  if int(stem_convs_per_stage) != stem_convs_per_stage or stem_convs_per_stage < 1:
    raise ValueError(f'stem_convs_per_stage must be a positive int, got '
                     f'{stem_convs_per_stage!r}')
  if stem == 'patch' and stem_convs_per_stage != 1:
    raise ValueError(f"stem_convs_per_stage applies to stem='conv' only; set it to 1 or "
                     f"stem='conv', got {stem_convs_per_stage!r}")
  if patch_size not in PATCH_SIZES:
    raise ValueError(f'ViT patch_size must be one of {PATCH_SIZES} (the published patch '
                     f'sizes), got {patch_size!r}')
  if pretrained_image_size <= 0 or pretrained_image_size % patch_size:
    raise ValueError(f'pretrained_image_size must be a positive multiple of patch_size '
                     f'{patch_size}, got {pretrained_image_size!r} (224 or 384 for the '
                     'published checkpoints)')
  if int(depth) != depth or depth < 0:
    raise ValueError(f'ViT depth must be 0 (the size\'s {SIZES[size][1]} blocks) or a '
                     f'positive number of blocks, got {depth!r}')


def _torch_cubic(x, a=-0.75):
  """Keys' cubic convolution kernel at distances x (PyTorch's bicubic uses a = -0.75)."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def torch_bicubic_matrix(out_size, in_size):
  """[out_size, in_size] float32 weights of `F.interpolate(mode='bicubic',
  align_corners=False)` along one axis: output d reads the 4 inputs around
  (d + 0.5) * in / out - 0.5, indices clamped to the edges."""
  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  first = np.floor(source).astype(int) - 1
  matrix = np.zeros((out_size, in_size))
  for tap in range(4):
    index = first + tap
    np.add.at(matrix, (np.arange(out_size), np.clip(index, 0, in_size - 1)),
              _torch_cubic(source - index))
  return matrix.astype(np.float32)


@functools.lru_cache(maxsize=64)
def antialiased_bicubic_matrix(out_size, in_size):
  """[out_size, in_size] float32 weights of `jax.image.resize(method='bicubic',
  antialias=True)` along one axis (Keys' a = -0.5, widened by in / out when shrinking):
  the resize of the identity, computed eagerly, so that a traced model holds a constant
  matrix product, which exports to ONNX (jax2onnx has no antialiased Resize)."""
  with jax.ensure_compile_time_eval():
    matrix = jax.image.scale_and_translate(
        jnp.eye(in_size, dtype=jnp.float32), (out_size, in_size), (0,),
        jnp.asarray([out_size / in_size], jnp.float32), jnp.zeros(1, jnp.float32),
        'bicubic', antialias=True)
  return np.asarray(matrix, np.float32)


def resample_pos_embed(pos_embed, grid, method='timm'):
  """Position embeddings [1, 1 + n*n, D] for an n x n grid -> [1, 1 + h*w, D], grid = (h, w).

  The class token's embedding (first) is kept; the grid part is resized bicubically:
  `method` 'timm' with antialiasing (timm's `resample_abs_pos_embed`), 'torch' as PyTorch's
  plain bicubic interpolate (mmsegmentation's `resize_pos_embed`), either as a product with
  one constant matrix per axis. Returns `pos_embed` itself when the grid is unchanged.
  """
  num_grid = pos_embed.shape[1] - 1
  side = math.isqrt(num_grid)
  if side * side != num_grid:
    raise ValueError(f'pos_embed of {num_grid} grid tokens is not a square grid')
  if tuple(grid) == (side, side):
    return pos_embed
  dim = pos_embed.shape[-1]
  cls_embed, grid_embed = pos_embed[:, :1], pos_embed[:, 1:]
  grid_embed = grid_embed.reshape(side, side, dim).astype(jnp.float32)
  matrix = antialiased_bicubic_matrix if method == 'timm' else torch_bicubic_matrix
  rows, cols = (matrix(n, side) for n in grid)
  grid_embed = jnp.einsum('hi,wj,ijd->hwd', rows, cols, grid_embed,
                          precision=jax.lax.Precision.HIGHEST)
  grid_embed = grid_embed.reshape(1, grid[0] * grid[1], dim).astype(pos_embed.dtype)
  return jnp.concatenate([cls_embed, grid_embed], axis=1)


class Block(nn.Module):
  """Pre-norm transformer block (timm's `Block`). [B, N, D] -> [B, N, D].

  `epsilon`: the LayerNorms' epsilon (timm's ViT 1e-6; Segmenter's decoder uses PyTorch's
  default 1e-5).
  """
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  epsilon: float = EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    norm = functools.partial(nn.LayerNorm, epsilon=self.epsilon, dtype=self.dtype)
    y = Attention(self.num_heads, self.dropout, self.dtype, name='attn')(
        norm(name='norm1')(x), train=train)
    x = x + DropPath(self.drop_path)(y, train=train)
    y = Mlp(dropout=self.dropout, dtype=self.dtype, name='mlp')(norm(name='norm2')(x), train=train)
    return x + DropPath(self.drop_path)(y, train=train)


class PatchEmbed(nn.Module):
  """Non-overlapping patches to tokens (a p x p convolution at stride p, with a bias when
  `use_bias`). [B, H, W, C] -> [B, H/p, W/p, features]."""
  features: int
  patch_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    return Conv(self.features, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                use_bias=self.use_bias, kernel_init=nn.initializers.lecun_normal(),
                name='proj')(images)


class ConvStem(nn.Module):
  """Xiao et al.'s convolutional stem. [B, H, W, C] -> [B, H/p, W/p, features].

  log2(p) stages of `convs_per_stage` 3x3 ConvBNReLU layers, the first of each with stride
  2, whose channels double from stage to stage up to `features` (p = 8, features = 192:
  48, 96, 192); then a 1x1 convolution with bias to `features`. Layer k (from 0) of stage
  i is `convs_{i * convs_per_stage + k}`.
  """
  features: int
  patch_size: int
  convs_per_stage: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train):
    num_stages = int(math.log2(self.patch_size))
    x = images
    for i in range(num_stages):
      channels = self.features // 2 ** (num_stages - 1 - i)
      for j in range(self.convs_per_stage):
        index = i * self.convs_per_stage + j
        x = ConvBNReLU(channels, strides=1 if j else 2, dtype=self.dtype,
                       name=f'convs_{index}')(x, train=train)
    return Conv(self.features, (1, 1), dtype=self.dtype, name='proj')(x)


class ViT(nn.Module):
  """ViT encoder returning patch tokens [B, H/p, W/p, D] (see the module docstring).

  Fields: `size` in SIZES; `patch_size` in (8, 16); `pretrained_image_size`: side of the
  square image the position embeddings are stored for (grid = side / patch_size);
  `depth`: 0 for the size's depth, else that many blocks (then no published weights fit);
  `drop_path_rate`: stochastic depth rate of the last block; `dropout`: see the module
  docstring; `stem`: 'patch' (timm's patch embedding) or 'conv' (Xiao et al.'s stem, no
  published weights); `stem_convs_per_stage`: 3x3 convolutions per stride-2 stage of the
  conv stem (1: the paper's small stems; more add stride-1 convolutions, as its larger
  stems do); `style`: 'timm' or 'mmseg' (module docstring); `dtype`: compute dtype
  (parameters stay float32).
  """
  size: str = 'base'
  patch_size: int = 16
  pretrained_image_size: int = 224
  depth: int = 0
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  stem: str = 'patch'
  stem_convs_per_stage: int = 1
  style: str = 'timm'
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.size, self.patch_size, self.pretrained_image_size, self.depth, self.stem,
                 self.stem_convs_per_stage)
    if self.style not in STYLES:
      raise ValueError(f'ViT style must be one of {STYLES}, got {self.style!r}')
    super().__post_init__()

  @property
  def num_blocks(self):
    return self.depth or SIZES[self.size][1]

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> patch tokens [B, H/p, W/p, D] in `dtype` (rounded up with
    style 'mmseg')."""
    p = self.patch_size
    if self.style == 'mmseg':
      images = jnp.pad(images, ((0, 0), (0, -images.shape[1] % p), (0, -images.shape[2] % p),
                                (0, 0)))
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'ViT with patch_size {p} needs image height and width divisible by '
                       f'{p}, got {images.shape[1:3]}; resize or crop the images (e.g. '
                       f'dataset.image_size a multiple of {p})')
    width, _, heads = SIZES[self.size]
    images = images.astype(self.dtype)
    if self.stem == 'patch':
      x = PatchEmbed(width, p, self.style == 'timm', self.dtype, name='patch_embed')(images)
    else:
      x = ConvStem(width, p, self.stem_convs_per_stage, self.dtype, name='conv_stem')(
          images, train=train)
    batch, h, w, _ = x.shape
    x = x.reshape(batch, h * w, width)
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, width))
    side = self.pretrained_image_size // p
    pos_embed = self.param('pos_embed', dense_init, (1, 1 + side * side, width))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, width)).astype(self.dtype), x],
                        axis=1)
    resize = 'torch' if self.style == 'mmseg' else 'timm'
    x = x + resample_pos_embed(pos_embed, (h, w), resize).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.num_blocks)):
      x = Block(heads, self.dropout, rate, dtype=self.dtype, name=f'blocks_{i}')(x, train=train)
    x = nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name='norm')(x)
    return x[:, 1:].reshape(batch, h, w, width)
