"""Backbone weights from torchvision files (segjax.weights): numerics, name checks, errors.

The reference is an independent ResNet forward pass written with torch.nn.functional on a
state dict in torchvision's naming (random weights, since nothing may be downloaded): the
flax ResNet loaded from the same file must give the same features.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from segjax import configs
from segjax import weights
from segjax.weights import torchvision as torchvision_weights
from segjax.errors import ConfigError
from segjax.models import deeplab
from segjax.models.backbones import resnet

torch = pytest.importorskip('torch')
F = torch.nn.functional

BLOCKS = {18: ('basic', (2, 2, 2, 2)), 50: ('bottleneck', (3, 4, 6, 3))}


def torchvision_state_dict(depth, seed=0):
  """Random weights under torchvision's resnet{depth} keys and shapes (fc included)."""
  gen = torch.Generator().manual_seed(seed)
  state = {}

  def conv(name, out_c, in_c, k):
    std = (2.0 / (in_c * k * k)) ** 0.5
    state[f'{name}.weight'] = torch.randn(out_c, in_c, k, k, generator=gen) * std

  def bn(name, c):
    state[f'{name}.weight'] = 1 + 0.1 * torch.randn(c, generator=gen)
    state[f'{name}.bias'] = 0.1 * torch.randn(c, generator=gen)
    state[f'{name}.running_mean'] = 0.1 * torch.randn(c, generator=gen)
    state[f'{name}.running_var'] = 0.5 + torch.rand(c, generator=gen)
    state[f'{name}.num_batches_tracked'] = torch.tensor(100)

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  kind, counts = BLOCKS[depth]
  expansion = 4 if kind == 'bottleneck' else 1
  in_c = 64
  for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
    for i in range(count):
      p = f'layer{stage}.{i}'
      if kind == 'basic':
        conv(f'{p}.conv1', width, in_c, 3), bn(f'{p}.bn1', width)
        conv(f'{p}.conv2', width, width, 3), bn(f'{p}.bn2', width)
      else:
        conv(f'{p}.conv1', width, in_c, 1), bn(f'{p}.bn1', width)
        conv(f'{p}.conv2', width, width, 3), bn(f'{p}.bn2', width)
        conv(f'{p}.conv3', width * 4, width, 1), bn(f'{p}.bn3', width * 4)
      if i == 0 and (stage > 1 or in_c != width * expansion):
        conv(f'{p}.downsample.0', width * expansion, in_c, 1)
        bn(f'{p}.downsample.1', width * expansion)
      in_c = width * expansion
  state['fc.weight'] = torch.randn(1000, in_c, generator=gen) * 0.01
  state['fc.bias'] = torch.zeros(1000)
  return state


def torchvision_forward(state, images, depth, dilate=(False, False, False)):
  """torchvision's ResNet forward (eval mode) -> {'stem', 'stage1'..'stage4'} NCHW tensors.

  dilate: torchvision's `replace_stride_with_dilation` for stages 2-4: such a stage keeps
  stride 1, its 3x3 convolutions dilate by the accumulated stride, and its first block
  uses the previous rate (bottleneck blocks only, as in torchvision).
  """
  def bn(x, name):
    return F.batch_norm(x, state[f'{name}.running_mean'], state[f'{name}.running_var'],
                        state[f'{name}.weight'], state[f'{name}.bias'], False, 0.0, 1e-5)

  def conv(x, name, stride, rate=1):
    w = state[f'{name}.weight']
    return F.conv2d(x, w, stride=stride, padding=rate * (w.shape[-1] // 2), dilation=rate)

  kind, counts = BLOCKS[depth]
  x = F.max_pool2d(F.relu(bn(conv(images, 'conv1', 2), 'bn1')), 3, 2, 1)
  out = {'stem': x}
  rate = 1
  for stage, count in enumerate(counts, start=1):
    stage_stride, previous_rate = (2 if stage > 1 else 1), rate
    if stage > 1 and dilate[stage - 2]:
      rate, stage_stride = rate * stage_stride, 1
    for i in range(count):
      p = f'layer{stage}.{i}'
      stride, block_rate = (stage_stride, previous_rate) if i == 0 else (1, rate)
      if kind == 'basic':
        y = F.relu(bn(conv(x, f'{p}.conv1', stride), f'{p}.bn1'))
        y = bn(conv(y, f'{p}.conv2', 1), f'{p}.bn2')
      else:
        y = F.relu(bn(conv(x, f'{p}.conv1', 1), f'{p}.bn1'))
        y = F.relu(bn(conv(y, f'{p}.conv2', stride, block_rate), f'{p}.bn2'))
        y = bn(conv(y, f'{p}.conv3', 1), f'{p}.bn3')
      if f'{p}.downsample.0.weight' in state:
        x = bn(conv(x, f'{p}.downsample.0', stride), f'{p}.downsample.1')
      x = F.relu(y + x)
    out[f'stage{stage}'] = x
  return out


def small_deeplab(depth=18, width=64):
  return deeplab.Model(num_classes=3, variant='v3', backbone_depth=depth, backbone_width=width,
                       aspp_features=8, output_stride=16)


@functools.lru_cache(maxsize=None)
def init_variables(depth=18, width=64, seed=0):
  model = small_deeplab(depth, width)
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))


def assert_features_close(ours, theirs):
  for name, expected in theirs.items():
    expected = expected.numpy().transpose(0, 2, 3, 1)
    # float32 sums in another order: errors grow with depth, relative to the feature scale.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(ours[name]) / scale, expected / scale, atol=3e-5,
                               err_msg=name)


@pytest.mark.parametrize('depth', [18, 50])
def test_torchvision_file_gives_torchvision_features(depth, tmp_path):
  state = torchvision_state_dict(depth)
  path = str(tmp_path / f'resnet{depth}.pth')
  torch.save(state, path)
  model = small_deeplab(depth)
  variables = init_variables(depth)
  loaded, part, message = weights.load(path, model, jax.device_get(variables))
  assert part == 'backbone' and 'loaded the backbone only (torchvision ResNet' in message
  assert message.endswith('not used from the file: fc.* (2)')  # the ImageNet classifier

  images = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
  backbone = {c: loaded[c]['backbone'] for c in ('params', 'batch_stats')}
  ours = jax.jit(functools.partial(resnet.ResNet(depth=depth).apply, train=False))(
      backbone, images)
  with torch.no_grad():
    theirs = torchvision_forward(state, torch.from_numpy(images.transpose(0, 3, 1, 2)), depth)
  assert_features_close(ours, theirs)
  # Heads keep their fresh initialisation.
  np.testing.assert_array_equal(loaded['params']['aspp']['conv1x1']['Conv_0']['kernel'],
                                variables['params']['aspp']['conv1x1']['Conv_0']['kernel'])


def test_contract_dilation_matches_torchvision_dilated_resnet50():
  """OS8 with contract_dilation = torchvision's replace_stride_with_dilation=[F, T, T]."""
  state = torchvision_state_dict(50, seed=2)
  like = jax.device_get(init_variables(50))
  table = torchvision_weights.resnet()
  backbone = table.from_source({k: v.numpy() for k, v in state.items()}, table.subtree(like))
  images = np.random.default_rng(1).normal(size=(1, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = torchvision_forward(state, torch.from_numpy(images.transpose(0, 3, 1, 2)), 50,
                                 dilate=(False, True, True))
  contracted = resnet.ResNet(depth=50, output_stride=8, contract_dilation=True)
  ours = jax.jit(functools.partial(contracted.apply, train=False))(backbone, images)
  assert ours['stage4'].shape == (1, 6, 6, 2048)
  assert_features_close(ours, theirs)
  # Every block at the stage's rate (DeepLab's convention) is a different network.
  uniform = resnet.ResNet(depth=50, output_stride=8, contract_dilation=False)
  other = jax.jit(functools.partial(uniform.apply, train=False))(backbone, images)
  expected = theirs['stage4'].numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(other['stage4']) - expected).max() > 1e-2 * np.abs(expected).max()


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
  source = jax.device_get(init_variables(seed=1))
  path = str(tmp_path / 'backbone.safetensors')
  backbone = {c: source[c]['backbone'] for c in ('params', 'batch_stats')}
  safetensors_numpy.save_file(torchvision_weights.resnet().to_source(backbone), path)
  model = small_deeplab()
  loaded, _, _ = weights.load(path, model, jax.device_get(init_variables(seed=2)))
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, loaded[collection]['backbone'],
                 source[collection]['backbone'])
  images = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
  apply = jax.jit(functools.partial(model.apply, train=False))
  expected = apply({'params': {**loaded['params'], 'aspp': source['params']['aspp'],
                               'classifier': source['params']['classifier']},
                    'batch_stats': {**loaded['batch_stats'],
                                    'aspp': source['batch_stats']['aspp']}}, images)
  np.testing.assert_array_equal(expected, apply(source, images))


def test_wrong_file_is_refused_with_the_keys(tmp_path):
  variables = jax.device_get(init_variables())
  model = small_deeplab()
  state = {k: v.numpy() for k, v in torchvision_state_dict(50).items()}
  path = str(tmp_path / 'resnet50.safetensors')
  safetensors_numpy.save_file(state, path)
  with pytest.raises(ConfigError) as error:
    weights.load(path, model, variables)
  message = str(error.value)
  assert "does not fit model 'deeplab' (closest: torchvision ResNet backbone)" in message
  assert 'unexpected keys (' in message and 'layer1.0.conv3.weight' in message
  assert 'mis-shaped keys (' in message
  assert 'layer1.0.conv1.weight (64, 64, 1, 1) (model: (64, 64, 3, 3))' in message
  # Classifier and counters are skipped silently; a missing key is named.
  state = {k: v.numpy() for k, v in torchvision_state_dict(18).items()}
  del state['layer4.1.bn2.running_var']
  safetensors_numpy.save_file(state, path)
  with pytest.raises(ConfigError, match=r'missing keys \(1\): layer4.1.bn2.running_var$'):
    weights.load(path, model, variables)


@pytest.mark.parametrize('name,content,message', [
    ('garbage.pth', b'not a checkpoint', "cannot read init_from '.*garbage.pth' .corrupt"),
    ('garbage.safetensors', b'\x00' * 16, 'cannot read init_from'),
    ('weights.h5', b'', 'unknown format; expected .safetensors'),
])
def test_unreadable_files_are_refused(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=message):
    weights.read_state_dict(str(path))


def test_wrapped_and_data_parallel_checkpoints_are_unwrapped(tmp_path):
  state = {'module.conv1.weight': torch.ones(2, 3, 1, 1)}
  path = str(tmp_path / 'ckpt.pth')
  torch.save({'state_dict': state, 'epoch': 3}, path)
  assert list(weights.read_state_dict(path)) == ['conv1.weight']


def test_config_validation_checks_init_from(tmp_path):
  config = configs.base_config()
  config.model = ml_collections.ConfigDict({'name': 'deeplab', 'backbone_depth': 18})
  config.init_from = str(tmp_path / 'missing.pth')
  with pytest.raises(ConfigError, match="init_from file '.*missing.pth' does not exist"):
    configs.validate(config)
  config.init_from = str(tmp_path / 'exists.pth')
  (tmp_path / 'exists.pth').write_bytes(b'')
  config.model = ml_collections.ConfigDict({'name': 'unet'})
  with pytest.raises(ConfigError, match="model 'unet' with these fields cannot start from"):
    configs.validate(config)


@pytest.mark.parametrize('channels', [1, 6])
def test_rgb_weights_adapt_to_other_input_channel_counts(channels, tmp_path):
  """segmentation_models_pytorch's rule: a gray image g gives the features the RGB weights
  give on (g, g, g); six channels holding the RGB image twice give its RGB features."""
  path = str(tmp_path / 'resnet18.pth')
  torch.save(torchvision_state_dict(18, seed=3), path)
  model = small_deeplab(18)
  rgb, _, _ = weights.load(path, model, jax.device_get(init_variables(18)))
  like = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 64, 64, channels), np.float32))
  adapted, part, message = weights.load(path, model, like)
  assert part == 'backbone'
  assert f'adapted conv1.weight from 3 to {channels} input channels' in message
  images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  if channels == 1:
    images = np.repeat(images[..., :1], 3, axis=-1)
  inputs = images[..., :1] if channels == 1 else np.concatenate([images, images], axis=-1)
  backbone = resnet.ResNet(depth=18)
  apply = jax.jit(functools.partial(backbone.apply, train=False))
  features = lambda variables, x: apply({c: variables[c]['backbone'] for c in variables}, x)
  expected, got = features(rgb, images)['stage4'], features(adapted, inputs)['stage4']
  np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()))
