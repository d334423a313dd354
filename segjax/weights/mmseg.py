"""mmsegmentation's names: ResNetV1c, ViT and MiT backbones; the DeepLab v3 (ASPPHead), DeepLab
v3+ (DepthwiseSeparableASPPHead) and FCN (FCNHead) models whole, with their auxiliary FCN
heads, on ResNetV1c or (the 'b' configs) torchvision's ResNet; Segmenter and SegFormer whole;
UPerNet on ConvNeXt (mmpretrain's) and Swin whole.

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

Its MiT (`MixVisionTransformer`) and `SegformerHead` (SegFormer, style 'mmseg'):

  mmseg key                                   segjax flax path
  backbone.layers.{i}.0.projection / .norm    backbone/patch_embed_{i}, patch_norm_{i}
  backbone.layers.{i}.1.{j}.norm1 / norm2     backbone/blocks_{i}_{j}/norm1 / norm2
  ....attn.attn.in_proj_* (q, k, v stacked)   backbone/blocks_{i}_{j}/attn/query, key, value
  ....attn.attn.out_proj, .attn.sr, .attn.norm  .../attn/proj, sr, sr_norm
  ....ffn.layers.0 / 1 / 4                    .../mlp/fc1 / dwconv / fc2 (fc1 and fc2 are 1x1
                                              convolutions there, Dense layers here)
  backbone.layers.{i}.2                       backbone/norm_{i}
  decode_head.convs.{i}, fusion_conv          decode_head/convs_{i}, fuse
  decode_head.conv_seg                        decode_head/classifier

Its UPerNet (`UPerHead`, the auxiliary `FCNHead`; `segjax.models.upernet`) on mmpretrain's
`ConvNeXt` (the upernet_convnext configs' `mmpretrain.ConvNeXt`) or its `SwinTransformer`:

  mmseg key                                   segjax flax path
  decode_head.psp_modules.{k}.1               decode_head/psp_{k} (conv + bn)
  decode_head.bottleneck / fpn_bottleneck     decode_head/bottleneck / fpn_bottleneck
  decode_head.lateral_convs.{i} / fpn_convs.{i}  decode_head/lateral_{i} / fpn_{i}
  decode_head.conv_seg                        decode_head/classifier
  auxiliary_head.convs.0 / conv_seg           aux_head/conv0 / classifier
  backbone.downsample_layers.0.0 / .0.1       backbone/downsample_0/conv / norm (the stem)
  backbone.downsample_layers.{i}.0 / .{i}.1   backbone/downsample_{i}/norm / conv
  backbone.stages.{i}.{j}.depthwise_conv, .norm, .pointwise_conv1, .pointwise_conv2, .gamma
                                              backbone/stages_{i}/blocks_{j}/dwconv, norm,
                                              pwconv1, pwconv2, gamma
  backbone.norm{i}                            backbone/norm_{i} (ConvNeXt and Swin)
  backbone.patch_embed.projection / .norm     backbone/patch_embed/proj / norm (Swin)
  backbone.stages.{i}.blocks.{j}.norm1 / norm2  backbone/stages_{i}/blocks_{j}/norm1 / norm2
  ....attn.w_msa.qkv (q, k, v stacked)        .../attn/query, key, value
  ....attn.w_msa.relative_position_bias_table, .proj  .../attn/relative_position_bias_table, proj
  ....ffn.layers.0.0 / .ffn.layers.1          .../mlp/fc1 / fc2
  backbone.stages.{i}.downsample.norm / .reduction
                                              backbone/stages_{i}/downsample/norm / reduction
                                              (4C axis in unfold order there: permuted)

Swin files also hold the `relative_position_index` buffers, which are recomputed here.

The backbone names alone read the ImageNet files mmseg's UPerNet configs start from, into
UPerNet's or U-Net's backbone: mmpretrain's ConvNeXt classifiers ('backbone.' keys with the
last stage's `norm3` only; `head.*` unused) and mmseg's pretrain/swin_*.pth (the official
classifiers converted by swin2mmseg: no stage norms; the final `norm` unused). Stage norms a
file lacks keep their initialisation, as in mmseg.
"""
import dataclasses
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



_MIT_BLOCK = {'norm1': 'norm1', 'norm2': 'norm2', 'attn/proj': 'attn.attn.out_proj',
              'attn/sr': 'attn.sr', 'attn/sr_norm': 'attn.norm', 'mlp/fc1': 'ffn.layers.0',
              'mlp/dwconv': 'ffn.layers.1', 'mlp/fc2': 'ffn.layers.4'}
_PACKED_QKV = ('attn/query', 'attn/key', 'attn/value')  # nn.MultiheadAttention's in_proj
_MIT_POINTWISE = ('ffn.layers.0.weight', 'ffn.layers.4.weight')  # 1x1 convs, Dense here


def _mit_module(modules):
  """mmseg's name of an MiT module path below backbone/."""
  top, rest = modules[0], '/'.join(modules[1:])
  kind, _, index = top.rpartition('_')
  if kind in ('patch_embed', 'patch_norm'):
    return f'layers.{index}.0.{"projection" if kind == "patch_embed" else "norm"}'
  if kind == 'norm':
    return f'layers.{index}.2'
  stage, block = top[len('blocks_'):].split('_')
  return f'layers.{stage}.1.{block}.{_MIT_BLOCK[rest]}'


def _mit_key(collection, path):
  module = '/'.join(path[1:-1])
  if module in _PACKED_QKV:
    stage, block = path[0][len('blocks_'):].split('_')
    leaf = {'kernel': 'in_proj_weight', 'bias': 'in_proj_bias'}[path[-1]]
    return layout.Packed(f'layers.{stage}.1.{block}.attn.attn.{leaf}',
                         _PACKED_QKV.index(module), 3)
  return layout.module_keys(_mit_module)(collection, path)


def _mit_to_torch(key, array):
  return array[:, :, None, None] if key.endswith(_MIT_POINTWISE) else array


def _mit_from_torch(key, array, shape):
  del key
  return array.reshape(array.shape[:2]) if array.ndim == 4 and len(shape) == 2 else array


def mit_table():
  """mmseg's `MixVisionTransformer` (pretrain/segformer/mit_b*.pth, converted from the
  official ImageNet weights)."""
  return layout.Table('mmseg MiT', _mit_key, part='backbone', to_torch=_mit_to_torch,
                      from_torch=_mit_from_torch, input_key='layers.0.0.projection.weight')


_SEGFORMER_HEAD = {'fuse/Conv_0': 'fusion_conv.conv', 'fuse/BatchNorm_0': 'fusion_conv.bn',
                   'classifier': 'conv_seg',
                   **{f'convs_{i}/{a}': f'convs.{i}.{b}' for i in range(4)
                      for a, b in CONV_MODULE.items()}}
_segformer_head_key = layout.named_modules(_SEGFORMER_HEAD)


def segformer(model):
  """mmseg's SegFormer: MixVisionTransformer + SegformerHead (style 'mmseg')."""
  parts = {'backbone': ('backbone.', _mit_key), 'decode_head': ('decode_head.',
                                                                _segformer_head_key)}
  return layout.Table(f'mmseg SegFormer {model.size}', layout.by_top_module(parts),
                      to_torch=_mit_to_torch, from_torch=_mit_from_torch,
                      input_key='backbone.layers.0.0.projection.weight')

def uper_head_module(norm='bn', classifier='conv_seg'):
  """mmseg's name of a module path below decode_head/ (UPerHead) or aux_head/ (FCNHead):
  psp_{k} -> psp_modules.{k}.1, lateral_{i} / fpn_{i} -> lateral_convs.{i} / fpn_convs.{i},
  conv0 -> convs.0, each ConvModule's conv and `norm`; classifier -> `classifier`. Hugging
  Face's conversion renamed only `norm` (batch_norm) and `classifier`."""
  inner = {'Conv_0': 'conv', 'BatchNorm_0': norm}

  def name(modules):
    top = modules[0]
    if top == 'classifier':
      return classifier
    kind, _, index = top.rpartition('_')
    if top in ('bottleneck', 'fpn_bottleneck'):
      prefix = top
    elif top == 'conv0':
      prefix = 'convs.0'
    else:
      prefix = {'psp': f'psp_modules.{index}.1', 'lateral': f'lateral_convs.{index}',
                'fpn': f'fpn_convs.{index}'}[kind]
    return f'{prefix}.{inner[modules[1]]}'

  return name


def upernet_table(description, model, backbone_key, input_key, head_module, unused=()):
  """A whole UPerNet `Table`: backbone/ under 'backbone.' by `backbone_key`, decode_head/
  and aux_head/ under 'decode_head.' / 'auxiliary_head.' by `head_module`; the auxiliary
  head's keys are unused by a model without it."""
  head_key = layout.module_keys(head_module)
  parts = {'backbone': ('backbone.', backbone_key), 'decode_head': ('decode_head.', head_key),
           'aux_head': ('auxiliary_head.', head_key)}
  unused = tuple(unused) + (() if model.aux_head else ('auxiliary_head.',))
  return layout.Table(description, layout.by_top_module(parts), unused=unused,
                      input_key=f'backbone.{input_key}')


def _convnext_module(modules):
  """mmpretrain's name of a ConvNeXt module path below backbone/."""
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if kind == 'downsample':  # the stem is (conv, norm), a downsampling layer (norm, conv)
    order = ('conv', 'norm') if index == '0' else ('norm', 'conv')
    return f'downsample_layers.{index}.{order.index(modules[1])}'
  if kind == 'norm':
    return f'norm{index}'
  block = f'stages.{index}.{modules[1][len("blocks_"):]}'  # holding gamma itself
  names = {'dwconv': 'depthwise_conv', 'norm': 'norm', 'pwconv1': 'pointwise_conv1',
           'pwconv2': 'pointwise_conv2'}
  return '.'.join([block] + [names[m] for m in modules[2:]])


def _swin_module(modules):
  """mmseg's name of a Swin module path below backbone/ (q, k, v: `layout.packed_qkv`)."""
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if top == 'patch_embed':
    return {'proj': 'patch_embed.projection', 'norm': 'patch_embed.norm'}[modules[1]]
  if kind == 'norm':
    return f'norm{index}'
  if modules[1] == 'downsample':
    return f'stages.{index}.downsample.{modules[2]}'
  names = {'norm1': 'norm1', 'norm2': 'norm2', 'attn': 'attn.w_msa',
           'attn/proj': 'attn.w_msa.proj', 'mlp/fc1': 'ffn.layers.0.0', 'mlp/fc2': 'ffn.layers.1'}
  return f'stages.{index}.blocks.{modules[1][len("blocks_"):]}.{names["/".join(modules[2:])]}'


_MERGING = ('downsample.reduction.weight', 'downsample.norm.weight', 'downsample.norm.bias')


def _merging_to_mmseg(key, array):
  """Swin's patch merging in the official (row, column, c) order -> mmseg's unfold
  (c, row, column) order, along the 4C axis (the last one)."""
  if not key.endswith(_MERGING):
    return array
  *lead, channels = array.shape
  array = array.reshape(*lead, 4, channels // 4)[..., [0, 2, 1, 3], :]
  return np.ascontiguousarray(np.swapaxes(array, -1, -2).reshape(*lead, channels))


def _merging_from_mmseg(key, array, shape):
  del shape
  if not key.endswith(_MERGING):
    return array
  *lead, channels = array.shape
  array = array.reshape(*lead, channels // 4, 4)[..., [0, 2, 1, 3]]
  return np.swapaxes(array, -1, -2).reshape(*lead, channels)


SWIN_KEY = layout.packed_qkv(_swin_module)
STAGE_NORMS = tuple(f'norm{i}.' for i in range(4))


def convnext_backbone():
  """mmpretrain's `ConvNeXt` (its ImageNet classifiers, e.g. convnext-tiny_3rdparty_32xb128-
  noema_in1k, which mmseg's UPerNet configs start from: they hold `norm3` only)."""
  return layout.Table('mmpretrain ConvNeXt', layout.module_keys(_convnext_module),
                      part='backbone', optional=STAGE_NORMS,
                      input_key='downsample_layers.0.0.weight')


def swin_backbone(depths):
  """mmseg's `SwinTransformer` (pretrain/swin_*.pth: the official ImageNet classifiers
  converted by swin2mmseg, whose final `norm` is not used)."""
  buffers = swin_buffers(depths, 'stages.{i}.blocks.{j}.attn.w_msa.relative_position_index')
  return layout.Table('mmseg Swin', SWIN_KEY, part='backbone', unused=('norm.',) + buffers,
                      optional=STAGE_NORMS, to_torch=_merging_to_mmseg,
                      from_torch=_merging_from_mmseg, input_key='patch_embed.projection.weight')


def swin_buffers(depths, prefix):
  """The relative_position_index buffers a Swin checkpoint holds (recomputed here), as key
  prefixes: `prefix`.format(i=stage, j=block)."""
  return tuple(prefix.format(i=i, j=j) for i, depth in enumerate(depths) for j in range(depth))


def upernet(model):
  """mmseg's UPerNet (UPerHead + FCNHead) on mmpretrain's ConvNeXt or mmseg's Swin."""
  family, size = model.backbone.split('_')
  head = uper_head_module()
  if family == 'convnext':
    return upernet_table(f'mmseg UPerNet ConvNeXt-{size}', model, layout.module_keys(
        _convnext_module), 'downsample_layers.0.0.weight', head)
  depths = layout.hierarchical_encoder(model)[2]
  buffers = swin_buffers(
      depths, 'backbone.stages.{i}.blocks.{j}.attn.w_msa.relative_position_index')
  table = upernet_table(f'mmseg UPerNet Swin-{size}', model, SWIN_KEY,
                        'patch_embed.projection.weight', head, buffers)
  return dataclasses.replace(table, to_torch=_merging_to_mmseg, from_torch=_merging_from_mmseg)


def tables(model):
  """(whole-model tables, backbone tables) of `model` in mmseg's names (its 'b' configs,
  e.g. fcn_r50b-d8, put the heads on torchvision's ResNet: `backbone_stem='torchvision'`)."""
  kind = type(model).__module__.rsplit('.', 1)[-1]
  if kind == 'deeplab' and model.backbone_width == 64 and not model.encoder:
    deep = model.backbone_stem == 'deep'
    return ([deeplab(model)] if model.head == 'mmseg' else []), [resnet_v1c()] if deep else []
  if kind == 'fcn' and model.width == 64 and not model.backbone.startswith('vgg'):
    whole = [fcn(model)] if model.variant == '8s_atrous' else []
    return whole, [resnet_v1c()] if model.backbone_stem == 'deep' else []
  if kind == 'segmenter' and model.encoder_style == 'mmseg' and model.stem == 'patch' and (
      model.depth in (0, vit.SIZES[model.size][1])):
    return ([segmenter(model)] if model.decoder == 'mask' else []), [vit_table()]
  if kind == 'segformer':
    return ([segformer(model)] if model.style == 'mmseg' else []), [mit_table()]
  encoder = layout.hierarchical_encoder(model)
  if not encoder:
    return [], []
  family, _, depths = encoder
  backbone = {'mit': mit_table, 'convnext': convnext_backbone,
              'swin': lambda: swin_backbone(depths)}[family]()
  return ([upernet(model)] if kind == 'upernet' else []), [backbone]
