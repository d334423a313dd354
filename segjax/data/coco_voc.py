"""COCO 2017 with Pascal VOC's 21 classes: the dataset of torchvision's segmentation references.

torchvision's references/segmentation train and evaluate on it (`--dataset coco`,
coco_utils.py), and publish on its validation split the mIoU of their fcn_resnet50/101,
deeplabv3_resnet50/101, deeplabv3_mobilenet_v3_large and lraspp_mobilenet_v3_large weights
(`COCO_WITH_VOC_LABELS_V1`). The labels are made once, when the dataset is prepared, from
COCO's instance annotations, as coco_utils.py makes them on the fly:
  - only the annotations of the 20 COCO categories that are VOC classes are kept (crowds
    too), each with the VOC class index of its category (`CAT_LIST`); the others are
    background (FilterAndRemapCocoCategories);
  - each kept annotation is rasterised with pycocotools at the image's height and width in
    the annotation file (an image file of another size is reported): polygons (the union of an object's parts) and uncompressed RLE
    (crowds) through `frPyObjects`, as torchvision does; compressed RLE, which torchvision
    cannot read, decoded as it is;
  - a pixel gets the class of the one mask covering it, 0 (background) where none does and
    255 (ignored) where two or more do, of one class or not (ConvertCocoPolysToMask).
Splits: validation, every image of val2017 (5,000; those without kept annotations are all
background); train, the images of train2017 whose kept annotations have a total `area` (the
annotation file's field, in pixels) above 1000, out of 118,287
(`_coco_remove_images_without_annotations`). Images in the order of their COCO ids, as
torchvision's CocoDetection reads them. 21 classes, VOC's (`voc.CLASS_NAMES`), 255 ignored;
the raw values are the classes: there is no label map.
"""
import dataclasses
import json
import os

import numpy as np
from pycocotools import mask as coco_mask

from segjax.data import prepare
from segjax.data import voc
from segjax.errors import DataError

# COCO category id of each VOC class index (torchvision's CAT_LIST; 0: background).
CAT_LIST = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
CLASS_NAMES = voc.CLASS_NAMES
IGNORE_LABEL = voc.IGNORE_LABEL
MIN_TRAIN_AREA = 1000  # pixels: train images need more kept annotated area than this
FOLDERS = {'train': 'train2017', 'validation': 'val2017'}

LAYOUT = """\
COCO 2017 is read from {source} in COCO's own layout (the zip files extracted there):
  annotations/instances_train2017.json and annotations/instances_val2017.json
  train2017/<id>.jpg
  val2017/<id>.jpg
Get train2017.zip, val2017.zip and annotations_trainval2017.zip from the COCO website
(cocodataset.org, "Dataset", "Download": 2017 Train and Val images, 2017 Train/Val
annotations)."""


@dataclasses.dataclass(frozen=True)
class ImageAnnotations:
  """What the label of one COCO image is rasterised from: the builder's "label file"."""
  annotation_file: str
  image_id: int
  height: int  # pixels, as the annotation file gives the image's size
  width: int
  objects: tuple  # (annotation id, VOC class index, COCO segmentation), in the file's order

  def __str__(self):
    return f'{self.annotation_file} (image id {self.image_id})'


def annotation_file(source, split):
  return os.path.join(source, 'annotations', f'instances_{FOLDERS[split]}.json')


def voc_annotations(annotations):
  """{image id: [(COCO annotation, VOC class index)]} of the annotations of VOC's categories,
  in the file's order (FilterAndRemapCocoCategories)."""
  by_image = {}
  for annotation in annotations:
    if annotation['category_id'] in CAT_LIST:
      by_image.setdefault(annotation['image_id'], []).append(
          (annotation, CAT_LIST.index(annotation['category_id'])))
  return by_image


def split_examples(instances, path, image_dir, train):
  """[(image path, ImageAnnotations)] of the images of `instances` (an instances json file's
  contents, read from `path`), in COCO id order; `train`: only those whose VOC annotations
  have a total area above MIN_TRAIN_AREA."""
  by_image = voc_annotations(instances['annotations'])
  examples = []
  for image in sorted(instances['images'], key=lambda image: image['id']):
    kept = by_image.get(image['id'], [])
    if train and sum(annotation['area'] for annotation, _ in kept) <= MIN_TRAIN_AREA:
      continue
    objects = tuple((annotation['id'], index, annotation['segmentation'])
                    for annotation, index in kept)
    examples.append((os.path.join(image_dir, image['file_name']), ImageAnnotations(
        path, image['id'], int(image['height']), int(image['width']), objects)))
  return examples


def read_examples(source, split):
  """`split_examples` of a split's instances file in `source`; `DataError` if it is not one."""
  path = annotation_file(source, split)
  try:
    with open(path, encoding='utf-8') as f:
      instances = json.load(f)
    return split_examples(instances, path, os.path.join(source, FOLDERS[split]),
                          train=split == 'train')
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f'{path} is not a COCO instances file ({type(e).__name__}: {e}); it '
                    "needs 'images' (id, file_name, height, width) and 'annotations' (id, "
                    'image_id, category_id, area, segmentation), as COCO 2017 has') from e


def instance_mask(segmentation, height, width):
  """bool [height, width]: the pixels of one COCO segmentation, rasterised as torchvision's
  `convert_coco_poly_to_mask` does: polygons ([[x0, y0, x1, y1, ...], ...] in pixels, the
  union of the parts) and uncompressed RLE ({'counts': [int, ...], 'size': [height, width]})
  through pycocotools' frPyObjects; compressed RLE (counts a string) decoded as it is.

  Raises `DataError` for an RLE of another size and what pycocotools cannot read.
  """
  if isinstance(segmentation, dict):
    _check_rle(segmentation, height, width)
  compressed = isinstance(segmentation, dict) and isinstance(segmentation['counts'], str)
  try:
    mask = coco_mask.decode(segmentation if compressed else
                            coco_mask.frPyObjects(segmentation, height, width))
  except Exception as e:  # pylint: disable=broad-except  (pycocotools raises plain Exception)
    raise DataError(f'cannot be read by pycocotools ({type(e).__name__}: {e}): '
                    f'{str(segmentation)[:80]}') from e
  return mask.reshape(height, width, -1).any(axis=2)


def _check_rle(rle, height, width):
  """Raises `DataError` unless `rle` is an RLE of the [height, width] image: compressed, or
  counts that add up to its pixels (pycocotools would read past the end of fewer)."""
  counts = rle.get('counts')
  if rle.get('size') != [height, width] or not (isinstance(counts, str) or (
      isinstance(counts, list) and all(isinstance(count, int) for count in counts)
      and sum(counts) == height * width)):
    raise DataError(f'is not an RLE of its {height}x{width} image (size [height, width] '
                    f'{rle.get("size")}, counts a string or adding up to height x width): '
                    f'{str(rle)[:80]}')


def label_values(objects, height, width):
  """uint8 [height, width] class map of an image's `objects` ((annotation id, VOC class
  index, segmentation), `ImageAnnotations.objects`), as torchvision's
  ConvertCocoPolysToMask: the class of the one mask covering a pixel, 0 where none does,
  IGNORE_LABEL where several do."""
  if not objects:
    return np.zeros((height, width), np.uint8)
  masks = []
  for annotation_id, _, segmentation in objects:
    try:
      masks.append(instance_mask(segmentation, height, width))
    except DataError as e:
      raise DataError(f'annotation {annotation_id}: its segmentation {e}') from e
  masks = np.stack(masks)
  classes = np.array([index for _, index, _ in objects], np.uint8)
  values = (masks * classes[:, None, None]).max(axis=0)
  values[masks.sum(axis=0) > 1] = IGNORE_LABEL
  return values


class CocoVoc(prepare.FilesBuilder, skip_registration=True):
  """COCO 2017 with VOC's classes (torchvision's references), prepared from COCO's files."""

  name = 'coco_voc'
  HOMEPAGE = 'https://cocodataset.org/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset(range(len(CLASS_NAMES))) | {IGNORE_LABEL}

  def find_examples(self, source):
    layout = LAYOUT.format(source=source)
    needed = [path for split in FOLDERS for path in (
        annotation_file(source, split), os.path.join(source, FOLDERS[split]))]
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
      raise prepare.missing_files_error('COCO 2017', missing, layout)
    splits, missing = {}, []
    for split in FOLDERS:
      splits[split] = read_examples(source, split)
      missing += [image for image, _ in splits[split] if not os.path.isfile(image)]
    if missing:
      raise prepare.missing_files_error('COCO 2017', missing, layout)
    return splits

  def read_label(self, annotations):
    """An image's `ImageAnnotations` -> (uint8 [H, W] class indices, their PNG bytes)."""
    values = label_values(annotations.objects, annotations.height, annotations.width)
    return values, prepare.png_bytes(values)


def load(dataset_config, data_dir):
  builder = CocoVoc(data_dir=data_dir)
  return prepare.load(builder, prepare.source_dir(dataset_config, data_dir))
