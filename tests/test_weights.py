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

import jax
import numpy as np
import pytest
import torch

import references
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
  model = getattr(segmentation, builder)(weights=None, weights_backbone=None,
                                         num_classes=num_classes, aux_loss=True)
  return references.randomize_batch_norm(model, seed).eval()


def mmseg_logits(model):
  """NCHW images -> NCHW logits at the input size, as mmseg's whole inference."""
  def infer(images):
    metas = [dict(img_shape=images.shape[2:], pad_shape=images.shape[2:])] * len(images)
    return model.encode_decode(images, metas)
  return infer


_MMSEG_SCHEDULES = {'cityscapes': '4xb2-80k_cityscapes-512x1024',
                    'ade20k': '4xb4-160k_ade20k-512x512', 'voc': '4xb4-40k_voc12aug-512x512'}
_MMSEG_FCN_SCHEDULES = {**_MMSEG_SCHEDULES, 'ade20k': '4xb4-80k_ade20k-512x512',
                        'voc': '4xb4-20k_voc12aug-512x512'}


def reference_of(recipe):
  """('torchvision', builder) or ('mmseg', config file) of a published-checkpoint recipe."""
  source, _, rest = recipe.partition('_')
  if source == 'torchvision':
    return source, rest
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


# One recipe per name table and source runs in the default suite, every other in `-m slow`.
DEFAULT_SUITE = ('torchvision_fcn_resnet50', 'torchvision_deeplabv3_resnet50',
                 'mmseg_deeplabv3plus_r50_d8_cityscapes', 'mmseg_deeplabv3_r50_d8_ade20k',
                 'mmseg_fcn_r50_d8_cityscapes', 'mmseg_segmenter_vit_t_mask_ade20k')
CHECKPOINT_RECIPES = [(experiment, name) for experiment in ('fcn', 'deeplab', 'segmenter')
                      for name in experiment_module(experiment).CHECKPOINTS]


def test_every_published_checkpoint_recipe_has_a_reference():
  for _, name in CHECKPOINT_RECIPES:
    source, reference = reference_of(name)
    if source == 'mmseg':
      _, config_dir = references.import_mmseg()
      assert os.path.isfile(os.path.join(config_dir, reference)), (name, reference)
    else:
      assert hasattr(references.import_torchvision().models.segmentation, reference), name
  assert set(DEFAULT_SUITE) <= {name for _, name in CHECKPOINT_RECIPES}


@pytest.mark.parametrize('experiment,recipe', [
    pytest.param(experiment, name, marks=() if name in DEFAULT_SUITE else pytest.mark.slow)
    for experiment, name in CHECKPOINT_RECIPES])
def test_published_checkpoint_loads_whole_and_gives_the_reference_logits(experiment, recipe,
                                                                         tmp_path):
  source, name = reference_of(recipe)
  path = str(tmp_path / 'checkpoint.pth')
  if source == 'torchvision':
    num_classes = 21
    reference = torchvision_model(name)
    torch.save(reference.state_dict(), path)
    infer = lambda images: reference(images)['out']
  else:
    reference = references.build_mmseg_model(name)
    num_classes = reference.decode_head.num_classes
    torch.save({'state_dict': reference.state_dict(), 'meta': {}}, path)
    infer = mmseg_logits(reference)
  model = segjax_model(experiment, recipe, num_classes)
  variables, part, message = weights.load(path, model, abstract_variables(model))
  assert part == 'model' and 'loaded the whole model' in message, message
  assert 'not used' not in message, message  # the auxiliary heads were loaded too
  assert_same_logits(model, variables, infer, num_classes)


# ---------------------------------------------------------------------------- file handling

@pytest.fixture(scope='module')
def torchvision_deeplab_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('weights') / 'deeplabv3_resnet50_coco.pth')
  torch.save(torchvision_model('deeplabv3_resnet50').state_dict(), path)
  return path


def test_another_class_count_loads_the_backbone_and_says_why(torchvision_deeplab_file):
  model = segjax_model('deeplab', 'torchvision_deeplabv3_resnet50', 5)
  like = abstract_variables(model)
  variables, part, message = weights.load(torchvision_deeplab_file, model, like)
  assert part == 'backbone'
  assert 'loaded the backbone only (torchvision ResNet' in message
  assert 'classifier.4.weight (21, 256, 1, 1) (model: (5, 256, 1, 1))' in message
  assert 'not used from the file: classifier.* (' in message
  assert variables['params']['classifier'] is like['params']['classifier']  # left as it was


def test_a_model_without_the_aux_head_skips_it_and_says_so(torchvision_deeplab_file):
  config = recipe_config('deeplab', 'torchvision_deeplabv3_resnet50')
  config.model.aux_head = False
  model = models.get_model(config.model, 21)
  _, part, message = weights.load(torchvision_deeplab_file, model, abstract_variables(model))
  assert part == 'model' and 'not used from the file: aux_classifier.* (7)' in message


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
