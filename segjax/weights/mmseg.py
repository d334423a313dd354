"""mmsegmentation's names: ResNetV1c backbones and the DeepLab v3 (ASPPHead), DeepLab v3+
(DepthwiseSeparableASPPHead) and FCN (FCNHead) models whole, with their auxiliary FCN heads,
on ResNetV1c or (the 'b' configs) torchvision's ResNet.

An mmseg checkpoint is {'state_dict': {...}, 'meta': {...}} with the parts under
'backbone.', 'decode_head.' and 'auxiliary_head.'; its ResNet keeps torchvision's layer
names, with the deep stem as `stem.{0,3,6}` (convs) and `stem.{1,4,7}` (BatchNorms). A
ConvModule is `.conv` + `.bn`, a DepthwiseSeparableConvModule `.depthwise_conv` +
`.pointwise_conv`:

  mmseg key (decode_head.)        segjax flax path
  image_pool.1                    aspp/pool
  aspp_modules.0                  aspp/conv1x1
  aspp_modules.{i+1}              aspp/atrous{i} (v3+: depthwise / depthwise_bn / pointwise)
  bottleneck                      aspp/project
  c1_bottleneck                   decoder/low_level_project
  sep_bottleneck.{0,1}            decoder/conv1, decoder/conv2
  convs.{i}, conv_cat (FCN)       head/conv{i}, head/conv_cat
  conv_seg                        classifier (DeepLab), head/classifier (FCN)
  auxiliary_head.convs.0          aux_head/conv0
  auxiliary_head.conv_seg         aux_head/classifier

Its ViT (`VisionTransformer`) and Segmenter head (`SegmenterMaskTransformerHead`):

  mmseg key                                   segjax flax path
  backbone.patch_embed.projection             backbone/patch_embed/proj
  backbone.layers.{i}.ln1 / ln2               backbone/blocks_{i}/norm1 / norm2
  backbone.layers.{i}.attn.attn.in_proj_*     backbone/blocks_{i}/attn/qkv (q, k, v stacked)
  backbone.layers.{i}.attn.attn.out_proj      backbone/blocks_{i}/attn/proj
  backbone.layers.{i}.ffn.layers.0.0 / .1     backbone/blocks_{i}/mlp/fc1 / fc2
  backbone.ln1 (the final norm)               backbone/norm
  decode_head.dec_proj, cls_emb, layers.{i}   mask_decoder/proj_dec, cls_emb, blocks_{i}
  decode_head.decoder_norm, mask_norm         mask_decoder/decoder_norm, mask_norm
  decode_head.patch_proj / classes_proj       mask_decoder/proj_patch / proj_classes
"""
import math

import jax.numpy as jnp
import numpy as np

from segjax.models.backbones import vit
from segjax.weights import layout
from segjax.weights import torchvision

CONV_MODULE = {'Conv_0': 'conv', 'BatchNorm_0': 'bn'}
SEPARABLE = {'depthwise': 'depthwise_conv.conv', 'depthwise_bn': 'depthwise_conv.bn',
             'pointwise/Conv_0': 'pointwise_conv.conv',
             'pointwise/BatchNorm_0': 'pointwise_conv.bn'}


def resnet_v1c():
  """mmcv's / mmseg's `ResNetV1c` ImageNet state dict (open-mmlab://resnet50_v1c)."""
  return layout.Table('mmseg ResNetV1c', torchvision.resnet_key, part='backbone',
                      unused=('fc.',), input_key='stem.0.weight')


def _module(flax_name, source_name, inner=CONV_MODULE):
  return layout.submodules(flax_name, source_name, inner)


def _aux_head():
  return {**_module('aux_head/conv0', 'auxiliary_head.convs.0'),
          'aux_head/classifier': 'auxiliary_head.conv_seg'}


def _whole(description, model, head_names):
  unused = () if model.aux_head else ('auxiliary_head.',)
  first = 'stem.0.weight' if model.backbone_stem == 'deep' else 'conv1.weight'
  return layout.on_backbone(description, torchvision.resnet_key, head_names, unused, first)


def deeplab(model):
  """mmseg's DeepLab v3 (ASPPHead) / v3+ (DepthwiseSeparableASPPHead) on ResNetV1c."""
  rates = len(model.aspp_rates) or 3
  separable = model.variant == 'v3plus'
  names = {**_module('aspp/pool', 'decode_head.image_pool.1'),
           **_module('aspp/conv1x1', 'decode_head.aspp_modules.0'),
           **_module('aspp/project', 'decode_head.bottleneck'),
           'classifier': 'decode_head.conv_seg', **_aux_head()}
  for i in range(rates):
    names.update(_module(f'aspp/atrous{i}', f'decode_head.aspp_modules.{i + 1}',
                         SEPARABLE if separable else CONV_MODULE))
  if separable:
    names.update({**_module('decoder/low_level_project', 'decode_head.c1_bottleneck'),
                  **_module('decoder/conv1', 'decode_head.sep_bottleneck.0', SEPARABLE),
                  **_module('decoder/conv2', 'decode_head.sep_bottleneck.1', SEPARABLE)})
  head = 'DepthwiseSeparableASPPHead' if separable else 'ASPPHead'
  return _whole(f'mmseg {head}, ResNet-{model.backbone_depth}', model, names)


def fcn(model):
  """mmseg's FCNHead (`head_convs` convs, `head_concat_input`) on ResNetV1c."""
  names = {'head/classifier': 'decode_head.conv_seg', **_aux_head()}
  for i in range(model.head_convs):
    names.update(_module(f'head/conv{i}', f'decode_head.convs.{i}'))
  if model.head_concat_input:
    names.update(_module('head/conv_cat', 'decode_head.conv_cat'))
  return _whole(f'mmseg FCNHead, ResNet-{model.depth}', model, names)


def _transformer_module(modules):
  """mmseg's name of a ViT / mask-transformer module path (below backbone/ or the head)."""
  renames = {'patch_embed': 'patch_embed', 'proj': 'projection', 'norm1': 'ln1',
             'norm2': 'ln2', 'fc1': 'ffn.layers.0.0', 'fc2': 'ffn.layers.1', 'norm': 'ln1',
             'proj_dec': 'dec_proj', 'proj_patch': 'patch_proj',
             'proj_classes': 'classes_proj'}
  names = []
  for i, module in enumerate(modules):
    if module.startswith('blocks_'):
      names.append(f'layers.{module[len("blocks_"):]}')
    elif module == 'attn':
      names.append('attn.attn')
    elif module == 'proj' and i and modules[i - 1] == 'attn':
      names.append('out_proj')
    elif module != 'mlp':
      names.append(renames.get(module, module))
  return '.'.join(names)


def _transformer_key(collection, path):
  if path[-2:-1] == ('qkv',):  # nn.MultiheadAttention's packed projection
    leaf = {'kernel': 'in_proj_weight', 'bias': 'in_proj_bias'}[path[-1]]
    return f'{_transformer_module(path[:-2])}.{leaf}'
  return layout.module_keys(_transformer_module)(collection, path)


def _vit_from_torch(key, array, shape):
  """A checkpoint's position embeddings for another grid resized as mmseg's ViT does."""
  if key.endswith('pos_embed') and array.shape != shape:
    side = math.isqrt(shape[1] - 1)
    return np.asarray(vit.resample_pos_embed(jnp.asarray(array), (side, side), 'torch'))
  return array


def vit_table():
  """mmseg's `VisionTransformer` (the Segmenter recipes' ImageNet-21k backbone files)."""
  return layout.Table('mmseg ViT', _transformer_key, part='backbone', resizable=('pos_embed',),
                      from_torch=_vit_from_torch, input_key='patch_embed.projection.weight')


def segmenter(model):
  """mmseg's Segmenter: ViT + SegmenterMaskTransformerHead."""
  parts = {'backbone': ('backbone.', _transformer_key),
           'mask_decoder': ('decode_head.', _transformer_key)}
  return layout.Table(f'mmseg Segmenter ViT-{model.size}', layout.by_top_module(parts),
                      resizable=('backbone.pos_embed',), from_torch=_vit_from_torch,
                      input_key='backbone.patch_embed.projection.weight')


def tables(model):
  """(whole-model tables, backbone tables) of `model` in mmseg's names (its 'b' configs,
  e.g. fcn_r50b-d8, put the heads on torchvision's ResNet: `backbone_stem='torchvision'`)."""
  kind = type(model).__module__.rsplit('.', 1)[-1]
  if kind == 'deeplab' and model.backbone_width == 64:
    deep = model.backbone_stem == 'deep'
    return ([deeplab(model)] if model.head == 'mmseg' else []), [resnet_v1c()] if deep else []
  if kind == 'fcn' and model.width == 64 and not model.backbone.startswith('vgg'):
    whole = [fcn(model)] if model.variant == '8s_atrous' else []
    return whole, [resnet_v1c()] if model.backbone_stem == 'deep' else []
  if kind == 'segmenter' and model.encoder_style == 'mmseg' and model.stem == 'patch' and (
      model.depth in (0, vit.SIZES[model.size][1])):
    return ([segmenter(model)] if model.decoder == 'mask' else []), [vit_table()]
  return [], []
