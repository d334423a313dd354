"""grain input pipelines over TFDS data sources: training stream and exact evaluation batches.

A batch is a dict with `image` float32 [B, H, W, C] (normalised) and `label` int32 [B, H, W]
(class index or the dataset's ignore label); evaluation batches under evaluation.resize
'fit' have labels of another size than their images ([B, h, w, C] and [B, H, W]).
"""
import grain
import jax
import numpy as np

from segjax.data import transforms
from segjax.errors import DataError


EVAL_PAD_MULTIPLE = 32  # the default evaluation pad size is rounded up to a multiple of this


def decode(example, spec, num_channels=None, index=None):
  """TFDS example -> (image uint8 [H, W, C], label uint8 [H, W]).

  The label holds class indices or `spec.ignore_label`: the raw values of the prepared
  files mapped through `spec.label_map`. With `num_channels` (len(dataset.mean)), an image
  of another channel count is a `DataError` naming it (`index`: its place in the split).
  """
  image, label = example['image'], example['segmentation_mask'][..., 0]
  if num_channels is not None and image.shape[-1] != num_channels:
    raise DataError(
        f'dataset {spec.name!r}: image {_example_name(example, index)} has '
        f'{image.shape[-1]} channels but dataset.mean and dataset.std have {num_channels} '
        'values; give one mean and std per image channel')
  if spec.label_map is not None:
    label = np.asarray(spec.label_map, np.uint8)[label]
  return image, label


def _example_name(example, index):
  name = example.get('file_name')
  if isinstance(name, bytes):
    return name.decode()
  return 'without a file name' if index is None else f'example {index}'


def photometric(dataset_config):
  """The `transforms.Photometric` of `dataset_config`, or None when dataset.photometric is off."""
  if not dataset_config.photometric:
    return None
  return transforms.Photometric(
      brightness_delta=dataset_config.brightness_delta,
      contrast_range=tuple(dataset_config.contrast_range),
      saturation_range=tuple(dataset_config.saturation_range),
      hue_delta=dataset_config.hue_delta, channels=photometric_channels(dataset_config))


def photometric_channels(dataset_config):
  """The leading channels photometric distortion acts on: dataset.photometric_channels, or
  with 0 every channel of the images (one per dataset.mean value)."""
  return dataset_config.photometric_channels or len(dataset_config.mean)


def max_image_size(source):
  """(height, width) of the largest image of `source`, in pixels.

  Read from the metadata the real datasets' builders record, else by decoding every
  example once.
  """
  info = getattr(source, 'dataset_info', None)
  recorded = (info.metadata or {}).get('max_size', {}) if info is not None else {}
  if getattr(source, 'split', None) in recorded:
    return tuple(recorded[source.split])
  sizes = np.array([source[i]['segmentation_mask'].shape[:2] for i in range(len(source))])
  return tuple(sizes.max(axis=0).tolist())


def eval_pad_size(source, dataset_config):
  """(height, width) that every evaluation image and label is padded to.

  `dataset.eval_pad_size` when set (an int side or a (height, width) pair), else the
  largest image of `source` rounded up to a multiple of EVAL_PAD_MULTIPLE, so one shape is
  compiled for the whole split.
  """
  if dataset_config.eval_pad_size:
    return transforms.height_width(dataset_config.eval_pad_size)
  return tuple(-(-side // EVAL_PAD_MULTIPLE) * EVAL_PAD_MULTIPLE
               for side in max_image_size(source))


def train_batches(source, spec, config, *, start_step, process_index=0, process_count=1):
  """The infinite training stream of this process's local batches, from `start_step` on.

  Element i of the shuffled, repeated stream (reshuffled every epoch) is augmented with a
  generator seeded by (config.seed, i), so batch k is a pure function of (config, k):
  resuming at `start_step` reproduces exactly the batches an uninterrupted run would see.
  Each process takes every `process_count`-th local batch, offset by its index.
  """
  data = config.dataset
  local_batch = config.batch_size // process_count
  distortion = photometric(data)

  def augment(example, rng):
    image, label = transforms.train_augment(
        rng, *decode(example, spec, len(data.mean)), crop_size=data.image_size,
        min_scale=data.min_scale, max_scale=data.max_scale, flip=data.flip,
        ignore_label=spec.ignore_label, base_size=data.base_size,
        cat_max_ratio=data.cat_max_ratio, photometric=distortion)
    return {'image': transforms.normalize(image, data.mean, data.std),
            'label': label.astype(np.int32)}

  return augmented_batches(source, augment, seed=config.seed, local_batch=local_batch,
                           start_step=start_step, process_index=process_index,
                           process_count=process_count, num_threads=data.num_threads)


def augmented_batches(source, augment, *, seed, local_batch, start_step, process_index,
                      process_count, num_threads):
  """The infinite stream of batches of `augment(example, rng)` over `source`, shuffled anew
  every epoch; element i's generator is seeded by (seed, i), so batch k is a pure function
  of (seed, k). Local batches from `start_step` on; process p takes every
  `process_count`-th batch, offset by p."""
  dataset = (grain.MapDataset.source(source)
             .shuffle(seed=seed)
             .repeat(None)
             .random_map(augment, seed=seed)
             .batch(local_batch, drop_remainder=True))
  dataset = dataset[start_step * process_count + process_index::process_count]
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64)
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(source, spec, config):
  """Every example of `source` once, in order, in batches of `config.eval_batch_size`.

  Images of any size: each image and label is padded at the bottom and right to
  `eval_pad_size` (image with 0 after normalisation, i.e. the mean colour; label with
  `ignore_label`) and never resized, so metrics are computed at the original label
  resolution and predictions on padded pixels never reach the confusion matrix. The last
  batch is filled up with such padding examples. An image larger than the pad size is a
  `DataError`.

  With `config.evaluation.pad` False, the batches are `protocol_batches` instead: every
  example once, resized as `evaluation.resize` says and never padded.
  """
  if not config.evaluation.get('pad', True):
    yield from protocol_batches(source, spec, config)
    return
  data = config.dataset
  pad_height, pad_width = eval_pad_size(source, data)

  def prepare(index, example):
    image, label = decode(example, spec, len(data.mean), index)
    height, width = label.shape
    if height > pad_height or width > pad_width:
      raise DataError(
          f'evaluation image {_example_name(example, index)} is {height}x{width} (height x '
          f'width), larger than the evaluation pad size {pad_height}x{pad_width}; set '
          f'dataset.eval_pad_size to at least ({height}, {width}), or to 0 for the largest '
          'image of the split')
    image, label = transforms.pad_to(transforms.normalize(image, data.mean, data.std), label,
                                     pad_height, pad_width, spec.ignore_label)
    return {'image': image, 'label': label.astype(np.int32)}

  dataset = grain.MapDataset.source(source).map_with_index(prepare).batch(
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


def protocol_examples(source, spec, config):
  """Every example of `source` once, in order, as a benchmark's test pipeline prepares it:
  (image float32 [h, w, C] normalised, label int32 [H, W]).

  The image is resized by `transforms.protocol_resize` (config.evaluation.resize and
  resize_scale: '' none, 'fit' mmsegmentation's keep-ratio Resize with the label left at its
  own size, 'short_side' torchvision's with the label resized nearest) and never padded.
  """
  data, evaluation = config.dataset, config.evaluation

  def prepare(index, example):
    image, label = decode(example, spec, len(data.mean), index)
    image, label = transforms.protocol_resize(image, label, evaluation.resize,
                                              evaluation.resize_scale)
    return transforms.normalize(image, data.mean, data.std), label.astype(np.int32)

  dataset = grain.MapDataset.source(source).map_with_index(prepare)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads)))


def protocol_batches(source, spec, config, rows=None):
  """The `protocol_examples` of `source` in batches of `rows` (default: the device count, one
  image per device) examples whose images, and labels, have one size: each image is
  inferred at its own size, and each distinct size is one compiled shape.

  Examples wait in a group per (image size, label size) until it has `rows` of them; when
  more than `config.eval_batch_size` wait, the largest group goes out, and at the end every
  group does, its missing rows filled with zero images and `ignore_label` labels (they reach
  no metric). So every example is in exactly one batch, once.
  """
  rows = rows or jax.device_count()
  waiting, count = {}, 0  # (image shape, label shape) -> [(image, label)]
  for image, label in protocol_examples(source, spec, config):
    group = waiting.setdefault((image.shape, label.shape), [])
    group.append((image, label))
    count += 1
    if len(group) == rows:
      count -= rows
      yield _filled_batch(waiting.pop((image.shape, label.shape)), rows, spec.ignore_label)
    elif count > config.eval_batch_size:
      largest = max(waiting, key=lambda key: len(waiting[key]))
      count -= len(waiting[largest])
      yield _filled_batch(waiting.pop(largest), rows, spec.ignore_label)
  for group in waiting.values():
    yield _filled_batch(group, rows, spec.ignore_label)


def _filled_batch(group, rows, ignore_label):
  """A batch of the (image, label) pairs of `group` (one size), filled up to `rows` with
  zero images and `ignore_label` labels."""
  missing = rows - len(group)
  images = np.stack([image for image, _ in group])
  labels = np.stack([label for _, label in group])
  return {'image': np.pad(images, ((0, missing),) + ((0, 0),) * 3),
          'label': np.pad(labels, ((0, missing), (0, 0), (0, 0)),
                          constant_values=ignore_label)}


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
