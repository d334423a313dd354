"""FCN: published parameter counts, shapes and strides, bilinear upsampling, skip fusion,
auxiliary head, weight conversion and field checks.

Counts and shapes come from `jax.eval_shape`; the numeric tests run a VGG16-BN of width 4
and a ResNet-18 of width 8 on 64x64 images, compared with numpy references.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError
from segjax.models import fcn
from segjax.models.layers import resize_to
from segjax import weights
from segjax.weights import torchvision as torchvision_weights

NUM_CLASSES = 5
SIZE = 64


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def traced_init(model, size=SIZE, batch=1):
  """(logits, variables, backbone features) of `model` as shapes only."""
  def init(x):
    return model.init_with_output(
        jax.random.key(0), x, train=False, mutable=True,
        capture_intermediates=lambda module, _: module.name == 'backbone')

  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  logits, variables = jax.eval_shape(init, images)
  features = variables.pop('intermediates')['backbone']['__call__'][0]
  return logits, variables, features


def random_like(tree, seed=0):
  """Random values shaped like `tree`: He-scaled kernels, positive scales and variances."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=x.shape) * np.sqrt(2 / math.prod(x.shape[:-1]))).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return (0.1 * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, tree)


def bilinear_upsample(x, factor):
  """numpy reference: [B, h, w, C] -> [B, h*f, w*f, C], half-pixel centres, clamped edges."""
  def weights(n):
    matrix = np.zeros((n * factor, n))
    for out in range(n * factor):
      source = (out + 0.5) / factor - 0.5
      low = int(np.floor(source))
      frac = source - low
      matrix[out, np.clip(low, 0, n - 1)] += 1 - frac
      matrix[out, np.clip(low + 1, 0, n - 1)] += frac
    return matrix

  return np.einsum('yi,xj,bijc->byxc', weights(x.shape[1]), weights(x.shape[2]), x)


# ---------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize('backbone,torchvision_total', [('resnet50', 35_322_218),
                                                        ('resnet101', 54_314_346)])
def test_atrous_resnet_with_aux_equals_torchvision_fcn(backbone, torchvision_total):
  # torchvision's fcn_resnet50 / fcn_resnet101 (21 classes, aux_loss=True).
  model = fcn.Model(num_classes=21, backbone=backbone, variant='8s_atrous',
                    upsample='bilinear', aux_head=True)
  _, variables, features = traced_init(model, size=32)
  assert num_params(variables['params']) == torchvision_total
  assert features['stage4'].shape == (1, 4, 4, 2048)  # output stride 8
  assert variables['params']['head']['conv0']['Conv_0']['kernel'].shape == (3, 3, 2048, 512)
  assert variables['params']['aux_head']['conv0']['Conv_0']['kernel'].shape == (
      3, 3, 1024, 256)


def test_mmsegmentation_head_shapes():
  # mmsegmentation's FCNHead: num_convs=2, channels=512, concat_input=True.
  model = fcn.Model(num_classes=19, backbone='resnet50', variant='8s_atrous',
                    upsample='bilinear', head_convs=2, head_concat_input=True)
  _, variables, _ = traced_init(model, size=32)
  head = variables['params']['head']
  assert head['conv0']['Conv_0']['kernel'].shape == (3, 3, 2048, 512)
  assert head['conv1']['Conv_0']['kernel'].shape == (3, 3, 512, 512)
  assert head['conv_cat']['Conv_0']['kernel'].shape == (3, 3, 2048 + 512, 512)
  assert head['classifier']['kernel'].shape == (1, 1, 512, 19)


VGG16_WITHOUT_FC8 = 138_357_544 - (4096 * 1000 + 1000)  # torchvision's vgg16


@pytest.mark.parametrize('variant,learned', [
    ('32s', ()), ('16s', ('upscore2',)), ('8s', ('upscore2', 'upscore_pool4')),
])
def test_vgg_fcn_has_the_reference_layers(variant, learned):
  # The reference voc-fcn{32,16,8}s nets: VGG16 with fc6/fc7, score_fr 4096 -> 21,
  # score_pool4 512 -> 21 and score_pool3 256 -> 21 (with bias), bias-free 21 -> 21 4x4
  # deconvolutions between fusions, and a final deconvolution that the paper fixes to
  # bilinear interpolation (so not a parameter here).
  model = fcn.Model(num_classes=21, backbone='vgg16', variant=variant)
  _, variables, features = traced_init(model)
  params = variables['params']
  scores = {'32s': ('score_fr',), '16s': ('score_fr', 'score_pool4'),
            '8s': ('score_fr', 'score_pool4', 'score_pool3')}[variant]
  channels = {'score_fr': 4096, 'score_pool4': 512, 'score_pool3': 256}
  assert set(params) == {'backbone', *scores, *learned}
  for name in learned:
    assert params[name] == {'kernel': jax.ShapeDtypeStruct((4, 4, 21, 21), jnp.float32)}
  expected = (VGG16_WITHOUT_FC8 + sum(channels[s] * 21 + 21 for s in scores)
              + len(learned) * 4 * 4 * 21 * 21)
  assert num_params(params) == expected
  assert features['fc7'].shape == (1, 2, 2, 4096)


# ---------------------------------------------------------------------------- shapes and strides

CONFIGS = [(b, v) for b in fcn.BACKBONES for v in fcn.VARIANTS
           if not (b.startswith('vgg') and v == '8s_atrous')]


@pytest.mark.parametrize('backbone,variant', CONFIGS)
def test_logits_at_input_size_and_feature_strides(backbone, variant):
  model = fcn.Model(num_classes=NUM_CLASSES, backbone=backbone, variant=variant, width=8)
  logits, variables, features = traced_init(model, batch=2)
  assert logits.shape == (2, SIZE, SIZE, NUM_CLASSES) and logits.dtype == jnp.float32
  if backbone.startswith('vgg'):
    strides = {'pool3': 8, 'pool4': 16, 'pool5': 32, 'fc7': 32}
    skips = ('score_pool4', 'score_pool3')
  else:
    last = 8 if variant == '8s_atrous' else 32
    strides = {'stage2': 8, 'stage3': min(16, last), 'stage4': last}
    skips = ('score_stage3', 'score_stage2')
  for name, stride in strides.items():
    assert features[name].shape[:3] == (2, SIZE // stride, SIZE // stride), name
  used = skips[:fcn.NUM_SKIPS[variant]]
  assert {s for s in skips if s in variables['params']} == set(used)


def test_bilinear_upsampling_takes_any_size_transposed_needs_multiples():
  model = fcn.Model(num_classes=3, backbone='resnet18', variant='8s', width=8,
                    upsample='bilinear')
  logits, _, _ = traced_init(model, size=50)
  assert logits.shape == (1, 50, 50, 3)
  with pytest.raises(ValueError, match=r"FCN-8s with upsample='transposed' needs H and W "
                                       r'divisible by 32, got \(48, 48\)'):
    traced_init(model.clone(upsample='transposed'), size=48)
  # No learned upsampling: the final one is fixed.
  for variant in ('32s', '8s_atrous'):
    logits, variables, _ = traced_init(model.clone(variant=variant, upsample='transposed'),
                                       size=48)
    assert logits.shape == (1, 48, 48, 3)
    assert not any(k.startswith('upscore') for k in variables['params'])


def test_published_dropout_rates():
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      rates['/'.join(context.module.path)] = context.module.rate
    return next_fun(*args, **kwargs)

  def dropout_rates(**fields):
    rates.clear()
    with nn.intercept_methods(record):
      traced_init(fcn.Model(num_classes=2, width=8, **fields))
    return rates.copy()

  assert set(dropout_rates(backbone='vgg16').values()) == {0.5}  # after fc6 and fc7
  assert dropout_rates(backbone='resnet18', aux_head=True) == {'head/Dropout_0': 0.1,
                                                                'aux_head/Dropout_0': 0.1}
  assert set(dropout_rates(backbone='vgg16', dropout=0.3).values()) == {0.3}


# ---------------------------------------------------------------------------- upsampling

def test_bilinear_kernel():
  np.testing.assert_allclose(fcn.bilinear_kernel(2), [0.25, 0.75, 0.75, 0.25])
  np.testing.assert_allclose(fcn.bilinear_kernel(4), np.array([1, 3, 5, 7, 7, 5, 3, 1]) / 8)
  kernel = fcn.bilinear_init(2)(None, (4, 4, 3, 3))
  assert kernel[1, 2, 0, 0] == 0.75 * 0.75 and kernel[1, 2, 0, 1] == 0


@pytest.mark.parametrize('factor', [2, 8, 32])
def test_learned_upsampling_starts_as_bilinear_upsampling(factor):
  image = np.random.default_rng(factor).normal(size=(2, 3, 5, 4)).astype(np.float32)
  upsampled, variables = fcn.LearnedUpsample(factor).init_with_output(jax.random.key(0), image)
  assert upsampled.shape == (2, 3 * factor, 5 * factor, 4)
  expected = bilinear_upsample(image, factor)
  np.testing.assert_allclose(upsampled, expected, atol=1e-5)
  np.testing.assert_allclose(resize_to(image, 3 * factor, 5 * factor), expected, atol=1e-5)
  assert variables['params']['kernel'].shape == (2 * factor, 2 * factor, 4, 4)


def test_learned_upsampling_is_a_transposed_convolution():
  # PyTorch's ConvTranspose2d (out[f*p + t] += x[p] * w[t], summed over input channels) on
  # the edge-padded input, cropped by 3f/2, with an arbitrary kernel.
  factor, rng = 2, np.random.default_rng(0)
  image = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
  kernel = rng.normal(size=(4, 4, 2, 2)).astype(np.float32)
  ours = fcn.LearnedUpsample(factor).apply({'params': {'kernel': kernel}}, image)
  padded = np.pad(image[0], ((1, 1), (1, 1), (0, 0)), mode='edge')
  full = np.zeros(((padded.shape[0] + 1) * factor, (padded.shape[1] + 1) * factor, 2))
  for p in range(padded.shape[0]):
    for q in range(padded.shape[1]):
      full[p * factor:(p + 2) * factor, q * factor:(q + 2) * factor] += np.einsum(
          'i,yxio->yxo', padded[p, q], kernel)
  start = 3 * factor // 2
  np.testing.assert_allclose(ours[0], full[start:start + 3 * factor, start:start + 4 * factor],
                             atol=1e-5)


# ---------------------------------------------------------------------------- skip fusion

@pytest.fixture(scope='module')
def vgg_fcn8s():
  """FCN-8s on a width-4 VGG16-BN: (transposed model, its initial variables, images)."""
  model = fcn.Model(num_classes=NUM_CLASSES, backbone='vgg16_bn', width=4, variant='8s')
  images = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  # The 'rbg' generator compiles in a quarter of threefry's time on CPU.
  init = jax.jit(functools.partial(model.init, train=False))
  return model, jax.device_get(init(jax.random.key(0, impl='rbg'), images)), images


@functools.lru_cache(maxsize=None)
def scored_apply(model):
  """Jitted eval apply -> (logits, {score layer: its output})."""
  names = ('score_fr', 'score_pool4', 'score_pool3')

  def run(variables, images):
    logits, state = model.apply(variables, images, train=False,
                                capture_intermediates=lambda m, _: m.name in names,
                                mutable=['intermediates'])
    scores = {k: v['__call__'][0] for k, v in state['intermediates'].items()}
    return logits, scores

  return jax.jit(run)


def with_random_scores(variables, seed, skips_zero=False):
  """`variables` with random score layers (the skip ones zero if `skips_zero`)."""
  params = dict(variables['params'])
  for name in ('score_fr', 'score_pool4', 'score_pool3'):
    params[name] = random_like(params[name], seed)
    if skips_zero and name != 'score_fr':
      params[name] = jax.tree.map(np.zeros_like, params[name])
  return {**variables, 'params': params}


def without_upsampling(variables):
  return {**variables, 'params': {k: v for k, v in variables['params'].items()
                                  if not k.startswith('upscore')}}


def test_score_layers_start_at_zero_and_upsampling_at_bilinear(vgg_fcn8s):
  _, variables, _ = vgg_fcn8s
  params = variables['params']
  for name in ('score_fr', 'score_pool4', 'score_pool3'):
    assert not np.any(params[name]['kernel']) and not np.any(params[name]['bias']), name
  for name in ('upscore2', 'upscore_pool4'):
    np.testing.assert_array_equal(params[name]['kernel'],
                                  fcn.bilinear_init(2)(None, (4, 4, 5, 5)))


def test_fusion_sums_upsampled_scores_and_transposed_starts_as_bilinear(vgg_fcn8s):
  model, variables, images = vgg_fcn8s
  variables = with_random_scores(variables, seed=1)
  bilinear = model.clone(upsample='bilinear')
  logits, scores = scored_apply(bilinear)(without_upsampling(variables), images)
  s32, s16, s8 = (np.asarray(scores[k]) for k in ('score_fr', 'score_pool4', 'score_pool3'))
  assert s32.shape[1:3] == (2, 2) and s16.shape[1:3] == (4, 4) and s8.shape[1:3] == (8, 8)
  expected = bilinear_upsample(bilinear_upsample(bilinear_upsample(s32, 2) + s16, 2) + s8, 8)
  scale = np.abs(expected).max()
  assert scale > 0.1
  np.testing.assert_allclose(logits / scale, expected / scale, atol=1e-5)
  transposed, _ = scored_apply(model)(variables, images)
  np.testing.assert_allclose(transposed / scale, expected / scale, atol=1e-5)


def test_zero_skip_layers_give_upsampled_stride32_scores_like_fcn32s(vgg_fcn8s):
  # Zero-initialised skips (the paper's staged training): FCN-8s then predicts what the
  # FCN-32s with the same layers predicts, up to 2x-2x-8x instead of one 32x interpolation.
  model, variables, images = vgg_fcn8s
  variables = with_random_scores(variables, seed=2, skips_zero=True)
  logits, scores = scored_apply(model)(variables, images)
  s32 = np.asarray(scores['score_fr'])
  cascade = bilinear_upsample(bilinear_upsample(bilinear_upsample(s32, 2), 2), 8)
  scale = np.abs(cascade).max()
  np.testing.assert_allclose(logits / scale, cascade / scale, atol=1e-5)

  fcn32s = model.clone(variant='32s', upsample='bilinear')
  params32 = {k: variables['params'][k] for k in ('backbone', 'score_fr')}
  logits32, _ = scored_apply(fcn32s)({**variables, 'params': params32}, images)
  np.testing.assert_allclose(logits32 / scale, bilinear_upsample(s32, 32) / scale, atol=1e-5)
  # Same coarse scores, same argmax away from the coarse cells' boundaries.
  assert np.mean(np.argmax(logits, -1) == np.argmax(logits32, -1)) > 0.8


def test_skip_scales_multiply_the_skip_features(vgg_fcn8s):
  model, variables, images = vgg_fcn8s
  variables = without_upsampling(with_random_scores(variables, seed=3))
  bilinear = model.clone(upsample='bilinear')
  scaled = bilinear.clone(skip_scales=(0.5, 0.25))
  params = dict(variables['params'])
  for name, scale in (('score_pool4', 0.5), ('score_pool3', 0.25)):
    params[name] = {**params[name], 'kernel': params[name]['kernel'] * scale}
  expected, _ = scored_apply(bilinear)({**variables, 'params': params}, images)
  ours, _ = scored_apply(scaled)(variables, images)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------- aux head, weights

@pytest.fixture(scope='module')
def resnet_fcn_with_aux():
  model = fcn.Model(num_classes=NUM_CLASSES, backbone='resnet18', width=8, variant='8s',
                    aux_head=True)
  _, like, _ = traced_init(model, batch=2)
  images = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  return model, random_like(like, seed=4), images


def test_aux_logits_are_sown_only_when_training(resnet_fcn_with_aux):
  model, variables, images = resnet_fcn_with_aux
  assert 'aux_head' in variables['params']  # created by init in eval mode too
  train = jax.jit(functools.partial(model.apply, train=True,
                                    mutable=['batch_stats', 'intermediates']))
  logits, state = train(variables, images, rngs={'dropout': jax.random.key(0)})
  (aux,) = state['intermediates']['aux_logits']
  assert logits.shape == aux.shape == (2, SIZE, SIZE, NUM_CLASSES)
  assert aux.dtype == logits.dtype == jnp.float32
  assert not np.allclose(aux, logits)
  _, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(
      variables, images)
  assert 'aux_logits' not in state.get('intermediates', {})
  no_aux = model.clone(aux_head=False)
  params = {k: v for k, v in variables['params'].items() if k != 'aux_head'}
  stats = {k: v for k, v in variables['batch_stats'].items() if k != 'aux_head'}
  _, state = jax.jit(functools.partial(no_aux.apply, train=True,
                                       mutable=['batch_stats', 'intermediates']))(
      {'params': params, 'batch_stats': stats}, images, rngs={'dropout': jax.random.key(0)})
  assert 'aux_logits' not in state.get('intermediates', {})


def round_trip(table, variables):
  """`variables` with the backbone sent through `table`'s torch layout and back."""
  backbone = table.subtree(variables)
  restored = table.from_source(table.to_source(backbone), backbone)
  return {c: {**tree, 'backbone': restored[c]} if c in restored else tree
          for c, tree in variables.items()}


def test_backbone_round_trip_gives_identical_outputs(vgg_fcn8s, resnet_fcn_with_aux):
  model, variables, images = vgg_fcn8s
  variables = with_random_scores(variables, seed=5)
  state = torchvision_weights.vgg().to_source({c: t['backbone'] for c, t in variables.items()})
  assert state['classifier.0.weight'].shape == (256, 32 * 49)
  expected, _ = scored_apply(model)(variables, images)
  ours, _ = scored_apply(model)(round_trip(torchvision_weights.vgg(), variables), images)
  np.testing.assert_array_equal(ours, expected)

  model, variables, images = resnet_fcn_with_aux
  apply = jax.jit(functools.partial(model.apply, train=False))
  np.testing.assert_array_equal(apply(round_trip(torchvision_weights.resnet(), variables), images),
                                apply(variables, images))


def weight_tables(**fields):
  whole, backbone = weights.tables_for(fcn.Model(num_classes=2, **fields))
  return [t.description for t in whole], [t.description for t in backbone]


def test_published_weights_need_the_published_width():
  assert weight_tables(backbone='vgg16_bn') == ([], ['torchvision VGG16'])
  assert weight_tables(backbone='resnet50') == ([], ['torchvision ResNet'])
  assert weight_tables(backbone='resnet50', variant='8s_atrous', aux_head=True) == (
      ['torchvision fcn_resnet50', 'mmseg FCNHead, ResNet-50'], ['torchvision ResNet'])
  assert weight_tables(backbone='resnet50', width=32) == ([], [])
  assert weight_tables(backbone='vgg16', width=8) == ([], [])


# ---------------------------------------------------------------------------- field checks

@pytest.mark.parametrize('fields,message', [
    ({'backbone': 'vgg19'}, r"unknown FCN backbone 'vgg19'; use one of \('vgg16', "),
    ({'variant': '4s'}, r"unknown FCN variant '4s'; use one of \('32s', '16s', '8s', "
                        r"'8s_atrous'\)"),
    ({'upsample': 'nearest'}, r"unknown FCN upsample 'nearest'; use one of "
                              r"\('transposed', 'bilinear'\)"),
    ({'variant': '8s_atrous'}, "'8s_atrous' needs a ResNet backbone"),
    ({'head_convs': 2}, 'head_convs and head_concat_input shape the ResNet FCN head'),
    ({'backbone': 'resnet18', 'head_convs': 0}, 'head_convs must be a positive int, got 0'),
    ({'dropout': 1.0}, r'dropout must be in \[0, 1\) or None'),
    ({'skip_scales': (0.01,)}, 'skip_scales must be two positive factors'),
    ({'width': 0}, r'VGG width must be a positive int \(64 as published\), got 0'),
    ({'backbone': 'resnet18', 'width': 2.5}, 'ResNet width must be a positive int'),
])
def test_bad_fields_are_refused_at_construction(fields, message):
  with pytest.raises(ValueError, match=message):
    fcn.Model(num_classes=2, **fields)


def test_get_model_builds_fcn_and_turns_bad_fields_into_config_errors():
  config = ml_collections.ConfigDict({'name': 'fcn', 'backbone': 'resnet34', 'variant': '16s'})
  model = models.get_model(config, num_classes=6)
  assert isinstance(model, fcn.Model) and model.num_classes == 6
  assert 'fcn' in models.model_names()
  with pytest.raises(ConfigError, match="model 'fcn': unknown FCN variant '2s'"):
    models.get_model(ml_collections.ConfigDict({'name': 'fcn', 'variant': '2s'}), 2)
