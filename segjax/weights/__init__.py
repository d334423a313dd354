"""Published weights -> segjax variables (`config.init_from`): one module per source, each
mostly a name table from segjax's flax paths to the source's keys.

  reader       any weights file -> flat {key: float32 array} (.pth/.pt/.bin, .safetensors of
               any float dtype); mmseg's {'state_dict', 'meta'} and 'module.' unwrapped
  layout       `Table` (one source's names for a model or its backbone) and the layouts
  torchvision  ResNet / VGG16 / MobileNetV3 backbones; fcn_resnet50/101,
               deeplabv3_resnet50/101 and lraspp_mobilenet_v3_large whole
  mmseg        ResNetV1c, ViT and MiT backbones; DeepLab v3 / v3+, FCN, Segmenter,
               SegFormer and UPerNet (ConvNeXt, Swin) models whole
  timm         ViT backbones (the Hugging Face hub's timm/* files)
  huggingface  transformers' SegFormer and UperNet (ConvNeXt, Swin) models whole, their MiT
               backbones

`load` reads a file and loads every parameter it has for the model: the whole model
(backbone, decoder, heads, auxiliary head) when one of the model's whole-model tables fits
the file, else the backbone (a backbone file, or a segmentation checkpoint whose heads do
not fit, e.g. another class count), and says which. Keys may sit under a prefix ('model.'
for a whole model; 'backbone.' or 'model.backbone.' for a backbone in a larger file). A
file no table fits is refused with the missing, unexpected and mis-shaped keys of the
closest one. Model code never names a source's keys: the tables here do.
"""
import collections
import dataclasses

from segjax.errors import ConfigError
from segjax.weights import huggingface
from segjax.weights import layout
from segjax.weights import mmseg
from segjax.weights import reader
from segjax.weights import timm
from segjax.weights import torchvision

SOURCES = (torchvision, mmseg, timm, huggingface)
MODEL_PREFIXES = ('', 'model.')
BACKBONE_PREFIXES = ('', 'backbone.', 'model.backbone.')
_SHOWN_KEYS = 8  # keys listed per kind of mismatch

read_state_dict = reader.read_state_dict


def tables_for(model):
  """(whole-model tables, backbone tables) that published files of `model` could fit."""
  whole, backbone = [], []
  for source in SOURCES:
    source_whole, source_backbone = source.tables(model)
    whole += source_whole
    backbone += source_backbone
  return whole, backbone


def model_kind(model):
  return type(model).__module__.rsplit('.', 1)[-1]


def check_loadable(model):
  """Raises ConfigError when no published weights fit `model` (e.g. U-Net, a ResNet of width
  other than 64, a ViT of another depth)."""
  whole, backbone = tables_for(model)
  if not whole and not backbone:
    raise ConfigError(f'model {model_kind(model)!r} with these fields cannot start from '
                      'published weights (they need the published architecture: ResNet and '
                      'VGG widths 64, ViT depths of their size, the patch embedding); unset '
                      'init_from')


def _listed(keys):
  keys = sorted(keys)
  more = f' ... and {len(keys) - _SHOWN_KEYS} more' if len(keys) > _SHOWN_KEYS else ''
  return ', '.join(keys[:_SHOWN_KEYS]) + more


def _grouped(keys):
  """'decode_head.* (54), auxiliary_head.* (7)': keys counted by their first name."""
  counts = collections.Counter(key.split('.', 1)[0] for key in keys)
  return ', '.join(f'{name}.* ({count})' for name, count in counts.most_common())


@dataclasses.dataclass
class Fit:
  """How the keys of a file fit one table: what is missing, unexpected, mis-shaped, and
  which keys are not used (the table's `unused`, and the rest of a larger file)."""
  table: layout.Table
  matched: int
  missing: list
  unexpected: list
  misshaped: list
  unused: list
  adapted: list  # the input kernel, for another input channel count
  initialised: list  # the table's optional keys the file lacks

  @property
  def fits(self):
    return self.matched and not (self.missing or self.unexpected or self.misshaped)

  def problems(self):
    return '; '.join(f'{what} keys ({len(keys)}): {_listed(keys)}' for what, keys in
                     (('missing', self.missing), ('unexpected', self.unexpected),
                      ('mis-shaped', self.misshaped)) if keys)


def fit(table, state, like):
  """The `Fit` of `state` ({key: array}) to `table` over the model variables `like`."""
  expected = table.expected_shapes(table.subtree(like))
  inside, outside, unused = {}, [], []
  for key, array in state.items():
    if key.endswith('num_batches_tracked'):
      continue
    if key.startswith(table.unused):
      unused.append(key)
    elif key.startswith(table.prefix):
      inside[key] = array
    elif table.part == 'model':  # a whole model's file holds nothing but the model
      outside.append(key)
    else:  # the rest of a larger file (its heads)
      unused.append(key)
  absent = sorted(set(expected) - set(inside))
  initialised = [k for k in absent if k.startswith(table.optional)]
  missing = [k for k in absent if k not in initialised]
  unexpected = sorted(set(inside) - set(expected)) + sorted(outside)
  misshaped, adapted = [], []
  for k in sorted(set(inside) & set(expected)):
    shape = tuple(inside[k].shape)
    if k in table.resizable or shape == expected[k]:
      continue
    if table.input_channels_differ(k, shape, expected[k]):
      adapted.append(f'{k} from {shape[1]} to {expected[k][1]} input channels')
    else:
      misshaped.append(f'{k} {shape} (model: {expected[k]})')
  matched = len(set(inside) & set(expected))
  return Fit(table, matched, missing, unexpected, misshaped, unused, adapted, initialised)


def _candidates(model):
  whole, backbone = tables_for(model)
  return ([t.with_prefix(p) for t in whole for p in MODEL_PREFIXES]
          + [t.with_prefix(p) for t in backbone for p in BACKBONE_PREFIXES])


def load(path, model, variables):
  """-> (variables with the weights of the file at `path`, 'model' or 'backbone', a line
  saying what was loaded). variables: {'params': ..., 'batch_stats': ...} of the whole
  model, host arrays. Raises ConfigError when no table fits (module docstring)."""
  check_loadable(model)
  state = reader.read_state_dict(path)
  fits = [fit(table, state, variables) for table in _candidates(model)]
  chosen = next((f for f in fits if f.fits), None)
  if chosen is None:
    closest = max(fits, key=lambda f: f.matched / max(1, f.matched + len(f.missing)))
    raise ConfigError(f'init_from {path!r} does not fit model {model_kind(model)!r} (closest: '
                      f'{closest.table.description} {closest.table.part}); '
                      + closest.problems())
  table = chosen.table
  loaded = table.from_source(state, table.subtree(variables))
  if table.part == 'model':
    variables = {c: loaded.get(c, tree) for c, tree in variables.items()}
    what = f'loaded the whole model ({table.description}, {chosen.matched} tensors)'
  else:
    variables = {c: {**tree, 'backbone': loaded[c]} if c in loaded else tree
                 for c, tree in variables.items()}
    what = (f'loaded the backbone only ({table.description}, {chosen.matched} tensors); '
            'the other parts keep their initialisation')
    near = [f for f in fits if f.table.part == 'model' and f.matched]
    if near:
      best = max(near, key=lambda f: f.matched)
      what += f' (the whole-model keys do not fit: {best.problems()})'
  if chosen.adapted:
    what += (f'; adapted {", ".join(chosen.adapted)} (kernels repeated and scaled by weights '
             'channels / input channels; a single channel sums them)')
  if chosen.initialised:
    what += f'; not in the file, initialised: {_grouped(chosen.initialised)}'
  if chosen.unused:
    what += f'; not used from the file: {_grouped(chosen.unused)}'
  return variables, table.part, f'init_from {path}: {what}'
