"""Training crops of any (height, width) and evaluation of images of any size and aspect."""
import os

import numpy as np
from PIL import Image
import pytest

from segjax import configs
from segjax import data
from segjax import metrics
from segjax.data import pipeline
from segjax.errors import ConfigError, DataError
from conftest import tiny_config

# (stem, height, width): validation images of several sizes and aspects.
VALIDATION = [('v0', 5, 7), ('v1', 9, 4), ('v2', 5, 33), ('v3', 6, 6), ('v4', 3, 3)]
TRAIN = [('t0', 12, 10), ('t1', 20, 30)]
NUM_CLASSES = 3
IGNORE = 255


def folder_config(tmp_path, source):
  config = tiny_config(tmp_path / 'tfds')
  config.dataset.name = 'folder'
  config.dataset.source_dir = str(source)
  config.dataset.class_names = tuple(f'class{i}' for i in range(NUM_CLASSES))
  config.eval_batch_size = 2
  config.batch_size = 2
  return config


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A folder dataset of index masks; returns (config, sources, {stem: label})."""
  tmp_path = tmp_path_factory.mktemp('sizes')
  source = tmp_path / 'mine'
  rng = np.random.default_rng(0)
  labels = {}
  for stem, height, width in VALIDATION + TRAIN:
    labels[stem] = rng.choice([0, 1, 2, IGNORE], (height, width)).astype(np.uint8)
    for directory, array in (('images', rng.integers(0, 256, (height, width, 3), np.uint8)),
                             ('masks', labels[stem])):
      os.makedirs(source / directory, exist_ok=True)
      Image.fromarray(array).save(source / directory / f'{stem}.png')
  (source / 'train.txt').write_text(''.join(f'{stem}\n' for stem, _, _ in TRAIN))
  (source / 'val.txt').write_text(''.join(f'{stem}\n' for stem, _, _ in VALIDATION))
  config = folder_config(tmp_path, source)
  return config, data.load_sources(config.dataset), labels


def stems_in_order(source):
  return [os.path.splitext(os.path.basename(source[i]['file_name'].decode()))[0]
          for i in range(len(source))]


def test_pad_size_is_the_largest_image_rounded_up_to_32(prepared):
  config, sources, _ = prepared
  assert pipeline.max_image_size(sources['validation']) == (9, 33)  # recorded when prepared
  listed = [sources['validation'][i] for i in range(len(sources['validation']))]
  assert pipeline.max_image_size(listed) == (9, 33)  # scanned when not recorded
  assert pipeline.eval_pad_size(sources['validation'], config.dataset) == (32, 64)
  config.dataset.eval_pad_size = (40, 48)
  assert pipeline.eval_pad_size(sources['validation'], config.dataset) == (40, 48)
  config.dataset.eval_pad_size = 0


def test_eval_batches_cover_every_pixel_once_at_label_resolution(prepared):
  config, sources, labels = prepared
  spec = data.get_spec(config.dataset)
  batches = list(pipeline.eval_batches(sources['validation'], spec, config))
  assert [b['image'].shape for b in batches] == [(2, 32, 64, 3)] * 3
  assert all(b['label'].shape == (2, 32, 64) and b['label'].dtype == np.int32 for b in batches)
  images = np.concatenate([b['image'] for b in batches])
  padded = np.concatenate([b['label'] for b in batches])
  covered = np.zeros(padded.shape, np.int64)
  for row, stem in enumerate(stems_in_order(sources['validation'])):
    height, width = labels[stem].shape
    np.testing.assert_array_equal(padded[row, :height, :width], labels[stem])
    covered[row, :height, :width] += 1
  assert covered.sum() == sum(h * w for _, h, w in VALIDATION)
  assert (padded[covered == 0] == IGNORE).all()  # padding, and the filler 6th example
  assert (images[covered == 0] == 0).all()
  # Perfect predictions count exactly the labelled pixels of the original labels.
  confusion = sum(np.asarray(metrics.confusion_matrix(
      b['label'], b['label'], num_classes=NUM_CLASSES, ignore_label=IGNORE)) for b in batches)
  expected = np.bincount(np.concatenate([labels[stem].ravel() for stem, _, _ in VALIDATION]),
                         minlength=256)[:NUM_CLASSES]
  np.testing.assert_array_equal(np.diag(confusion), expected)
  assert confusion.sum() == expected.sum()


@pytest.mark.parametrize('num_threads', [0, 2])
def test_an_image_larger_than_the_pad_size_is_named(prepared, num_threads):
  config, sources, _ = prepared
  config.dataset.eval_pad_size = (8, 40)
  config.dataset.num_threads = num_threads
  spec = data.get_spec(config.dataset)
  try:
    with pytest.raises(DataError, match=r'v1.png is 9x4 .*larger than the evaluation pad size '
                                        r'8x40.*at least \(9, 4\)'):
      list(pipeline.eval_batches(sources['validation'], spec, config))
  finally:
    config.dataset.eval_pad_size = 0
    config.dataset.num_threads = 0


def test_training_crops_of_height_and_width(prepared):
  config, sources, _ = prepared
  spec = data.get_spec(config.dataset)
  config.dataset.image_size = (16, 24)
  batch = next(pipeline.train_batches(sources['train'], spec, config, start_step=0))
  assert batch['image'].shape == (2, 16, 24, 3) and batch['label'].shape == (2, 16, 24)
  assert set(np.unique(batch['label'])) <= {0, 1, 2, IGNORE}
  config.dataset.image_size = 32


@pytest.mark.parametrize('size', [32, (16, 24), [48, 64]])
def test_sizes_as_int_or_pair_are_accepted(tmp_path, size):
  config = folder_config(tmp_path, tmp_path)
  config.dataset.image_size = size
  config.dataset.eval_pad_size = size
  configs.validate(config)


@pytest.mark.parametrize('field, value, match', [
    ('image_size', (16, 0), 'image_size must be a positive int or a'),
    ('image_size', (1, 2, 3), 'image_size must be a positive int or a'),
    ('eval_pad_size', -32, 'eval_pad_size must be 0'),
    ('eval_pad_size', (32, True), 'eval_pad_size must be 0'),
])
def test_bad_sizes_are_refused(tmp_path, field, value, match):
  config = folder_config(tmp_path, tmp_path)
  config.dataset[field] = value
  with pytest.raises(ConfigError, match=match):
    configs.validate(config)


def test_shapes_needs_an_int_image_size(tmp_path):
  config = tiny_config(tmp_path)
  config.dataset.image_size = (32, 48)
  with pytest.raises(ConfigError, match="'shapes' generates square images"):
    configs.validate(config)
