"""SegFormer and its MiT encoder: parameter counts, backbone weights, the published parameter
groups (against mmengine's own constructor), field checks. Whole-model parity with the
reference implementations is in test_weights.py (the CHECKPOINTS recipes)."""
import functools
import os

import jax
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
from segjax.models.backbones import mit

# The paper's Table 1 (parameters in millions with the ADE20K head, 150 classes).
PAPER_PARAMS = {'b0': 3.8, 'b1': 13.7, 'b2': 27.5, 'b3': 47.3, 'b4': 64.1, 'b5': 84.7}


def segformer(num_classes=150, **fields):
  return models.get_model(ml_collections.ConfigDict({'name': 'segformer', **fields}),
                          num_classes)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('size', list(PAPER_PARAMS))
def test_parameter_counts_are_the_papers(size):
  params = test_weights.abstract_variables(segformer(size=size))['params']
  assert round(count(params) / 1e6, 1) == PAPER_PARAMS[size]


@pytest.mark.parametrize('size', [
    'b0', *(pytest.param(s, marks=pytest.mark.slow) for s in ('b1', 'b2', 'b3', 'b4', 'b5'))])
def test_parameter_counts_equal_the_reference_models(size):
  """Every parameter of transformers' model (the whole model with 150 classes, and its
  encoder without the decoder) is one of ours."""
  reference, _, _ = test_weights.hf_segformer(size)
  params = test_weights.abstract_variables(segformer(size=size))['params']
  assert count(params) == sum(p.numel() for p in reference.parameters())
  assert count(params['backbone']) == sum(p.numel() for p in reference.segformer.parameters())


def write_hf_encoder(path_dir, size='b0', seed=0):
  """transformers' ImageNet classifier (nvidia/mit-b0's architecture) saved as on the hub."""
  transformers = references.import_transformers()
  widths, depths = mit.SIZES[size]
  torch.manual_seed(seed)
  model = transformers.SegformerForImageClassification(transformers.SegformerConfig(
      depths=list(depths), hidden_sizes=list(widths), num_labels=1000)).eval()
  model.save_pretrained(path_dir)
  return model, os.path.join(path_dir, 'model.safetensors')


@pytest.fixture(scope='module')
def hf_encoder(tmp_path_factory):
  return write_hf_encoder(str(tmp_path_factory.mktemp('mit_b0')))


def encoder_features(model, variables, images):
  """The MiT maps of `model` (NHWC) for NCHW `images`."""
  backbone = mit.MiT(model.size, style=model.style)
  return backbone.apply({'params': variables['params']['backbone']},
                        images.transpose(0, 2, 3, 1), train=False)


def test_imagenet_encoder_file_loads_the_backbone_and_matches_its_features(hf_encoder):
  reference, path = hf_encoder
  model = segformer(num_classes=6)
  variables, part, message = weights.load(path, model, test_weights.abstract_variables(model))
  assert part == 'backbone', message
  assert 'loaded the backbone only (transformers MiT' in message
  assert 'not used from the file: classifier.* (2)' in message
  images = test_weights.images_nchw((64, 64), seed=1)
  with torch.no_grad():
    theirs = reference.segformer(torch.from_numpy(images), output_hidden_states=True)
  ours = encoder_features(model, variables, images)
  for mine, their in zip(ours, theirs.hidden_states):
    their = their.numpy().transpose(0, 2, 3, 1)
    assert mine.shape == their.shape
    assert test_weights.relative_difference(np.asarray(mine), their) < 1e-4


def test_mmseg_encoder_file_loads_the_backbone(tmp_path):
  reference = references.build_mmseg_model(
      'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py')
  path = str(tmp_path / 'mit_b0.pth')  # pretrain/segformer/mit_b0_*.pth: the bare encoder
  torch.save(reference.backbone.state_dict(), path)
  model = segformer(num_classes=6, style='mmseg')
  variables, part, message = weights.load(path, model, test_weights.abstract_variables(model))
  assert part == 'backbone' and 'loaded the backbone only (mmseg MiT' in message, message
  images = test_weights.images_nchw((52, 76), seed=2)
  with torch.no_grad():
    theirs = reference.backbone(torch.from_numpy(images))
  for mine, their in zip(encoder_features(model, variables, images), theirs):
    assert test_weights.relative_difference(np.asarray(mine),
                                            their.numpy().transpose(0, 2, 3, 1)) < 1e-4


def mmengine_groups(reference, paramwise_cfg):
  """{parameter name: (lr multiplier, weight-decay multiplier)} as mmengine's default
  constructor builds them for `reference` (the recipe's optim_wrapper)."""
  from mmengine.optim import DefaultOptimWrapperConstructor  # pylint: disable=g-import-not-at-top
  constructor = DefaultOptimWrapperConstructor(
      dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=1.0)),
      paramwise_cfg)
  groups = []
  constructor.add_params(groups, reference)
  names = file_names(reference)
  return {names[id(g['params'][0])]: (g.get('lr', 1.0), g.get('weight_decay', 1.0))
          for g in groups}


def file_names(reference):
  """{id(parameter): its key in the file the reference writes} (transformers 5 writes the
  hub's names back, not its in-memory ones)."""
  named = dict(reference.named_parameters())
  if hasattr(reference, 'save_pretrained'):
    from transformers.modeling_utils import revert_weight_conversion  # pylint: disable=g-import-not-at-top
    named = revert_weight_conversion(reference, named)
  return {id(p): n for n, p in named.items()}


SEGFORMER_PARAMWISE = dict(custom_keys={'pos_block': dict(decay_mult=0.),
                                        'norm': dict(decay_mult=0.),
                                        'head': dict(lr_mult=10.)})


@pytest.mark.parametrize('source,recipe', [('mmseg', 'mmseg_segformer_b0_ade'),
                                           ('hf', 'hf_segformer_b0_ade')])
def test_recipe_parameter_groups_are_mmengines(source, recipe):
  """The recipe's param_groups give every parameter the learning-rate and weight-decay
  multipliers mmengine gives the reference model's parameter of the same weights (for 'hf'
  the transformers model, whose names keep NVlabs' 'norm' and 'head' words)."""
  config = test_weights.recipe_config('segformer', recipe)
  model = models.get_model(config.model, 150)
  params = test_weights.abstract_variables(model)['params']
  if source == 'mmseg':
    reference = references.build_mmseg_model(
        'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py')
  else:
    reference = test_weights.hf_segformer('b0')[0]
  theirs = mmengine_groups(reference, SEGFORMER_PARAMWISE)
  table = weights.tables_for(model)[0][0]
  labels = optim.parameter_labels(config)(params)
  multipliers = optim._group_multipliers(config)  # pylint: disable=protected-access
  checked = 0
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    path = tuple(k.key for k in path)
    key = table.source_key('params', path)
    key = getattr(key, 'key', key)  # a packed q/k/v leaf: its tensor's multipliers
    lr_mult, decay_mult = multipliers[label]
    leaf = functools.reduce(lambda tree, k: tree[k], path, params)
    assert config.optimizer.decay == 'all' or leaf.ndim > 1
    assert (lr_mult, decay_mult) == theirs[key], (path, key)
    checked += 1
  assert checked == count(jax.tree.map(lambda _: np.zeros(1), params))


@pytest.mark.parametrize('fields,message', [
    (dict(size='b7'), "MiT size must be one of \\('b0', .*'b5'\\), got 'b7'"),
    (dict(style='nvlabs'), "SegFormer style must be one of \\('hf', 'mmseg'\\)"),
    (dict(channels=-1), 'SegFormer channels must be 0'),
    (dict(depth=3), "model 'segformer' has no field\\(s\\) \\['depth'\\]"),
])
def test_bad_fields_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    segformer(**fields)


def test_unknown_param_groups_are_refused():
  module = test_weights.experiment_module('segformer')
  with pytest.raises(ConfigError, match="unknown param_groups 'beit'; valid: \\['none'"):
    module.get_config('param_groups=beit')


def test_unet_on_the_mit_encoder_loads_its_imagenet_weights(hf_encoder):
  _, path = hf_encoder
  model = models.get_model(ml_collections.ConfigDict(
      {'name': 'unet', 'encoder': 'mit_b0', 'features': 8}), 6)
  initial = model.init(jax.random.key(0), np.zeros((1, 52, 76, 3), np.float32), train=False)
  variables, part, message = weights.load(path, model, jax.device_get(initial))
  assert part == 'backbone' and 'loaded the backbone only (transformers MiT' in message
  logits = model.apply(variables, np.zeros((1, 52, 76, 3), np.float32), train=False)
  assert logits.shape == (1, 52, 76, 6)
  # The encoder is the one of SegFormer: the same weights give the same features.
  images = test_weights.images_nchw((52, 76), seed=3)
  segformer_model = segformer(num_classes=6)
  ours = mit.MiT('b0').apply({'params': variables['params']['backbone']},
                             images.transpose(0, 2, 3, 1), train=False)
  loaded, _, _ = weights.load(path, segformer_model,
                              test_weights.abstract_variables(segformer_model))
  np.testing.assert_array_equal(ours[-1], encoder_features(segformer_model, loaded, images)[-1])


def test_unet_refuses_an_unknown_encoder():
  with pytest.raises(ConfigError, match="U-Net encoder must be '' .* got 'mit_b9'"):
    models.get_model(ml_collections.ConfigDict({'name': 'unet', 'encoder': 'mit_b9'}), 2)
