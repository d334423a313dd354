"""Name tables: how a source names the variables of a segjax module tree, and their layouts.

A `Table` maps each flax leaf (collection, path) of a whole model or of its 'backbone'
subtree to the source's key; the leaves convert by kind:

  flax (collection, leaf)          PyTorch          layout
  params kernel, 4-D (conv)        weight           [kh, kw, I, O] <-> [O, I, kh, kw]
  params kernel, 2-D (dense)       weight           [I, O] <-> [O, I]
  params scale (norm)              weight
  params bias                      bias
  batch_stats mean / var           running_mean / running_var
  any other leaf (e.g. pos_embed)  its own name     unchanged

A depthwise kernel [kh, kw, 1, C] is PyTorch's [C, 1, kh, kw] by the same rule. A source
that packs several flax leaves into one tensor (nn.MultiheadAttention's `in_proj_weight` holds
the query, key and value projections) names each leaf with a `Packed` key: the leaf is one
of `count` equal slices along the source tensor's first axis.

The first convolution's kernel (`Table.input_key`) adapts to another input channel count,
as segmentation_models_pytorch's `patch_first_conv` does (`adapt_input_channels`), so RGB
weights start RGB-D, multispectral or grayscale models.
"""
import dataclasses
from typing import Callable

import flax.traverse_util
import numpy as np

from segjax.models import backbones

LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


@dataclasses.dataclass(frozen=True)
class Packed:
  """A `Table.key` result for a leaf stored as slice `index` of `count` equal slices along
  axis 0 of the source tensor `key` (in the source's layout)."""
  key: str
  index: int
  count: int


def prefixed(prefix, key):
  """A `Table.key` result (a str or a `Packed`) with its source key under `prefix`."""
  if isinstance(key, Packed):
    return dataclasses.replace(key, key=prefix + key.key)
  return prefix + key


def kernel_to_torch(array):
  # Contiguous, so that writers that dump raw buffers (safetensors) store the new layout.
  return np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T)


def kernel_from_torch(array):
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def module_keys(module_name):
  """A `Table.key` from `module_name(flax module path) -> source module name` ('' for the
  root) and the leaf names of LEAF_NAMES."""

  def key(collection, path):
    *modules, leaf = path
    prefix = module_name(tuple(modules))
    name = LEAF_NAMES.get((collection, leaf), leaf)
    return f'{prefix}.{name}' if prefix else name

  return key


QKV = ('query', 'key', 'value')


def packed_qkv(module_name):
  """A `Table.key` like `module_keys(module_name)` for a model whose attention's query, key
  and value Dense layers are one `qkv` Linear in the source (Swin's)."""

  def key(collection, path):
    if path[-2] in QKV:
      leaf = LEAF_NAMES.get((collection, path[-1]), path[-1])
      return Packed(f'{module_name(path[:-2])}.qkv.{leaf}', QKV.index(path[-2]), 3)
    return module_keys(module_name)(collection, path)

  return key


def dotted(path, renames=None):
  """('layer2_0', 'conv1') -> 'layer2.0.conv1': '_' becomes '.', and modules named in
  `renames` ({flax name: source name}) are renamed first."""
  renames = renames or {}
  return '.'.join(renames.get(p, p.replace('_', '.')) for p in path)


def by_top_module(parts):
  """A `Table.key` for a whole model from {flax top-level module: (source prefix, key of
  the path below it)}, e.g. {'backbone': ('backbone.', resnet_key), 'aspp': (...)}."""

  def key(collection, path):
    source_prefix, below = parts[path[0]]
    return prefixed(source_prefix, below(collection, path[1:]))

  return key


def named_modules(names):
  """A `Table.key` from {flax module path 'a/b/c': source module name}."""
  return module_keys(lambda modules: names['/'.join(modules)])


def submodules(flax_name, source_name, inner):
  """{f'{flax_name}/{a}': f'{source_name}.{b}'} for each {a: b} of `inner`: the names of a
  block's inner modules (a ConvBNReLU's 'Conv_0' and 'BatchNorm_0', say)."""
  return {f'{flax_name}/{a}': f'{source_name}.{b}' for a, b in inner.items()}


def on_backbone(description, backbone_key, head_names, unused=(), input_key=''):
  """A whole-model `Table`: flax 'backbone/...' named by `backbone_key` under the source's
  'backbone.', every other top-level module by `head_names` ({flax module path: source
  module name}); `input_key`: the backbone's first kernel (without 'backbone.')."""
  parts = {'backbone': ('backbone.', backbone_key)}
  head_key = named_modules(head_names)
  for top in {name.split('/')[0] for name in head_names}:
    parts[top] = ('', lambda collection, path, top=top: head_key(collection, (top, *path)))
  return Table(description, by_top_module(parts), unused=unused,
               input_key=input_key and f'backbone.{input_key}')


def hierarchical_encoder(model):
  """(family, size, blocks per stage) of the MiT, ConvNeXt or Swin backbone of a U-Net or
  DeepLab, or of a UPerNet at its published widths (the ones published weights fit), else
  None."""
  kind = type(model).__module__.rsplit('.', 1)[-1]
  if kind in ('unet', 'deeplab') and model.encoder:
    encoder, depths = model.encoder, ()
  elif kind == 'upernet' and not model.width:
    encoder, depths = model.backbone, model.depths
  else:
    return None
  family, size = encoder.split('_')
  return family, size, backbones.blocks_per_stage(encoder, depths)


def adapt_input_channels(kernel, channels):
  """A PyTorch conv kernel [O, I, kh, kw] (I: the weights' input channels, 3 for RGB) for
  `channels` inputs: one channel gets the sum over I (a gray image g gives what the RGB
  weights give on (g, g, g)); more get the I kernels repeated cyclically and scaled by
  I / channels (an image made of the RGB image repeated gives what the RGB weights give on
  it); fewer, other than one, take the first `channels` of them unscaled."""
  kernel = np.asarray(kernel)
  weights_channels = kernel.shape[1]
  if channels == 1:
    return kernel.sum(axis=1, keepdims=True)
  if channels < weights_channels:
    return np.ascontiguousarray(kernel[:, :channels])
  repeated = kernel[:, np.arange(channels) % weights_channels]
  return repeated * (weights_channels / channels)


def _identity(key, array, shape=None):
  del key, shape
  return array


@dataclasses.dataclass(frozen=True)
class Table:
  """One source's names for the variables of a segjax model ('model') or its backbone.

  key: (collection, flax path) -> the source's key. unused: prefixes of source keys that
  are not loaded (an ImageNet classifier). optional: prefixes of the table's keys that a
  file may lack; their leaves keep the model's initialisation (the per-stage output norms
  that segmentation backbones add to an ImageNet classifier). resizable: source keys whose
  shape may differ from the model's (`from_torch` resamples them, e.g. ViT position
  embeddings).
  to_torch / from_torch: per-key array conversions beyond the kernel transposes
  ((key, array) -> array and (key, array, flax shape) -> array).
  """
  description: str
  key: Callable
  part: str = 'model'  # 'model': all variables; 'backbone': each collection's 'backbone'
  unused: tuple = ()
  optional: tuple = ()
  resizable: tuple = ()
  to_torch: Callable = _identity
  from_torch: Callable = _identity
  prefix: str = ''  # prepended to every key (e.g. 'backbone.' inside a whole checkpoint)
  input_key: str = ''  # the first convolution's kernel (after `prefix`), adapted to the
  # model's input channel count

  def input_channels_differ(self, key, source_shape, expected_shape):
    """Whether `key` is the input kernel and its shapes differ in input channels only."""
    return (bool(self.input_key) and key == self.prefix + self.input_key
            and len(source_shape) == len(expected_shape) == 4
            and source_shape[:1] + source_shape[2:] == expected_shape[:1] + expected_shape[2:])

  def subtree(self, variables):
    """The variables this table names: the whole model's or {collection: backbone tree}."""
    if self.part == 'model':
      return variables
    return {c: tree['backbone'] for c, tree in variables.items() if 'backbone' in tree}

  def source_key(self, collection, path):
    """The source's key of a leaf: a str, or a `Packed` slice of one."""
    return prefixed(self.prefix, self.key(collection, path))

  def to_source(self, variables):
    """{collection: tree} of this table's part -> flat {source key: numpy array}."""
    state, slices = {}, {}
    for collection, tree in variables.items():
      for path, array in flax.traverse_util.flatten_dict(tree).items():
        array = np.asarray(array)
        key = self.source_key(collection, path)
        array = kernel_to_torch(array) if path[-1] == 'kernel' else array
        if isinstance(key, Packed):
          slices.setdefault(key.key, [None] * key.count)[key.index] = array
        else:
          state[key] = self.to_torch(key, array)
    for key, parts in slices.items():
      state[key] = self.to_torch(key, np.concatenate(parts, axis=0))
    return state

  def expected_shapes(self, like):
    """{source key: shape} of this table's part of `like` (arrays or shape structs)."""
    shapes = {}
    for collection, tree in like.items():
      for path, leaf in flax.traverse_util.flatten_dict(tree).items():
        key = self.source_key(collection, path)
        dummy = np.empty(leaf.shape, np.uint8)  # shapes only, the layout rules need arrays
        dummy = kernel_to_torch(dummy) if path[-1] == 'kernel' else dummy
        if isinstance(key, Packed):
          key, dummy = key.key, np.empty((key.count * len(dummy), *dummy.shape[1:]), np.uint8)
        shapes[key] = tuple(self.to_torch(key, dummy).shape)
    return shapes

  def from_source(self, state, like):
    """Inverse of `to_source`: float32 variables shaped like `like` from `state`; the
    `optional` leaves that `state` lacks are `like`'s."""
    variables = {}
    for collection, tree in like.items():
      flat = {}
      for path, leaf in flax.traverse_util.flatten_dict(tree).items():
        key = self.source_key(collection, path)
        if isinstance(key, str) and key not in state and key.startswith(self.optional):
          flat[path] = leaf
          continue
        if isinstance(key, Packed):
          packed = np.asarray(state[key.key], np.float32)
          size = len(packed) // key.count
          key, array = key.key, packed[key.index * size:(key.index + 1) * size]
        else:
          array = np.asarray(state[key], np.float32)
        if path[-1] == 'kernel' and len(leaf.shape) == 4 and self.input_channels_differ(
            key, array.shape, (leaf.shape[3], leaf.shape[2], *leaf.shape[:2])):
          array = adapt_input_channels(array, leaf.shape[2])
        array = self.from_torch(key, array, tuple(leaf.shape))
        flat[path] = kernel_from_torch(array) if path[-1] == 'kernel' else array
      variables[collection] = flax.traverse_util.unflatten_dict(flat)
    return variables

  def with_prefix(self, prefix, description=None):
    """This table with every key under `prefix` (a backbone inside a whole checkpoint)."""
    return dataclasses.replace(self, prefix=prefix + self.prefix,
                               description=description or self.description,
                               unused=tuple(prefix + u for u in self.unused),
                               optional=tuple(prefix + o for o in self.optional),
                               resizable=tuple(prefix + r for r in self.resizable))
