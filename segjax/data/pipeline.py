"""grain input pipelines over TFDS data sources: training stream and exact evaluation batches.

A batch is a dict with `image` float32 [B, H, W, C] (normalised) and `label` int32 [B, H, W]
(class index or the dataset's ignore label).
"""
import grain
import numpy as np

from segjax.data import transforms
from segjax.errors import DataError


def _decode(example):
  """TFDS example -> (image uint8 [H, W, 3], label uint8 [H, W])."""
  return example['image'], example['segmentation_mask'][..., 0]


def train_batches(source, spec, config, *, start_step, process_index=0, process_count=1):
  """The infinite training stream of this process's local batches, from `start_step` on.

  Element i of the shuffled, repeated stream (reshuffled every epoch) is augmented with a
  generator seeded by (config.seed, i), so batch k is a pure function of (config, k):
  resuming at `start_step` reproduces exactly the batches an uninterrupted run would see.
  Each process takes every `process_count`-th local batch, offset by its index.
  """
  data = config.dataset
  local_batch = config.batch_size // process_count

  def augment(example, rng):
    image, label = transforms.train_augment(
        rng, *_decode(example), crop_size=data.image_size, min_scale=data.min_scale,
        max_scale=data.max_scale, flip=data.flip, ignore_label=spec.ignore_label)
    return {'image': transforms.normalize(image, data.mean, data.std),
            'label': label.astype(np.int32)}

  dataset = (grain.MapDataset.source(source)
             .shuffle(seed=config.seed)
             .repeat(None)
             .random_map(augment, seed=config.seed)
             .batch(local_batch, drop_remainder=True))
  dataset = dataset[start_step * process_count + process_index::process_count]
  read_options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=64)
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(source, spec, config):
  """Every example of `source` once, in order, in batches of `config.eval_batch_size`.

  The last batch is padded to full size with images of zeros and labels of `ignore_label`,
  so padded pixels never reach the confusion matrix. Images must all be the same size.
  """
  data = config.dataset

  def prepare(example):
    image, label = _decode(example)
    return {'image': transforms.normalize(image, data.mean, data.std),
            'label': label.astype(np.int32)}

  dataset = grain.MapDataset.source(source).map(prepare).batch(
      config.eval_batch_size, drop_remainder=False)
  for batch in dataset.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads)):
    missing = config.eval_batch_size - len(batch['label'])
    if missing:
      batch = {
          'image': np.pad(batch['image'], ((0, missing),) + ((0, 0),) * 3),
          'label': np.pad(batch['label'], ((0, missing), (0, 0), (0, 0)),
                          constant_values=spec.ignore_label),
      }
    yield batch


def check_labels(labels, spec, where):
  """Raises `DataError` if `labels` hold values outside [0, num_classes) and the ignore label."""
  values = np.unique(labels)
  bad = values[((values < 0) | (values >= spec.num_classes)) & (values != spec.ignore_label)]
  if bad.size:
    raise DataError(
        f'dataset {spec.name!r} ({where}) has label values {bad.tolist()[:20]} outside '
        f'[0, {spec.num_classes}) and ignore_label {spec.ignore_label}; rewrite those masks so '
        f'every pixel is a class index or the ignore label (dataset.name selects the spec)')


def checked(batches, spec, where, num_checked):
  """Yields `batches`, checking the labels of the first `num_checked` of them."""
  for index, batch in enumerate(batches):
    if index < num_checked:
      check_labels(batch['label'], spec, where)
    yield batch
