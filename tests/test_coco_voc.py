"""COCO-VOC prepared from a tiny COCO layout, against torchvision's coco_utils.py rules.

The fixture writes COCO's own files (annotations/instances_{train,val}2017.json with
polygons, uncompressed and compressed RLE, overlapping objects, a category VOC lacks,
images without or with little annotation). The expected labels are made here the way
torchvision's references/segmentation/coco_utils.py makes them (it is not installed:
FilterAndRemapCocoCategories, convert_coco_poly_to_mask and ConvertCocoPolysToMask
transcribed with numpy, on pycocotools' COCO index as torchvision's CocoDetection reads
it), and a few pixels are checked by hand.
"""
import importlib.util
import json
import os

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as coco_mask
import pytest

import references
import test_datasets
from segjax import data
from segjax.data import coco_voc
from segjax.data import voc
from segjax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = 255
# torchvision's CAT_LIST, from references/segmentation/coco_utils.py.
TORCHVISION_CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
# VOC class -> COCO 2017 category (id, name), from COCO's instances_val2017.json.
VOC_TO_COCO = {
    'aeroplane': (5, 'airplane'), 'bicycle': (2, 'bicycle'), 'bird': (16, 'bird'),
    'boat': (9, 'boat'), 'bottle': (44, 'bottle'), 'bus': (6, 'bus'), 'car': (3, 'car'),
    'cat': (17, 'cat'), 'chair': (62, 'chair'), 'cow': (21, 'cow'),
    'diningtable': (67, 'dining table'), 'dog': (18, 'dog'), 'horse': (19, 'horse'),
    'motorbike': (4, 'motorcycle'), 'person': (1, 'person'), 'pottedplant': (64, 'potted plant'),
    'sheep': (20, 'sheep'), 'sofa': (63, 'couch'), 'train': (7, 'train'), 'tvmonitor': (72, 'tv')}
PERSON, DOG, CAT, BUS, BOTTLE, TEDDY_BEAR = 1, 18, 17, 6, 44, 88  # COCO category ids


def rectangle(x0, y0, x1, y1):
  """A polygon part: the corners of a box, in pixels."""
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask):
  """COCO's crowd RLE of a bool [H, W] mask: run lengths in column-major order, from 0s."""
  flat = mask.flatten(order='F').astype(np.int64)
  changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  return {'counts': np.diff(np.concatenate([[0], changes])).tolist(),
          'size': list(mask.shape)}


def box_mask(height, width, rows, cols):
  mask = np.zeros((height, width), bool)
  mask[rows, cols] = True
  return mask


def write_coco(root):
  """COCO 2017's layout in `root`; returns the annotation ids that need a note."""
  images = {  # split -> [(id, height, width, grayscale)]
      'val2017': [(3, 16, 16, True), (1, 24, 32, False), (2, 10, 12, False)],
      'train2017': [(10, 8, 10, False), (11, 8, 10, False), (12, 8, 10, False),
                    (13, 8, 10, False), (14, 8, 10, False), (15, 8, 10, False),
                    (16, 8, 10, False)],
  }
  crowd = box_mask(24, 32, slice(18, 23), slice(20, 31))
  compressed = coco_mask.encode(np.asfortranarray(box_mask(16, 16, slice(4, 12), slice(3, 9))
                                                  .astype(np.uint8)))
  # (image id, category, segmentation, area, iscrowd); area is the json's field, which the
  # train filter reads (not the rasterised masks).
  annotations = {
      'val2017': [
          (1, PERSON, [rectangle(2, 2, 14, 14)], 144.0, 0),
          (1, DOG, [rectangle(10, 8, 22, 20), [24, 2, 30, 2, 30, 10]], 168.0, 0),  # 2 parts
          (1, TEDDY_BEAR, [rectangle(0, 16, 8, 23)], 56.0, 0),  # not a VOC class
          (1, PERSON, uncompressed_rle(crowd), float(crowd.sum()), 1),
          (1, PERSON, [rectangle(24, 14, 31, 21)], 49.0, 0),  # overlaps the crowd
          (3, CAT, {'counts': compressed['counts'].decode(), 'size': [16, 16]}, 48.0, 0),
          (3, BUS, [rectangle(12, 12, 14, 14)], 4.0, 0),
      ],
      'train2017': [
          (10, PERSON, [rectangle(1, 1, 8, 6)], 1500.0, 0),  # kept
          (11, BOTTLE, [rectangle(1, 1, 3, 3)], 50.0, 0),  # too little area
          (12, TEDDY_BEAR, [rectangle(1, 1, 8, 6)], 5000.0, 0),  # no VOC class
          (14, DOG, [rectangle(1, 1, 4, 6)], 600.0, 0),  # 600 + 500 > 1000: kept
          (14, CAT, [rectangle(5, 1, 8, 6)], 500.0, 0),
          (15, BUS, [rectangle(1, 1, 8, 6)], 1000.0, 0),  # exactly 1000: dropped
          (16, BUS, [rectangle(1, 1, 8, 6)], 900.0, 0),  # the teddy bear does not count
          (16, TEDDY_BEAR, [rectangle(1, 1, 8, 6)], 5000.0, 0),
      ],
  }
  categories = [{'id': id_, 'name': name, 'supercategory': ''}
                for id_, name in VOC_TO_COCO.values()] + [
                    {'id': TEDDY_BEAR, 'name': 'teddy bear', 'supercategory': 'indoor'}]
  next_id = 100
  for folder, entries in images.items():
    for image_id, height, width, grayscale in entries:
      path = root / folder / f'{image_id:012d}.jpg'
      pixels = test_datasets.write_image(str(path), height, width, seed=image_id)
      if grayscale:
        Image.fromarray(pixels[..., 0]).save(path, format='JPEG')
    rows = []
    for image_id, category, segmentation, area, iscrowd in annotations[folder]:
      rows.append({'id': next_id, 'image_id': image_id, 'category_id': category,
                   'segmentation': segmentation, 'area': area, 'iscrowd': iscrowd,
                   'bbox': [0, 0, 1, 1]})
      next_id += 1
    instances = {'images': [{'id': image_id, 'file_name': f'{image_id:012d}.jpg',
                             'height': height, 'width': width}
                            for image_id, height, width, _ in entries],
                 'annotations': rows, 'categories': categories}
    os.makedirs(root / 'annotations', exist_ok=True)
    (root / 'annotations' / f'instances_{folder}.json').write_text(json.dumps(instances))


def torchvision_target(annotations, height, width):
  """uint8 [height, width]: FilterAndRemapCocoCategories(CAT_LIST), then
  ConvertCocoPolysToMask, as coco_utils.py (torch tensors as numpy arrays). Compressed RLE,
  which its frPyObjects call cannot read, is decoded directly (segjax's one addition)."""
  kept = [dict(obj, category_id=TORCHVISION_CAT_LIST.index(obj['category_id']))
          for obj in annotations if obj['category_id'] in TORCHVISION_CAT_LIST]
  if not kept:
    return np.zeros((height, width), np.uint8)
  masks = []
  for obj in kept:
    polygons = obj['segmentation']
    if isinstance(polygons, dict) and isinstance(polygons['counts'], str):
      rles = polygons
    else:
      rles = coco_mask.frPyObjects(polygons, height, width)
    mask = coco_mask.decode(rles)
    if len(mask.shape) < 3:
      mask = mask[..., None]
    masks.append(mask.any(axis=2).astype(np.uint8))
  masks = np.stack(masks)
  cats = np.array([obj['category_id'] for obj in kept], np.uint8)
  target = (masks * cats[:, None, None]).max(axis=0)
  target[masks.sum(0) > 1] = 255
  return target


def torchvision_train_ids(coco):
  """The image ids `_coco_remove_images_without_annotations(dataset, CAT_LIST)` keeps."""
  kept = []
  for image_id in sorted(coco.imgs):
    anno = [obj for obj in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
            if obj['category_id'] in TORCHVISION_CAT_LIST]
    if anno and sum(obj['area'] for obj in anno) > 1000:
      kept.append(image_id)
  return kept


def image_id(file_name):
  return int(os.path.splitext(os.path.basename(file_name))[0])


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  """(source dir, {split: {image id: (image, label)}}) of the prepared fixture."""
  tmp_path = tmp_path_factory.mktemp('coco')
  write_coco(tmp_path / 'coco')
  config = test_datasets.dataset_config('coco_voc', tmp_path, tmp_path / 'coco')
  _, splits = test_datasets.decoded(config)
  return tmp_path / 'coco', {split: {image_id(name): pair for name, pair in examples.items()}
                             for split, examples in splits.items()}


def test_spec_is_vocs_classes_in_torchvisions_category_order():
  spec = data.get_spec('coco_voc')
  assert spec.class_names is voc.CLASS_NAMES and spec.num_classes == 21
  assert spec.ignore_label == IGNORE and spec.label_map is None
  assert list(coco_voc.CAT_LIST) == TORCHVISION_CAT_LIST
  assert {name: VOC_TO_COCO[name][0] for name in voc.CLASS_NAMES[1:]} == dict(
      zip(voc.CLASS_NAMES[1:], coco_voc.CAT_LIST[1:]))


def test_splits_follow_torchvisions_rules(coco):
  source, splits = coco
  assert sorted(splits['validation']) == [1, 2, 3]  # every val2017 image
  train = coco_api.COCO(str(source / 'annotations' / 'instances_train2017.json'))
  assert sorted(splits['train']) == torchvision_train_ids(train) == [10, 14]


def test_labels_are_torchvisions_targets_pixel_for_pixel(coco):
  source, splits = coco
  for split, folder in coco_voc.FOLDERS.items():
    index = coco_api.COCO(str(source / 'annotations' / f'instances_{folder}.json'))
    for image_id_, (image, label) in splits[split].items():
      info = index.imgs[image_id_]
      expected = torchvision_target(index.loadAnns(index.getAnnIds(imgIds=image_id_)),
                                    info['height'], info['width'])
      np.testing.assert_array_equal(label, expected, err_msg=f'{split} image {image_id_}')
      assert image.shape == label.shape + (3,) and image.dtype == np.uint8


def test_labels_by_hand(coco):
  _, splits = coco
  label = splits['validation'][1][1]
  assert label[5, 5] == voc.CLASS_NAMES.index('person')
  assert label[11, 12] == IGNORE  # person and dog overlap
  assert label[17, 17] == voc.CLASS_NAMES.index('dog')
  assert label[3, 29] == voc.CLASS_NAMES.index('dog')  # the dog's second polygon
  assert label[20, 3] == 0  # the teddy bear: background
  assert label[22, 22] == voc.CLASS_NAMES.index('person')  # the crowd (RLE)
  assert label[19, 26] == IGNORE  # a person in the crowd: two masks of one class
  assert not splits['validation'][2][1].any()  # no annotation: all background
  cat = splits['validation'][3][1]
  np.testing.assert_array_equal(cat[4:12, 3:9], voc.CLASS_NAMES.index('cat'))  # compressed
  assert cat[13, 13] == voc.CLASS_NAMES.index('bus')  # a 4-pixel object is kept
  assert set(np.unique(splits['train'][14][1])) <= {0, 8, 12, IGNORE}


def test_images_and_labels_match_torchvisions_coco_detection(coco):
  """torchvision's own CocoDetection (RGB images, each image's annotations) where importable."""
  torchvision = references.import_torchvision()
  source, splits = coco
  dataset = torchvision.datasets.CocoDetection(
      str(source / 'val2017'), str(source / 'annotations' / 'instances_val2017.json'))
  assert dataset.ids == sorted(splits['validation'])
  for index, image_id_ in enumerate(dataset.ids):
    image, annotations = dataset[index]
    prepared_image, label = splits['validation'][image_id_]
    assert image.mode == 'RGB'
    np.testing.assert_array_equal(prepared_image, np.asarray(image))
    np.testing.assert_array_equal(label, torchvision_target(annotations, image.height,
                                                            image.width))


@pytest.mark.parametrize('removed,named', [
    ('annotations/instances_val2017.json', 'annotations/instances_val2017.json'),
    ('train2017', 'train2017'),
    ('val2017/000000000002.jpg', 'val2017/000000000002.jpg'),
])
def test_missing_files_are_named_with_the_layout(tmp_path, removed, named):
  source = tmp_path / 'coco'
  write_coco(source)
  path = source / removed
  if path.is_dir():
    for child in path.iterdir():
      child.unlink()
    path.rmdir()
  else:
    path.unlink()
  with pytest.raises(DataError) as error:
    data.load_sources(test_datasets.dataset_config('coco_voc', tmp_path, source))
  message = str(error.value)
  assert str(source / named) in message and 'missing' in message
  assert "COCO's own layout" in message and 'annotations_trainval2017.zip' in message


def test_a_train_image_the_filter_drops_may_be_missing(tmp_path):
  source = tmp_path / 'coco'
  write_coco(source)
  (source / 'train2017' / '000000000011.jpg').unlink()
  splits = coco_voc.CocoVoc(data_dir=str(tmp_path / 'tfds')).find_examples(str(source))
  assert [image_id(path) for path, _ in splits['train']] == [10, 14]


def test_bad_annotation_files_are_refused(tmp_path):
  source = tmp_path / 'coco'
  write_coco(source)
  path = source / 'annotations' / 'instances_val2017.json'
  path.write_text(json.dumps({'images': [{'id': 1}], 'annotations': []}))
  with pytest.raises(DataError, match=r'instances_val2017.json is not a COCO instances '
                                      r"file \(KeyError: 'file_name'\)"):
    coco_voc.CocoVoc(data_dir=str(tmp_path / 'tfds')).find_examples(str(source))


@pytest.mark.parametrize('segmentation,match', [
    ({'counts': [10, 5], 'size': [24, 32]}, r'is not an RLE of its 24x32 image'),
    ({'counts': [768], 'size': [32, 24]}, r'is not an RLE of its 24x32 image'),
    ([], r'cannot be read by pycocotools'),
])
def test_bad_segmentations_are_named_with_their_annotation(tmp_path, segmentation, match):
  source = tmp_path / 'coco'
  write_coco(source)
  path = source / 'annotations' / 'instances_val2017.json'
  instances = json.loads(path.read_text())
  instances['annotations'][0]['segmentation'] = segmentation
  path.write_text(json.dumps(instances))
  with pytest.raises(DataError, match=match) as error:
    data.load_sources(test_datasets.dataset_config('coco_voc', tmp_path, source))
  assert f'{path} (image id 1): annotation 100: its segmentation' in str(error.value)


def load_experiment(name):
  path = os.path.join(ROOT, 'experiments', name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('experiment,recipe', [
    ('deeplab.py', 'torchvision_deeplabv3_resnet50'),
    ('deeplab.py', 'torchvision_deeplabv3_resnet101'),
    ('fcn.py', 'torchvision_fcn_resnet50'),
    ('fcn.py', 'torchvision_fcn_resnet101'),
])
def test_torchvision_checkpoints_evaluate_as_torchvision_publishes(experiment, recipe):
  """On COCO-VOC, short side resized to 520, whole images, unpadded (SegmentationPresetEval)."""
  config = load_experiment(experiment).get_config(recipe)
  assert config.dataset.name == 'coco_voc'
  assert (config.evaluation.mode, config.evaluation.resize, config.evaluation.resize_scale,
          config.evaluation.pad) == ('whole', 'short_side', 520, False)


def test_torchvision_recipes_still_train_on_voc():
  deeplab = load_experiment('deeplab.py').get_config(
      'variant=v3,head=torchvision,output_stride=8,aux_head=True,dataset=voc_torchvision,'
      'backbone=resnet50')
  fcn = load_experiment('fcn.py').get_config('torchvision_fcn_resnet50,dataset=voc')
  coco = load_experiment('fcn.py').get_config('torchvision_fcn_resnet50')
  assert deeplab.dataset.name == fcn.dataset.name == 'voc'
  assert fcn.to_dict() == {**coco.to_dict(), 'dataset': {**coco.dataset.to_dict(),
                                                         'name': 'voc'}}
