"""Inference modes against direct computations, evaluation reports, and `--mode eval`."""
import functools
import json
import os
import re
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import configs
from segjax import evaluate
from segjax import metrics
from segjax import report
from segjax import train
from segjax.errors import ConfigError
from segjax.models import cnn
from segjax.models import unet
from conftest import tiny_config

NUM_CLASSES = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluation_config(**fields):
  defaults = dict(mode='whole', window=0, stride=0, scales=(1.0,), flip=False)
  return ml_collections.ConfigDict({**defaults, **fields})


def predict_fn(model, crop_size=None, **fields):
  return jax.jit(evaluate.make_predict(model, evaluation_config(**fields),
                                       num_classes=NUM_CLASSES, crop_size=crop_size))


def random_variables(model, images, seed):
  """Random variables of `model` drawn with numpy (flax's initialisers compile slowly here);
  BatchNorm variances are 1."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'var':
      return np.ones(leaf.shape, np.float32)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class PixelwiseModel(nn.Module):
  """A 1x1 convolution: each pixel's logits depend on that pixel only (flip-equivariant)."""
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train):
    del train
    return nn.Dense(self.num_classes)(images)


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


@pytest.fixture(scope='module')
def cnn_model(images):
  """A random-weight CNN whose logits depend on context (3x3 convolutions, pooling)."""
  model = cnn.Model(num_classes=NUM_CLASSES, features=4, num_stages=2)
  variables = random_variables(model, images, seed=1)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  return model, variables, apply


@pytest.fixture(scope='module')
def whole_logits(cnn_model, images):
  model, variables, _ = cnn_model
  return np.asarray(predict_fn(model)(variables, images))


def test_whole_is_the_model_at_input_resolution(cnn_model, images, whole_logits):
  _, _, apply = cnn_model
  assert whole_logits.shape == (2, 32, 32, NUM_CLASSES) and whole_logits.dtype == np.float32
  # Two compiled programs of the same model: equal up to float rounding (XLA may fuse them
  # differently; on some CPUs they differ by ~1e-8).
  np.testing.assert_allclose(whole_logits, apply(images), rtol=1e-6, atol=1e-6)


def test_whole_pads_to_a_multiple_of_32_and_crops(cnn_model, images):
  model, variables, apply = cnn_model
  got = predict_fn(model)(variables, images[:, :24, :20])
  expected = apply(jnp.pad(images[:, :24, :20], ((0, 0), (0, 8), (0, 12), (0, 0))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected)[:, :24, :20], atol=1e-6)


def test_slide_with_a_window_covering_the_image_equals_whole(cnn_model, images, whole_logits):
  model, variables, _ = cnn_model
  got = predict_fn(model, mode='slide', window=32, stride=7)(variables, images)
  np.testing.assert_array_equal(np.asarray(got), whole_logits)


def reference_starts(size, window, stride):
  """Every `stride` from 0 while the window fits, plus one window flush with the border."""
  starts = list(range(0, size - window + 1, stride))
  return starts if starts[-1] == size - window else starts + [size - window]


def test_slide_averages_overlapping_windows_like_a_loop(cnn_model, images):
  model, variables, apply = cnn_model
  images = images[:, :, :28]
  got = predict_fn(model, mode='slide', window=(16, 12), stride=(7, 5))(variables, images)
  total = np.zeros((2, 32, 28, NUM_CLASSES))
  count = np.zeros((32, 28))
  for top in reference_starts(32, 16, 7):
    for left in reference_starts(28, 12, 5):
      total[:, top:top + 16, left:left + 12] += apply(images[:, top:top + 16, left:left + 12])
      count[top:top + 16, left:left + 12] += 1
  assert count.max() > 1 and count.min() == 1  # the windows overlap and cover every pixel
  np.testing.assert_allclose(np.asarray(got), total / count[..., None], rtol=1e-5, atol=1e-6)


def test_slide_pads_an_image_smaller_than_the_window(cnn_model, images):
  model, variables, apply = cnn_model
  small = images[:, :12, :10]
  got = predict_fn(model, crop_size=16, mode='slide')(variables, small)  # window 0: crop 16
  padded = jnp.pad(small, ((0, 0), (0, 4), (0, 6), (0, 0)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(apply(padded))[:, :12, :10],
                             rtol=1e-6, atol=1e-6)


def test_window_and_stride_defaults():
  assert evaluate.window_and_stride(evaluation_config(), 512) == ((512, 512), (341, 341))
  assert evaluate.window_and_stride(evaluation_config(window=(769, 769)), 512) == (
      (769, 769), (513, 513))
  assert evaluate.window_and_stride(evaluation_config(stride=(100, 200)), (256, 512)) == (
      (256, 512), (100, 200))


def test_repeated_scale_averages_to_the_whole_probabilities(cnn_model, images, whole_logits):
  model, variables, _ = cnn_model
  got = predict_fn(model, scales=(1.0, 1.0))(variables, images)
  np.testing.assert_allclose(np.asarray(got), jax.nn.log_softmax(whole_logits), atol=1e-5)


def test_multi_scale_flip_equals_a_direct_computation(cnn_model, images):
  model, variables, apply = cnn_model
  got = predict_fn(model, scales=(0.75, 1.25), flip=True)(variables, images)
  probabilities = []
  for side, padding in ((24, 8), (40, 24)):  # 32 at 0.75 and 1.25, padded to a multiple of 32
    scaled = jax.image.resize(images, (2, side, side, 3), 'bilinear')
    for flip in (False, True):
      view = scaled[:, :, ::-1] if flip else scaled
      logits = apply(jnp.pad(view, ((0, 0), (0, padding), (0, padding), (0, 0))))
      logits = logits[:, :side, :side]
      logits = logits[:, :, ::-1] if flip else logits
      logits = jax.image.resize(logits, (2, 32, 32, NUM_CLASSES), 'bilinear')
      probabilities.append(jax.nn.softmax(logits))
  expected = np.log(np.mean(probabilities, axis=0))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_a_scale_unet_cannot_take_alone_runs_padded(images):
  """U-Net of depth 2 needs sides divisible by 4; 32 at scale 0.6 is 19."""
  model = unet.Model(num_classes=NUM_CLASSES, depth=2, features=2)
  variables = random_variables(model, images, seed=3)
  got = predict_fn(model, scales=(0.6,))(variables, images)
  scaled = jax.image.resize(images, (2, 19, 19, 3), 'bilinear')
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  logits = apply(jnp.pad(scaled, ((0, 0), (0, 13), (0, 13), (0, 0))))[:, :19, :19]
  expected = jax.image.resize(logits, (2, 32, 32, NUM_CLASSES), 'bilinear')
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_flip_of_a_flip_equivariant_model_equals_plain_inference(images):
  model = PixelwiseModel(NUM_CLASSES)
  variables = random_variables(model, images, seed=2)
  plain = np.asarray(predict_fn(model)(variables, images))
  flipped = np.asarray(predict_fn(model, flip=True)(variables, images))
  np.testing.assert_allclose(flipped, jax.nn.log_softmax(plain), atol=1e-5)
  np.testing.assert_array_equal(flipped.argmax(-1), plain.argmax(-1))


def test_flip_is_not_a_no_op_for_a_model_that_sees_context(cnn_model, images, whole_logits):
  model, variables, _ = cnn_model
  flipped = predict_fn(model, flip=True)(variables, images)
  assert np.abs(np.asarray(flipped) - jax.nn.log_softmax(whole_logits)).max() > 1e-3


def test_eval_step_counts_argmax_predictions(cnn_model, images, whole_logits):
  model, variables, _ = cnn_model
  labels = np.random.default_rng(0).integers(0, NUM_CLASSES, (2, 32, 32))
  labels[:, 28:] = 255  # padding rows never count
  step = evaluate.make_eval_step(evaluate.make_predict(model, evaluation_config(),
                                                       num_classes=NUM_CLASSES),
                                 num_classes=NUM_CLASSES, ignore_label=255)
  got = np.asarray(jax.jit(step)(variables, {'image': images, 'label': labels}))
  predictions = whole_logits.argmax(-1)
  valid = labels != 255
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(expected, (labels[valid], predictions[valid]), 1)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('field,value,message', [
    ('mode', 'tiles', "unknown evaluation.mode 'tiles'; valid: whole, slide"),
    ('window', (0, 16), 'evaluation.window must be 0 (the default), a positive int'),
    ('stride', -2, 'evaluation.stride must be 0 (the default), a positive int'),
    ('stride', (8, 40), 'evaluation.stride (8, 40) is larger than the window (32, 32)'),
    ('scales', (), 'evaluation.scales must be a non-empty tuple of positive numbers'),
    ('scales', (0.5, 0.0), 'evaluation.scales must be a non-empty tuple of positive numbers'),
])
def test_bad_evaluation_settings_are_refused(field, value, message, data_dir):
  config = tiny_config(data_dir)
  config.evaluation[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    configs.validate(config)


# ---------------------------------------------------------------------------- reports

def png_size(path):
  with open(path, 'rb') as f:
    header = f.read(24)
  assert header[:8] == b'\x89PNG\r\n\x1a\n' and header[12:16] == b'IHDR'
  return struct.unpack('>II', header[16:24])


def markdown_rows(text):
  """{first cell: other cells} of every Markdown table row (separators left out)."""
  rows = [line.strip('|').split('|') for line in text.splitlines() if line.startswith('|')]
  return [[cell.strip() for cell in row] for row in rows if not set(row[0]) <= set('-: ')]


def test_report_files_hold_the_metrics(tmp_path):
  confusion = np.array([[50, 3, 0, 2], [4, 30, 0, 1], [0, 0, 0, 0], [6, 0, 0, 9]])
  result = {**metrics.from_confusion(confusion), 'confusion': confusion}
  names = ['background', 'circle', 'star', 'square']
  settings = {'mode': 'slide', 'scales': [0.5, 1.0], 'flip': True}
  report.write(str(tmp_path), result, names, step=7, checkpoint='/x/checkpoints/7',
               evaluation=settings)

  record = json.load(open(tmp_path / 'metrics.json'))
  assert record['step'] == 7 and record['checkpoint'] == '/x/checkpoints/7'
  assert record['evaluation'] == settings
  for name in ('miou', 'macc', 'aacc', 'mdice', 'fwiou'):
    assert record[name] == result[name]
  assert record['per_class']['star'] == {'iou': None, 'acc': None, 'dice': None}
  assert record['per_class']['square']['iou'] == pytest.approx(9 / (15 + 12 - 9))

  header, scalars, class_header, *classes = markdown_rows(open(tmp_path / 'metrics.md').read())
  assert header == ['mIoU', 'mAcc', 'aAcc', 'mDice', 'fwIoU']
  for name, cell in zip(('miou', 'macc', 'aacc', 'mdice', 'fwiou'), scalars):
    assert float(cell) == pytest.approx(100 * result[name], abs=0.005)
  assert class_header == ['class', 'IoU', 'Acc', 'Dice']
  assert [row[0] for row in classes] == names and classes[2][1:] == ['-', '-', '-']
  assert float(classes[1][1]) == pytest.approx(100 * 30 / 38, abs=0.005)

  saved = np.load(tmp_path / 'confusion.npy')
  assert saved.dtype == np.int64
  np.testing.assert_array_equal(saved, confusion)
  side = int(report.figure_inches(4) * report.PLOT_DPI)
  assert png_size(tmp_path / 'confusion.png') == (side, side)


def test_confusion_plot_of_150_classes(tmp_path):
  confusion = np.random.default_rng(0).integers(0, 100, (150, 150))
  report.plot_confusion(confusion, [f'class {c}' for c in range(150)], tmp_path / 'c.png')
  assert png_size(tmp_path / 'c.png') == (3000, 3000)  # 20 pixels per class


# ---------------------------------------------------------------------------- end to end

LAUNCH_FLAGS = [
    '--config.model.depth=2', '--config.model.features=4', '--config.dataset.image_size=32',
    '--config.dataset.num_train=24', '--config.dataset.num_validation=10',
    '--config.batch_size=4', '--config.eval_batch_size=4', '--config.warmup_steps=0',
    '--config.schedule=constant', '--config.total_steps=2',
]


@pytest.mark.slow
def test_training_end_and_mode_eval_write_the_report(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.total_steps = config.eval_every = config.checkpoint_every = 2
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir)
  eval_dir = os.path.join(workdir, 'eval_2')
  record = json.load(open(os.path.join(eval_dir, 'metrics.json')))
  assert record['miou'] == final['miou'] and record['step'] == 2
  assert record['evaluation'] == {'mode': 'whole', 'scales': [1.0], 'flip': False}
  np.testing.assert_array_equal(np.load(os.path.join(eval_dir, 'confusion.npy')),
                                final['confusion'])
  for name in ('metrics.md', 'confusion.png'):
    os.remove(os.path.join(eval_dir, name))

  evaluated = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'experiments/unet.py', *LAUNCH_FLAGS,
       f'--config.dataset.data_dir={data_dir}', f'--workdir={workdir}', '--mode=eval',
       '--config.evaluation.mode=slide', '--config.evaluation.stride=16'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'fwIoU' in evaluated.stdout and 'background' in evaluated.stdout
  record = json.load(open(os.path.join(eval_dir, 'metrics.json')))
  assert record['evaluation'] == {'mode': 'slide', 'scales': [1.0], 'flip': False,
                                  'window': [32, 32], 'stride': [16, 16]}
  assert record['checkpoint'].endswith(os.path.join('best', '2'))
  assert png_size(os.path.join(eval_dir, 'confusion.png'))[0] > 0
  assert '| background |' in open(os.path.join(eval_dir, 'metrics.md')).read()
