"""Pascal VOC 2012 semantic segmentation with the SBD augmented training set.

Splits (`dataset.voc_train_split` chooses the training set):
  train, 'train_aug' (default): 10,582 images, the usual "VOC aug" set: every image with an
    SBD annotation (SBD train 8,498 + val 2,857) or a VOC 2012 train annotation (1,464),
    minus the VOC 2012 val images.
  train, 'train': VOC 2012 segmentation train, 1,464 images (SBD not needed).
  validation: VOC 2012 segmentation val, 1,449 images.
21 classes (background and 20 objects); 255 is ignored (VOC's object borders and difficult
regions). Labels: the palette index stored in VOC's SegmentationClass PNGs is the class index
(their colours are not read); an image's annotation is taken from the first of VOC's
SegmentationClass/<name>.png, SegmentationClassAug/<name>.png and SBD's cls/<name>.mat
(`GTcls.Segmentation`, no 255 borders) that exists. The raw values are the classes: there is
no label map.
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import prepare
from segjax.errors import ConfigError, DataError

CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
    'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
    'sheep', 'sofa', 'train', 'tvmonitor')
IGNORE_LABEL = 255
TRAIN_SPLITS = ('train_aug', 'train')

LAYOUT = """\
Pascal VOC 2012 is read from {source} in this layout (the tar files extracted there):
  VOCdevkit/VOC2012/JPEGImages/<name>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<name>.png
  VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt and val.txt
(VOC2012/ or the contents of VOC2012/ directly in {source} are accepted too), and for
train_aug the SBD annotations, either form:
  benchmark_RELEASE/dataset/cls/<name>.mat (SBD's benchmark.tgz extracted), or
  SegmentationClassAug/<name>.png (index PNGs; also accepted inside VOC2012/).
Get VOCtrainval_11-May-2012.tar from the PASCAL VOC 2012 challenge site
(host.robots.ox.ac.uk/pascal/VOC/voc2012), benchmark.tgz from the Semantic Boundaries
Dataset page (Hariharan et al., "Semantic contours from inverse detectors", ICCV 2011,
home.bharathh.info/pubs/codes/SBD), or SegmentationClassAug.zip as distributed with
DeepLab and mmsegmentation. Without SBD, set dataset.voc_train_split='train'."""


def _voc_root(source):
  return prepare.first_dir([os.path.join(source, 'VOCdevkit', 'VOC2012'),
                            os.path.join(source, 'VOC2012'), source])


def _sbd_labels(source, voc_root):
  """{name: path} of the SBD .mat and SegmentationClassAug PNG annotations found."""
  labels = {}
  aug_dir = prepare.first_dir([os.path.join(source, 'SegmentationClassAug'),
                               os.path.join(voc_root, 'SegmentationClassAug')])
  mat_dir = prepare.first_dir([os.path.join(source, 'benchmark_RELEASE', 'dataset', 'cls'),
                               os.path.join(source, 'dataset', 'cls')])
  for directory, suffix in ((aug_dir, '.png'), (mat_dir, '.mat')):
    if directory:
      for name, path in prepare.files_by_stem(directory, suffix).items():
        labels.setdefault(name, path)
  return labels


class VocConfig(tfds.core.BuilderConfig):
  """Which set is the training split: 'train_aug' or 'train'."""


class VocSegmentation(prepare.FilesBuilder, skip_registration=True):
  """Pascal VOC 2012 segmentation (+ SBD train_aug), prepared from the original files."""

  name = 'voc_segmentation'
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
  BUILDER_CONFIGS = [VocConfig(name=split) for split in TRAIN_SPLITS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset(range(len(CLASS_NAMES))) | {IGNORE_LABEL}

  def find_examples(self, source):
    layout = LAYOUT.format(source=source)
    voc_root = _voc_root(source)
    lists = os.path.join(voc_root, 'ImageSets', 'Segmentation')
    needed = [os.path.join(voc_root, 'JPEGImages'), os.path.join(voc_root, 'SegmentationClass'),
              os.path.join(lists, 'train.txt'), os.path.join(lists, 'val.txt')]
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
      raise prepare.missing_files_error('Pascal VOC 2012', missing, layout)
    voc_train = prepare.read_names(os.path.join(lists, 'train.txt'))
    voc_val = prepare.read_names(os.path.join(lists, 'val.txt'))
    voc_labels = prepare.files_by_stem(os.path.join(voc_root, 'SegmentationClass'), '.png')
    if self.builder_config.name == 'train_aug':
      sbd_labels = _sbd_labels(source, voc_root)
      if not sbd_labels:
        raise prepare.missing_files_error(
            'the SBD annotations for train_aug',
            [os.path.join(source, 'benchmark_RELEASE', 'dataset', 'cls', '<name>.mat'),
             os.path.join(source, 'SegmentationClassAug', '<name>.png')], layout)
      train = sorted((set(sbd_labels) | set(voc_train)) - set(voc_val))
    else:
      sbd_labels, train = {}, voc_train
    images = prepare.files_by_stem(os.path.join(voc_root, 'JPEGImages'), '.jpg')
    splits, missing = {}, []
    for split, names in (('train', train), ('validation', voc_val)):
      pairs = []
      for name in names:
        image = images.get(name)
        label = voc_labels.get(name, sbd_labels.get(name))
        if image is None:
          missing.append(os.path.join(voc_root, 'JPEGImages', f'{name}.jpg'))
        if label is None:
          missing.append(os.path.join(voc_root, 'SegmentationClass', f'{name}.png'))
        pairs.append((image, label))
      splits[split] = pairs
    if missing:
      raise prepare.missing_files_error('Pascal VOC 2012', missing, layout)
    return splits

  def read_label(self, path):
    if not path.endswith('.mat'):
      return prepare.read_index_png(path)
    import scipy.io  # pylint: disable=g-import-not-at-top  (only SBD needs it; slow import)
    try:
      values = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)['GTcls']
      values = np.asarray(values.Segmentation)
    except (KeyError, AttributeError) as e:
      raise DataError(f'is not an SBD cls file (no GTcls.Segmentation: {e})') from e
    if values.ndim != 2 or values.min() < 0 or values.max() > 255:
      raise DataError('GTcls.Segmentation is not a 2-D map of values in [0, 255]')
    values = values.astype(np.uint8)
    return values, prepare.png_bytes(values)


def check_config(dataset_config):
  """Raises `ConfigError` for a bad `dataset.voc_train_split`."""
  if dataset_config.voc_train_split not in TRAIN_SPLITS:
    raise ConfigError(f'dataset.voc_train_split must be one of {TRAIN_SPLITS}, got '
                     f'{dataset_config.voc_train_split!r}')


def load(dataset_config, data_dir):
  builder = VocSegmentation(config=dataset_config.voc_train_split, data_dir=data_dir)
  return prepare.load(builder, prepare.source_dir(dataset_config, data_dir))
