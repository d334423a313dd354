"""UPerNet on ConvNeXt and Swin: parameter counts against the papers, whole-model parity with
transformers' and mmseg's code at reduced depths (every name table: the full-size recipes
run in test_weights.py, slow), the recipes' optimizer groups against mmseg's and
mmengine's own constructors, the CPU formulation of ConvNeXt's depthwise convolution, the
auxiliary head and field checks."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import references
from references import torch
import test_weights
from segjax import models
from segjax import optim
from segjax import weights
from segjax.errors import ConfigError
from segjax.models import upernet
from segjax.models.backbones import convnext
from segjax.weights import mmseg as mmseg_weights

# Millions of parameters. UPerNet with 150 classes and the auxiliary head: the ConvNeXt
# paper's Table 3 (ADE20K), which lists Swin's too. The ImageNet classifiers (1000 classes,
# the final norm): ConvNeXt's Table 1 and Swin's Table 1.
PAPER_UPERNET = {'convnext_tiny': 60, 'convnext_small': 82, 'convnext_base': 122,
                 'swin_tiny': 60, 'swin_small': 81, 'swin_base': 121}
PAPER_IMAGENET = {'convnext_tiny': 28.6, 'convnext_small': 50.2, 'convnext_base': 88.6,
                  'swin_tiny': 28.3, 'swin_small': 49.6, 'swin_base': 87.8}
DEPTHS = (2, 1, 2, 1)  # structure tests: a shifted Swin block in stages 1 and 3
MMSEG_CONFIGS = {'convnext': test_weights._MMSEG_UPERNET['convnext_tiny'],  # pylint: disable=protected-access
                 'swin': test_weights._MMSEG_UPERNET['swin_tiny']}  # pylint: disable=protected-access


def build(num_classes=150, **fields):
  return models.get_model(ml_collections.ConfigDict({'name': 'upernet', **fields}), num_classes)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('backbone', upernet.BACKBONES)
def test_parameter_counts_are_the_papers(backbone):
  """The whole model, and the backbone with an ImageNet classifier (8C x 1000 + 1000) and one
  final norm in place of the four stages' norms."""
  params = test_weights.abstract_variables(build(backbone=backbone))['params']
  assert round(count(params) / 1e6) == PAPER_UPERNET[backbone]
  last = params['backbone']['norm_3']['scale'].shape[0]
  stage_norms = sum(count(params['backbone'][f'norm_{i}']) for i in range(3))
  imagenet = count(params['backbone']) - stage_norms + last * 1000 + 1000
  assert round(imagenet / 1e6, 1) == PAPER_IMAGENET[backbone]


def reference_of(source, family, num_classes=150):
  """(reference model, NCHW images -> NCHW logits, path of its file) at DEPTHS."""
  if source == 'hf':
    reference, _, infer = test_weights.hf_upernet(f'{family}-tiny', num_classes, depths=DEPTHS)
    return reference, infer
  reference = test_weights.mmseg_upernet(MMSEG_CONFIGS[family], depths=DEPTHS)
  return reference, test_weights.mmseg_logits(reference)


def save(source, reference, tmp_path):
  if source == 'hf':
    reference.save_pretrained(str(tmp_path))  # the hub's file
    return str(tmp_path / 'model.safetensors')
  path = str(tmp_path / 'checkpoint.pth')
  torch.save({'state_dict': reference.state_dict(), 'meta': {}}, path)
  return path


@pytest.mark.parametrize('source,family', [
    ('hf', 'convnext'), ('mmseg', 'swin'),
    pytest.param('mmseg', 'convnext', marks=pytest.mark.slow),
    pytest.param('hf', 'swin', marks=pytest.mark.slow)])
def test_reference_file_loads_whole_and_gives_its_logits(source, family, tmp_path):
  """transformers' UperNetForSemanticSegmentation and mmseg's EncoderDecoder (random weights,
  BatchNorm statistics, LayerNorm affines, layer scales, position bias tables) at 2-1-2-1
  blocks: the file loads whole and the logits agree at 64x64 and 52x76."""
  reference, infer = reference_of(source, family)
  model = build(backbone=f'{family}_tiny', depths=DEPTHS)
  variables, part, message = weights.load(save(source, reference, tmp_path), model,
                                          test_weights.abstract_variables(model))
  assert part == 'model', message
  test_weights.assert_same_logits(model, variables, infer, 150)


def test_mmseg_patch_merging_order_round_trips():
  """mmseg's unfold order (c, row, column) <-> the official (column-major neighbour, c)."""
  table = mmseg_weights.upernet(build(backbone='swin_tiny'))
  key = 'backbone.stages.0.downsample.reduction.weight'
  official = np.arange(2 * 8 * 4 * 8, dtype=np.float32).reshape(16, 32)
  theirs = table.to_torch(key, official)
  np.testing.assert_array_equal(table.from_torch(key, theirs, None), official)
  # Input channel c of neighbour n (official index n * C + c) is mmseg's c * 4 + (row, col).
  row_col = {0: 0, 1: 2, 2: 1, 3: 3}  # official neighbours (0,0), (1,0), (0,1), (1,1)
  for n in range(4):
    for c in range(8):
      np.testing.assert_array_equal(theirs[:, c * 4 + row_col[n]], official[:, n * 8 + c])


def mmseg_convnext_reference():
  return test_weights.mmseg_upernet(MMSEG_CONFIGS['convnext'], depths=DEPTHS)


def parameter_multipliers(config, model):
  """{flax path: (lr multiplier, effective weight-decay multiplier)} of the recipe."""
  params = test_weights.abstract_variables(model)['params']
  labels = optim.parameter_labels(config)(params)
  multipliers = optim._group_multipliers(config)  # pylint: disable=protected-access
  out = {}
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    path = tuple(k.key for k in path)
    leaf = functools.reduce(lambda tree, k: tree[k], path, params)
    lr_mult, decay_mult = multipliers[label]
    decayed = config.optimizer.decay == 'all' or leaf.ndim > 1
    out[path] = (lr_mult, decay_mult if decayed else 0.0)
  return out


def mmseg_groups(reference, constructor):
  """{parameter name: (lr, weight decay)} of mmseg's / mmengine's `constructor` at base lr and
  weight decay 1."""
  groups = []
  constructor.add_params(groups, reference)
  names = {id(p): n for n, p in reference.named_parameters()}
  return {names[id(p)]: (g.get('lr', 1.0), g.get('weight_decay', 1.0))
          for g in groups for p in g['params']}


@pytest.mark.parametrize('family', ['convnext', 'swin'])
def test_recipe_parameter_groups_are_mmsegs(family):
  """Every parameter's learning-rate and weight-decay multipliers of the mmseg recipe equal
  those mmseg's LearningRateDecayOptimizerConstructor (ConvNeXt: stage-wise decay 0.9) or
  mmengine's DefaultOptimWrapperConstructor (Swin: custom_keys) give its tensor."""
  references.import_mmseg()
  from mmengine.optim import DefaultOptimWrapperConstructor  # pylint: disable=g-import-not-at-top
  from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor  # pylint: disable=g-import-not-at-top
  config = test_weights.recipe_config('upernet', f'mmseg_upernet_{family}_tiny_ade')
  config.model.depths = DEPTHS
  model = models.get_model(config.model, 150)
  wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=1.0))
  if family == 'convnext':
    reference = mmseg_convnext_reference()
    constructor = LearningRateDecayOptimizerConstructor(wrapper, dict(
        decay_rate=0.9, decay_type='stage_wise', num_layers=config.optimizer.layer_decay_layers))
  else:
    reference = test_weights.mmseg_upernet(MMSEG_CONFIGS['swin'], depths=DEPTHS)
    constructor = DefaultOptimWrapperConstructor(wrapper, dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.), 'relative_position_bias_table':
        dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
  theirs = mmseg_groups(reference, constructor)
  table = mmseg_weights.upernet(model)
  ours = parameter_multipliers(config, model)
  for path, (lr_mult, decay_mult) in ours.items():
    key = table.source_key('params', path)
    key = getattr(key, 'key', key)  # a packed q/k/v leaf: its tensor's multipliers
    np.testing.assert_allclose((lr_mult, decay_mult), theirs[key], rtol=1e-6, err_msg=key)
  assert len({getattr(k, 'key', k) for k in (table.source_key('params', p) for p in ours)}) \
      == len(theirs)


def test_layer_ids_are_mmsegs_stage_ids():
  references.import_mmseg()
  from mmseg.engine.optimizers.layer_decay_optimizer_constructor import get_stage_id_for_convnext  # pylint: disable=g-import-not-at-top
  model = build(backbone='convnext_tiny', depths=DEPTHS)
  params = test_weights.abstract_variables(model)['params']
  table = mmseg_weights.upernet(model)
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    path = tuple(k.key for k in path)
    # mmseg numbers num_layers + 2 layers internally
    expected = get_stage_id_for_convnext(table.source_key('params', path), 12 + 2)
    assert upernet.layer_id(path, 12) == expected, path


def test_training_sows_the_auxiliary_logits_at_input_size():
  model = build(num_classes=4, width=32, depths=(1, 1, 1, 1), channels=16, aux_channels=8)
  images = jax.ShapeDtypeStruct((2, 40, 36, 3), jnp.float32)
  variables = test_weights.abstract_variables(model, (40, 36))
  assert 'aux_head' in variables['params']
  train = functools.partial(model.apply, train=True, mutable=['batch_stats', 'intermediates'],
                            rngs={'dropout': jax.random.key(1)})
  logits, updates = jax.eval_shape(train, variables, images)
  (aux,) = updates['intermediates']['aux_logits']
  assert logits.shape == aux.shape == (2, 40, 36, 4)
  no_aux = build(num_classes=4, width=32, depths=(1, 1, 1, 1), channels=16, aux_head=False)
  assert 'aux_head' not in test_weights.abstract_variables(no_aux)['params']


@references.needs_torch
def test_adaptive_pooling_is_pytorchs():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for size in (1, 2, 3, 6):
    theirs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                                     size).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(upernet.adaptive_average_pool(jnp.asarray(x), size), theirs,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fields,message', [
    (dict(backbone='resnet50'), "unknown UPerNet backbone 'resnet50'; use one of \\('convnext_"),
    (dict(window_size=7), "window_size applies to Swin backbones only"),
    (dict(backbone='swin_tiny', layer_scale_init=1.0),
     'layer_scale_init applies to ConvNeXt backbones only'),
    (dict(backbone='swin_tiny', window_size=9), 'Swin window_size must be 0 \\(7\\) or one of'),
    (dict(backbone='swin_tiny', width=48), 'Swin width must be 0 .* multiple of 32'),
    (dict(depths=(1, 1, 1)), 'ConvNeXt depths must be \\(\\) .* or 4 positive ints'),
    (dict(width=-8), 'ConvNeXt width must be 0'),
    (dict(pool_scales=()), 'pool_scales must be a non-empty tuple of positive ints'),
    (dict(channels=0), 'channels must be a positive int \\(published: 512\\)'),
    (dict(drop_path_rate=1.0), 'drop_path_rate must be in \\[0, 1\\)'),
    (dict(heads=3), "model 'upernet' has no field\\(s\\) \\['heads'\\]"),
])
def test_bad_fields_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    build(**fields)


def test_reduced_widths_cannot_start_from_published_weights():
  with pytest.raises(ConfigError, match="model 'upernet' with these fields cannot start from"):
    weights.check_loadable(build(num_classes=6, width=32))


def test_unknown_param_groups_are_refused():
  module = test_weights.experiment_module('upernet')
  with pytest.raises(ConfigError, match="unknown param_groups 'beit'; valid: \\[''"):
    module.get_config('param_groups=beit')
