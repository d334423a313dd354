"""Swin Transformer backbone (Liu et al., "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows", ICCV 2021) as mmsegmentation's `SwinTransformer` and Hugging Face's
`SwinBackbone` (the same network) compute it for dense prediction.

Sizes (Swin-T/S/B): embedding width C / blocks per stage / heads per stage = tiny 96 /
2-2-6-2 / 3-6-12-24, small 96 / 2-2-18-2 / 3-6-12-24, base 128 / 2-2-18-2 / 4-8-16-32 (32
channels per head throughout); stage i has 2^i C channels; MLP ratio 4; window 7 (12 for the
Swin-B models pre-trained at 384).

images [B, H, W, 3] -> patch embedding (zero-padded at the bottom and right to multiples of
4, a 4x4 convolution at stride 4 with bias, LayerNorm) -> 4 stages. A stage is `depth`
pre-norm blocks x + DropPath(W-MSA(LN(x))), x + DropPath(MLP(LN(x))); the map is
zero-padded at the bottom and right to multiples of the window (after the LayerNorm, so the
padded tokens are zeros inside attention, as both references do), odd blocks roll it by
-window // 2 along both axes first (shifted windows) and mask attention between tokens that
were not neighbours (-100 on the logits), and the result is rolled back and cropped. Window
attention: separate query, key and value Dense layers with bias, softmax(q k^T / sqrt(32) +
B) with the learned relative position bias B (a (2w-1)^2 x heads table indexed by the
offset between two tokens of a window), through `attention.attend`, and an output Dense
`proj`. Between stages, patch merging zero-pads odd sides, concatenates the 2x2 neighbours
[(0, 0), (1, 0), (0, 1), (1, 1)] (row, column offsets; the official order, Hugging Face's)
to 4C channels, applies a LayerNorm and a bias-free Dense to 2C. Each stage's output
(before merging) goes through its own LayerNorm (`norm_{i}`), giving features at strides 4,
8, 16, 32 (sides rounded up). LayerNorm epsilon 1e-5; exact GELU.

mmseg's patch merging unfolds the neighbours channel-major ((c, row, column) order): its
checkpoints' merging weights are permuted on loading (`segjax.weights.mmseg`).

Stochastic depth rates grow linearly from 0 to `drop_path_rate` over all blocks. The models
here have no absolute position embedding (mmseg's `use_abs_pos_embed=False`, Hugging Face's
`use_absolute_embeddings=False`), so any input size works.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segjax.models import attention
from segjax.models.layers import Conv

SIZES = {  # size -> (embedding width C, blocks per stage); heads: channels / HEAD_DIM
    'tiny': (96, (2, 2, 6, 2)),
    'small': (96, (2, 2, 18, 2)),
    'base': (128, (2, 2, 18, 2)),
}
HEAD_DIM = 32
PATCH_SIZE = 4
WINDOW_SIZES = (7, 12)
EPSILON = 1e-5
MASKED = -100.0  # the logit added between tokens of a shifted window that are not neighbours


def check_config(size, width=0, depths=(), window_size=0):
  """Raises ValueError naming the valid values if a Swin field is out of range."""
  if size not in SIZES:
    raise ValueError(f'Swin size must be one of {tuple(SIZES)}, got {size!r}')
  if int(width) != width or width < 0 or width % HEAD_DIM:
    raise ValueError(f'Swin width must be 0 (the size\'s {SIZES[size][0]}) or a positive '
                     f'multiple of {HEAD_DIM} (the channels per head), got {width!r}')
  if depths and (len(depths) != 4 or any(int(d) != d or d < 1 for d in depths)):
    raise ValueError(f'Swin depths must be () (the size\'s {SIZES[size][1]}) or 4 positive '
                     f'ints, blocks per stage, got {depths!r}')
  if window_size and window_size not in WINDOW_SIZES:
    raise ValueError(f'Swin window_size must be 0 (7) or one of {WINDOW_SIZES} (the '
                     f'published windows), got {window_size!r}')


def relative_position_index(window):
  """[w*w, w*w] int index into the bias table of the offset between two tokens of a window
  (row-major tokens): (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  coords = coords.reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + window - 1
  return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def partition(x, window):
  """[B, H, W, C] (H, W multiples of `window`) -> windows [B * H/w * W/w, w*w, C]."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def merge(windows, batch, height, width):
  """Inverse of `partition`: windows [B * H/w * W/w, w*w, C] -> [B, H, W, C]."""
  window = int(round(windows.shape[1] ** 0.5))
  x = windows.reshape(batch, height // window, width // window, window, window, -1)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def shift_mask(height, width, window, shift):
  """[num_windows, w*w, w*w] float32: 0 between tokens of one region of the rolled map
  (height x width, multiples of `window`), MASKED between tokens of different regions (the
  references' 3 x 3 regions: [0, -w), [-w, -shift), [-shift, end) along each axis)."""
  regions = np.zeros((1, height, width, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, rows in enumerate(bounds):
    for j, cols in enumerate(bounds):
      regions[:, rows, cols] = 3 * i + j
  ids = partition(regions, window)[..., 0]  # [num_windows, w*w]
  return np.where(ids[:, None, :] != ids[:, :, None], MASKED, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with the relative position bias.

  windows [B', w*w, C], mask None or [num_windows, w*w, w*w] (B' = B * num_windows) ->
  [B', w*w, C].
  """
  num_heads: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    batch, length, dim = x.shape
    dense = functools.partial(nn.Dense, dim, kernel_init=attention.dense_init, dtype=self.dtype)
    q, k, v = (dense(name=name)(x).reshape(batch, length, self.num_heads, dim // self.num_heads)
               for name in ('query', 'key', 'value'))
    table = self.param('relative_position_bias_table', attention.dense_init,
                       ((2 * self.window - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(self.window)].transpose(2, 0, 1)[None]
    if mask is not None:  # windows are batch-major: example b's window n is b * nW + n
      bias = jnp.tile(bias + mask[:, None], (batch // len(mask), 1, 1, 1))
    out = attention.attend(q, k, v, bias)
    return dense(name='proj')(out.reshape(batch, length, dim))


class Block(nn.Module):
  """Swin block (shifted by `shift` > 0). [B, H, W, C] -> [B, H, W, C]."""
  num_heads: int
  window: int
  shift: int = 0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    batch, height, width, _ = x.shape
    norm = functools.partial(nn.LayerNorm, epsilon=EPSILON, dtype=self.dtype)
    w, s = self.window, self.shift
    y = norm(name='norm1')(x)
    y = jnp.pad(y, ((0, 0), (0, -height % w), (0, -width % w), (0, 0)))
    padded = y.shape[1:3]
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    mask = jnp.asarray(shift_mask(*padded, w, s)) if s else None
    y = WindowAttention(self.num_heads, w, self.dtype, name='attn')(partition(y, w), mask)
    y = merge(y, batch, *padded)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    x = x + attention.DropPath(self.drop_path)(y[:, :height, :width], train=train)
    y = attention.Mlp(dtype=self.dtype, name='mlp')(norm(name='norm2')(x), train=train)
    return x + attention.DropPath(self.drop_path)(y, train=train)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C] (module docstring)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    x = jnp.concatenate([x[:, row::2, col::2] for col in range(2) for row in range(2)], -1)
    x = nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name='norm')(x)
    return nn.Dense(2 * channels, use_bias=False, kernel_init=attention.dense_init,
                    dtype=self.dtype, name='reduction')(x)


class PatchEmbed(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/4), ceil(W/4), features]: zero padding to multiples of 4,
  the 4x4 stride-4 convolution `proj`, LayerNorm `norm`."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = PATCH_SIZE
    x = jnp.pad(images, ((0, 0), (0, -images.shape[1] % p), (0, -images.shape[2] % p),
                         (0, 0)))
    x = Conv(self.features, (p, p), strides=p, padding='VALID', dtype=self.dtype,
             kernel_init=attention.dense_init, name='proj')(x)
    return nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name='norm')(x)


class Stage(nn.Module):
  """`len(drop_paths)` blocks (`blocks_{j}`, odd ones shifted), then patch merging
  (`downsample`) unless `last`. -> (the blocks' output, the merged map or None)."""
  num_heads: int
  window: int
  drop_paths: tuple
  last: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    for j, rate in enumerate(self.drop_paths):
      x = Block(self.num_heads, self.window, self.window // 2 if j % 2 else 0, rate,
                self.dtype, name=f'blocks_{j}')(x, train=train)
    merged = None if self.last else PatchMerging(self.dtype, name='downsample')(x)
    return x, merged


class SwinTransformer(nn.Module):
  """Swin backbone returning its four stages' normalised features.

  Fields: `size` in SIZES; `width`: 0 for the size's C, else another multiple of 32 (heads
  = channels / 32; no published weights fit); `depths`: () for the size's blocks per stage,
  else 4 counts; `window_size`: 0 for 7, or 12; `drop_path_rate`: stochastic depth rate of
  the last block; `dtype`: compute dtype (parameters stay float32).
  """
  size: str = 'tiny'
  width: int = 0
  depths: tuple = ()
  window_size: int = 0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_config(self.size, self.width, tuple(self.depths), self.window_size)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> 4 features [B, ceil(H/s), ceil(W/s), 2^i C] at s = 4 ... 32."""
    width = self.width or SIZES[self.size][0]
    depths = tuple(self.depths) or SIZES[self.size][1]
    window = self.window_size or WINDOW_SIZES[0]
    rates = attention.drop_path_rates(self.drop_path_rate, sum(depths))
    x = PatchEmbed(width, self.dtype, name='patch_embed')(images.astype(self.dtype))
    features = []
    for i, depth in enumerate(depths):
      first = sum(depths[:i])
      out, x = Stage(width * 2**i // HEAD_DIM, window, rates[first:first + depth], i == 3,
                     self.dtype, name=f'stages_{i}')(x, train=train)
      features.append(nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype, name=f'norm_{i}')(out))
    return features
