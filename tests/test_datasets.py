"""Real datasets prepared from tiny fixtures written in each dataset's own on-disk layout.

Every test writes a few tiny images in the real formats (VOC palette PNGs and SBD .mat
files, Cityscapes *_gtFine_labelIds.png, ADE annotations, pet trimaps, a user's colour
masks), prepares them through the real builders, and compares the decoded labels pixel by
pixel with mapping tables written here from the datasets' documentation.
"""
import os
import zlib

import numpy as np
from PIL import Image
import pytest
import scipy.io

from segjax import configs
from segjax import data
from segjax.data import pipeline
from segjax.errors import ConfigError, DataError

IGNORE = 255


def dataset_config(name, tmp_path, source, **fields):
  config = configs.base_config().dataset
  config.name = name
  config.data_dir = str(tmp_path / 'tfds')
  config.source_dir = str(source)
  config.num_threads = 0
  for key, value in fields.items():
    config[key] = value
  return config


def write_image(path, height, width, seed, fmt='JPEG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)
  return pixels


def write_label(path, values, palette=None):
  """Saves uint8 `values` as a grayscale PNG, or as a palette PNG with `palette`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(np.asarray(values, np.uint8))
  if palette is not None:
    image.putpalette(palette)
  image.save(path, format='PNG')


def decoded(config):
  """{file_name: (image, label)} of both splits, labels through the spec's label map."""
  spec = data.get_spec(config)
  sources = data.load_sources(config)
  return spec, {split: {source[i]['file_name'].decode(): pipeline.decode(source[i], spec)
                        for i in range(len(source))}
                for split, source in sources.items()}


# ----------------------------------------------------------------------------- Pascal VOC

def voc_colormap():
  """The VOC palette: bits of the index spread over R, G, B from the high bit down."""
  colours = []
  for index in range(256):
    r = g = b = 0
    c = index
    for bit in range(8):
      r |= ((c >> 0) & 1) << (7 - bit)
      g |= ((c >> 1) & 1) << (7 - bit)
      b |= ((c >> 2) & 1) << (7 - bit)
      c >>= 3
    colours += [r, g, b]
  return colours


def voc_labels(rng, height, width):
  """Classes 0-20 with a one-pixel 255 frame, like VOC's object borders."""
  values = rng.integers(0, 21, (height, width))
  values[0, :] = values[-1, :] = values[:, 0] = values[:, -1] = IGNORE
  return values.astype(np.uint8)


def write_voc(root, sbd='mat'):
  """VOC 2012 + SBD ('mat': benchmark_RELEASE .mat files, 'aug': SegmentationClassAug).

  Returns {image name: expected label} of every image with an annotation.
  """
  rng = np.random.default_rng(0)
  voc = root / 'VOCdevkit' / 'VOC2012'
  splits = {'train': ['2007_000032', '2007_000039'], 'val': ['2007_000033', '2007_000042']}
  os.makedirs(voc / 'ImageSets' / 'Segmentation')
  for split, names in splits.items():
    (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(names) + '\n')
  expected = {}
  sizes = {'2007_000032': (5, 7), '2007_000039': (6, 4), '2007_000033': (4, 9),
           '2007_000042': (7, 7), '2008_000008': (5, 5), '2008_000015': (3, 8)}
  for name, (height, width) in sizes.items():
    write_image(str(voc / 'JPEGImages' / f'{name}.jpg'), height, width, seed=len(expected))
  for name in splits['train'] + splits['val']:
    expected[name] = voc_labels(rng, *sizes[name])
    write_label(str(voc / 'SegmentationClass' / f'{name}.png'), expected[name], voc_colormap())
  # SBD annotates 2007_000039 (VOC's own annotation wins) and val's 2007_000033 (excluded).
  for name in ('2008_000008', '2008_000015', '2007_000039', '2007_000033'):
    values = rng.integers(0, 21, sizes[name]).astype(np.uint8)
    expected.setdefault(name, values)
    if sbd == 'mat':
      path = root / 'benchmark_RELEASE' / 'dataset' / 'cls' / f'{name}.mat'
      os.makedirs(path.parent, exist_ok=True)
      scipy.io.savemat(str(path), {'GTcls': {'Segmentation': values,
                                             'CategoriesPresent': np.unique(values)}})
    else:
      write_label(str(root / 'SegmentationClassAug' / f'{name}.png'), values)
  return expected


def image_name(file_name):
  return os.path.splitext(os.path.basename(file_name))[0]


@pytest.mark.parametrize('sbd', ['mat', 'aug'])
def test_voc_train_aug_labels_are_the_palette_indices(tmp_path, sbd):
  expected = write_voc(tmp_path / 'voc', sbd)
  spec, splits = decoded(dataset_config('voc', tmp_path, tmp_path / 'voc'))
  assert spec.num_classes == 21 and spec.ignore_label == IGNORE
  assert spec.class_names[0] == 'background' and spec.class_names[20] == 'tvmonitor'
  # (SBD names | VOC train) - VOC val.
  assert sorted(map(image_name, splits['train'])) == [
      '2007_000032', '2007_000039', '2008_000008', '2008_000015']
  assert sorted(map(image_name, splits['validation'])) == ['2007_000033', '2007_000042']
  for split in splits.values():
    for file_name, (image, label) in split.items():
      assert file_name.startswith('VOCdevkit/VOC2012/JPEGImages/')
      np.testing.assert_array_equal(label, expected[image_name(file_name)])
      assert image.shape == label.shape + (3,) and image.dtype == np.uint8


def test_voc_train_split_needs_no_sbd(tmp_path):
  write_voc(tmp_path / 'voc')
  config = dataset_config('voc', tmp_path, tmp_path / 'voc', voc_train_split='train')
  _, splits = decoded(config)
  assert sorted(map(image_name, splits['train'])) == ['2007_000032', '2007_000039']


def test_voc_missing_files_are_named_with_the_layout(tmp_path):
  source = tmp_path / 'voc'
  write_voc(source)
  os.remove(source / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / '2007_000042.jpg')
  with pytest.raises(DataError) as error:
    data.load_sources(dataset_config('voc', tmp_path, source))
  message = str(error.value)
  assert str(source / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / '2007_000042.jpg') in message
  assert 'VOCtrainval_11-May-2012.tar' in message and 'benchmark.tgz' in message


def test_voc_without_sbd_says_where_sbd_goes(tmp_path):
  source = tmp_path / 'voc'
  write_voc(source, sbd='aug')
  for name in os.listdir(source / 'SegmentationClassAug'):
    os.remove(source / 'SegmentationClassAug' / name)
  os.rmdir(source / 'SegmentationClassAug')
  with pytest.raises(DataError, match="voc_train_split='train'") as error:
    data.load_sources(dataset_config('voc', tmp_path, source))
  assert str(source / 'benchmark_RELEASE' / 'dataset' / 'cls') in str(error.value)


def test_empty_source_dir_shows_the_layout(tmp_path):
  with pytest.raises(DataError, match='missing or empty') as error:
    data.load_sources(dataset_config('voc', tmp_path, tmp_path / 'nothing'))
  assert 'VOCdevkit/VOC2012/SegmentationClass/<name>.png' in str(error.value)


# ----------------------------------------------------------------------------- Cityscapes

# cityscapesScripts labels.py: (name, labelId, trainId); trainId 255 is not evaluated.
CITYSCAPES_LABELS = [
    ('unlabeled', 0, 255), ('ego vehicle', 1, 255), ('rectification border', 2, 255),
    ('out of roi', 3, 255), ('static', 4, 255), ('dynamic', 5, 255), ('ground', 6, 255),
    ('road', 7, 0), ('sidewalk', 8, 1), ('parking', 9, 255), ('rail track', 10, 255),
    ('building', 11, 2), ('wall', 12, 3), ('fence', 13, 4), ('guard rail', 14, 255),
    ('bridge', 15, 255), ('tunnel', 16, 255), ('pole', 17, 5), ('polegroup', 18, 255),
    ('traffic light', 19, 6), ('traffic sign', 20, 7), ('vegetation', 21, 8),
    ('terrain', 22, 9), ('sky', 23, 10), ('person', 24, 11), ('rider', 25, 12),
    ('car', 26, 13), ('truck', 27, 14), ('bus', 28, 15), ('caravan', 29, 255),
    ('trailer', 30, 255), ('train', 31, 16), ('motorcycle', 32, 17), ('bicycle', 33, 18),
    ('license plate', 255, 255),  # id -1, stored as 255 in the uint8 PNGs
]


def write_cityscapes(root):
  """Returns {image file name: raw labelIds}."""
  rng = np.random.default_rng(1)
  all_ids = np.array([label_id for _, label_id, _ in CITYSCAPES_LABELS], np.uint8)
  frames = {('train', 'aachen', 'aachen_000000_000019'): rng.permutation(all_ids).reshape(5, 7),
            ('train', 'bochum', 'bochum_000000_000313'): rng.choice(all_ids, (3, 4)),
            ('val', 'frankfurt', 'frankfurt_000000_000294'): rng.choice(all_ids, (4, 6))}
  raw = {}
  for (split, city, stem), ids in frames.items():
    image = f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'
    write_image(str(root / image), *ids.shape, seed=len(raw), fmt='PNG')
    write_label(str(root / 'gtFine' / split / city / f'{stem}_gtFine_labelIds.png'), ids)
    raw[image] = ids
  return raw


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
  raw = write_cityscapes(tmp_path / 'cs')
  spec, splits = decoded(dataset_config('cityscapes', tmp_path, tmp_path / 'cs'))
  train_id = dict((label_id, tid) for _, label_id, tid in CITYSCAPES_LABELS)
  names = {tid: name for name, _, tid in CITYSCAPES_LABELS if tid != 255}
  assert spec.class_names == tuple(names[t] for t in range(19))
  assert len(splits['train']) == 2 and len(splits['validation']) == 1
  for split in splits.values():
    for file_name, (_, label) in split.items():
      expected = np.vectorize(train_id.get)(raw[file_name])
      np.testing.assert_array_equal(label, expected)
  # The 5x7 frame holds every labelId once: all 19 classes and 16 ignored pixels.
  label = splits['train']['leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png'][1]
  assert sorted(set(label.ravel()) - {IGNORE}) == list(range(19))
  assert (label == IGNORE).sum() == 35 - 19


def test_cityscapes_missing_label_is_named(tmp_path):
  source = tmp_path / 'cs'
  write_cityscapes(source)
  missing = source / 'gtFine' / 'val' / 'frankfurt' / 'frankfurt_000000_000294_gtFine_labelIds.png'
  os.remove(missing)
  with pytest.raises(DataError) as error:
    data.load_sources(dataset_config('cityscapes', tmp_path, source))
  assert str(missing) in str(error.value)
  assert 'gtFine_trainvaltest.zip' in str(error.value)


# ----------------------------------------------------------------------------- ADE20K

# objectInfo150.csv, 'Name' column (synonyms separated by ';'), a few rows by index.
ADE_CSV_NAMES = {
    1: 'wall', 2: 'building;edifice', 8: 'bed', 9: 'windowpane;window',
    45: 'chest;of;drawers;chest;bureau;dresser', 57: 'pool;table;billiard;table;snooker;table',
    90: 'television;television;receiver;television;set;tv;tv;set;idiot;box;boob;tube;telly',
    131: 'screen;silver;screen;projection;screen', 142: 'crt;screen', 150: 'flag'}


def test_ade20k_class_names_follow_object_info_150():
  spec = data.get_spec('ade20k')
  assert spec.num_classes == 150 and len(set(spec.class_names)) == 150
  for index, csv_name in ADE_CSV_NAMES.items():
    name = spec.class_names[index - 1]
    assert f";{name.replace(' ', ';')};" in f';{csv_name};', (index, name)  # one synonym


def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / 'ade' / 'ADEChallengeData2016'
  raw = {}
  for folder, stem, size in (('training', 'ADE_train_00000001', (6, 5)),
                             ('training', 'ADE_train_00000002', (4, 8)),
                             ('validation', 'ADE_val_00000001', (5, 5))):
    values = rng.integers(0, 151, size).astype(np.uint8)
    values[0, 0], values[-1, -1] = 0, 150
    write_image(str(root / 'images' / folder / f'{stem}.jpg'), *size, seed=len(raw))
    write_label(str(root / 'annotations' / folder / f'{stem}.png'), values)
    raw[f'ADEChallengeData2016/images/{folder}/{stem}.jpg'] = values
  _, splits = decoded(dataset_config('ade20k', tmp_path, tmp_path / 'ade'))
  assert len(splits['train']) == 2 and len(splits['validation']) == 1
  for split in splits.values():
    for file_name, (_, label) in split.items():
      values = raw[file_name].astype(np.int64)
      np.testing.assert_array_equal(label, np.where(values == 0, IGNORE, values - 1))
      assert label[0, 0] == IGNORE and label[-1, -1] == 149


def test_ade20k_missing_annotation_is_named(tmp_path):
  root = tmp_path / 'ade' / 'ADEChallengeData2016'
  for folder in ('training', 'validation'):
    write_image(str(root / 'images' / folder / 'ADE_x.jpg'), 4, 4, seed=0)
    os.makedirs(root / 'annotations' / folder)
  with pytest.raises(DataError) as error:
    data.load_sources(dataset_config('ade20k', tmp_path, tmp_path / 'ade'))
  assert str(root / 'annotations' / 'training' / 'ADE_x.png') in str(error.value)
  assert 'ADEChallengeData2016.zip' in str(error.value)


# ----------------------------------------------------------------------------- Oxford-IIIT Pet

@pytest.fixture(scope='module')
def pets_files(tmp_path_factory):
  """The original pets layout; one '.jpg' is really an RGBA PNG, as some in the release."""
  root = tmp_path_factory.mktemp('pets')
  rng = np.random.default_rng(3)
  names = {'trainval': ['Abyssinian_1', 'beagle_116'], 'test': ['Bombay_10']}
  trimaps = {}
  for name, size in zip(['Abyssinian_1', 'beagle_116', 'Bombay_10'], [(5, 6), (4, 4), (6, 3)]):
    trimaps[name] = rng.integers(1, 4, size).astype(np.uint8)
    write_label(str(root / 'annotations' / 'trimaps' / f'{name}.png'), trimaps[name])
    if name == 'beagle_116':
      rgba = rng.integers(0, 256, size + (4,), dtype=np.uint8)
      os.makedirs(root / 'images', exist_ok=True)
      Image.fromarray(rgba).save(root / 'images' / f'{name}.jpg', format='PNG')
    else:
      write_image(str(root / 'images' / f'{name}.jpg'), *size, seed=len(name))
  (root / 'annotations' / 'trimaps' / '._Abyssinian_1.png').write_bytes(b'resource fork')
  for split, split_names in names.items():
    (root / 'annotations' / f'{split}.txt').write_text(
        ''.join(f'{name} 1 1 1\n' for name in split_names))
  return root, trimaps, rgba


@pytest.mark.parametrize('boundary, expected_names, boundary_label', [
    ('class', ('foreground', 'background', 'boundary'), 2),
    ('ignore', ('foreground', 'background'), IGNORE)])
def test_pets_trimaps_map_to_foreground_background_boundary(
    tmp_path_factory, pets_files, boundary, expected_names, boundary_label):
  root, trimaps, rgba = pets_files
  data_dir = tmp_path_factory.getbasetemp() / 'pets_prepared'  # shared by both cases
  config = dataset_config('pets', data_dir, root, pets_boundary=boundary)
  spec, splits = decoded(config)
  assert spec.class_names == expected_names
  assert sorted(splits['train']) == ['images/Abyssinian_1.jpg', 'images/beagle_116.jpg']
  assert list(splits['validation']) == ['images/Bombay_10.jpg']
  trimap_class = {1: 0, 2: 1, 3: boundary_label}
  for split in splits.values():
    for file_name, (_, label) in split.items():
      np.testing.assert_array_equal(label, np.vectorize(trimap_class.get)(trimaps[image_name(
          file_name)]))
  image, _ = splits['train']['images/beagle_116.jpg']
  np.testing.assert_array_equal(image, rgba[..., :3])  # alpha dropped, colours kept


def test_pets_bad_boundary_choice_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="pets_boundary must be one of.*'class', 'ignore'"):
    data.get_spec(dataset_config('pets', tmp_path, tmp_path, pets_boundary='drop'))


# ----------------------------------------------------------------------------- folder

PALETTE = ((0, 0, 0), (255, 0, 0), (0, 128, 255))
IGNORE_COLOUR = (255, 255, 255)


def write_folder(root, class_of_pixel, names_and_sizes):
  """Images and colour masks; returns {image path relative to root: class labels}."""
  rng = np.random.default_rng(4)
  colours = np.array(PALETTE + (IGNORE_COLOUR,), np.uint8)
  expected = {}
  for index, (stem, extension, size) in enumerate(names_and_sizes):
    classes = rng.integers(0, len(PALETTE) + 1, size)  # len(PALETTE) stands for ignore
    write_image(str(root / 'images' / f'{stem}{extension}'), *size, seed=index,
                fmt='PNG' if extension == '.png' else 'JPEG')
    mask = root / 'masks' / f'{stem}.png'
    os.makedirs(mask.parent, exist_ok=True)
    Image.fromarray(colours[classes]).save(mask)
    expected[f'images/{stem}{extension}'] = class_of_pixel(classes)
  return expected


def folder_config(tmp_path, source, **fields):
  return dataset_config('folder', tmp_path, source, class_names=('sky', 'cat', 'dog'),
                        palette=PALETTE, ignore_colours=(IGNORE_COLOUR,), **fields)


def test_folder_colour_masks_map_through_the_palette(tmp_path):
  source = tmp_path / 'mine'
  expected = write_folder(source, lambda c: np.where(c == len(PALETTE), IGNORE, c),
                          [('a', '.jpg', (5, 6)), ('site/b', '.png', (4, 7)),
                           ('c', '.jpeg', (3, 3))])
  (source / 'train.txt').write_text('a\nsite/b.png\n')
  (source / 'val.txt').write_text('c\n')
  spec, splits = decoded(folder_config(tmp_path, source))
  assert spec.class_names == ('sky', 'cat', 'dog') and spec.ignore_label == IGNORE
  assert sorted(splits['train']) == ['images/a.jpg', 'images/site/b.png']
  assert list(splits['validation']) == ['images/c.jpeg']
  for split in splits.values():
    for file_name, (_, label) in split.items():
      np.testing.assert_array_equal(label, expected[file_name])


def test_folder_index_masks_and_hash_split(tmp_path):
  source = tmp_path / 'mine'
  rng = np.random.default_rng(5)
  stems = [f'img{i}' for i in range(8)]
  expected = {}
  for i, stem in enumerate(stems):
    values = rng.choice([0, 1, 2, IGNORE], (4, 5)).astype(np.uint8)
    write_image(str(source / 'images' / f'{stem}.jpg'), 4, 5, seed=i)
    # Half the masks are palette PNGs: their indices count, not their colours.
    write_label(str(source / 'masks' / f'{stem}.png'), values,
                voc_colormap() if i % 2 else None)
    expected[f'images/{stem}.jpg'] = values
  config = dataset_config('folder', tmp_path, source, class_names=('a', 'b', 'c'),
                          validation_fraction=0.5)
  _, splits = decoded(config)
  in_validation = [s for s in stems if zlib.crc32(s.encode()) / 2**32 < 0.5]
  assert sorted(image_name(f) for f in splits['validation']) == sorted(in_validation)
  assert len(splits['train']) + len(splits['validation']) == 8
  for split in splits.values():
    for file_name, (_, label) in split.items():
      np.testing.assert_array_equal(label, expected[file_name])


def test_folder_unpaired_files_are_all_listed(tmp_path):
  source = tmp_path / 'mine'
  write_folder(source, lambda c: c, [('a', '.jpg', (4, 4)), ('b', '.jpg', (4, 4))])
  os.remove(source / 'masks' / 'a.png')
  write_image(str(source / 'images' / 'b.png'), 4, 4, seed=9, fmt='PNG')  # stem twice
  os.makedirs(source / 'masks' / 'extra')
  Image.new('RGB', (4, 4)).save(source / 'masks' / 'extra' / 'z.png')
  Image.new('RGB', (4, 4)).save(source / 'masks' / 'extra' / 'y.jpg')
  with pytest.raises(DataError) as error:
    data.load_sources(folder_config(tmp_path, source))
  message = str(error.value)
  assert '4 problem(s)' in message
  assert f'{source / "masks" / "extra" / "y.jpg"}: JPEG changes label values' in message
  assert f'{source / "images" / "a.jpg"}: no mask {source / "masks" / "a"}.png' in message
  assert f'{source / "masks" / "extra" / "z.png"}: no image' in message
  assert 'have the same stem' in message and str(source / 'images' / 'b.png') in message


def test_folder_bad_files_are_all_listed_with_unknown_colours(tmp_path):
  source = tmp_path / 'mine'
  write_folder(source, lambda c: c, [(s, '.jpg', (4, 4)) for s in 'abcd'])
  Image.new('RGB', (5, 4)).save(source / 'masks' / 'a.png')  # 4x5 mask for a 4x4 image
  (source / 'images' / 'b.jpg').write_bytes(b'not a jpeg')
  stray = np.zeros((4, 4, 3), np.uint8)
  stray[0, :3] = (10, 20, 30)
  Image.fromarray(stray).save(source / 'masks' / 'c.png')
  (source / 'train.txt').write_text('a\nb\nc\n')
  (source / 'val.txt').write_text('d\n')
  with pytest.raises(DataError) as error:
    data.load_sources(folder_config(tmp_path, source))
  message = str(error.value)
  assert '3 problem(s) in the train split' in message
  assert f'{source / "masks" / "a.png"} is 4x5 but its image' in message
  assert f'{source / "images" / "b.jpg"}: unreadable' in message
  assert f'{source / "masks" / "c.png"}: has 1 colour(s)' in message
  assert '(10, 20, 30) (3 px)' in message


@pytest.mark.parametrize('fields, match', [
    ({'class_names': ()}, 'needs dataset.class_names'),
    ({'class_names': ('a', 'b'), 'palette': ((0, 0, 0),)}, 'palette has 1 colours for 2'),
    ({'class_names': ('a',), 'palette': ((0, 0, 300),)}, r'\(0, 0, 300\) is not an'),
    ({'class_names': ('a',), 'palette': ((1, 2, 3),), 'ignore_colours': ((1, 2, 3),)},
     'must not repeat a colour'),
])
def test_folder_config_errors(tmp_path, fields, match):
  with pytest.raises(ConfigError, match=match):
    data.get_spec(dataset_config('folder', tmp_path, tmp_path, **fields))


def test_prepared_data_is_reused_without_the_sources(tmp_path):
  source = tmp_path / 'ade'
  root = source / 'ADEChallengeData2016'
  for folder in ('training', 'validation'):
    write_image(str(root / 'images' / folder / 'ADE_1.jpg'), 4, 4, seed=0)
    write_label(str(root / 'annotations' / folder / 'ADE_1.png'), np.ones((4, 4)))
  config = dataset_config('ade20k', tmp_path, source)
  data.load_sources(config)
  for folder in ('training', 'validation'):
    os.remove(root / 'images' / folder / 'ADE_1.jpg')
  assert len(data.load_sources(config)['validation']) == 1


@pytest.mark.parametrize('name, field', [('folder', 'class_names'), ('pets', 'pets_boundary')])
def test_config_dependent_specs_need_the_config(name, field):
  with pytest.raises(ConfigError, match=f'depend on dataset.{field}: pass the dataset config'):
    data.get_spec(name)


# ----------------------------------------------------------------------------- folder, channels

def write_array_images(root, stems, channels, height=6, width=5):
  """uint8 [H, W, C] .npy images and index masks; returns {file name: (image, label)}."""
  rng = np.random.default_rng(6)
  expected = {}
  for stem in stems:
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    values = rng.choice([0, 1, IGNORE], (height, width)).astype(np.uint8)
    os.makedirs(root / 'images', exist_ok=True)
    np.save(root / 'images' / f'{stem}.npy', pixels)
    write_label(str(root / 'masks' / f'{stem}.png'), values)
    expected[f'images/{stem}.npy'] = (pixels, values)
  (root / 'train.txt').write_text('\n'.join(stems[:-1]))
  (root / 'val.txt').write_text(stems[-1])
  return expected


def channels_config(tmp_path, source, channels, **fields):
  return dataset_config('folder', tmp_path, source, class_names=('a', 'b'),
                        mean=(0.5,) * channels, std=(0.25,) * channels, **fields)


@pytest.mark.parametrize('channels', [6, 3, 1])
def test_folder_npy_images_of_any_channel_count_decode_pixel_by_pixel(tmp_path, channels):
  source = tmp_path / 'bands'
  expected = write_array_images(source, ['a', 'b', 'c'], channels)
  _, splits = decoded(channels_config(tmp_path, source, channels))
  assert sorted(splits['train']) == ['images/a.npy', 'images/b.npy']
  for split in splits.values():
    for file_name, (image, label) in split.items():
      assert image.dtype == np.uint8
      np.testing.assert_array_equal(image, expected[file_name][0])
      np.testing.assert_array_equal(label, expected[file_name][1])


def test_folder_multichannel_tiff_and_rgba_png(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  source = tmp_path / 'mixed'
  rng = np.random.default_rng(7)
  six = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
  os.makedirs(source / 'images')
  tifffile.imwrite(source / 'images' / 'interleaved.tif', six, photometric='minisblack',
                   planarconfig='contig')
  tifffile.imwrite(source / 'images' / 'planar.tif', np.moveaxis(six, -1, 0),
                   photometric='minisblack', planarconfig='separate')
  for stem in ('interleaved', 'planar'):
    write_label(str(source / 'masks' / f'{stem}.png'), np.zeros((4, 5)))
  (source / 'train.txt').write_text('interleaved\n')
  (source / 'val.txt').write_text('planar\n')
  _, splits = decoded(channels_config(tmp_path, source, 6))
  np.testing.assert_array_equal(splits['train']['images/interleaved.tif'][0], six)
  np.testing.assert_array_equal(splits['validation']['images/planar.tif'][0], six)


def test_folder_rgba_png_gives_four_channels(tmp_path):
  source = tmp_path / 'rgbd'
  rgbd = np.random.default_rng(8).integers(0, 256, (4, 5, 4), dtype=np.uint8)
  os.makedirs(source / 'images')
  for stem in ('a', 'b'):
    Image.fromarray(rgbd).save(source / 'images' / f'{stem}.png')
    write_label(str(source / 'masks' / f'{stem}.png'), np.ones((4, 5)))
  (source / 'train.txt').write_text('a\n')
  (source / 'val.txt').write_text('b\n')
  _, splits = decoded(channels_config(tmp_path, source, 4))
  np.testing.assert_array_equal(splits['train']['images/a.png'][0], rgbd)


def test_folder_channel_count_mismatch_names_the_files(tmp_path):
  source = tmp_path / 'bands'
  write_array_images(source, ['a', 'b'], 4)
  np.save(source / 'images' / 'b.npy', np.zeros((6, 5, 5), np.uint8))
  with pytest.raises(DataError) as error:
    data.load_sources(channels_config(tmp_path, source, 4))
  assert (f'{source / "images" / "b.npy"}: has 5 channels but dataset.mean and dataset.std '
          'have 4 values' in str(error.value))
  with pytest.raises(DataError, match=r'a.npy: has 4 channels but dataset.mean and '
                                      r'dataset.std have 3 values'):
    data.load_sources(channels_config(tmp_path, source, 3))
  np.save(source / 'images' / 'b.npy', np.zeros((6, 5, 4), np.float32))
  with pytest.raises(DataError, match=r'b.npy: holds a float32 array of shape \(6, 5, 4\); '
                                      'store uint8'):
    data.load_sources(channels_config(tmp_path, source, 4))


def test_folder_multichannel_training_batches_are_normalised_per_channel(tmp_path):
  source = tmp_path / 'bands'
  expected = write_array_images(source, ['a', 'b', 'c', 'd'], 6, height=12, width=10)
  config = configs.base_config()
  config.dataset = channels_config(tmp_path, source, 6, image_size=8, photometric=True,
                                   cat_max_ratio=0.9, min_scale=1.0, max_scale=1.0)
  config.dataset.mean = tuple(0.1 * c for c in range(6))
  config.dataset.std = tuple(0.2 + 0.1 * c for c in range(6))
  config.dataset.photometric_channels = 3  # the RGB bands only (0, the default: all six)
  config.batch_size = 2
  spec = data.get_spec(config.dataset)
  batch = next(pipeline.train_batches(data.load_sources(config.dataset)['train'], spec, config,
                                      start_step=0))
  assert batch['image'].shape == (2, 8, 8, 6) and batch['image'].dtype == np.float32
  pixels = 255 * (batch['image'] * np.array(config.dataset.std) + np.array(config.dataset.mean))
  # Channels 3-5 are not distorted (photometric_channels=3) nor resampled (scale 1): each
  # holds values of that channel of the training images.
  for channel in range(3, 6):
    values = np.round(pixels[..., channel]).ravel()
    np.testing.assert_allclose(pixels[..., channel].ravel(), values, atol=1e-3)
    originals = np.concatenate([image[..., channel].ravel() for file_name, (image, _)
                                in expected.items() if not file_name.endswith('d.npy')])
    assert set(values.tolist()) <= set(originals.tolist())
