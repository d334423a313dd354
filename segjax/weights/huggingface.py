"""Hugging Face transformers' names: the `*ForSemanticSegmentation` models' `model.safetensors`
files (SegFormer, UperNet) whole, and their ImageNet backbones.

The hub's files keep the names of the transformers release that wrote them (transformers 5
renames modules in memory and writes the old names back on `save_pretrained`); those are
the names here. `SegformerForSemanticSegmentation` (nvidia/segformer-b*-finetuned-*) and
the ImageNet `SegformerForImageClassification` (nvidia/mit-b*), under 'segformer.encoder.':

  transformers key                           segjax flax path (under backbone/)
  patch_embeddings.{i}.proj / .layer_norm    patch_embed_{i}, patch_norm_{i}
  block.{i}.{j}.layer_norm_1 / _2            blocks_{i}_{j}/norm1 / norm2
  block.{i}.{j}.attention.self.query/key/value, .sr, .layer_norm
                                             blocks_{i}_{j}/attn/query/key/value, sr, sr_norm
  block.{i}.{j}.attention.output.dense       blocks_{i}_{j}/attn/proj
  block.{i}.{j}.mlp.dense1 / dwconv.dwconv / dense2
                                             blocks_{i}_{j}/mlp/fc1 / dwconv / fc2
  layer_norm.{i}                             norm_{i}
  (decode_head.) linear_c.{i}.proj           decode_head/linear_{i}
  (decode_head.) linear_fuse / batch_norm    decode_head/fuse/Conv_0 / BatchNorm_0
  (decode_head.) classifier                  decode_head/classifier

The ImageNet files' `classifier.*` is not used.

`UperNetForSemanticSegmentation` (openmmlab/upernet-convnext-* and upernet-swin-*: mmseg's
checkpoints converted, its module names with bn -> batch_norm and conv_seg -> classifier; the
head names in `mmseg`), with `ConvNextBackbone` or `SwinBackbone` under 'backbone.':

  transformers key                           segjax flax path (under backbone/)
  embeddings.patch_embeddings / .layernorm   downsample_0/conv / norm (ConvNeXt's stem)
  encoder.stages.{i}.downsampling_layer.0 / .1  downsample_{i}/norm / conv
  encoder.stages.{i}.layers.{j}.dwconv, .layernorm, .pwconv1, .pwconv2, .layer_scale_parameter
                                             stages_{i}/blocks_{j}/dwconv, norm, pwconv1,
                                             pwconv2, gamma
  hidden_states_norms.stage{i+1}             norm_{i} (ConvNeXt and Swin)
  embeddings.patch_embeddings.projection / embeddings.norm   patch_embed/proj / norm (Swin)
  encoder.layers.{i}.blocks.{j}.layernorm_before / _after    stages_{i}/blocks_{j}/norm1 / norm2
  ....attention.self.query/key/value, .relative_position_bias_table
                                             .../attn/query, key, value,
                                             relative_position_bias_table
  ....attention.output.dense, .intermediate.dense, .output.dense  .../attn/proj, mlp/fc1, fc2
  encoder.layers.{i}.downsample.norm / .reduction   stages_{i}/downsample/norm / reduction

The hub's Swin files also hold `relative_position_index` buffers (recomputed here), and
transformers 5 writes its SwinModel's unused final `swin.layernorm`: neither is loaded.

The same backbone names read the ImageNet classifiers (`ConvNextForImageClassification`,
facebook/convnext-*-224, under 'convnext.'; `SwinForImageClassification`,
microsoft/swin-*-patch4-window7-224, under 'swin.') into UPerNet's or U-Net's backbone. They
have no `hidden_states_norms` (the stage norms keep their initialisation); their pooled
`layernorm` and `classifier` are not used.
"""
from segjax.weights import layout
from segjax.weights import mmseg

_MIT_BLOCK = {'norm1': 'layer_norm_1', 'norm2': 'layer_norm_2',
              'attn/query': 'attention.self.query', 'attn/key': 'attention.self.key',
              'attn/value': 'attention.self.value', 'attn/sr': 'attention.self.sr',
              'attn/sr_norm': 'attention.self.layer_norm', 'attn/proj': 'attention.output.dense',
              'mlp/fc1': 'mlp.dense1', 'mlp/dwconv': 'mlp.dwconv.dwconv', 'mlp/fc2': 'mlp.dense2'}
_SEGFORMER_HEAD = {'fuse/Conv_0': 'linear_fuse', 'fuse/BatchNorm_0': 'batch_norm',
                   'classifier': 'classifier'}
MIT_PREFIX = 'segformer.encoder.'


def _mit_module(modules):
  """transformers' name of an MiT module path below backbone/ (below 'segformer.encoder.')."""
  top, rest = modules[0], '/'.join(modules[1:])
  kind, _, index = top.rpartition('_')
  if kind == 'patch_embed':
    return f'patch_embeddings.{index}.proj'
  if kind == 'patch_norm':
    return f'patch_embeddings.{index}.layer_norm'
  if kind == 'norm':
    return f'layer_norm.{index}'
  stage, block = top[len('blocks_'):].split('_')
  return f'block.{stage}.{block}.{_MIT_BLOCK[rest]}'


def _segformer_head_module(modules):
  name = '/'.join(modules)
  if name.startswith('linear_'):
    return f'linear_c.{name[len("linear_"):]}.proj'
  return _SEGFORMER_HEAD[name]


def mit():
  """transformers' `SegformerModel` encoder: the ImageNet nvidia/mit-b* files, or the encoder
  of a SegFormer checkpoint whose decoder does not fit."""
  return layout.Table('transformers MiT', layout.module_keys(_mit_module), part='backbone',
                      unused=('classifier.',), prefix=MIT_PREFIX,
                      input_key='patch_embeddings.0.proj.weight')


def segformer(model):
  """transformers' `SegformerForSemanticSegmentation` (style 'hf')."""
  parts = {'backbone': (MIT_PREFIX, layout.module_keys(_mit_module)),
           'decode_head': ('decode_head.', layout.module_keys(_segformer_head_module))}
  return layout.Table(f'transformers SegformerForSemanticSegmentation {model.size}',
                      layout.by_top_module(parts),
                      input_key=f'{MIT_PREFIX}patch_embeddings.0.proj.weight')

def _convnext_module(modules):
  """transformers' name of a ConvNeXt module path below backbone/ (`ConvNextBackbone`)."""
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if top == 'downsample_0':
    return {'conv': 'embeddings.patch_embeddings', 'norm': 'embeddings.layernorm'}[modules[1]]
  if kind == 'downsample':
    return f'encoder.stages.{index}.downsampling_layer.{("norm", "conv").index(modules[1])}'
  if kind == 'norm':
    return f'hidden_states_norms.stage{int(index) + 1}'
  block = f'encoder.stages.{index}.layers.{modules[1][len("blocks_"):]}'  # holding gamma
  names = {'dwconv': 'dwconv', 'norm': 'layernorm', 'pwconv1': 'pwconv1', 'pwconv2': 'pwconv2'}
  return '.'.join([block] + [names[m] for m in modules[2:]])


def _convnext_key(collection, path):
  if path[-1] == 'gamma':
    return f'{_convnext_module(path[:-1])}.layer_scale_parameter'
  return layout.module_keys(_convnext_module)(collection, path)


_SWIN_BLOCK = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
               'attn': 'attention.self', 'attn/query': 'attention.self.query',
               'attn/key': 'attention.self.key', 'attn/value': 'attention.self.value',
               'attn/proj': 'attention.output.dense', 'mlp/fc1': 'intermediate.dense',
               'mlp/fc2': 'output.dense'}


def _swin_module(modules):
  """transformers' name of a Swin module path below backbone/ (`SwinBackbone`)."""
  top = modules[0]
  kind, _, index = top.rpartition('_')
  if top == 'patch_embed':
    return {'proj': 'embeddings.patch_embeddings.projection',
            'norm': 'embeddings.norm'}[modules[1]]
  if kind == 'norm':
    return f'hidden_states_norms.stage{int(index) + 1}'
  if modules[1] == 'downsample':
    return f'encoder.layers.{index}.downsample.{modules[2]}'
  block = modules[1][len('blocks_'):]
  return f'encoder.layers.{index}.blocks.{block}.{_SWIN_BLOCK["/".join(modules[2:])]}'


_STAGE_NORMS = ('hidden_states_norms.',)


def convnext_backbones():
  """transformers' ConvNeXt: `ConvNextBackbone` / `ConvNextModel` files, and the ImageNet
  `ConvNextForImageClassification` (facebook/convnext-*-224) under 'convnext.', which lack
  the backbone's stage norms; the classifier's pooled `layernorm` is not used."""
  table = layout.Table('transformers ConvNext', _convnext_key, part='backbone',
                       unused=('layernorm.',), optional=_STAGE_NORMS,
                       input_key='embeddings.patch_embeddings.weight')
  return [table, table.with_prefix('convnext.')]


def swin_backbones(depths):
  """transformers' Swin, as `convnext_backbones` (microsoft/swin-*-patch4-window7-224
  `SwinForImageClassification` under 'swin.')."""
  buffers = mmseg.swin_buffers(
      depths, 'encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index')
  table = layout.Table('transformers Swin', layout.module_keys(_swin_module), part='backbone',
                       unused=('layernorm.',) + buffers, optional=_STAGE_NORMS,
                       input_key='embeddings.patch_embeddings.projection.weight')
  return [table, table.with_prefix('swin.')]


def upernet(model):
  """transformers' `UperNetForSemanticSegmentation` with a `ConvNextBackbone` or a
  `SwinBackbone` (openmmlab/upernet-{convnext,swin}-*: mmseg's checkpoints converted)."""
  family, size = model.backbone.split('_')
  head = mmseg.uper_head_module('batch_norm', 'classifier')
  description = f'transformers UperNetForSemanticSegmentation {family}-{size}'
  if family == 'convnext':
    return mmseg.upernet_table(description, model, _convnext_key,
                               'embeddings.patch_embeddings.weight', head)
  depths = layout.hierarchical_encoder(model)[2]
  # The hub's files (written before transformers made the index buffers non-persistent)
  # hold them; transformers 5 writes the unused final norm of its SwinModel.
  unused = ('backbone.swin.layernorm.',) + mmseg.swin_buffers(
      depths, 'backbone.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index')
  return mmseg.upernet_table(description, model, layout.module_keys(_swin_module),
                             'embeddings.patch_embeddings.projection.weight', head, unused)


def tables(model):
  """(whole-model tables, backbone tables) of `model` in transformers' names."""
  kind = type(model).__module__.rsplit('.', 1)[-1]
  if kind == 'segformer':
    return ([segformer(model)] if model.style == 'hf' else []), [mit()]
  encoder = layout.hierarchical_encoder(model)
  if not encoder:
    return [], []
  family, _, depths = encoder
  backbones = {'mit': lambda: [mit()], 'convnext': convnext_backbones,
               'swin': lambda: swin_backbones(depths)}[family]()
  return ([upernet(model)] if kind == 'upernet' else []), backbones
