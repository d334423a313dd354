"""VGG16 backbone: torchvision's parameter counts, names, strides, and torchvision numerics.

Counts come from `jax.eval_shape(model.init, ...)` (nothing is computed); the numeric test
runs a VGG16 of width 2 against an independent torch.nn.functional forward pass on a state
dict in torchvision's naming.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.backbones import vgg
from segjax.models.backbones.vgg import VGG16
from segjax.weights import torchvision as torchvision_weights

VGG = torchvision_weights.vgg()

# torchvision's vgg16 / vgg16_bn `features` indices of the convolutions (print(vgg16())).
TORCHVISION_CONVS = {
    False: (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    True: (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40),
}
FC8 = 4096 * 1000 + 1000  # classifier.6, the 1000-way layer the backbone leaves out


def abstract_init(model, size=64):
  """(variables, features) of `model` on a [1, size, size, 3] input as ShapeDtypeStructs."""
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  init = lambda x: model.init_with_output(jax.random.key(0), x, train=False)
  features, variables = jax.eval_shape(init, images)
  return variables, features


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('batch_norm,torchvision_total', [(False, 138_357_544),
                                                          (True, 138_365_992)])
def test_parameter_counts_equal_torchvision_without_fc8(batch_norm, torchvision_total):
  # The backbone holds features, fc6 (classifier.0) and fc7 (classifier.3).
  variables, _ = abstract_init(VGG16(batch_norm=batch_norm, include_fc=True), size=32)
  assert num_params(variables['params']) == torchvision_total - FC8
  assert variables['params']['classifier_0']['kernel'].shape == (7, 7, 512, 4096)
  assert variables['params']['classifier_3']['kernel'].shape == (1, 1, 4096, 4096)
  if batch_norm:  # one running mean and variance per BatchNorm channel
    assert num_params(variables['batch_stats']) == 2 * (64 * 2 + 128 * 2 + 256 * 3 + 512 * 6)
  else:
    assert 'batch_stats' not in variables


@pytest.mark.parametrize('batch_norm', [False, True])
def test_torchvision_indices(batch_norm):
  convs, pools = vgg.layer_indices(batch_norm)
  assert sum(convs, ()) == TORCHVISION_CONVS[batch_norm]
  assert pools == ((4, 9, 16, 23, 30) if not batch_norm else (6, 13, 23, 33, 43))
  variables, _ = abstract_init(VGG16(batch_norm=batch_norm, width=2), size=32)
  expected = {f'features_{i}' for i in TORCHVISION_CONVS[batch_norm]}
  if batch_norm:
    expected |= {f'features_{i + 1}' for i in TORCHVISION_CONVS[batch_norm]}
  assert set(variables['params']) == expected


def test_pool_strides_and_fc7_alignment():
  _, features = abstract_init(VGG16(include_fc=True), size=64)
  assert {k: v.shape for k, v in features.items()} == {
      'pool1': (1, 32, 32, 64), 'pool2': (1, 16, 16, 128), 'pool3': (1, 8, 8, 256),
      'pool4': (1, 4, 4, 512), 'pool5': (1, 2, 2, 512), 'fc7': (1, 2, 2, 4096)}
  # PyTorch's 2x2 max pooling floors: 70 -> 35, 17, 8, 4, 2; 'SAME' fc6 keeps pool5's grid.
  _, features = abstract_init(VGG16(width=4, include_fc=True), size=70)
  assert [features[f'pool{k}'].shape[1] for k in range(1, 6)] == [35, 17, 8, 4, 2]
  assert features['fc7'].shape == (1, 2, 2, 256)


# ---------------------------------------------------------------------------- torchvision numerics

def torchvision_state_dict(torch, batch_norm, width, seed=0):
  """Random weights under torchvision's vgg16(_bn) keys and shapes, fc8 included.

  Indices follow torchvision's make_layers: conv, [BatchNorm,] ReLU per layer; a pool.
  """
  gen = torch.Generator().manual_seed(seed)
  state, index, in_c = {}, 0, 3
  for block, depth in enumerate((2, 2, 3, 3, 3)):
    out_c = width * 2 ** min(block, 3)
    for _ in range(depth):
      state[f'features.{index}.weight'] = (torch.randn(out_c, in_c, 3, 3, generator=gen)
                                           * (2 / (9 * in_c)) ** 0.5)
      state[f'features.{index}.bias'] = 0.1 * torch.randn(out_c, generator=gen)
      if batch_norm:
        name = f'features.{index + 1}'
        state[f'{name}.weight'] = 1 + 0.1 * torch.randn(out_c, generator=gen)
        state[f'{name}.bias'] = 0.1 * torch.randn(out_c, generator=gen)
        state[f'{name}.running_mean'] = 0.1 * torch.randn(out_c, generator=gen)
        state[f'{name}.running_var'] = 0.5 + torch.rand(out_c, generator=gen)
        state[f'{name}.num_batches_tracked'] = torch.tensor(10)
      index, in_c = index + (3 if batch_norm else 2), out_c
    index += 1  # the pool
  fc = 64 * width
  for name, (out_f, in_f) in (('classifier.0', (fc, in_c * 49)), ('classifier.3', (fc, fc)),
                              ('classifier.6', (1000, fc))):
    state[f'{name}.weight'] = torch.randn(out_f, in_f, generator=gen) * (2 / in_f) ** 0.5
    state[f'{name}.bias'] = 0.1 * torch.randn(out_f, generator=gen)
  return state


def torchvision_forward(torch, state, images, batch_norm):
  """torchvision's VGG forward (eval mode) -> (pool5 NCHW, fc7 [B, 4096 * width / 64])."""
  F = torch.nn.functional
  x = images
  index = 0
  for depth in (2, 2, 3, 3, 3):
    for _ in range(depth):
      x = F.conv2d(x, state[f'features.{index}.weight'], state[f'features.{index}.bias'],
                   padding=1)
      if batch_norm:
        n = f'features.{index + 1}'
        x = F.batch_norm(x, state[f'{n}.running_mean'], state[f'{n}.running_var'],
                         state[f'{n}.weight'], state[f'{n}.bias'], False, 0.0, 1e-5)
      x = F.relu(x)
      index += 3 if batch_norm else 2
    x = F.max_pool2d(x, 2, 2)
    index += 1
  pool5 = x
  x = torch.flatten(F.adaptive_avg_pool2d(x, (7, 7)), 1)
  x = F.relu(F.linear(x, state['classifier.0.weight'], state['classifier.0.bias']))
  x = F.relu(F.linear(x, state['classifier.3.weight'], state['classifier.3.bias']))
  return pool5, x


@pytest.mark.parametrize('batch_norm', [False, True])
def test_torchvision_weights_give_torchvision_features_and_classifier(batch_norm):
  torch = pytest.importorskip('torch')
  width = 2
  state = torchvision_state_dict(torch, batch_norm, width)
  model = VGG16(batch_norm=batch_norm, width=width, include_fc=True)
  like, _ = abstract_init(model, size=32)
  usable = {k: v.numpy() for k, v in state.items()
            if not k.startswith(VGG.unused) and not k.endswith('num_batches_tracked')}
  assert set(usable) == set(VGG.to_source(jax.tree.map(np.zeros_like, like)))
  variables = VGG.from_source(usable, like)

  # At 224x224 pool5 is 7x7: fc6's centre cell sees all of it, exactly as the Linear does.
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  ours = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  with torch.no_grad():
    pool5, fc7 = torchvision_forward(torch, state,
                                     torch.from_numpy(images.transpose(0, 3, 1, 2)), batch_norm)
  pool5 = pool5.numpy().transpose(0, 2, 3, 1)
  scale = np.abs(pool5).max()
  np.testing.assert_allclose(np.asarray(ours['pool5']) / scale, pool5 / scale, atol=1e-5)
  fc7 = fc7.numpy()
  np.testing.assert_allclose(np.asarray(ours['fc7'][:, 3, 3]) / np.abs(fc7).max(),
                             fc7 / np.abs(fc7).max(), atol=1e-5)


def test_round_trip_through_torch_layout_is_exact():
  like, _ = abstract_init(VGG16(batch_norm=True, width=2, include_fc=True), size=32)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), like)
  state = VGG.to_source(variables)
  assert state['classifier.0.weight'].shape == (128, 16 * 7 * 7)
  assert state['features.0.weight'].shape == (2, 3, 3, 3)
  np.testing.assert_array_equal(state['features.0.weight'][1, 2, 0],
                                variables['params']['features_0']['kernel'][0, :, 2, 1])
  assert state['features.1.running_var'].shape == (2,)
  restored = VGG.from_source(state, like)
  same = jax.tree.map(lambda a, b: a.shape == b.shape and bool(np.array_equal(a, b)),
                      restored, variables)
  assert all(jax.tree.leaves(same))


def test_bad_width_is_refused():
  with pytest.raises(ValueError, match=r'VGG width must be a positive int \(64 as published\)'):
    VGG16(width=0)
