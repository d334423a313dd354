"""The embedded shapes dataset and the input pipeline."""
import numpy as np
import pytest

from segjax.data import pipeline
from segjax.data import shapes
from segjax import data
from segjax.errors import ConfigError, DataError
from conftest import tiny_config


def test_examples_are_deterministic_and_well_formed():
  image, label = shapes.generate_example(7, 64)
  image2, label2 = shapes.generate_example(7, 64)
  np.testing.assert_array_equal(image, image2)
  np.testing.assert_array_equal(label, label2)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert label.shape == (64, 64) and label.dtype == np.uint8
  assert set(np.unique(label)) <= set(range(shapes.NUM_CLASSES)) | {shapes.IGNORE_LABEL}


def test_ignore_pixels_lie_on_boundaries_between_labels():
  for seed in range(10):
    _, label = shapes.generate_example(seed, 64)
    ys, xs = np.nonzero(label == shapes.IGNORE_LABEL)
    assert len(ys) > 0
    for y, x in zip(ys, xs):
      window = label[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
      scored = set(np.unique(window)) - {shapes.IGNORE_LABEL}
      # An ignored pixel touches two labels, or sits inside a thin band of ignored pixels.
      assert len(scored) >= 2 or (window == shapes.IGNORE_LABEL).sum() >= 2


def _colour_bins(image):
  return (image // 32).astype(np.int64) @ np.array([64, 8, 1])  # 512 colour bins


def test_colour_does_not_tell_the_class():
  """A per-pixel colour classifier does no better than always guessing the commonest shape."""
  num_objects = shapes.NUM_CLASSES - 1
  histogram = np.zeros((512, num_objects))
  for seed in range(150):  # fit P(class | colour) on object pixels
    image, label = shapes.generate_example(seed, 64)
    mask = (label > 0) & (label < shapes.NUM_CLASSES)
    np.add.at(histogram, (_colour_bins(image[mask]), label[mask] - 1), 1)
  correct = total = 0
  counts = np.zeros(num_objects)
  for seed in range(1000, 1100):  # held out
    image, label = shapes.generate_example(seed, 64)
    mask = (label > 0) & (label < shapes.NUM_CLASSES)
    guess = histogram[_colour_bins(image[mask])].argmax(axis=1)
    correct += np.sum(guess == label[mask] - 1)
    total += mask.sum()
    counts += np.bincount(label[mask] - 1, minlength=num_objects)
  majority_rate = counts.max() / counts.sum()
  assert correct / total < majority_rate + 0.05, (correct / total, majority_rate)


def test_classes_are_imbalanced_around_a_dominant_background():
  counts = np.zeros(256, np.int64)
  for seed in range(100):
    counts += np.bincount(shapes.generate_example(seed, 64)[1].ravel(), minlength=256)
  object_counts = counts[1:shapes.NUM_CLASSES]
  assert (object_counts > 0).all()
  assert counts[0] > object_counts.sum()
  assert object_counts.max() > 2 * object_counts.min()
  assert 0 < counts[shapes.IGNORE_LABEL] < 0.1 * counts.sum()


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ConfigError, match="unknown dataset.name 'nope'.*shapes"):
    data.get_spec('nope')


def test_train_batches_resume_exactly(sources, data_dir):
  config = tiny_config(data_dir)
  spec = data.get_spec('shapes')
  from_start = pipeline.train_batches(sources['train'], spec, config, start_step=0)
  batches = [next(from_start) for _ in range(8)]  # crosses an epoch boundary (6 per epoch)
  assert batches[0]['image'].shape == (4, 32, 32, 3)
  assert batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].shape == (4, 32, 32) and batches[0]['label'].dtype == np.int32
  resumed = pipeline.train_batches(sources['train'], spec, config, start_step=5)
  for expected in batches[5:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
  # Epochs are reshuffled and re-augmented: epoch 2 does not repeat epoch 1.
  assert not np.array_equal(batches[6]['image'], batches[0]['image'])


def test_processes_read_disjoint_shards(sources, data_dir):
  config = tiny_config(data_dir)
  spec = data.get_spec('shapes')
  single = pipeline.train_batches(sources['train'], spec, config, start_step=0)
  first_two = [next(single) for _ in range(2)]
  config.batch_size = 8  # two processes of 4 each make the same stream of local batches
  shards = [pipeline.train_batches(sources['train'], spec, config, start_step=0,
                                   process_index=p, process_count=2) for p in range(2)]
  for process, shard in enumerate(shards):
    np.testing.assert_array_equal(next(shard)['label'], first_two[process]['label'])


def test_eval_batches_cover_the_split_exactly_once(sources, data_dir):
  config = tiny_config(data_dir)  # 10 validation examples in batches of 4 -> 4 + 4 + 2 (+2 pad)
  spec = data.get_spec('shapes')
  batches = list(pipeline.eval_batches(sources['validation'], spec, config))
  assert [len(b['label']) for b in batches] == [4, 4, 4]
  labels = np.concatenate([b['label'] for b in batches])
  expected = np.stack([sources['validation'][i]['segmentation_mask'][..., 0]
                       for i in range(10)])
  np.testing.assert_array_equal(labels[:10], expected)
  assert (labels[10:] == spec.ignore_label).all()


def test_label_check_names_dataset_values_and_fix():
  spec = data.get_spec('shapes')
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, 0, 0] = 9
  labels[1, 0, 0] = spec.ignore_label
  with pytest.raises(DataError, match=r"dataset 'shapes' \(train split\).*\[9\].*\[0, 6\)"):
    pipeline.check_labels(labels, spec, 'train split')
  pipeline.check_labels(np.full((1, 2, 2), spec.ignore_label), spec, 'ok')
