"""timm's names: ViT, ConvNeXt and Swin backbones (`timm.models.vision_transformer`,
`convnext`, `swin_transformer`; the Hugging Face hub's `timm/vit_*`, `timm/convnext_*` and
`timm/swin_*` model.safetensors files, as timm >= 0.9 writes them).

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

ConvNeXt (`segjax.models.backbones.convnext`):

  timm key                                  segjax flax path (under backbone/)
  stem.0 / stem.1                           downsample_0/conv / norm
  stages.{i}.downsample.0 / .1              downsample_{i}/norm / conv
  stages.{i}.blocks.{j}.conv_dw, .norm, .mlp.fc1, .mlp.fc2, .gamma
                                            stages_{i}/blocks_{j}/dwconv, norm, pwconv1,
                                            pwconv2, gamma

Swin (`segjax.models.backbones.swin`):

  timm key                                  segjax flax path (under backbone/)
  patch_embed.proj / .norm                  patch_embed/proj / norm
  layers.{i}.blocks.{j}.norm1 / norm2       stages_{i}/blocks_{j}/norm1 / norm2
  ....attn.qkv (q, k, v stacked), .attn.relative_position_bias_table, .attn.proj
                                            .../attn/query, key, value,
                                            relative_position_bias_table, proj
  ....mlp.fc1 / .mlp.fc2                    .../mlp/fc1 / fc2
  layers.{i+1}.downsample.norm / .reduction  stages_{i}/downsample/norm / reduction (timm
                                            merges at the start of the next stage; the
                                            neighbour order is the official one)

timm's classifiers have no per-stage output norms (`norm_{i}`, named `norm{i}` here): they
keep their initialisation; the classifier's `head.*` (and Swin's final `norm`) is not used.
"""
import math

import jax.numpy as jnp
import numpy as np

from segjax.models.backbones import vit
from segjax.weights import layout
from segjax.weights import mmseg


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


def _convnext_module(modules):
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if top == 'downsample_0':
    return {'conv': 'stem.0', 'norm': 'stem.1'}[modules[1]]
  if kind == 'downsample':
    return f'stages.{index}.downsample.{("norm", "conv").index(modules[1])}'
  if kind == 'norm':
    return f'norm{index}'
  block = f'stages.{index}.blocks.{modules[1][len("blocks_"):]}'  # holding gamma itself
  names = {'dwconv': 'conv_dw', 'norm': 'norm', 'pwconv1': 'mlp.fc1', 'pwconv2': 'mlp.fc2'}
  return '.'.join([block] + [names[m] for m in modules[2:]])


_STAGE_NORMS = tuple(f'norm{i}.' for i in range(4))


def convnext_table():
  """timm's `ConvNeXt` state dict (an ImageNet classifier)."""
  return layout.Table('timm ConvNeXt', layout.module_keys(_convnext_module), part='backbone',
                      unused=('head.',), optional=_STAGE_NORMS, input_key='stem.0.weight')


_SWIN_BLOCK = {'norm1': 'norm1', 'norm2': 'norm2', 'attn': 'attn', 'attn/proj': 'attn.proj',
               'mlp/fc1': 'mlp.fc1', 'mlp/fc2': 'mlp.fc2'}


def _swin_module(modules):
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if top == 'patch_embed':
    return f'patch_embed.{modules[1]}'
  if kind == 'norm':
    return f'norm{index}'
  if modules[1] == 'downsample':
    return f'layers.{int(index) + 1}.downsample.{modules[2]}'
  block = modules[1][len('blocks_'):]
  return f'layers.{index}.blocks.{block}.{_SWIN_BLOCK["/".join(modules[2:])]}'


def swin_table(depths):
  """timm's `SwinTransformer` state dict (an ImageNet classifier) with `depths` blocks per
  stage; older files' relative_position_index buffers are recomputed, not read."""
  buffers = mmseg.swin_buffers(depths, 'layers.{i}.blocks.{j}.attn.relative_position_index')
  return layout.Table('timm Swin', layout.packed_qkv(_swin_module), part='backbone',
                      unused=('head.', 'norm.') + buffers, optional=_STAGE_NORMS,
                      input_key='patch_embed.proj.weight')


def tables(model):
  """(whole-model tables, backbone tables) of `model` in timm's names."""
  encoder = layout.hierarchical_encoder(model)
  if encoder and encoder[0] == 'convnext':
    return [], [convnext_table()]
  if encoder and encoder[0] == 'swin':
    return [], [swin_table(encoder[2])]
  if type(model).__module__.rsplit('.', 1)[-1] != 'segmenter':
    return [], []
  published = (model.depth in (0, vit.SIZES[model.size][1]) and model.stem == 'patch'
               and model.encoder_style == 'timm')
  return [], [vit_table()] if published else []
