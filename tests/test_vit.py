"""ViT encoder: timm's parameter counts and names, a NumPy re-implementation of timm's forward,
position-embedding resampling against PIL, drop path, and the timm weight round trip.

Counts come from `jax.eval_shape`; only a 2-block ViT-Ti/8 on 32 x 32 images is run.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import special

from segjax import weights
from segjax.models import attention
from segjax.models.backbones import vit
from segjax.models.backbones.vit import ViT
from segjax.weights import timm as timm_weights

TIMM = timm_weights.vit_table()

TINY = dict(size='tiny', patch_size=8, pretrained_image_size=32, depth=2)


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(model, size=32):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def timm_count(width, depth, patch=16, grid=14, classes=1000):
  """timm's parameter count of a ViT with its `classes`-way head, from the architecture."""
  block = (2 * width                            # norm1
           + 3 * width * width + 3 * width      # attn.qkv
           + width * width + width              # attn.proj
           + 2 * width                          # norm2
           + 4 * width * width + 4 * width      # mlp.fc1
           + 4 * width * width + width)         # mlp.fc2
  embed = 3 * patch * patch * width + width + width + (1 + grid * grid) * width
  return embed + depth * block + 2 * width + width * classes + classes


# Published: sum(p.numel()) of timm.create_model('vit_<size>_patch16_224') (1000 classes).
@pytest.mark.parametrize('size,published', [
    ('tiny', 5_717_416), ('small', 22_050_664), ('base', 86_567_656), ('large', 304_326_632),
])
def test_parameter_counts_equal_timm_with_the_1000_class_head(size, published):
  width, depth, _ = vit.SIZES[size]
  variables = abstract_params(ViT(size=size, patch_size=16))
  head = width * 1000 + 1000  # timm's `head`: Linear(width, 1000), not part of the encoder
  assert num_params(variables['params']) + head == published
  assert timm_count(width, depth) == published


@pytest.fixture(scope='module')
def tiny():
  """(model, variables, images, jitted apply) of a 2-block ViT-Ti/8 stored at a 4 x 4 grid."""
  model = ViT(**TINY)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  @jax.jit
  def init(images):
    variables = model.init(jax.random.key(1), images, train=False)
    # Non-trivial LayerNorm parameters and biases, so the reference test sees their layout.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)

  variables = init(images)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, variables, images, apply


def test_timm_names_and_layouts(tiny):
  _, variables, _, _ = tiny
  state = TIMM.to_source(variables)
  block = {'norm1.weight': (192,), 'norm1.bias': (192,), 'attn.qkv.weight': (576, 192),
           'attn.qkv.bias': (576,), 'attn.proj.weight': (192, 192), 'attn.proj.bias': (192,),
           'norm2.weight': (192,), 'norm2.bias': (192,), 'mlp.fc1.weight': (768, 192),
           'mlp.fc1.bias': (768,), 'mlp.fc2.weight': (192, 768), 'mlp.fc2.bias': (192,)}
  expected = {'cls_token': (1, 1, 192), 'pos_embed': (1, 17, 192),
              'patch_embed.proj.weight': (192, 3, 8, 8), 'patch_embed.proj.bias': (192,),
              'norm.weight': (192,), 'norm.bias': (192,)}
  for i in range(2):
    expected.update({f'blocks.{i}.{k}': shape for k, shape in block.items()})
  assert {k: v.shape for k, v in state.items()} == expected
  assert all(v.dtype == np.float32 for v in state.values())
  assert TIMM.unused == ('head.', 'pre_logits.') and TIMM.resizable == ('pos_embed',)


def _layer_norm(x, weight, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def timm_forward(state, images, patch, heads, depth):
  """timm's VisionTransformer.forward_features in float64 NumPy, minus the class token."""
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)  # NCHW, as PyTorch
  batch, channels, height, width = x.shape
  h, w = height // patch, width // patch
  dim = s['cls_token'].shape[-1]
  patches = x.reshape(batch, channels, h, patch, w, patch).transpose(0, 2, 4, 1, 3, 5)
  tokens = patches.reshape(batch, h * w, -1) @ s['patch_embed.proj.weight'].reshape(dim, -1).T
  tokens = tokens + s['patch_embed.proj.bias']
  x = np.concatenate([np.broadcast_to(s['cls_token'], (batch, 1, dim)), tokens], 1)
  x = x + s['pos_embed']
  for i in range(depth):
    p = lambda name: s[f'blocks.{i}.{name}']  # pylint: disable=cell-var-from-loop
    y = _layer_norm(x, p('norm1.weight'), p('norm1.bias'))
    qkv = (y @ p('attn.qkv.weight').T + p('attn.qkv.bias')).reshape(
        batch, -1, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) * (dim // heads) ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
    x = x + y @ p('attn.proj.weight').T + p('attn.proj.bias')
    y = _layer_norm(x, p('norm2.weight'), p('norm2.bias'))
    y = y @ p('mlp.fc1.weight').T + p('mlp.fc1.bias')
    y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))  # exact GELU
    x = x + y @ p('mlp.fc2.weight').T + p('mlp.fc2.bias')
  x = _layer_norm(x, s['norm.weight'], s['norm.bias'])
  return x[:, 1:].reshape(batch, h, w, dim)


def test_forward_equals_a_numpy_implementation_of_timm(tiny):
  _, variables, images, apply = tiny
  tokens = apply(variables, images)
  assert tokens.shape == (2, 4, 4, 192) and tokens.dtype == jnp.float32
  expected = timm_forward(TIMM.to_source(variables), images, patch=8, heads=3, depth=2)
  np.testing.assert_allclose(tokens, expected, atol=2e-4, rtol=1e-4)


def test_to_torch_from_torch_round_trip_is_exact(tiny):
  _, variables, images, apply = tiny
  restored = TIMM.from_source(TIMM.to_source(variables), variables)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), restored, variables)
  assert all(jax.tree.leaves(same))
  assert np.array_equal(apply(restored, images), apply(variables, images))


def pil_bicubic(grid, size):
  """Each channel of [n, n, D] resized to `size` (h, w) by PIL's float bicubic (antialiased)."""
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., c]), mode='F').resize(
      (size[1], size[0]), Image.BICUBIC)) for c in range(grid.shape[-1])]
  return np.stack(channels, -1)


def test_pos_embed_resampling_keeps_class_token_and_matches_pil_bicubic():
  pos_embed = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 5)).astype(np.float32)
  assert vit.resample_pos_embed(pos_embed, (14, 14)) is pos_embed  # same grid: untouched
  grid = pos_embed[0, 1:].reshape(14, 14, 5)
  for size in [(20, 24), (6, 10), (32, 32)]:  # up, down (antialiased), the 512-crop grid
    resized = np.asarray(vit.resample_pos_embed(pos_embed, size))
    assert resized.shape == (1, 1 + size[0] * size[1], 5)
    assert np.array_equal(resized[0, 0], pos_embed[0, 0])
    np.testing.assert_allclose(resized[0, 1:].reshape(*size, 5), pil_bicubic(grid, size),
                               atol=2e-5)


def test_other_input_grid_equals_a_model_stored_at_that_grid_loaded_by_from_torch(tiny):
  # The 4 x 4 model on 48 x 48 images resamples its embeddings to 6 x 6 on the fly; a
  # 6 x 6 model loaded from its checkpoint by from_torch must compute the same tokens.
  model, variables, _, apply = tiny
  images = jax.random.normal(jax.random.key(3), (1, 48, 48, 3))
  big = ViT(**{**TINY, 'pretrained_image_size': 48})
  like = abstract_params(big, size=48)
  loaded = TIMM.from_source(TIMM.to_source(variables), like)
  assert loaded['params']['pos_embed'].shape == (1, 37, 192)
  np.testing.assert_allclose(big.apply(loaded, images, train=False), apply(variables, images),
                             atol=1e-5)
  # A 224-grid (14 x 14) checkpoint goes into a model stored at another grid.
  state = TIMM.to_source(variables)
  state['pos_embed'] = np.zeros((1, 1 + 14 * 14, 192), np.float32)
  loaded = TIMM.from_source(state, abstract_params(model))
  assert loaded['params']['pos_embed'].shape == (1, 17, 192)


def test_shapes_other_than_pos_embed_are_not_adapted(tiny):
  _, variables, _, _ = tiny
  state = TIMM.to_source(variables)
  state['blocks.0.mlp.fc1.weight'] = np.zeros((10, 192), np.float32)
  state['pos_embed'] = np.zeros((1, 1 + 14 * 14, 192), np.float32)
  fit = weights.fit(TIMM, state, {c: {'backbone': tree} for c, tree in variables.items()})
  assert fit.misshaped == ['blocks.0.mlp.fc1.weight (10, 192) (model: (768, 192))']


def test_drop_path_only_in_training_and_rates_grow_linearly(tiny):
  _, variables, images, apply = tiny
  assert attention.drop_path_rates(0.1, 5) == pytest.approx((0.0, 0.025, 0.05, 0.075, 0.1))
  model = ViT(**TINY, drop_path_rate=0.5)
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.DropPath):
      rates[context.module.path[0]] = context.module.rate
    return next_fun(*args, **kwargs)

  def train_apply(seed):
    with nn.intercept_methods(record):
      return model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(seed)})

  a, b = train_apply(0), train_apply(1)
  assert rates == {'blocks_0': 0.0, 'blocks_1': 0.5}
  assert not np.allclose(a, b)  # the second block's branches are dropped at random
  evaluated = model.apply(variables, images, train=False)
  np.testing.assert_allclose(evaluated, apply(variables, images), atol=1e-5)  # eval: no drop path
  # Without drop path and dropout, training computes what evaluation does.
  np.testing.assert_allclose(ViT(**TINY).apply(variables, images, train=True), evaluated,
                             atol=1e-6)


def test_drop_path_drops_whole_examples_and_rescales_the_rest():
  x = jnp.ones((2000, 3, 4))
  y = attention.DropPath(0.25).apply({}, x, train=True, rngs={'dropout': jax.random.key(0)})
  per_example = np.asarray(y).reshape(2000, -1)
  kept = per_example[:, 0] > 0
  np.testing.assert_allclose(per_example[kept], 1 / 0.75)
  assert np.all(per_example[~kept] == 0)
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_array_equal(attention.DropPath(0.25).apply({}, x, train=False), x)


@pytest.mark.parametrize('fields,match', [
    ({'size': 'huge'}, r"size must be one of \('tiny', 'small', 'base', 'large'\), got 'huge'"),
    ({'patch_size': 14}, r'patch_size must be one of \(8, 16\).*got 14'),
    ({'pretrained_image_size': 100}, r'multiple of patch_size 16, got 100'),
    ({'depth': -1}, r'depth must be 0'),
    ({'stem': 'hybrid'}, r"stem must be one of \('patch', 'conv'\), got 'hybrid'"),
    ({'stem': 'conv', 'stem_convs_per_stage': 0}, r'stem_convs_per_stage must be a positive'),
    ({'stem_convs_per_stage': 2}, r"applies to stem='conv' only"),
])
def test_bad_fields_are_refused_with_the_valid_values(fields, match):
  with pytest.raises(ValueError, match=match):
    ViT(**fields)


def test_input_not_divisible_by_the_patch_size_is_refused(tiny):
  model, variables, _, _ = tiny
  with pytest.raises(ValueError, match=r'divisible by 8, got \(36, 32\).*multiple of 8'):
    model.apply(variables, jnp.zeros((1, 36, 32, 3)), train=False)


# ---------------------------------------------------------------------------- conv stem

def conv_stem_count(width, patch, per_stage=1, channels=3):
  """Parameters (and BatchNorm statistics) of Xiao et al.'s stem, layer by layer."""
  params = stats = 0
  num_stages = int(math.log2(patch))
  for i in range(num_stages):
    out = width // 2 ** (num_stages - 1 - i)
    for _ in range(per_stage):
      params += 3 * 3 * channels * out + 2 * out  # bias-free 3x3 conv, BatchNorm scale, bias
      stats += 2 * out  # BatchNorm mean and var
      channels = out
  return params + channels * width + width, stats  # the 1x1 projection, with bias


@pytest.mark.parametrize('size,patch,per_stage', [
    ('tiny', 8, 1), ('tiny', 16, 1), ('small', 16, 1), ('tiny', 8, 2), ('tiny', 8, 3)])
def test_conv_stem_replaces_only_the_patch_embedding(size, patch, per_stage):
  width, depth, _ = vit.SIZES[size]
  variables = abstract_params(ViT(size=size, patch_size=patch, stem='conv',
                                  stem_convs_per_stage=per_stage))
  params = variables['params']
  assert 'patch_embed' not in params
  stem, stats = conv_stem_count(width, patch, per_stage)
  patch_embed = 3 * patch * patch * width + width
  grid = 224 // patch
  assert num_params(params) == (timm_count(width, depth, patch, grid, classes=0) - patch_embed
                                + stem)
  assert num_params(variables['batch_stats']) == stats
  # The paper's ViT_C-1GF stem (width 192, patch 16): 3x3 convs of 24, 48, 96, 192 channels.
  num_stages = int(math.log2(patch))
  channels = [params['conv_stem'][f'convs_{i}']['Conv_0']['kernel'].shape[-1]
              for i in range(num_stages * per_stage)]
  assert channels == [width // 2 ** i for i in reversed(range(num_stages))
                      for _ in range(per_stage)]
  assert params['conv_stem']['proj']['kernel'].shape == (1, 1, width, width)


@pytest.fixture(scope='module')
def conv_tiny():
  """(model, variables, jitted eval apply) of the 2-block ViT-Ti/8 of `tiny` with a conv stem
  of two convolutions per stage (stride 2, then stride 1)."""
  model = ViT(**TINY, stem='conv', stem_convs_per_stage=2)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, variables, apply


def numpy_conv3x3(x, kernel, stride):
  """[B, H, W, C] (H, W even) -> [B, H/s, W/s, F] in float64 with 'SAME' padding: one pixel
  of zeros each side at stride 1; at stride 2 only after the input (PyTorch's padding=1
  would put one each side)."""
  before = 1 if stride == 1 else 0
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (before, 1), (before, 1), (0, 0)))
  out_h, out_w = x.shape[1] // stride, x.shape[2] // stride
  kernel = np.asarray(kernel, np.float64)
  return sum(padded[:, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride]
             @ kernel[dy, dx] for dy in range(3) for dx in range(3))


def numpy_conv_stem(params, stats, images, per_stage):
  """The stem in float64 NumPy: 3x3 convs (stride 2 first in each stage, then stride 1),
  BatchNorm with running statistics (epsilon 1e-5), ReLU; then the 1x1 conv with bias."""
  x = images
  for i in range(len(stats)):
    y = numpy_conv3x3(x, params[f'convs_{i}']['Conv_0']['kernel'], 1 if i % per_stage else 2)
    bn, running = params[f'convs_{i}']['BatchNorm_0'], stats[f'convs_{i}']['BatchNorm_0']
    y = (y - running['mean']) / np.sqrt(running['var'] + 1e-5) * bn['scale'] + bn['bias']
    x = np.maximum(y, 0)
  proj = params['proj']
  return x @ np.asarray(proj['kernel'], np.float64)[0, 0] + proj['bias']


def test_conv_stem_keeps_the_token_grid_and_matches_a_numpy_implementation(conv_tiny):
  _, variables, apply = conv_tiny
  for shape in [(2, 32, 32, 3), (1, 48, 64, 3)]:
    images = jax.random.normal(jax.random.key(4), shape)
    assert apply(variables, images).shape == (shape[0], shape[1] // 8, shape[2] // 8, 192)
  # Non-trivial running statistics, so the reference sees how they are applied.
  stats = jax.tree.map(lambda x: x + 0.3 * jax.random.uniform(jax.random.key(5), x.shape),
                       variables['batch_stats'])['conv_stem']
  params = variables['params']['conv_stem']
  images = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
  assert len(stats) == 6  # 3 stages of 2
  embedded = vit.ConvStem(192, 8, convs_per_stage=2).apply(
      {'params': params, 'batch_stats': stats}, images, train=False)
  assert embedded.shape == (2, 4, 4, 192)
  np.testing.assert_allclose(embedded, numpy_conv_stem(params, stats, images, per_stage=2),
                             atol=1e-4, rtol=1e-4)


def test_conv_stem_batch_norm_uses_batch_statistics_when_training(conv_tiny):
  model, variables, apply = conv_tiny
  images = 2.0 + jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
  trained, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  first = lambda tree: tree['conv_stem']['convs_0']['BatchNorm_0']
  conv = numpy_conv3x3(images, variables['params']['conv_stem']['convs_0']['Conv_0']['kernel'],
                       stride=2)
  # PyTorch's momentum 0.1 from the initial mean 0.
  np.testing.assert_allclose(first(updated['batch_stats'])['mean'], 0.1 * conv.mean((0, 1, 2)),
                             atol=1e-5, rtol=1e-4)
  assert not np.allclose(trained, apply(variables, images), atol=1e-3)
