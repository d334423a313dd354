"""Published checkpoints load whole and give the reference implementation's logits.

For each recipe that names a published checkpoint, the reference model (torchvision's or
mmsegmentation's own code, random weights, randomised BatchNorm statistics) is saved as
the file a user would download, loaded through `segjax.weights.load` (what init_from
does), and both compute logits on the same images at two sizes (one not a multiple of the
output stride): relative max difference (max |ours - theirs| / max |theirs|) < 1e-4.
"""
import functools
import importlib.util
import os
import re

import jax
import numpy as np
import pytest

import references
from references import torch
from segjax import data as data_lib
from segjax import models
from segjax import weights
from segjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((64, 64), (52, 76))  # 52 and 76 are not multiples of the output stride 8
TOLERANCE = 1e-4


def recipe_config(experiment, name):
  return experiment_module(experiment).get_config(name)


def segjax_model(experiment, name, num_classes):
  return models.get_model(recipe_config(experiment, name).model, num_classes)


def abstract_variables(model, size=(64, 64)):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *size, 3), np.float32))


def relative_difference(ours, theirs):
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def images_nchw(size, seed):
  return np.random.default_rng(seed).normal(size=(2, 3, *size)).astype(np.float32)


def assert_same_logits(model, variables, reference, num_classes):
  """Logits of `model` and of `reference` (NCHW images -> NCHW logits) at SIZES."""
  apply = jax.jit(functools.partial(model.apply, train=False))
  for seed, size in enumerate(SIZES):
    images = images_nchw(size, seed)
    with torch.no_grad():
      theirs = reference(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    assert ours.shape == theirs.shape == (2, *size, num_classes)
    assert relative_difference(ours, theirs) < TOLERANCE, size


# ---------------------------------------------------------------------------- references

def torchvision_model(builder, num_classes=21, seed=0):
  segmentation = references.import_torchvision().models.segmentation
  torch.manual_seed(seed)
  # LR-ASPP has no auxiliary head (its builder refuses aux_loss=True).
  aux = {} if builder.startswith('lraspp') else {'aux_loss': True}
  model = getattr(segmentation, builder)(weights=None, weights_backbone=None,
                                         num_classes=num_classes, **aux)
  return references.randomize_batch_norm(model, seed).eval()


def mmseg_logits(model):
  """NCHW images -> NCHW logits at the input size, as mmseg's whole inference."""
  def infer(images):
    metas = [dict(img_shape=images.shape[2:], pad_shape=images.shape[2:])] * len(images)
    return model.encode_decode(images, metas)
  return infer


def hf_segformer(size, num_classes=150, seed=0):
  """transformers' SegformerForSemanticSegmentation of MiT `size` (random weights and BatchNorm
  statistics) -> (model, num_classes, NCHW images -> NCHW logits at the input size, as
  the image processor's post-processing upsamples them)."""
  transformers = references.import_transformers()
  from segjax.models import segformer  # pylint: disable=g-import-not-at-top
  from segjax.models.backbones import mit  # pylint: disable=g-import-not-at-top
  widths, depths = mit.SIZES[size]
  config = transformers.SegformerConfig(
      depths=list(depths), hidden_sizes=list(widths), num_labels=num_classes,
      decoder_hidden_size=segformer.decoder_channels(size))
  torch.manual_seed(seed)
  model = references.randomize_batch_norm(
      transformers.SegformerForSemanticSegmentation(config), seed).eval()

  def infer(images):
    logits = model(pixel_values=images).logits
    return torch.nn.functional.interpolate(logits, size=images.shape[2:], mode='bilinear',
                                           align_corners=False)
  return model, num_classes, infer


def randomize_transformer_weights(module, seed=0):
  """`references.randomize_batch_norm`, and random LayerNorm affines, layer scales (ConvNeXt's
  start at 1e-6) and relative position bias tables (mmseg's start at zero): parameters left
  at a constant would hide a permuted or misnamed tensor."""
  references.randomize_batch_norm(module, seed)
  generator = torch.Generator().manual_seed(seed)
  randn = lambda p: torch.randn(p.shape, generator=generator)
  with torch.no_grad():
    for layer in module.modules():
      if isinstance(layer, torch.nn.LayerNorm):
        layer.weight.copy_(1 + 0.2 * randn(layer.weight))
        layer.bias.copy_(0.2 * randn(layer.bias))
    for name, parameter in module.named_parameters():
      if name.endswith(('relative_position_bias_table', 'layer_scale_parameter', '.gamma')):
        parameter.copy_(randn(parameter))
  return module


def hf_upernet(backbone, num_classes=150, seed=0, depths=()):
  """transformers' UperNetForSemanticSegmentation on `backbone` ('convnext-tiny', 'swin-base':
  the hub's configs, window 12 for Swin-B; `depths` other blocks per stage), random weights
  (`randomize_transformer_weights`) -> (model, num_classes, NCHW images -> NCHW logits)."""
  transformers = references.import_transformers()
  from segjax.models.backbones import convnext, swin  # pylint: disable=g-import-not-at-top
  family, size = backbone.split('-')
  stages = ['stage1', 'stage2', 'stage3', 'stage4']
  if family == 'convnext':
    widths, size_depths = convnext.SIZES[size]
    config = transformers.ConvNextConfig(depths=list(depths or size_depths),
                                         hidden_sizes=list(widths), out_features=stages)
  else:
    width, size_depths = swin.SIZES[size]
    config = transformers.SwinConfig(
        embed_dim=width, depths=list(depths or size_depths),
        num_heads=[width * 2**i // swin.HEAD_DIM for i in range(4)],
        window_size=12 if size == 'base' else 7, out_features=stages)
  torch.manual_seed(seed)
  model = transformers.UperNetForSemanticSegmentation(
      transformers.UperNetConfig(backbone_config=config, num_labels=num_classes))
  model = randomize_transformer_weights(model, seed).eval()
  return model, num_classes, lambda images: model(pixel_values=images).logits


def mmseg_upernet(config_name, seed=0, depths=()):
  """mmseg's UPerNet of config `config_name` (`depths`: other blocks per stage), random
  weights (`randomize_transformer_weights`), in eval mode."""
  references.import_torchvision()  # before mmpretrain (mmseg's ConvNeXt), which imports it
  models_registry, _ = references.import_mmseg()
  # With pycocotools installed mmpretrain imports its multimodal models, which need
  # transformers 4 (BertPreTrainedModel): its ConvNeXt needs none of them.
  from mmpretrain.utils import dependency  # pylint: disable=g-import-not-at-top
  dependency.WITH_MULTIMODAL = False
  config = references.mmseg_config(config_name)
  if depths and config.model.backbone.type == 'SwinTransformer':
    config.model.backbone.depths = list(depths)
  elif depths:
    from segjax.models.backbones import convnext  # pylint: disable=g-import-not-at-top
    size = config.model.backbone.arch
    config.model.backbone.arch = dict(depths=list(depths), channels=list(convnext.SIZES[size][0]))
  torch.manual_seed(seed)
  model = models_registry.build(config.model)
  return randomize_transformer_weights(model, seed).eval()


HF_REFERENCES = {'segformer': hf_segformer, 'upernet': hf_upernet}  # family -> builder


_MMSEG_SCHEDULES = {'cityscapes': '4xb2-80k_cityscapes-512x1024',
                    'ade20k': '4xb4-160k_ade20k-512x512', 'voc': '4xb4-40k_voc12aug-512x512'}
_MMSEG_FCN_SCHEDULES = {**_MMSEG_SCHEDULES, 'ade20k': '4xb4-80k_ade20k-512x512',
                        'voc': '4xb4-20k_voc12aug-512x512'}


_MMSEG_SEGFORMER = {'ade': '8xb2-160k_ade20k-512x512', 'ade_640': '8xb2-160k_ade20k-640x640',
                    'cityscapes': '8xb1-160k_cityscapes-1024x1024'}
_MMSEG_UPERNET = {
    **{f'convnext_{size}': f'convnext/convnext-{size}_upernet_8xb2-amp-160k_ade20k-512x512.py'
       for size in ('tiny', 'small', 'base')},
    **{f'swin_{size}': f'swin/swin-{size}-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
       for size in ('tiny', 'small', 'base')},
    'swin_base_w12_in22k':
        'swin/swin-base-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py',
}


def reference_of(recipe):
  """('torchvision', builder), ('hf', family and size, e.g. 'segformer_b0') or ('mmseg',
  config file) of a published-checkpoint recipe."""
  source, _, rest = recipe.partition('_')
  if source == 'torchvision':
    return source, rest
  if source == 'hf':  # hf_segformer_b0_ade -> segformer_b0, hf_upernet_swin_tiny_ade -> upernet_swin-tiny
    family, *parts = rest.split('_')
    return source, f'{family}_{"-".join(parts[:2]) if family == "upernet" else parts[0]}'
  if rest.startswith('upernet_'):  # mmseg_upernet_convnext_tiny_ade, ..._swin_base_w12_in22k_ade
    return source, _MMSEG_UPERNET[rest[len('upernet_'):-len('_ade')]]
  if rest.startswith('segformer_'):  # mmseg_segformer_b0_ade, ..._b5_ade_640
    _, size, dataset = rest.split('_', 2)
    return source, f'segformer/segformer_mit-{size}_{_MMSEG_SEGFORMER[dataset]}.py'
  family, depth, _, dataset = rest.split('_')[:4]
  if family == 'segmenter':  # mmseg_segmenter_vit_{t,s,b,l}_mask_ade20k
    size = rest.split('_')[2]
    return source, f'segmenter/segmenter_vit-{size}_mask_8xb1-160k_ade20k-512x512.py'
  schedules = _MMSEG_FCN_SCHEDULES if family == 'fcn' else _MMSEG_SCHEDULES
  return source, f'{family}/{family}_{depth}-d8_{schedules[dataset]}.py'


def experiment_module(experiment):
  path = os.path.join(ROOT, 'experiments', f'{experiment}.py')
  spec = importlib.util.spec_from_file_location(experiment, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# One recipe per name table and source runs in the default suite, one per other distinct
# model (recipes that differ in their data only share one) in `-m slow`. torchvision's LR-ASPP
# runs in the default suite in tests/test_lraspp.py, which also compares its class maps.
DEFAULT_SUITE = ('torchvision_fcn_resnet50', 'torchvision_deeplabv3_resnet50',
                 'mmseg_deeplabv3plus_r50_d8_cityscapes', 'mmseg_deeplabv3_r50_d8_ade20k',
                 'mmseg_fcn_r50_d8_cityscapes', 'mmseg_segmenter_vit_t_mask_ade20k',
                 'hf_segformer_b0_ade', 'mmseg_segformer_b0_ade')
CHECKPOINT_RECIPES = [(experiment, name)
                      for experiment in ('fcn', 'deeplab', 'segmenter', 'segformer', 'lraspp',
                                         'upernet')
                      for name in experiment_module(experiment).CHECKPOINTS]


def distinct_models(recipes):
  """The recipes of `recipes` with a model no recipe before them has (the same source and
  model fields: class counts come from the reference)."""
  seen, distinct = set(), []
  for experiment, name in recipes:
    key = (name.partition('_')[0], repr(sorted(recipe_config(experiment, name).model.items())))
    if key not in seen or name in DEFAULT_SUITE:
      seen.add(key)
      distinct.append((experiment, name))
  return distinct


def test_every_published_checkpoint_recipe_has_a_reference():
  for _, name in CHECKPOINT_RECIPES:
    source, reference = reference_of(name)
    if source == 'mmseg':
      _, config_dir = references.import_mmseg()
      assert os.path.isfile(os.path.join(config_dir, reference)), (name, reference)
    elif source == 'hf':
      assert reference.split('_')[0] in HF_REFERENCES, name
    else:
      assert hasattr(references.import_torchvision().models.segmentation, reference), name
  assert set(DEFAULT_SUITE) <= {name for _, name in CHECKPOINT_RECIPES}


@pytest.mark.parametrize('experiment,recipe', [
    pytest.param(experiment, name, marks=() if name in DEFAULT_SUITE else pytest.mark.slow)
    for experiment, name in distinct_models(CHECKPOINT_RECIPES)])
def test_published_checkpoint_loads_whole_and_gives_the_reference_logits(experiment, recipe,
                                                                         tmp_path):
  source, name = reference_of(recipe)
  path = str(tmp_path / 'checkpoint.pth')
  if source == 'hf':
    family, size = name.split('_')
    reference, num_classes, infer = HF_REFERENCES[family](size)
    reference.save_pretrained(str(tmp_path))  # the hub's file: model.safetensors
    path = str(tmp_path / 'model.safetensors')
  elif source == 'torchvision':
    num_classes = 21
    reference = torchvision_model(name)
    torch.save(reference.state_dict(), path)
    infer = lambda images: reference(images)['out']
  else:
    build = mmseg_upernet if experiment == 'upernet' else references.build_mmseg_model
    reference = build(name)
    num_classes = reference.decode_head.num_classes
    torch.save({'state_dict': reference.state_dict(), 'meta': {}}, path)
    infer = mmseg_logits(reference)
  model = segjax_model(experiment, recipe, num_classes)
  variables, part, message = weights.load(path, model, abstract_variables(model))
  assert part == 'model' and 'loaded the whole model' in message, message
  # The auxiliary heads were loaded too; Swin files hold only unused index buffers (and
  # transformers 5's unused final norm) outside the model.
  unused = message.partition('not used from the file: ')[2]
  assert not unused or experiment == 'upernet' and re.fullmatch(r'backbone\.\* \(\d+\)', unused), \
      message
  assert_same_logits(model, variables, infer, num_classes)


# ---------------------------------------------------------------------------- file handling

@pytest.fixture(scope='module')
def torchvision_deeplab_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('weights') / 'deeplabv3_resnet50_coco.pth')
  torch.save(torchvision_model('deeplabv3_resnet50').state_dict(), path)
  return path


@references.needs_torch
def test_another_class_count_loads_the_backbone_and_says_why(torchvision_deeplab_file):
  model = segjax_model('deeplab', 'torchvision_deeplabv3_resnet50', 5)
  like = abstract_variables(model)
  variables, part, message = weights.load(torchvision_deeplab_file, model, like)
  assert part == 'backbone'
  assert 'loaded the backbone only (torchvision ResNet' in message
  assert 'classifier.4.weight (21, 256, 1, 1) (model: (5, 256, 1, 1))' in message
  assert 'not used from the file: classifier.* (' in message
  assert variables['params']['classifier'] is like['params']['classifier']  # left as it was


@references.needs_torch
def test_a_model_without_the_aux_head_skips_it_and_says_so(torchvision_deeplab_file):
  config = recipe_config('deeplab', 'torchvision_deeplabv3_resnet50')
  config.model.aux_head = False
  model = models.get_model(config.model, 21)
  _, part, message = weights.load(torchvision_deeplab_file, model, abstract_variables(model))
  assert part == 'model' and 'not used from the file: aux_classifier.* (7)' in message


@references.needs_torch
def test_prefixed_and_half_precision_files_load(torchvision_deeplab_file, tmp_path):
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  state = torch.load(torchvision_deeplab_file, weights_only=True)
  model = segjax_model('deeplab', 'torchvision_deeplabv3_resnet50', 21)
  like = abstract_variables(model)
  expected, _, _ = weights.load(torchvision_deeplab_file, model, like)
  for dtype in (torch.bfloat16, torch.float16):
    path = str(tmp_path / f'model_{dtype}.safetensors')
    safetensors_torch.save_file({f'model.{k}': v.to(dtype) if v.is_floating_point() else v
                                 for k, v in state.items()}, path)
    variables, part, _ = weights.load(path, model, like)
    assert part == 'model'
    kernel = variables['params']['classifier']['kernel']
    np.testing.assert_array_equal(
        kernel, expected['params']['classifier']['kernel'].astype(dtype_of(dtype))
        .astype(np.float32))
  # A key beside the prefixed model: not the whole model any more, but its backbone is.
  path = str(tmp_path / 'with_extra.pth')
  torch.save({**{f'model.{k}': v for k, v in state.items()}, 'step': torch.zeros(1)}, path)
  _, part, message = weights.load(path, model, like)
  assert part == 'backbone' and 'the whole-model keys do not fit: unexpected keys (1): step' \
      in message, message


def dtype_of(torch_dtype):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}[torch_dtype]


def test_a_file_that_fits_nothing_is_refused_with_its_keys(tmp_path):
  path = str(tmp_path / 'other.pth')
  reference = torchvision_model('fcn_resnet50')
  state = reference.state_dict()
  del state['backbone.layer4.2.bn3.running_var']
  torch.save(state, path)
  model = segjax_model('fcn', 'torchvision_fcn_resnet50', 21)
  with pytest.raises(ConfigError) as error:
    weights.load(path, model, abstract_variables(model))
  message = str(error.value)
  assert "does not fit model 'fcn' (closest: torchvision fcn_resnet50 model)" in message
  assert 'missing keys (1): backbone.layer4.2.bn3.running_var' in message


def test_models_without_published_weights_are_refused():
  with pytest.raises(ConfigError, match="model 'unet' with these fields cannot start from"):
    weights.check_loadable(models.get_model(recipe_config('unet', None).model, 2))
  narrow = recipe_config('deeplab', None).model  # ResNet-18 at width 16
  with pytest.raises(ConfigError, match="model 'deeplab' with these fields cannot start"):
    weights.check_loadable(models.get_model(narrow, 2))


# ---------------------------------------------------------------------------- eval without training

def test_eval_mode_runs_the_published_weights_without_a_checkpoint(data_dir, tmp_path, capsys):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from segjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from segjax import train  # pylint: disable=g-import-not-at-top
  from segjax.data import pipeline  # pylint: disable=g-import-not-at-top
  reference = torchvision_model('fcn_resnet50', num_classes=6)
  path = str(tmp_path / 'fcn_resnet50_shapes.pth')
  torch.save(reference.state_dict(), path)
  config = tiny_config(data_dir)
  config.model = recipe_config('fcn', 'torchvision_fcn_resnet50').model
  config.init_from = path
  result = train.evaluate_checkpoint(config, str(tmp_path / 'run'))
  printed = capsys.readouterr().out
  assert f'init_from {path}: loaded the whole model (torchvision fcn_resnet50' in printed
  assert 'No checkpoint in' in printed and 'evaluating the published weights' in printed
  # The same images through torchvision's model give the same confusion matrix.
  sources, spec = data_lib.load_sources(config.dataset), data_lib.get_spec(config.dataset)
  expected = 0
  for batch in pipeline.eval_batches(sources['validation'], spec, config):
    with torch.no_grad():
      logits = reference(torch.from_numpy(batch['image'].transpose(0, 3, 1, 2)))['out']
    expected += np.asarray(metrics_lib.confusion_matrix(
        logits.argmax(1).numpy(), batch['label'], num_classes=6, ignore_label=255))
  np.testing.assert_array_equal(result['confusion'], expected)


@references.needs_torch
def test_eval_mode_refuses_a_backbone_file_without_a_checkpoint(data_dir, tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from segjax import train  # pylint: disable=g-import-not-at-top
  from segjax.errors import SegjaxError  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'resnet50.pth')
  torch.save(references.import_torchvision().models.resnet50().state_dict(), path)
  config = tiny_config(data_dir)
  config.model = recipe_config('fcn', 'torchvision_fcn_resnet50').model
  config.init_from = path
  with pytest.raises(SegjaxError, match='holds only backbone weights for this model'):
    train.evaluate_checkpoint(config, str(tmp_path / 'run'))


# ---------------------------------------------------------------------------- predict at test scale

def write_image(path, size, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def predicted_map(output, stem):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(output, f'{stem}.png')) as picture:
    return np.asarray(picture)


def predict_with_recipe(experiment, recipe, weights_path, images, output, tmp_path):
  from segjax import predict  # pylint: disable=g-import-not-at-top
  config = recipe_config(experiment, recipe)
  config.init_from = weights_path
  config.eval_batch_size = 1
  written, skipped = predict.predict_files(config, str(tmp_path / 'no_run'), images, output)
  assert (written, skipped) == (len(os.listdir(images)), 0)


# Images at each protocol's own test scale: ADE20K's 512 short side (whole; and a slide over
# two windows), mmseg's Cityscapes resize keeps 1024x1024, torchvision's short side 520.
MMSEG_PREDICT = [
    pytest.param('deeplab', 'mmseg_deeplabv3_r50_d8_ade20k',
                 'deeplabv3/deeplabv3_r50-d8_4xb4-160k_ade20k-512x512.py', (512, 512),
                 marks=pytest.mark.slow),
    pytest.param('segmenter', 'mmseg_segmenter_vit_t_mask_ade20k',
                 'segmenter/segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py', (512, 683),
                 marks=pytest.mark.slow),
    pytest.param('deeplab', 'mmseg_deeplabv3plus_r50_d8_cityscapes',
                 'deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                 (1024, 1024), marks=pytest.mark.slow),
]


@pytest.mark.parametrize('experiment,recipe,config,size', MMSEG_PREDICT)
def test_predict_at_test_scale_gives_mmsegs_class_maps(experiment, recipe, config, size,
                                                       tmp_path):
  """`--mode predict` with init_from against mmseg's own `inference_model` (its test
  pipeline, data preprocessor and postprocessing) on the same image file."""
  reference = references.build_mmseg_model(config, keep_preprocessor=True)
  from mmseg.apis import inference_model  # pylint: disable=g-import-not-at-top  # after the stub
  weights_path = str(tmp_path / 'mmseg.pth')
  torch.save({'state_dict': reference.state_dict(), 'meta': {}}, weights_path)
  images, output = tmp_path / 'images', str(tmp_path / 'out')
  images.mkdir()
  write_image(str(images / 'street.png'), size, seed=3)
  predict_with_recipe(experiment, recipe, weights_path, str(images), output, tmp_path)
  ours = predicted_map(output, 'street')
  theirs = inference_model(reference, str(images / 'street.png')).pred_sem_seg.data[0].numpy()
  assert ours.shape == theirs.shape == size
  # Random weights leave some pixels with near-tied classes, where float rounding decides.
  assert np.mean(ours == theirs) > 0.9999


@pytest.mark.slow
def test_predict_at_test_scale_gives_torchvisions_class_maps(tmp_path):
  """torchvision's reference evaluation transform (short side 520, ImageNet normalisation)
  and model against `--mode predict` with the torchvision recipe."""
  functional = references.import_torchvision().transforms.functional
  from PIL import Image  # pylint: disable=g-import-not-at-top
  reference = torchvision_model('deeplabv3_resnet50')
  weights_path = str(tmp_path / 'deeplabv3_resnet50_coco.pth')
  torch.save(reference.state_dict(), weights_path)
  images, output = tmp_path / 'images', str(tmp_path / 'out')
  images.mkdir()
  write_image(str(images / 'room.png'), (520, 520), seed=4)
  predict_with_recipe('deeplab', 'torchvision_deeplabv3_resnet50', weights_path, str(images),
                      output, tmp_path)
  with Image.open(images / 'room.png') as picture:
    tensor = functional.normalize(functional.to_tensor(functional.resize(picture, 520)),
                                  (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  with torch.no_grad():
    theirs = reference(tensor[None])['out'][0].argmax(0).numpy()
  ours = predicted_map(output, 'room')
  assert ours.shape == theirs.shape == (520, 520)
  assert np.mean(ours == theirs) > 0.9999
