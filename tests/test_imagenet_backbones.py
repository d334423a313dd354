"""ConvNeXt and Swin ImageNet classifiers (timm, transformers, mmpretrain / mmseg files) load
into the backbone of UPerNet and U-Net: random reference weights at 2-1-2-1 blocks, saved as
each source writes them; the four stage maps equal the reference's. The classifiers have no
per-stage output norms: those keep their initialisation (unit scale, zero bias), so the
reference maps are layer-normalised without an affine here, except where the file has the
norm (mmpretrain's `norm3`, which mmseg's UPerNet configs load too)."""
import os

import jax
import ml_collections
import numpy as np
import pytest

import references
from references import torch
import test_weights
from segjax import models
from segjax import weights
from segjax.errors import ConfigError
from segjax.models import backbones
from segjax.models.backbones import convnext
from segjax.models.backbones import swin

DEPTHS = (2, 1, 2, 1)
# Swin at 224: every stage's map is at least the 7-token window, where timm and transformers
# (which shrink the window and drop the shift on smaller maps) compute what mmseg does.
SIZES = {'convnext': (64, 64), 'swin': (224, 224)}
EPSILONS = {'convnext': convnext.EPSILON, 'swin': swin.EPSILON}


def stage_norm(maps, epsilon):
  """NCHW torch maps -> NHWC numpy, layer-normalised over channels without an affine."""
  return [torch.nn.functional.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2], eps=epsilon)
          .numpy() for m in maps]


def nhwc(maps):
  return [m.permute(0, 2, 3, 1).numpy() for m in maps]


def timm_reference(family, directory):
  """timm's classifier, its model.safetensors (as the hub's timm/* files) and its stage maps
  (NCHW images -> NHWC numpy maps)."""
  references.import_torchvision()
  timm = pytest.importorskip('timm')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  name = {'convnext': 'convnext_tiny', 'swin': 'swin_tiny_patch4_window7_224'}[family]
  torch.manual_seed(0)
  model = test_weights.randomize_transformer_weights(
      timm.create_model(name, pretrained=False, depths=DEPTHS)).eval()
  path = os.path.join(directory, 'model.safetensors')
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)

  def maps(images):
    return stage_norm(model.forward_intermediates(images, intermediates_only=True),
                      EPSILONS[family])

  return path, maps


def hf_reference(family, directory):
  """transformers' ImageNet classifier (facebook/convnext-*-224, microsoft/swin-*-224) saved
  with save_pretrained, and its stage maps."""
  transformers = references.import_transformers()
  torch.manual_seed(0)
  if family == 'convnext':
    model = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(depths=list(DEPTHS)))
    encoder = lambda images: model.convnext(images, output_hidden_states=True).hidden_states
  else:
    config = transformers.SwinConfig(depths=list(DEPTHS), num_heads=[3, 6, 12, 24],
                                     out_features=['stage1', 'stage2', 'stage3', 'stage4'])
    model = transformers.SwinForImageClassification(config)
  model = test_weights.randomize_transformer_weights(model).eval()
  model.save_pretrained(directory)
  if family == 'swin':  # SwinModel's hidden states are after the merging: the maps of the
    # SwinBackbone that loads the file (its stage norms initialised).
    backbone = transformers.SwinBackbone.from_pretrained(directory).eval()
    maps = lambda images: nhwc(backbone(images).feature_maps)
  else:
    maps = lambda images: stage_norm(encoder(images)[1:], EPSILONS[family])

  return os.path.join(directory, 'model.safetensors'), maps


def openmmlab_reference(family, directory):
  """mmpretrain's ConvNeXt classifier file ('backbone.' keys with `norm3` only, 'head.fc')
  or mmseg's pretrain/swin_*.pth (no stage norms; the official final `norm`), and the maps
  of mmseg's UPerNet backbone with the norms the file lacks at their initialisation."""
  backbone = test_weights.mmseg_upernet(test_weights._MMSEG_UPERNET[f'{family}_tiny'],  # pylint: disable=protected-access
                                        depths=DEPTHS).backbone
  kept = ('norm3.',) if family == 'convnext' else ()
  state = {k: v for k, v in backbone.state_dict().items()
           if not k.startswith(('norm0.', 'norm1.', 'norm2.', 'norm3.')) or k.startswith(kept)}
  with torch.no_grad():
    for i in range(4):
      norm = getattr(backbone, f'norm{i}')
      if not f'norm{i}.'.startswith(kept):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
  path = os.path.join(directory, 'imagenet.pth')
  if family == 'convnext':
    state = {**{f'backbone.{k}': v for k, v in state.items()},
             'head.fc.weight': torch.randn(1000, 768), 'head.fc.bias': torch.zeros(1000)}
    torch.save({'state_dict': state, 'meta': {}}, path)
  else:
    torch.save({**state, 'norm.weight': torch.ones(768), 'norm.bias': torch.zeros(768)}, path)
  return path, lambda images: nhwc(backbone(images))


REFERENCES = {'timm': timm_reference, 'hf': hf_reference, 'openmmlab': openmmlab_reference}
DESCRIPTIONS = {('timm', 'convnext'): 'timm ConvNeXt', ('timm', 'swin'): 'timm Swin',
                ('hf', 'convnext'): 'transformers ConvNext', ('hf', 'swin'): 'transformers Swin',
                ('openmmlab', 'convnext'): 'mmpretrain ConvNeXt',
                ('openmmlab', 'swin'): 'mmseg Swin'}


def initial_variables(model, size):
  return jax.device_get(model.init(jax.random.key(0), np.zeros((1, *size, 3), np.float32),
                                   train=False))


@references.needs_torch
@pytest.mark.parametrize('source,family', [  # transformers' (its import alone ~20 s): slow
    (source, family) if source != 'hf' else pytest.param(source, family, marks=pytest.mark.slow)
    for source in sorted(REFERENCES) for family in ('convnext', 'swin')])
def test_imagenet_classifier_loads_the_upernet_backbone_and_gives_its_maps(source, family,
                                                                          tmp_path):
  path, reference_maps = REFERENCES[source](family, str(tmp_path))
  model = models.get_model(ml_collections.ConfigDict(
      {'name': 'upernet', 'backbone': f'{family}_tiny', 'depths': DEPTHS}), 150)
  size = SIZES[family]
  variables, part, message = weights.load(path, model, initial_variables(model, size))
  assert part == 'backbone', message
  assert f'loaded the backbone only ({DESCRIPTIONS[source, family]}' in message
  assert 'not in the file, initialised: ' in message
  images = test_weights.images_nchw(size, seed=1)
  with torch.no_grad():
    theirs = reference_maps(torch.from_numpy(images))
  ours = backbones.hierarchical(f'{family}_tiny', depths=DEPTHS).apply(
      {'params': variables['params']['backbone']}, images.transpose(0, 2, 3, 1), train=False)
  assert len(ours) == len(theirs) == 4
  for mine, their in zip(ours, theirs):
    assert mine.shape == their.shape
    assert test_weights.relative_difference(np.asarray(mine), their) < 1e-4


HIERARCHICAL_MODELS = {'unet': {'name': 'unet', 'features': 8},
                       'deeplab': {'name': 'deeplab', 'output_stride': 32}}


def hierarchical_model(family, encoder):
  return models.get_model(ml_collections.ConfigDict(
      {**HIERARCHICAL_MODELS[family], 'encoder': encoder}), 6)


@references.needs_torch
@pytest.mark.parametrize('family', sorted(HIERARCHICAL_MODELS))
def test_convnext_encoder_loads_timms_imagenet_weights(family, tmp_path):
  """U-Net's and DeepLab's ConvNeXt-T encoder is UPerNet's: the full-size timm file loads."""
  references.import_torchvision()
  timm = pytest.importorskip('timm')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  reference = timm.create_model('convnext_tiny', pretrained=False)
  path = str(tmp_path / 'model.safetensors')
  save_file(reference.state_dict(), path)
  model = hierarchical_model(family, 'convnext_tiny')
  variables, part, message = weights.load(path, model, initial_variables(model, (64, 64)))
  assert part == 'backbone' and 'timm ConvNeXt' in message, message
  assert 'not used from the file: head.* (4)' in message
  np.testing.assert_array_equal(
      variables['params']['backbone']['stages_2']['blocks_8']['gamma'],
      reference.state_dict()['stages.2.blocks.8.gamma'].numpy())


@references.needs_torch
def test_a_classifier_missing_a_block_is_refused(tmp_path):
  """Only the stage norms may be missing: a file without a block's weights does not fit."""
  references.import_torchvision()
  timm = pytest.importorskip('timm')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  state = timm.create_model('convnext_tiny', pretrained=False, depths=DEPTHS).state_dict()
  path = str(tmp_path / 'model.safetensors')
  save_file({k: v for k, v in state.items() if not k.startswith('stages.2.blocks.1.')}, path)
  model = models.get_model(ml_collections.ConfigDict(
      {'name': 'upernet', 'backbone': 'convnext_tiny', 'depths': DEPTHS}), 150)
  with pytest.raises(ConfigError, match=r'missing keys \(9\): stages\.2\.blocks\.1\.'):
    weights.load(path, model, initial_variables(model, (64, 64)))


@pytest.mark.parametrize('family', sorted(HIERARCHICAL_MODELS))
@pytest.mark.parametrize('encoder', ['mit_b0', 'convnext_tiny', 'swin_tiny'])
def test_each_hierarchical_encoder_gives_input_size_logits(family, encoder):
  """52 x 76: ConvNeXt floors its strided sides, Swin and MiT round them up."""
  model = hierarchical_model(family, encoder)
  images = jax.ShapeDtypeStruct((2, 52, 76, 3), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert logits.shape == (2, 52, 76, 6)
  assert set(variables['params']['backbone']) == set(
      backbones.hierarchical(encoder).init(jax.random.key(0), np.zeros((1, 64, 64, 3)),
                                           train=False)['params'])


@pytest.mark.parametrize('fields,message', [
    ({'encoder': 'convnext_tiny'}, 'is not dilated: .* set output_stride=32, got 16'),
    ({'encoder': 'resnet50', 'output_stride': 32}, "DeepLab encoder must be '' .* got 'resnet50'"),
    ({'encoder': 'swin_tiny', 'output_stride': 32, 'aspp_rates': (6, 12, 18)},
     r'use \(\) or \(3, 6, 9\)'),
])
def test_deeplab_encoder_fields_are_checked(fields, message):
  with pytest.raises(ConfigError, match=message):
    models.get_model(ml_collections.ConfigDict({'name': 'deeplab', **fields}), 6)
