"""DeepLab v3 / v3+: output and backbone strides, ASPP rates, field checks, parameter counts.

Shapes and counts come from `jax.eval_shape`, so only one small ResNet-18 model is run.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from segjax import models
from segjax.errors import ConfigError
from segjax.models import deeplab
from segjax.models.layers import ConvBNReLU


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def traced_init(model, images):
  """(logits, variables, backbone features, {ConvBNReLU path: dilation}) as shapes only."""
  dilations = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvBNReLU) and context.method_name == '__call__':
      dilations['/'.join(context.module.path)] = context.module.dilation
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(record):
      return model.init_with_output(
          jax.random.key(0), x, train=False, mutable=True,
          capture_intermediates=lambda module, _: module.name == 'backbone')

  logits, variables = jax.eval_shape(init, images)
  features = variables.pop('intermediates')['backbone']['__call__'][0]
  return logits, variables, features, dilations


@pytest.mark.parametrize('variant', deeplab.VARIANTS)
@pytest.mark.parametrize('output_stride,rates', [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_logits_at_input_size_backbone_stride_and_paper_aspp_rates(variant, output_stride,
                                                                   rates):
  model = deeplab.Model(num_classes=5, variant=variant, backbone_depth=18,
                        output_stride=output_stride)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  logits, variables, features, dilations = traced_init(model, images)
  assert logits.shape == (2, 64, 64, 5) and logits.dtype == jnp.float32
  size = 64 // output_stride
  assert features['stage4'].shape == (2, size, size, 512)  # the ASPP input
  assert features['stage1'].shape == (2, 16, 16, 64)  # the v3+ low-level input
  aspp = {path.split('/')[-1]: rate for path, rate in dilations.items() if 'aspp' in path}
  assert aspp == {'conv1x1': 1, 'atrous0': rates[0], 'atrous1': rates[1],
                  'atrous2': rates[2], 'pool': 1, 'project': 1}
  assert ('decoder' in variables['params']) == (variant == 'v3plus')


def test_aspp_rates_are_the_papers_unless_custom_rates_are_allowed():
  assert deeplab.aspp_rates_for(16) == (6, 12, 18)
  assert deeplab.aspp_rates_for(8) == (12, 24, 36)
  assert deeplab.aspp_rates_for(8, (12, 24, 36)) == (12, 24, 36)
  assert deeplab.aspp_rates_for(8, (6, 12, 18), allow_custom=True) == (6, 12, 18)
  assert deeplab.aspp_rates_for(16, (3, 6, 9, 12), allow_custom=True) == (3, 6, 9, 12)
  message = ('aspp_rates (6, 12, 18) are the OS16 rates but output_stride is 8; '
             'use (12, 24, 36) or set allow_custom_rates=True')
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    deeplab.Model(num_classes=2, output_stride=8, aspp_rates=(6, 12, 18))
  with pytest.raises(ValueError, match=r"\(3, 6, 9\) are not the paper's rates for "
                                       r'output_stride 16; use \(6, 12, 18\)'):
    deeplab.aspp_rates_for(16, (3, 6, 9))
  with pytest.raises(ValueError, match='positive ints'):
    deeplab.aspp_rates_for(16, (0, 6, 12), allow_custom=True)
  model = deeplab.Model(num_classes=2, backbone_depth=18, output_stride=8,
                        aspp_rates=(6, 12, 18), allow_custom_rates=True)
  _, _, _, dilations = traced_init(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert [dilations[f'aspp/atrous{i}'] for i in range(3)] == [6, 12, 18]


@pytest.mark.parametrize('fields,message', [
    ({'variant': 'v2'}, r"unknown DeepLab variant 'v2'; use one of \('v3', 'v3plus'\)"),
    ({'output_stride': 32}, 'DeepLab output_stride must be 8 or 16, got 32'),
    ({'backbone_depth': 152}, r'backbone_depth must be one of \[18, 34, 50, 101\]'),
    ({'multi_grid': ()}, 'multi_grid must be a non-empty tuple'),
])
def test_bad_fields_are_refused_at_construction(fields, message):
  with pytest.raises(ValueError, match=message):
    deeplab.Model(num_classes=2, **fields)


@pytest.mark.parametrize('depth,low_level_channels', [(18, 64), (50, 256)])
def test_v3plus_decoder_projects_stage1_to_48_channels(depth, low_level_channels):
  model = deeplab.Model(num_classes=3, backbone_depth=depth)
  _, variables, _, _ = traced_init(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  decoder = variables['params']['decoder']
  assert decoder['low_level_project']['Conv_0']['kernel'].shape == (
      1, 1, low_level_channels, 48)
  assert decoder['conv1']['Conv_0']['kernel'].shape == (3, 3, 256 + 48, 256)
  assert decoder['conv2']['Conv_0']['kernel'].shape == (3, 3, 256, 256)
  aspp_project = variables['params']['aspp']['project']['Conv_0']['kernel']
  assert aspp_project.shape == (1, 1, 5 * 256, 256)  # 1x1 + 3 atrous + image pooling


def test_without_aspp_a_1x1_projection_replaces_it():
  model = deeplab.Model(num_classes=3, variant='v3', backbone_depth=18, aspp=False,
                        aspp_features=32)
  logits, variables, _, dilations = traced_init(
      model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert logits.shape == (1, 32, 32, 3)
  assert 'aspp' not in variables['params']
  assert variables['params']['head_project']['Conv_0']['kernel'].shape == (1, 1, 512, 32)
  assert variables['params']['classifier']['kernel'].shape == (1, 1, 32, 3)
  assert not any(path.startswith('aspp') for path in dilations)
  with_aspp = deeplab.Model(num_classes=3, variant='v3', backbone_depth=18, aspp_features=32)
  _, aspp_variables, _, _ = traced_init(
      with_aspp, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  # ASPP's branches: 1x1 and 3 atrous 3x3 on 512 channels, pooling 1x1, 5x32 -> 32 project.
  aspp_params = num_params(aspp_variables['params']['aspp'])
  assert aspp_params == (512 * 32 + 3 * 9 * 512 * 32 + 512 * 32 + 5 * 32 * 32) + 6 * 2 * 32
  assert num_params(variables['params']) == (
      num_params(aspp_variables['params']) - aspp_params + 512 * 32 + 2 * 32)


def test_v3_resnet50_parameter_count_equals_torchvision_without_aux_and_head_conv():
  # torchvision's deeplabv3_resnet50 (21 classes, aux_loss=True) has 42,004,074 parameters.
  # Excluded: its aux classifier FCNHead(1024, 21) (3x3 conv 1024->256 without bias, BN,
  # 1x1 conv 256->21 with bias: 2,359,296 + 512 + 5,397), and the 3x3 conv (no bias) + BN
  # that its DeepLabHead adds after ASPP and the paper does not have (589,824 + 512).
  # Its backbone (no fc), ASPP (with image pooling) and 1x1 classifier match ours.
  expected = 42_004_074 - (2_359_296 + 512 + 5_397) - (589_824 + 512)
  model = deeplab.Model(num_classes=21, variant='v3', backbone_depth=50, output_stride=8)
  _, variables, _, _ = traced_init(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert num_params(variables['params']) == expected == 39_048_533


def test_train_mode_dropout_batchnorm_and_frozen_bn():
  model = deeplab.Model(num_classes=4, backbone_depth=18, aspp_features=16,
                        low_level_features=8, decoder_features=16)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (2, 32, 32, 4) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))

  def train_apply(model, dropout_seed):
    return model.apply(variables, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(dropout_seed)})

  a, updates = train_apply(model, 0)
  b, _ = train_apply(model, 1)
  assert a.shape == logits.shape and not jnp.allclose(a, b)  # dropout draws differ
  changed = jax.tree.map(lambda x, y: bool(jnp.any(x != y)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))
  # Frozen BatchNorm and no dropout: training computes exactly what evaluation does.
  frozen, updates = train_apply(model.clone(frozen_bn=True, dropout=0.0), 0)
  assert jnp.allclose(frozen, logits, atol=1e-5)
  unchanged = jax.tree.map(lambda x, y: bool(jnp.all(x == y)), updates['batch_stats'],
                           variables['batch_stats'])
  assert all(jax.tree.leaves(unchanged))


def test_get_model_builds_deeplab_and_turns_bad_fields_into_config_errors():
  config = ml_collections.ConfigDict({'name': 'deeplab', 'variant': 'v3', 'backbone_depth': 18,
                                      'output_stride': 8})
  model = models.get_model(config, num_classes=6)
  assert isinstance(model, deeplab.Model) and model.num_classes == 6
  assert 'deeplab' in models.model_names()
  with pytest.raises(ConfigError, match="model 'deeplab': unknown DeepLab variant 'v4'"):
    models.get_model(ml_collections.ConfigDict({'name': 'deeplab', 'variant': 'v4'}), 2)
  bad_rates = ml_collections.ConfigDict({'name': 'deeplab', 'output_stride': 8,
                                         'aspp_rates': (6, 12, 18)})
  with pytest.raises(ConfigError, match='are the OS16 rates but output_stride is 8'):
    models.get_model(bad_rates, 2)
