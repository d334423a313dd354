"""LR-ASPP on MobileNetV3: torchvision's parameter counts and feature maps, its logits and
class maps from its checkpoints, backbone-only loading, and refused fields.

The reference is torchvision's own code with random weights and randomised BatchNorm
statistics (tests/references.py); its files are saved as a user would download them and
loaded through `segjax.weights.load`, as `config.init_from` does.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import references
from references import torch
import test_weights
from segjax import configs
from segjax import models
from segjax import weights
from segjax.errors import ConfigError
from segjax.models import lraspp
from segjax.models.backbones import mobilenetv3

ARCHS = ('mobilenet_v3_large', 'mobilenet_v3_small')
# torchvision's published `num_params` (sum of p.numel() over model.parameters()):
# lraspp_mobilenet_v3_large with 21 classes, and the ImageNet mobilenet_v3_large / _small,
# whose classifier (two Linear layers) is not part of a segjax backbone.
PUBLISHED_LRASPP_LARGE = 3_221_538
PUBLISHED_IMAGENET = {'mobilenet_v3_large': 5_483_032, 'mobilenet_v3_small': 2_542_856}


def lraspp_model(backbone='mobilenet_v3_large', num_classes=21, **fields):
  config = ml_collections.ConfigDict({'name': 'lraspp', 'backbone': backbone, **fields})
  return models.get_model(config, num_classes)


def torchvision_lraspp(arch, num_classes=21, seed=0):
  """torchvision's LRASPP on `arch` in eval mode, random weights and BatchNorm statistics:
  its `lraspp_mobilenet_v3_large`, or for Small the same builder's `_lraspp_mobilenetv3` on
  `mobilenet_v3_small(dilated=True)` (torchvision publishes no weights for that one)."""
  if arch == 'mobilenet_v3_large':
    return test_weights.torchvision_model('lraspp_mobilenet_v3_large', num_classes, seed)
  torchvision = references.import_torchvision()
  torch.manual_seed(seed)
  segmentation = torchvision.models.segmentation
  model = segmentation.lraspp._lraspp_mobilenetv3(  # pylint: disable=protected-access
      torchvision.models.mobilenet_v3_small(dilated=True), num_classes)
  return references.randomize_batch_norm(model, seed).eval()


def torchvision_imagenet(arch, seed=0):
  """torchvision's ImageNet `mobilenet_v3_large` / `_small` (classifier included), eval
  mode, random weights and BatchNorm statistics."""
  torch.manual_seed(seed)
  model = getattr(references.import_torchvision().models, arch)()
  return references.randomize_batch_norm(model, seed).eval()


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count(module):
  return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope='module', params=ARCHS)
def saved_lraspp(request, tmp_path_factory):
  """(arch, torchvision's LRASPP on it, the path of its saved state dict)."""
  reference = torchvision_lraspp(request.param)
  path = str(tmp_path_factory.mktemp('weights') / f'lraspp_{request.param}.pth')
  torch.save(reference.state_dict(), path)
  return request.param, reference, path


# ---------------------------------------------------------------------------- architecture

@references.needs_torch
@pytest.mark.parametrize('arch', ARCHS)
def test_parameter_counts_equal_torchvisions(arch):
  """Ours against torchvision's published counts and its code's: the backbone without the
  ImageNet classifier, the whole LR-ASPP, and one running mean and var per BatchNorm channel
  (torchvision's buffers without num_batches_tracked)."""
  imagenet = torchvision_imagenet(arch)
  assert count(imagenet) == PUBLISHED_IMAGENET[arch]
  variables = test_weights.abstract_variables(lraspp_model(arch))
  assert num_params(variables['params']['backbone']) == (
      PUBLISHED_IMAGENET[arch] - count(imagenet.classifier))
  reference = torchvision_lraspp(arch)
  if arch == 'mobilenet_v3_large':
    assert count(reference) == PUBLISHED_LRASPP_LARGE
  assert num_params(variables['params']) == count(reference)
  buffers = sum(b.numel() for name, b in reference.named_buffers()
                if not name.endswith('num_batches_tracked'))
  assert num_params(variables['batch_stats']) == buffers


@references.needs_torch
@pytest.mark.parametrize('arch,low,low_channels,high_channels', [
    ('mobilenet_v3_large', 'block4', 40, 960),
    ('mobilenet_v3_small', 'block2', 24, 576),
])
def test_low_and_high_features_are_torchvisions(arch, low, low_channels, high_channels):
  """The head's inputs (torchvision's IntermediateLayerGetter 'low' and 'high') have its
  shapes at a size no stride divides: ceil(52 / 8) x ceil(76 / 8) and, dilated, / 16."""
  assert lraspp.low_feature(arch) == low
  with torch.no_grad():
    theirs = torchvision_lraspp(arch).backbone(torch.zeros(1, 3, 52, 76))
  for dilated, high_size in ((True, (4, 5)), (False, (2, 3))):
    backbone = mobilenetv3.MobileNetV3(arch, dilated)
    features = jax.eval_shape(
        lambda x, backbone=backbone: backbone.init_with_output(jax.random.key(0), x,
                                                               train=False)[0],
        jax.ShapeDtypeStruct((1, 52, 76, 3), jnp.float32))
    assert features[low].shape == (1, 7, 10, low_channels)
    assert features['last'].shape == (1, *high_size, high_channels)
    assert mobilenetv3.feature_strides(arch, dilated)['last'] == (16 if dilated else 32)
  assert tuple(theirs['low'].shape) == (1, low_channels, 7, 10)
  assert tuple(theirs['high'].shape) == (1, high_channels, 4, 5)


# ---------------------------------------------------------------------------- torchvision's files

def test_whole_model_gives_torchvisions_logits_and_class_maps(saved_lraspp):
  """torchvision's checkpoint (Large: `lraspp_mobilenet_v3_large`'s published layout) loads
  whole and gives its logits (relative max difference < 1e-4) and class maps at 64x64 and
  52x76."""
  arch, reference, path = saved_lraspp
  model = lraspp_model(arch)
  variables, part, message = weights.load(path, model, test_weights.abstract_variables(model))
  assert part == 'model' and 'not used' not in message, message
  assert f'loaded the whole model (torchvision lraspp_{arch}, ' in message
  apply = jax.jit(functools.partial(model.apply, train=False))
  for seed, size in enumerate(test_weights.SIZES):
    images = test_weights.images_nchw(size, seed)
    with torch.no_grad():
      theirs = reference(torch.from_numpy(images))['out'].numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    assert ours.shape == theirs.shape == (2, *size, 21)
    assert test_weights.relative_difference(ours, theirs) < test_weights.TOLERANCE, size
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_another_class_count_or_width_loads_the_backbone_and_says_why(saved_lraspp):
  arch, _, path = saved_lraspp
  for fields, mismatch in (
      ({'num_classes': 5}, 'classifier.low_classifier.weight'),
      ({'inter_channels': 64}, 'classifier.cbr.0.weight')):
    model = lraspp_model(arch, **fields)
    like = test_weights.abstract_variables(model)
    variables, part, message = weights.load(path, model, like)
    assert part == 'backbone', message
    assert f'loaded the backbone only (torchvision {arch} (segmentation backbone), ' in message
    assert mismatch in message and 'not used from the file: classifier.* (' in message
    assert variables['params']['high_classifier'] is like['params']['high_classifier']


@references.needs_torch
@pytest.mark.parametrize('arch', ARCHS)
def test_imagenet_file_loads_the_backbone_and_gives_torchvisions_features(arch, tmp_path):
  """An ImageNet state dict ('features.*', its classifier unused) starts the backbone; the
  backbone, not dilated as on ImageNet, then gives torchvision's `features` output."""
  reference = torchvision_imagenet(arch)
  path = str(tmp_path / f'{arch}.pth')
  torch.save(reference.state_dict(), path)
  model = lraspp_model(arch)
  like = test_weights.abstract_variables(model)
  variables, part, message = weights.load(path, model, like)
  assert part == 'backbone'
  assert f'init_from {path}: loaded the backbone only (torchvision {arch}, ' in message
  assert message.endswith('not used from the file: classifier.* (4)'), message
  assert variables['params']['low_classifier'] is like['params']['low_classifier']

  images = test_weights.images_nchw((52, 76), seed=0)
  with torch.no_grad():
    theirs = reference.features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
  backbone = {c: tree['backbone'] for c, tree in variables.items()}
  apply = jax.jit(functools.partial(mobilenetv3.MobileNetV3(arch).apply, train=False))
  ours = apply(backbone, images.transpose(0, 2, 3, 1))['last']
  assert test_weights.relative_difference(np.asarray(ours), theirs) < test_weights.TOLERANCE


# ---------------------------------------------------------------------------- refused fields

@pytest.mark.parametrize('fields,message', [
    ({'backbone': 'mobilenet_v2'},
     r"unknown LR-ASPP backbone 'mobilenet_v2'; use one of \('mobilenet_v3_large', "
     r"'mobilenet_v3_small'\)"),
    ({'inter_channels': 0}, r'inter_channels must be a positive int \(128 .*got 0'),
    ({'inter_channels': 12.5}, 'inter_channels must be a positive int'),
    ({'dilated': 'yes'}, r"dilated must be True .* or False, got 'yes'"),
    ({'output_stride': 8}, r"model 'lraspp' has no field\(s\) \['output_stride'\]"),
])
def test_bad_fields_are_refused_with_the_fix(fields, message):
  with pytest.raises(ConfigError, match=message):
    lraspp_model(**fields)


def test_the_experiment_refuses_a_backbone_it_does_not_have():
  config = test_weights.recipe_config('lraspp', 'backbone=resnet50')
  with pytest.raises(ConfigError, match="model 'lraspp': unknown LR-ASPP backbone 'resnet50'"):
    configs.validate(config)
  with pytest.raises(ValueError, match="unknown MobileNetV3 'mobilenet_v1'"):
    mobilenetv3.MobileNetV3('mobilenet_v1')
