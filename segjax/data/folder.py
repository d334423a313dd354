"""A user's own dataset: a directory of images and a directory of label masks.

Layout under `dataset.source_dir` (the two directory names are config fields):
  images/<stem>.{jpg,jpeg,png,bmp,tif,tiff,webp,npy}  dataset.image_dir; subdirectories allowed
  masks/<stem>.{png,bmp,tif,tiff}                   dataset.mask_dir; lossless formats only
  train.txt and val.txt                             optional split lists, one stem a line
An image and its mask pair by their path inside their directory without the extension
(images/site1/a.jpg <-> masks/site1/a.png). Files whose name starts with '.' are skipped.

Masks are either
  class indices (`dataset.palette` empty): grayscale or palette PNGs whose values (a palette
    PNG's indices, not its colours) are classes 0..C-1 or 255 (ignored), or
  colours (`dataset.palette = ((r, g, b), ...)`, one colour per class in class order): each
    pixel's colour gives its class, a colour in `dataset.ignore_colours` gives 255. Any
    other colour is an error listing the colours found in each file (with pixel counts),
    so that a wrong palette or anti-aliased edges are noticed instead of silently learned
    or dropped; add such colours to `dataset.ignore_colours` to ignore them.
Classes: `dataset.class_names`, whose length is num_classes; the ignore label is 255.

Images have len(dataset.mean) channels (RGB-D, multispectral, ...): .npy files hold uint8
[H, W, C] (or [H, W]) arrays; TIFFs that PIL cannot read whole (more than 4 channels,
planar, several pages: one page a channel) are read with the optional `tifffile` package;
other files with PIL as they are (L: 1 channel, LA: 2, RGB: 3, RGBA: 4). With 3 channels
every PIL image is converted to RGB (grayscale, palette, RGBA, CMYK files). An image with
another channel count is an error naming it and both counts.

Splits: with both train.txt and val.txt in the source directory, those (entries are stems,
an extension is allowed; unlisted images are not used); otherwise a stem goes to validation
when its CRC32 falls in the first `dataset.validation_fraction` of the range, which keeps
every assignment when files are added. Images without a mask, masks without an image and
list entries without an image are all listed in one `DataError`.
Unreadable files and masks of another size than their image are skipped, listed with their
paths in a warning (an error if nothing else is left, or with other problems).

The prepared data is named by a fingerprint of these settings and of the file listing
(names, sizes, modification times): changing a file or a setting prepares it again.
"""
import dataclasses
import functools
import hashlib
import json
import os
import zlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from segjax.data import prepare
from segjax.errors import ConfigError, DataError

IGNORE_LABEL = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.npy')
TIFF_EXTENSIONS = ('.tif', '.tiff')
PIL_MODES = {'1': 'L', 'L': 'L', 'LA': 'LA', 'P': 'RGB', 'RGB': 'RGB', 'RGBA': 'RGBA'}
MASK_EXTENSIONS = ('.png', '.bmp', '.tif', '.tiff')
SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt'}

LAYOUT = """\
A folder dataset is read from {source} (dataset.source_dir) in this layout:
  <dataset.image_dir>/<stem>.jpg (or .jpeg .png .bmp .tif .tiff .webp .npy)
  <dataset.mask_dir>/<stem>.png (or .bmp .tif .tiff; JPEG would change the label values)
  train.txt and val.txt (optional: one stem per line)
image_dir and mask_dir are relative to source_dir (or absolute): 'images' and 'masks' by
default. Masks hold class indices, or colours listed in dataset.palette."""


def check_config(dataset_config):
  """Raises `ConfigError` for bad folder fields: class names, palette, split fraction."""
  names = tuple(dataset_config.class_names)
  if not names or not all(isinstance(name, str) for name in names):
    raise ConfigError("dataset 'folder' needs dataset.class_names: one name per class, in "
                      "class-index order, e.g. ('background', 'road')")
  if len(set(names)) != len(names) or len(names) > IGNORE_LABEL:
    raise ConfigError(f'dataset.class_names must be distinct and at most {IGNORE_LABEL}')
  palette, ignored = _colours(dataset_config.palette), _colours(dataset_config.ignore_colours)
  if palette and len(palette) != len(names):
    raise ConfigError(f'dataset.palette has {len(palette)} colours for {len(names)} '
                      'dataset.class_names; give one (r, g, b) per class, or () for masks of '
                      'class indices')
  if len(set(palette + ignored)) != len(palette + ignored):
    raise ConfigError('dataset.palette and dataset.ignore_colours must not repeat a colour')
  if not 0 < dataset_config.validation_fraction < 1:
    raise ConfigError('dataset.validation_fraction must be in (0, 1)')


def _colours(value):
  """Validated tuple of (r, g, b) int triples from a config value."""
  colours = tuple(tuple(colour) for colour in value)
  for colour in colours:
    if len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
      raise ConfigError(f'colour {colour} is not an (r, g, b) triple of ints in [0, 255]')
  return colours


def _index(directory, extensions):
  """{stem relative to `directory` ('/'-separated): path}, and stems found twice."""
  files, repeated = {}, []
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(names):
      stem, extension = os.path.splitext(name)
      if name.startswith('.') or extension.lower() not in extensions:
        continue
      key = os.path.relpath(os.path.join(root, stem), directory).replace(os.sep, '/')
      if key in files:
        repeated.append(f'{files[key]} and {os.path.join(root, name)} have the same stem')
      files.setdefault(key, os.path.join(root, name))
  return files, repeated


def _list_entry(line):
  stem, extension = os.path.splitext(line)
  return stem if extension.lower() in IMAGE_EXTENSIONS else line


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """Where the files are and how masks map to classes; `name` is their fingerprint."""
  image_dir: str = ''
  mask_dir: str = ''
  num_classes: int = 0
  palette: tuple = ()
  ignore_colours: tuple = ()
  validation_fraction: float = 0.1
  num_channels: int = 3


def builder_config(dataset_config, source):
  """The `FolderConfig` of `dataset_config`, named by a fingerprint of settings and files."""
  image_dir = os.path.join(source, os.path.expanduser(dataset_config.image_dir))
  mask_dir = os.path.join(source, os.path.expanduser(dataset_config.mask_dir))
  missing = [path for path in (image_dir, mask_dir) if not os.path.isdir(path)]
  if missing:
    raise prepare.missing_files_error('folder dataset', missing, LAYOUT.format(source=source))
  fields = dict(image_dir=image_dir, mask_dir=mask_dir,
                num_classes=len(dataset_config.class_names),
                palette=_colours(dataset_config.palette),
                ignore_colours=_colours(dataset_config.ignore_colours),
                validation_fraction=float(dataset_config.validation_fraction),
                num_channels=len(dataset_config.mean))
  files = [os.path.join(source, name) for name in SPLIT_LISTS.values()]
  for directory in (image_dir, mask_dir):
    for root, _, names in os.walk(directory):
      files += [os.path.join(root, name) for name in names]
  stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
           for path in sorted(files) if os.path.isfile(path)]
  digest = hashlib.sha256(json.dumps([fields, stats]).encode()).hexdigest()[:16]
  return FolderConfig(name=f'files_{digest}', **fields)


class SegmentationFolder(prepare.FilesBuilder, skip_registration=True):
  """A user's image and mask folders, prepared once (see the module docstring)."""

  name = 'segmentation_folder'
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset(range(256))  # read_label checks the values against the classes
  SKIP_BAD_PAIRS = True  # unreadable or mismatched pairs are listed in a warning, not fatal

  def find_examples(self, source):
    config = self.builder_config
    images, problems = _index(config.image_dir, IMAGE_EXTENSIONS)
    masks, repeated = _index(config.mask_dir, MASK_EXTENSIONS)
    problems += repeated
    lossy, _ = _index(config.mask_dir, ('.jpg', '.jpeg'))
    problems += [f'{path}: JPEG changes label values; save masks as PNG'
                 for path in lossy.values()]
    problems += [f'{path}: no mask {os.path.join(config.mask_dir, stem)}.png'
                 for stem, path in images.items() if stem not in masks]
    problems += [f'{path}: no image {os.path.join(config.image_dir, stem)}.<ext>'
                 for stem, path in masks.items() if stem not in images]
    lists = {split: os.path.join(source, name) for split, name in SPLIT_LISTS.items()}
    present = [path for path in lists.values() if os.path.exists(path)]
    if len(present) == 1:
      problems.append(f'{present[0]}: a split list needs its partner '
                      f'({" and ".join(lists.values())}), or remove it')
    elif len(present) == 2:
      stems = {split: [_list_entry(name) for name in prepare.read_names(path)]
               for split, path in lists.items()}
      for split, path in lists.items():
        problems += [f'{path}: {stem} has no image in {config.image_dir}'
                     for stem in stems[split] if stem not in images]
      problems += [f'{stem} is in both {lists["train"]} and {lists["validation"]}'
                   for stem in sorted(set(stems['train']) & set(stems['validation']))]
    if len(present) != 2:
      threshold = config.validation_fraction * 2**32
      in_validation = {stem: zlib.crc32(stem.encode()) < threshold for stem in images}
      stems = {'train': [s for s in images if not in_validation[s]],
               'validation': [s for s in images if in_validation[s]]}
    for split, names in stems.items():
      if not names and not problems:
        problems.append(f'the {split} split is empty; add images, change '
                        'dataset.validation_fraction or give train.txt and val.txt')
    if problems:
      raise DataError(f'folder dataset in {source}: {len(problems)} problem(s):'
                      f'{prepare.listing(problems)}\n{LAYOUT.format(source=source)}')
    return {split: [(images[stem], masks[stem]) for stem in names]
            for split, names in stems.items()}

  def image_feature(self):
    if self.builder_config.num_channels == 3:
      return super().image_feature()
    return tfds.features.Tensor(shape=(None, None, self.builder_config.num_channels),
                                dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)

  def read_image(self, path):
    channels = self.builder_config.num_channels
    array = _array_file(path)
    if array is None and channels == 3:
      return prepare.encode_image(path)
    if array is None:
      array = _pil_array(path)
    if array.shape[-1] != channels:
      raise DataError(f'has {array.shape[-1]} channels but dataset.mean and dataset.std have '
                      f'{channels} values; give one mean and std per image channel')
    return prepare.png_bytes(array) if channels == 3 else array, array.shape[:2]

  @functools.cached_property
  def _class_of_colour(self):
    """{24-bit colour code: class index or IGNORE_LABEL}."""
    config = self.builder_config
    codes = {(r << 16) | (g << 8) | b: index for index, (r, g, b) in enumerate(config.palette)}
    codes.update({(r << 16) | (g << 8) | b: IGNORE_LABEL for r, g, b in config.ignore_colours})
    return codes

  def read_label(self, path):
    config = self.builder_config
    if not config.palette:
      try:
        values, data = prepare.read_index_png(path)
      except DataError as e:
        raise DataError(f'{e}; masks of colours need dataset.palette') from e
      bad = sorted(set(np.unique(values).tolist()) - set(range(config.num_classes))
                   - {IGNORE_LABEL})
      if bad:
        raise DataError(f'holds values {bad[:20]} that are neither classes 0..'
                        f'{config.num_classes - 1} nor {IGNORE_LABEL} (ignore); masks of '
                        'colours need dataset.palette')
      return values, data
    with Image.open(path) as image:
      rgb = np.asarray(image.convert('RGB'), np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    table = np.array([self._class_of_colour.get(code, -1) for code in colours.tolist()])
    unknown = np.flatnonzero(table < 0)
    if unknown.size:
      found = ', '.join(f'{(c >> 16, (c >> 8) & 255, c & 255)} ({counts[i]} px)'
                        for i, c in zip(unknown[:10], colours[unknown[:10]].tolist()))
      raise DataError(f'has {unknown.size} colour(s) in neither dataset.palette nor '
                      f'dataset.ignore_colours: {found}')
    values = table[inverse].reshape(codes.shape).astype(np.uint8)
    return values, prepare.png_bytes(values)


def _array_file(path):
  """uint8 [H, W, C] of a .npy file or of a TIFF that PIL cannot read whole, else None."""
  extension = os.path.splitext(path)[1].lower()
  if extension == '.npy':
    array = np.load(path, allow_pickle=False)
  elif extension in TIFF_EXTENSIONS and not _pil_reads_whole(path):
    array = _tiff_array(path)
  else:
    return None
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.dtype != np.uint8:
    raise DataError(f'holds a {array.dtype} array of shape {array.shape}; store uint8 '
                    '[height, width, channels] (or [height, width]) with values 0-255')
  return array


def _pil_reads_whole(path):
  """Whether PIL reads the image at `path` as one page."""
  try:
    with Image.open(path) as image:
      return getattr(image, 'n_frames', 1) == 1
  except Image.UnidentifiedImageError:
    return False


def _tiff_array(path):
  """A TIFF's pixels [H, W, C] (samples or pages as channels), read with tifffile."""
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('is a TIFF that PIL cannot read whole (more than 4 channels, planar or '
                    'several pages); pip install tifffile to read it') from e
  with tifffile.TiffFile(path) as tiff:
    series = tiff.series[0]
    array, axes = series.asarray(), series.axes
  if array.ndim == 3 and axes[0] != 'Y':  # channels first: planar samples or pages
    array = np.moveaxis(array, 0, -1)
  return array


def _pil_array(path):
  """uint8 [H, W, C] of an image PIL reads: L, LA, RGB, RGBA as they are (1, 2, 3, 4)."""
  with Image.open(path) as image:
    if image.mode not in PIL_MODES:
      raise DataError(f'is a {image.mode} image; store 8-bit grayscale, RGB or RGBA, or a '
                      'uint8 .npy array [height, width, channels]')
    array = np.asarray(image.convert(PIL_MODES[image.mode]))
  return array[..., None] if array.ndim == 2 else array


def load(dataset_config, data_dir):
  source = prepare.source_dir(dataset_config, data_dir)
  if not os.path.isdir(source):
    raise DataError(f'folder dataset: the source directory {source} does not exist (set '
                    f'dataset.source_dir)\n{LAYOUT.format(source=source)}')
  builder = SegmentationFolder(config=builder_config(dataset_config, source), data_dir=data_dir)
  return prepare.load(builder, source)
