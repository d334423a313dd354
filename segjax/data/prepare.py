"""Preparing real datasets once from the original files a user already has (no download).

Each real dataset has a TFDS builder derived from `FilesBuilder`. It finds the original
files in the source directory (TFDS's manual dir, `dataset.source_dir`), reads and checks
every one of them, and writes ArrayRecord files once into `dataset.data_dir`. Each example:
  image: uint8 [H, W, 3] once decoded; the file's own bytes when it is an RGB JPEG or PNG,
    else the image converted to RGB and stored as PNG (grayscale, CMYK, RGBA, ... files).
    A builder may store other channel counts (`image_feature`, `read_image`: the folder
    dataset's multi-channel images are zlib-compressed uint8 [H, W, C] tensors).
  segmentation_mask: uint8 [H, W, 1] once decoded; the annotation's raw values (before the
    dataset's `label_map`) as a single-channel PNG, so a palette PNG stores its indices.
  file_name: the image's path relative to the source directory.
Problems (unreadable files, image and label of different sizes, label values the dataset
does not define) are collected over a whole split and reported together, with paths, in one
`DataError`; nothing is written then. A builder with `SKIP_BAD_PAIRS` (the user's folder
dataset) skips unreadable and size-mismatched pairs instead, listing them in a warning. The dataset info's metadata records
`max_size[split] = [height, width]`, the largest image of each split, in pixels.
"""
import abc
import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from segjax.errors import DataError

MAX_LISTED = 30  # problems or missing files quoted in one error message
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def source_dir(dataset_config, data_dir):
  """`dataset.source_dir`, or `<data_dir>/downloads/manual/<dataset name>` when empty."""
  if dataset_config.source_dir:
    return os.path.abspath(os.path.expanduser(dataset_config.source_dir))
  return os.path.join(data_dir, 'downloads', 'manual', dataset_config.name)


def listing(lines, total=None):
  """Indented lines, at most MAX_LISTED of them, then how many were left out."""
  lines = list(lines)
  total = len(lines) if total is None else total
  text = ''.join(f'\n  {line}' for line in lines[:MAX_LISTED])
  if total > MAX_LISTED:
    text += f'\n  ... and {total - MAX_LISTED} more'
  return text


def missing_files_error(title, paths, layout):
  """A `DataError` naming the missing `paths`, then the expected layout and where to get it."""
  return DataError(f'{title}: missing{listing(sorted(paths))}\n{layout}')


def first_dir(candidates):
  """The first of `candidates` that is a directory, or None."""
  return next((path for path in candidates if os.path.isdir(path)), None)


def files_by_stem(directory, suffix):
  """{file name without `suffix`: path} of the files in `directory` ending in `suffix`."""
  return {name[:-len(suffix)]: os.path.join(directory, name)
          for name in sorted(os.listdir(directory))
          if name.endswith(suffix) and not name.startswith('.')}


def read_names(path):
  """The first word of each non-empty, non-comment line of a split list file."""
  with open(path, encoding='utf-8') as f:
    return [line.split()[0] for line in f if line.strip() and not line.startswith('#')]


def png_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def encode_image(path):
  """Reads and fully decodes an image file -> (RGB JPEG or PNG bytes, (height, width))."""
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    size = (image.height, image.width)
    if image.format in ('JPEG', 'PNG') and image.mode == 'RGB':
      return data, size
    return png_bytes(np.asarray(image.convert('RGB'))), size


def read_index_png(path):
  """A label image of class indices -> (uint8 [H, W] values, single-channel PNG bytes).

  Grayscale and palette PNGs give their stored values (a palette's indices, never its
  colours); 16-bit ones must hold values below 256. Colour images are refused.
  """
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    if image.mode not in ('L', 'P', '1', 'I', 'I;16'):
      raise DataError(f'is a {image.mode} image; a label image must hold one class index '
                      'per pixel (grayscale or palette PNG)')
    values = np.asarray(image)
    is_grayscale_png = image.format == 'PNG' and image.mode == 'L'
  if values.size and values.max() > 255:
    raise DataError(f'holds label values up to {values.max()}; at most 255 are supported')
  values = values.astype(np.uint8)
  return values, data if is_grayscale_png else png_bytes(values)


class FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that prepare a segmentation dataset from files on disk.

  Subclasses set `name`, `RAW_LABELS` (the label values the annotations may hold),
  `MANUAL_DOWNLOAD_INSTRUCTIONS` (the expected layout and where to get the files, with
  '{source}' where the source directory goes) and implement `find_examples`; they may
  override `read_label`, and `image_feature` with `read_image` for images that are not RGB.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = ''
  RAW_LABELS = frozenset()
  SKIP_BAD_PAIRS = False  # True: skip unreadable or size-mismatched pairs with a warning

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            'image': self.image_feature(),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1)),
            'file_name': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  @abc.abstractmethod
  def find_examples(self, source):
    """{'train': [(image path, label path)], 'validation': [...]} of the files in `source`.

    Raises `DataError` naming what is missing.
    """

  def image_feature(self):
    """The TFDS feature of the images: RGB, stored as JPEG or PNG."""
    return tfds.features.Image(shape=(None, None, 3))

  def read_image(self, path):
    """Image file -> (what `image_feature` encodes, (height, width)); `DataError` if bad."""
    return encode_image(path)

  def read_label(self, path):
    """Label file -> (uint8 [H, W] raw values, single-channel PNG bytes)."""
    return read_index_png(path)

  def _split_generators(self, dl_manager):
    source = os.fspath(dl_manager.manual_dir)
    self.info.metadata['max_size'] = {}
    return {split: self._generate_examples(split, pairs, source)
            for split, pairs in self.find_examples(source).items()}

  def _generate_examples(self, split, pairs, source):
    problems, max_size = [], np.zeros(2, np.int64)
    # Unreadable files and image/label size mismatches: skipped with a warning when the
    # builder allows it (SKIP_BAD_PAIRS), else problems like the others.
    skipped = [] if self.SKIP_BAD_PAIRS else problems
    for image_path, label_path in pairs:
      try:
        image, image_size = self.read_image(image_path)
      except DataError as e:
        problems.append(f'{image_path}: {e}')
        continue
      except _READ_ERRORS as e:
        skipped.append(f'{image_path}: unreadable ({e})')
        continue
      try:
        values, label = self.read_label(label_path)
      except DataError as e:
        problems.append(f'{label_path}: {e}')
        continue
      except _READ_ERRORS as e:
        skipped.append(f'{label_path}: unreadable ({e})')
        continue
      if values.shape != image_size:
        skipped.append(f'{label_path} is {values.shape[0]}x{values.shape[1]} but its image '
                       f'{image_path} is {image_size[0]}x{image_size[1]} (height x width)')
        continue
      unknown = sorted(set(np.unique(values).tolist()) - self.RAW_LABELS)
      if unknown:
        problems.append(f'{label_path}: label values {unknown[:20]} that {self.name} does '
                        'not define')
        continue
      max_size = np.maximum(max_size, image_size)
      file_name = os.path.relpath(image_path, source)
      yield file_name, {'image': image, 'segmentation_mask': label, 'file_name': file_name}
    if skipped is not problems and (problems or len(skipped) == len(pairs)):
      problems += skipped  # nothing is prepared: list them all at once
    if problems:
      raise DataError(f'{self.name}: {len(problems)} problem(s) in the {split} split of '
                      f'{source}; fix or remove these files and run again:'
                      f'{listing(problems)}')
    if skipped:
      print(f'warning: {self.name}: skipped {len(skipped)} of the {len(pairs)} image/label '
            f'pairs of the {split} split of {source} (fix them and their split is prepared '
            f'again):{listing(skipped)}', flush=True)
    self.info.metadata['max_size'][split] = max_size.tolist()


def load(builder, source):
  """Prepares `builder` from the files in `source` unless already prepared.

  Returns {'train': data source, 'validation': data source}.
  """
  if not builder.is_prepared():
    if not os.path.isdir(source) or not os.listdir(source):
      raise DataError(f'{builder.name}: the source directory {source} is missing or empty '
                      f'(set dataset.source_dir to where the files are)\n'
                      f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.format(source=source)}')
    print(f'Preparing {builder.name} from {source} into {builder.data_dir} (once; every file '
          'is read and checked) ...', flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=source))
  sources = builder.as_data_source()
  return {'train': sources['train'], 'validation': sources['validation']}
