"""timm's names: ViT backbones (`timm.models.vision_transformer`; the Hugging Face hub's
`timm/vit_*` model.safetensors files).

  timm key                          segjax flax path (under backbone/)   layout change
  cls_token, pos_embed              cls_token, pos_embed                 unchanged
  patch_embed.proj.weight / bias    patch_embed/proj/kernel / bias       (D, C, p, p) -> (p, p, C, D)
  blocks.{i}.norm1 / norm2          blocks_{i}/norm1 / norm2             weight -> scale
  blocks.{i}.attn.qkv / attn.proj   blocks_{i}/attn/qkv / proj           (O, I) -> (I, O)
  blocks.{i}.mlp.fc1 / fc2          blocks_{i}/mlp/fc1 / fc2
  norm                              norm

The classifier `head.*` (and old in21k files' `pre_logits.*`) is not used. A checkpoint's
position embeddings for another grid (224 -> 14 x 14) are resampled to the model's
(`vit.resample_pos_embed`, timm's bicubic with antialiasing).
"""
import math

import jax.numpy as jnp
import numpy as np

from segjax.models.backbones import vit
from segjax.weights import layout


def _vit_from_torch(key, array, shape):
  if key.endswith('pos_embed') and array.shape != shape:
    side = math.isqrt(shape[1] - 1)
    return np.asarray(vit.resample_pos_embed(jnp.asarray(array), (side, side)))
  return array


def vit_table():
  """timm's `VisionTransformer` state dict."""
  key = layout.module_keys(lambda modules: '.'.join(
      m.replace('blocks_', 'blocks.') for m in modules))
  return layout.Table('timm ViT', key, part='backbone', unused=('head.', 'pre_logits.'),
                      resizable=('pos_embed',), from_torch=_vit_from_torch,
                      input_key='patch_embed.proj.weight')


def tables(model):
  """(whole-model tables, backbone tables) of `model` in timm's names."""
  if type(model).__module__.rsplit('.', 1)[-1] != 'segmenter':
    return [], []
  published = (model.depth in (0, vit.SIZES[model.size][1]) and model.stem == 'patch'
               and model.encoder_style == 'timm')
  return [], [vit_table()] if published else []
