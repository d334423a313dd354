"""Segmenter (Strudel et al., 2021, arXiv 2105.05633): a ViT encoder and a linear or a mask
transformer decoder, as the official code (github.com/rstrudel/segmenter, segm/model).

Encoder: `vit.ViT` (timm's layout, its final LayerNorm applied, class token dropped), giving
patch tokens [B, h, w, D] with h = H / patch_size. Input height and width must be
divisible by `patch_size` (the official code pads instead). Its patch embedding can be
swapped for a convolutional stem (`stem='conv'`, same token grid), which Segmenter does not
use; it is what makes a small ViT trainable from scratch on the embedded dataset.

Decoders, each giving patch-level class scores [B, h, w, K] that are resized bilinearly
(half-pixel centres, as `F.interpolate(mode='bilinear')`) to [B, H, W, K]:

- 'linear' (Segmenter's linear baseline, SETR-naive style): a Dense D -> K per patch.
- 'mask' (the mask transformer): a Dense `proj_dec` D -> d_model, K learnable class
  embeddings `cls_emb` [1, K, d_model] appended to the N = h*w patch tokens,
  `decoder_layers` transformer blocks (the encoder's block; heads = d_model / 64,
  MLP 4 x d_model, dropout `decoder_dropout` = 0.1 and no drop path, as the official
  `mask_transformer` config), a LayerNorm `decoder_norm`, then the patch and class tokens
  are split, each projected by its own bias-free d_model x d_model matrix (`proj_patch`,
  `proj_classes`, initialised N(0, d_model^-1/2); there is no other scale factor),
  L2-normalised, and multiplied: masks = patches @ classes^T [B, N, K], cosine
  similarities in [-1, 1]. A LayerNorm over the K classes (`mask_norm`) turns them into
  the class scores. d_model = D (192/384/768/1024 for tiny/small/base/large), so the
  heads are 3/6/12/16. The decoder's LayerNorms use PyTorch's default epsilon 1e-5, as the
  official code (the encoder keeps timm's 1e-6).

The paper's recipe regularises the encoder with drop path 0.1 and no dropout; its
published models start from timm's ImageNet-21k "augreg" ViTs (the `_384` checkpoints for
/16) and keep their position embeddings at the training crop's grid: set
`pretrained_image_size` to the crop side and `vit.from_torch` resamples the checkpoint's
grid on loading. Inputs of another grid resample the stored embeddings bicubically, as
timm (the official Segmenter forward resamples bilinearly).
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.models import attention
from segjax.models.backbones import vit
from segjax.models.layers import resize_to

DECODERS = ('linear', 'mask')
DECODER_EPSILON = 1e-5  # torch.nn.LayerNorm's default, used by the official decoder
HEAD_DIM = 64  # the mask transformer's heads: d_model / 64


def _l2_normalize(x):
  """x / ||x|| over the last axis, in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class MaskTransformer(nn.Module):
  """Segmenter's mask transformer. Patch tokens [B, h, w, D] -> class scores [B, h, w, K]."""
  num_classes: int
  width: int
  num_layers: int = 2
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train):
    batch, h, w, _ = tokens.shape
    k = self.num_classes
    dense = functools.partial(nn.Dense, self.width, dtype=self.dtype)
    x = dense(kernel_init=attention.dense_init, name='proj_dec')(tokens.reshape(batch, h * w, -1))
    cls_emb = self.param('cls_emb', attention.dense_init, (1, k, self.width))
    x = jnp.concatenate(
        [x, jnp.broadcast_to(cls_emb, (batch, k, self.width)).astype(x.dtype)], axis=1)
    for i in range(self.num_layers):
      x = vit.Block(self.width // HEAD_DIM, self.dropout, epsilon=DECODER_EPSILON,
                    dtype=self.dtype, name=f'blocks_{i}')(x, train=train)
    x = nn.LayerNorm(epsilon=DECODER_EPSILON, dtype=self.dtype, name='decoder_norm')(x)
    projection = functools.partial(
        dense, use_bias=False, kernel_init=nn.initializers.normal(self.width ** -0.5))
    patches = _l2_normalize(projection(name='proj_patch')(x[:, :-k]))
    classes = _l2_normalize(projection(name='proj_classes')(x[:, -k:]))
    masks = jnp.einsum('bnd,bkd->bnk', patches, classes)  # cosine similarities
    masks = nn.LayerNorm(epsilon=DECODER_EPSILON, name='mask_norm')(masks)
    return masks.reshape(batch, h, w, k)


class Model(nn.Module):
  """Segmenter. Fields are checked at construction (ValueError naming the valid values).

  `size`: ViT size ('tiny', 'small', 'base', 'large'); `patch_size`: 8 or 16; `decoder`:
  'linear' or 'mask'; `decoder_layers`: blocks of the mask transformer (the paper: 2);
  `depth`: 0 for the size's encoder depth, else that many encoder blocks (a smaller model
  for quick experiments; it cannot load published weights); `drop_path_rate`: encoder
  stochastic depth (last block's rate); `dropout`: encoder dropout; `decoder_dropout`: the
  mask transformer's dropout; `pretrained_image_size`: image side the encoder's position
  embeddings are stored for (224 or 384 for timm's checkpoints; other input sizes
  resample them); `stem`, `stem_convs_per_stage`: the encoder's token embedding, timm's
  'patch' embedding (the paper's) or the 'conv' stem of Xiao et al. (2021; see `vit`),
  which has no published weights; `encoder_style`: 'timm' (the official code's encoder) or
  'mmseg' (mmsegmentation's: no patch-embedding bias, its position-embedding resize and
  input padding; see `vit`); `dtype`: compute dtype (parameters stay float32).
  """
  num_classes: int
  size: str = 'tiny'
  patch_size: int = 16
  decoder: str = 'mask'
  decoder_layers: int = 2
  depth: int = 0
  drop_path_rate: float = 0.1
  dropout: float = 0.0
  decoder_dropout: float = 0.1
  pretrained_image_size: int = 224
  stem: str = 'patch'
  stem_convs_per_stage: int = 1
  encoder_style: str = 'timm'
  dtype: Any = jnp.float32

  def __post_init__(self):
    vit.check_config(self.size, self.patch_size, self.pretrained_image_size, self.depth,
                     self.stem, self.stem_convs_per_stage)
    if self.decoder not in DECODERS:
      raise ValueError(f'unknown Segmenter decoder {self.decoder!r}; use one of {DECODERS}')
    if self.encoder_style not in vit.STYLES:
      raise ValueError(f'encoder_style must be one of {vit.STYLES}, got '
                       f'{self.encoder_style!r}')
    if self.decoder == 'mask' and (int(self.decoder_layers) != self.decoder_layers
                                   or self.decoder_layers < 1):
      raise ValueError(f'decoder_layers must be a positive int (the paper: 2), got '
                       f'{self.decoder_layers!r}')
    for field in ('drop_path_rate', 'dropout', 'decoder_dropout'):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f'{field} must be in [0, 1), got {getattr(self, field)!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train):
    """images [B, H, W, C] -> logits [B, H, W, num_classes] (float32)."""
    tokens = vit.ViT(self.size, self.patch_size, self.pretrained_image_size, self.depth,
                     self.drop_path_rate, self.dropout, self.stem, self.stem_convs_per_stage,
                     self.encoder_style, self.dtype, name='backbone')(images, train=train)
    if self.decoder == 'linear':
      scores = nn.Dense(self.num_classes, kernel_init=attention.dense_init, dtype=self.dtype,
                        name='head')(tokens)
    else:
      width = vit.SIZES[self.size][0]
      scores = MaskTransformer(self.num_classes, width, self.decoder_layers,
                               self.decoder_dropout, self.dtype, name='mask_decoder')(
                                   tokens, train=train)
    return resize_to(scores.astype(jnp.float32), *images.shape[1:3])
