"""Segmenter: output shapes of both decoders, the mask transformer's structure and invariants,
training-mode regularisation, the pretrained-weight interface, and the experiment's recipes.

The run models are 1-block ViT-Ti/8s on 32 x 32 (and 48 x 64) images.
"""
import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import configs
from segjax import models
from segjax.errors import ConfigError
from segjax.models import segmenter
from segjax.models import attention
from segjax.models.backbones import vit
from segjax import weights
from segjax.weights import timm as timm_weights

TIMM = timm_weights.vit_table()

SMALL = dict(size='tiny', patch_size=8, depth=1, pretrained_image_size=32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module', params=segmenter.DECODERS)
def built(request):
  """(model, variables, jitted eval apply) of a small Segmenter with each decoder, 5 classes."""
  model = segmenter.Model(num_classes=5, decoder=request.param, **SMALL)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1, 32, 32, 3)))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, variables, apply


@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (1, 48, 64, 3)])
def test_logits_at_input_size_for_two_input_sizes(built, shape):
  _, variables, apply = built
  images = jax.random.normal(jax.random.key(1), shape)
  logits = apply(variables, images)
  assert logits.shape == shape[:3] + (5,) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert np.array_equal(apply(variables, images), logits)  # evaluation is deterministic
  # The stored 4 x 4 grid of position embeddings serves the 6 x 8 grid too.
  assert variables['params']['backbone']['pos_embed'].shape == (1, 17, 192)


def torch_bilinear(x, size):
  """[B, h, w, C] -> [B, H, W, C] as PyTorch's interpolate(mode='bilinear',
  align_corners=False) upsamples: source (y + 0.5) * h / H - 0.5, clamped at 0."""
  for axis, (old, new) in ((1, (x.shape[1], size[0])), (2, (x.shape[2], size[1]))):
    source = np.maximum((np.arange(new) + 0.5) * old / new - 0.5, 0)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, old - 1)
    frac = (source - low).reshape([-1 if a == axis else 1 for a in range(4)])
    x = np.take(x, low, axis) * (1 - frac) + np.take(x, high, axis) * frac
  return x


def test_patch_level_scores_are_upsampled_bilinearly(built):
  model, variables, _ = built
  images = jax.random.normal(jax.random.key(2), (1, 32, 48, 3))
  scores = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name in ('head', 'mask_decoder') and context.method_name == '__call__':
      scores['patch'] = out
    return out

  with nn.intercept_methods(record):
    logits = model.apply(variables, images, train=False)
  patch = np.asarray(scores['patch'], np.float64)
  assert patch.shape == (1, 4, 6, 5)
  np.testing.assert_allclose(logits, torch_bilinear(patch, (32, 48)), atol=1e-5)


def test_mask_decoder_structure():
  model = segmenter.Model(num_classes=7, size='small', patch_size=16, depth=1)
  heads = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.Attention):
      heads['/'.join(context.module.path[:-1])] = context.module.num_heads
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), x, train=False)

  params = jax.eval_shape(init, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
  decoder = params['mask_decoder']
  assert set(decoder) == {'proj_dec', 'cls_emb', 'blocks_0', 'blocks_1', 'decoder_norm',
                          'proj_patch', 'proj_classes', 'mask_norm'}
  assert decoder['proj_dec']['kernel'].shape == (384, 384)
  assert decoder['cls_emb'].shape == (1, 7, 384)
  assert decoder['proj_patch'] == {'kernel': jax.ShapeDtypeStruct((384, 384), jnp.float32)}
  assert decoder['proj_classes'] == {'kernel': jax.ShapeDtypeStruct((384, 384), jnp.float32)}
  assert decoder['mask_norm']['scale'].shape == (7,)  # LayerNorm over the classes
  assert decoder['blocks_0']['mlp']['fc1']['kernel'].shape == (384, 4 * 384)
  # Decoder heads = d_model / 64 = 6, like ViT-S's encoder heads.
  assert heads == {'backbone/blocks_0': 6, 'mask_decoder/blocks_0': 6,
                   'mask_decoder/blocks_1': 6}
  # The decoder is 2 encoder blocks plus projections, class embeddings and norms.
  block = num_params(decoder['blocks_0'])
  assert num_params(decoder) == (2 * block + 384 * 384 + 384 + 7 * 384 + 2 * 384
                                 + 2 * 384 * 384 + 2 * 7)


def test_mask_decoder_scores_are_normalised_cosine_similarities():
  model = segmenter.Model(num_classes=6, **SMALL)
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  variables = model.init(jax.random.key(4), images, train=False)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name in ('proj_patch', 'proj_classes', 'mask_norm'):
      seen[context.module.name] = (args[0], out)
    return out

  with nn.intercept_methods(record):
    model.apply(variables, images, train=False)
  patches, classes = (np.asarray(seen[name][1], np.float64)
                      for name in ('proj_patch', 'proj_classes'))
  patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
  classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
  cosine, scores = (np.asarray(x) for x in seen['mask_norm'])
  assert cosine.shape == (2, 16, 6)
  assert np.all(np.abs(cosine) <= 1 + 1e-6)
  np.testing.assert_allclose(cosine, patches @ classes.transpose(0, 2, 1), atol=1e-5)
  # mask_norm (scale 1, bias 0 at init) standardises each patch's scores over the classes.
  np.testing.assert_allclose(scores.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(scores.var(-1), cosine.var(-1) / (cosine.var(-1) + 1e-5),
                             rtol=1e-4)


def test_drop_path_and_dropout_act_only_in_training(built):
  model, variables, apply = built
  images = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  regularised = model.clone(drop_path_rate=0.9, dropout=0.2)

  def train_apply(module, seed):
    return module.apply(variables, images, train=True, rngs={'dropout': jax.random.key(seed)})

  evaluated = apply(variables, images)
  a, b = train_apply(regularised, 0), train_apply(regularised, 1)
  assert not np.allclose(a, b) and not np.allclose(a, evaluated)
  np.testing.assert_allclose(regularised.apply(variables, images, train=False), evaluated,
                             atol=1e-5)
  plain = model.clone(drop_path_rate=0.0, dropout=0.0, decoder_dropout=0.0)
  np.testing.assert_allclose(train_apply(plain, 0), evaluated, atol=1e-5)


def test_backbone_weights_round_trip_and_load_into_another_grid(built):
  model, variables, apply = built
  assert backbone_tables(model) == []  # 1 block: no published checkpoint fits
  backbone = {'params': variables['params']['backbone']}
  state = TIMM.to_source(backbone)
  params = dict(variables['params'], backbone=TIMM.from_source(state, backbone)['params'])
  images = jax.random.normal(jax.random.key(6), (1, 32, 32, 3))
  assert np.array_equal(apply({'params': params}, images), apply(variables, images))
  # A checkpoint stored at the 224 grid (14 x 14) into a model stored at 32 (4 x 4).
  state['pos_embed'] = np.random.default_rng(0).normal(size=(1, 197, 192)).astype(np.float32)
  loaded = TIMM.from_source(state, backbone)['params']
  assert loaded['pos_embed'].shape == (1, 17, 192)
  np.testing.assert_array_equal(loaded['pos_embed'][0, 0], state['pos_embed'][0, 0])
  params = dict(variables['params'], backbone=loaded)
  assert bool(jnp.all(jnp.isfinite(apply({'params': params}, images))))


def backbone_tables(model):
  return [table.description for table in weights.tables_for(model)[1]]


def test_no_weights_fit_when_the_depth_departs_from_the_size():
  assert backbone_tables(segmenter.Model(num_classes=2, size='base')) == ['timm ViT']
  assert backbone_tables(segmenter.Model(num_classes=2, size='base', depth=12)) == ['timm ViT']
  assert backbone_tables(segmenter.Model(num_classes=2, size='base', depth=6)) == []


def test_stem_field_reaches_the_encoder():
  model = segmenter.Model(num_classes=5, stem='conv', **SMALL)
  images = jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  backbone = variables['params']['backbone']
  assert 'conv_stem' in backbone and 'patch_embed' not in backbone
  assert set(variables['batch_stats']['backbone']['conv_stem']) == {'convs_0', 'convs_1',
                                                                    'convs_2'}
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert logits.shape == (2, 32, 48, 5)


def test_conv_stem_has_no_published_weights_so_init_from_is_refused(tmp_path):
  # timm's blocks were trained on patch-embedding tokens: a random conv stem feeding them
  # would not be a pretrained encoder, so the whole backbone is refused, not mapped in part.
  assert backbone_tables(segmenter.Model(num_classes=2, size='base', stem='conv')) == []
  config = load_experiment().get_config()  # the default: a conv stem
  config.init_from = str(tmp_path / 'vit_tiny_patch8.safetensors')
  open(config.init_from, 'wb').close()
  with pytest.raises(ConfigError, match="model 'segmenter' with these fields cannot start "
                                        'from published weights'):
    configs.validate(config)
  config.model.stem, config.model.stem_convs_per_stage = 'patch', 1
  config.model.depth = 0  # the published ViT-Ti/8: accepted
  configs.validate(config)


@pytest.mark.parametrize('fields,match', [
    ({'decoder': 'upernet'}, r"unknown Segmenter decoder 'upernet'; use one of "
                             r"\('linear', 'mask'\)"),
    ({'decoder_layers': 0}, r'decoder_layers must be a positive int'),
    ({'size': 'huge'}, r'size must be one of'),
    ({'patch_size': 32}, r'patch_size must be one of \(8, 16\)'),
    ({'drop_path_rate': 1.0}, r'drop_path_rate must be in \[0, 1\)'),
    ({'stem': 'hybrid'}, r"stem must be one of \('patch', 'conv'\)"),
])
def test_bad_fields_are_refused_at_construction(fields, match):
  with pytest.raises(ValueError, match=match):
    segmenter.Model(num_classes=2, **fields)


def test_input_not_divisible_by_the_patch_size_is_refused(built):
  model, variables, _ = built
  with pytest.raises(ValueError, match=r'divisible by 8, got \(32, 36\)'):
    model.apply(variables, jnp.zeros((1, 32, 36, 3)), train=False)


def test_get_model_builds_segmenter_and_reports_bad_fields():
  config = ml_collections.ConfigDict({'name': 'segmenter', 'decoder': 'linear', 'size': 'small'})
  model = models.get_model(config, num_classes=6)
  assert isinstance(model, segmenter.Model) and model.num_classes == 6
  assert 'segmenter' in models.model_names() and 'vit' not in models.model_names()
  with pytest.raises(ConfigError, match="model 'segmenter': unknown Segmenter decoder"):
    models.get_model(ml_collections.ConfigDict({'name': 'segmenter', 'decoder': 'fcn'}), 2)


# ---------------------------------------------------------------------------- experiment

def load_experiment():
  path = os.path.join(ROOT, 'experiments', 'segmenter.py')
  spec = importlib.util.spec_from_file_location('segmenter_experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_default_experiment_validates_and_trains_on_shapes():
  config = load_experiment().get_config()
  configs.validate(config)
  assert config.model.name == 'segmenter' and config.dataset.name == 'shapes'
  assert (config.model.stem, config.model.stem_convs_per_stage) == ('conv', 2)
  assert config.dataset.image_size % config.model.patch_size == 0


# (size, patch, decoder, crop, learning rate, steps) of the paper's recipes.
PAPER = {
    'seg_t16_mask_ade20k': ('tiny', 16, 'mask', 512, 0.001, 160_000),
    'seg_s16_mask_ade20k': ('small', 16, 'mask', 512, 0.001, 160_000),
    'seg_b16_mask_ade20k': ('base', 16, 'mask', 512, 0.001, 160_000),
    'seg_b8_linear_ade20k': ('base', 8, 'linear', 512, 0.001, 160_000),
    'seg_l16_mask_ade20k': ('large', 16, 'mask', 640, 0.001, 160_000),
    'seg_l16_mask_cityscapes': ('large', 16, 'mask', 768, 0.01, 80_000),
}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_recipes_reproduce_the_papers_training_settings(name):
  experiment = load_experiment()
  assert set(experiment.RECIPES) == set(PAPER) | set(experiment.CHECKPOINTS)
  config = experiment.get_config(name)
  size, patch, decoder, crop, learning_rate, steps = PAPER[name]
  assert config.dataset.name == name.rsplit('_', 1)[1]
  assert (config.model.size, config.model.patch_size, config.model.decoder) == (
      size, patch, decoder)
  assert config.model.depth == 0 and config.model.decoder_layers == 2
  # The published ViTs' patch embedding.
  assert (config.model.stem, config.model.stem_convs_per_stage) == ('patch', 1)
  assert config.model.pretrained_image_size == config.dataset.image_size == crop
  assert (config.model.drop_path_rate, config.model.dropout) == (0.1, 0.0)
  assert config.model.decoder_dropout == 0.1
  assert (config.optimizer.name, config.optimizer.momentum, config.schedule) == (
      'sgd', 0.9, 'poly')
  assert (config.optimizer.learning_rate, config.total_steps) == (learning_rate, steps)
  assert (config.batch_size, config.weight_decay, config.warmup_steps) == (8, 0.0, 0)
  assert (config.poly_power, config.end_learning_rate) == (0.9, 1e-5)
  assert config.eval_batch_size == 8
  assert (config.dataset.min_scale, config.dataset.max_scale) == (0.5, 2.0)
  assert tuple(config.dataset.mean) == tuple(config.dataset.std) == (0.5, 0.5, 0.5)
  # The model fields are valid (the datasets are registered elsewhere).
  model = models.get_model(config.model, num_classes=150)
  assert backbone_tables(model) == ['timm ViT']
  experiment.get_config(experiment.RECIPES[name])  # the arg string itself parses


def test_unknown_variant_keys_and_normalizations_are_refused():
  experiment = load_experiment()
  with pytest.raises(ConfigError, match=r"bad config argument 'seg_x_ade20k'"):
    experiment.get_config('seg_x_ade20k')
  with pytest.raises(ConfigError, match=r"unknown normalization 'imagenet'"):
    experiment.get_config('normalization=imagenet')
