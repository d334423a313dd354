"""ResNet backbone: torchvision's parameter counts, output strides, channels, BatchNorm modes.

Shapes and counts come from `jax.eval_shape(model.init, ...)`, so the big models are only
traced, never run.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from segjax.models.backbones import resnet
from segjax.models.backbones.resnet import ResNet


def abstract_init(model, size=64):
  """(variables, features) of `model` on a [1, size, size, 3] input as ShapeDtypeStructs."""
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  init = lambda x: model.init_with_output(jax.random.key(0), x, train=False)
  features, variables = jax.eval_shape(init, images)
  return variables, features


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# torchvision's sum(p.numel() for p in model.parameters()) minus the fc classifier
# (512 * 1000 + 1000 for basic blocks, 2048 * 1000 + 1000 for bottlenecks).
@pytest.mark.parametrize('depth,torchvision_total,fc', [
    (18, 11_689_512, 513_000),
    (34, 21_797_672, 513_000),
    (50, 25_557_032, 2_049_000),
    (101, 44_549_160, 2_049_000),
])
def test_parameter_counts_equal_torchvision_without_fc(depth, torchvision_total, fc):
  variables, _ = abstract_init(ResNet(depth=depth), size=32)
  assert num_params(variables['params']) == torchvision_total - fc
  # Running statistics are not parameters; there is one mean and one var per BN channel.
  bn_channels = sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params'])
                    if x.ndim == 1) // 2
  assert num_params(variables['batch_stats']) == 2 * bn_channels
  # Convolutions have no bias: every 1-D parameter belongs to a BatchNorm.
  assert all(x.ndim in (1, 4) for x in jax.tree.leaves(variables['params']))


def test_torchvision_module_names():
  variables, _ = abstract_init(ResNet(depth=50), size=32)
  params = variables['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert set(params['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                     'downsample_conv', 'downsample_bn'}
  assert 'downsample_conv' not in params['layer1_1']
  # v1.5: the stride-2 block of stage 2 has a 3x3 conv2 and a 1x1 projection.
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 256, 512)
  assert sorted(k for k in params if k.startswith('layer3_')) == sorted(
      f'layer3_{i}' for i in range(6))


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('output_stride,stage_sizes', [
    (32, (16, 16, 8, 4, 2)),
    (16, (16, 16, 8, 4, 4)),
    (8, (16, 16, 8, 8, 8)),
])
def test_output_stride_and_channels(depth, output_stride, stage_sizes):
  _, features = abstract_init(ResNet(depth=depth, output_stride=output_stride), size=64)
  names = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')
  assert set(features) == set(names)
  expansion = 1 if depth == 18 else 4
  channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
  assert resnet.stage_channels(depth) == dict(zip(names, channels))
  for name, size, c in zip(names, stage_sizes, channels):
    assert features[name].shape == (1, size, size, c), name
    assert features[name].dtype == jnp.float32


def test_odd_input_sizes_follow_pytorch_arithmetic():
  # PyTorch: 7x7/2 pad 3 on 65 -> 33; max pool 3/2 pad 1 -> 17; 3x3/2 pad 1 -> 9, 5, 3.
  _, features = abstract_init(ResNet(depth=18), size=65)
  sizes = [features[k].shape[1] for k in ('stem', 'stage1', 'stage2', 'stage3', 'stage4')]
  assert sizes == [17, 17, 9, 5, 3]


def test_strides_rates_and_multi_grid():
  assert resnet.stage_strides_and_rates(32) == ((1, 1), (2, 1), (2, 1), (2, 1))
  assert resnet.stage_strides_and_rates(16) == ((1, 1), (2, 1), (2, 1), (1, 2))
  assert resnet.stage_strides_and_rates(8) == ((1, 1), (2, 1), (1, 2), (1, 4))
  assert resnet.block_rates(2, 3, (1, 2, 4)) == (2, 4, 8)
  assert resnet.block_rates(4, 4, (1, 2)) == (4, 8, 4, 8)
  assert resnet.block_rates(2, 23) == (2,) * 23
  # torchvision / mmsegmentation: the first block of a dilated stage keeps the previous rate.
  assert resnet.block_rates(4, 3, contract_dilation=True) == (2, 4, 4)
  assert resnet.block_rates(2, 6, contract_dilation=True) == (1,) + (2,) * 5
  assert resnet.block_rates(1, 2, contract_dilation=True) == (1, 1)
  assert resnet.block_rates(2, 3, (1, 2, 4), contract_dilation=True) == (2, 4, 8)


def test_dilation_and_multi_grid_reach_the_convolutions():
  model = ResNet(depth=50, output_stride=8, multi_grid=(1, 2, 4))
  convs = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      module = context.module
      convs['/'.join(module.path)] = (module.strides, module.kernel_dilation, module.padding)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_init(model, size=32)
  assert convs['layer2_0/conv2'] == (2, 1, ((1, 1), (1, 1)))
  assert convs['layer3_0/conv2'] == (1, 2, ((2, 2), (2, 2)))
  assert convs['layer3_0/downsample_conv'] == (1, 1, ((0, 0), (0, 0)))
  assert convs['layer3_5/conv2'] == (1, 2, ((2, 2), (2, 2)))
  assert [convs[f'layer4_{i}/conv2'][1] for i in range(3)] == [4, 8, 16]
  assert convs['layer4_2/conv2'][2] == ((16, 16), (16, 16))
  assert convs['conv1'] == (2, 1, ((3, 3), (3, 3)))


def test_small_forward_train_eval_and_frozen_bn():
  # Batch 2: with one 32x32 image stage 4 is 1x1, so train-mode BN there sees one value
  # per channel, outputs zeros, and the next BN's mean legitimately stays 0.
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = ResNet(depth=18)
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images)

  @jax.jit
  def run(variables, images):
    eval_features = model.apply(variables, images, train=False)
    train_features, updates = model.apply(variables, images, train=True,
                                          mutable=['batch_stats'])
    frozen = ResNet(depth=18, frozen_bn=True)
    frozen_features, frozen_updates = frozen.apply(variables, images, train=True,
                                                   mutable=['batch_stats'])
    return eval_features, train_features, updates, frozen_features, frozen_updates

  eval_f, train_f, updates, frozen_f, frozen_updates = run(variables, images)
  assert eval_f['stage4'].shape == train_f['stage4'].shape == (2, 1, 1, 512)
  assert all(bool(jnp.all(jnp.isfinite(f))) for f in jax.tree.leaves((eval_f, train_f)))
  # Training mode normalises with batch statistics and updates the running averages.
  assert not jnp.allclose(train_f['stage2'], eval_f['stage2'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))
  # frozen_bn: running averages in train mode too, and they stay unchanged.
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      frozen_updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(same))
  for name in eval_f:
    assert jnp.allclose(frozen_f[name], eval_f[name]), name


@pytest.mark.parametrize('fields,match', [
    ({'depth': 152}, r'depth must be one of \[18, 34, 50, 101\], got 152'),
    ({'depth': 50, 'output_stride': 4}, r'output_stride must be one of \(8, 16, 32\), got 4'),
    ({'depth': 50, 'multi_grid': ()}, r'multi_grid'),
])
def test_bad_fields_are_refused_with_the_valid_values(fields, match):
  with pytest.raises(ValueError, match=match):
    ResNet(**fields)
