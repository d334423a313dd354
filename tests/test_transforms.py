"""Training augmentation on numpy arrays: geometry shared by image and label, cat_max_ratio
crops, photometric distortion of the image only, any number of input channels.

Pure numpy (no compiles): every expectation is computed here independently (colorsys,
brute-force window counts, pixel coordinates carried through the transforms).
"""
import colorsys

import jax
import numpy as np
import pytest

from segjax import configs
from segjax import models
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, DataError

IGNORE = 255


def augment(seed, image, label, **fields):
  options = dict(crop_size=24, min_scale=0.5, max_scale=2.0, flip=True, ignore_label=IGNORE)
  options.update(fields)
  return transforms.train_augment(np.random.default_rng(seed), image, label, **options)


def coordinates(height, width):
  """An image whose channels are 4 * row and 4 * column, and label maps of row and column."""
  rows, cols = np.mgrid[:height, :width]
  image = np.stack([4 * rows, 4 * cols, np.zeros_like(rows)], -1).astype(np.uint8)
  return image, rows.astype(np.uint8), cols.astype(np.uint8)


# ----------------------------------------------------------------------------- geometry

@pytest.mark.parametrize('seed', range(12))
def test_label_follows_the_image_through_scale_crop_pad_and_flip(seed):
  image, rows, cols = coordinates(40, 52)
  image_a, row_label = augment(seed, image, rows)
  image_b, col_label = augment(seed, image, cols)
  np.testing.assert_array_equal(image_a, image_b)  # the same draws, whatever the label
  labelled = row_label != IGNORE
  assert labelled.any()
  np.testing.assert_array_equal(labelled, col_label != IGNORE)
  # The image is resized bilinearly and the label by nearest neighbour: the source
  # coordinates they carry agree to within a pixel.
  assert np.abs(image_a[..., 0] / 4 - row_label)[labelled].max() <= 1
  assert np.abs(image_a[..., 1] / 4 - col_label)[labelled].max() <= 1
  assert not image_a[~labelled].any()  # padding is black where the label is ignored


def test_a_scaled_image_smaller_than_the_crop_is_padded_with_ignore():
  image, rows, _ = coordinates(20, 30)
  small, label = augment(0, image, rows, min_scale=0.5, max_scale=0.5, flip=False)
  assert small.shape == (24, 24, 3) and label.shape == (24, 24)
  assert (label[:10, :15] != IGNORE).all()
  assert (label[10:] == IGNORE).all() and (label[:, 15:] == IGNORE).all()
  assert not small[10:].any() and not small[:, 15:].any()
  large, label = augment(0, image, rows, min_scale=2.0, max_scale=2.0)
  assert large.shape == (24, 24, 3) and (label != IGNORE).all()


def test_scales_cover_half_to_twice_the_size():
  image, rows, _ = coordinates(40, 40)
  heights = []
  for seed in range(60):
    _, label = augment(seed, image, rows, crop_size=100, flip=False)
    heights.append(int((label[:, 0] != IGNORE).sum()))
  assert min(heights) >= 20 and max(heights) <= 80
  assert min(heights) < 26 and max(heights) > 70


@pytest.mark.parametrize('shape, base_size, factor', [
    ((1024, 2048), (2048, 512), 0.5),  # Cityscapes under mmseg's scale=(2048, 512)
    ((1024, 2048), (512, 2048), 0.5),  # the order of the bounds does not matter
    ((375, 500), (2048, 512), 512 / 375),  # VOC: the short side reaches 512
    ((512, 683), 0, 1.0),
    ((300, 100), 150, 0.5),  # one int: the long side fits it
])
def test_base_scale_fits_long_and_short_side_bounds(shape, base_size, factor):
  assert transforms.base_scale(shape, base_size) == pytest.approx(factor)


def test_base_size_rescales_before_the_random_ratio():
  image, rows, _ = coordinates(20, 40)
  _, label = augment(0, image, rows, crop_size=64, min_scale=1.5, max_scale=1.5, flip=False,
                     base_size=(20, 10))  # factor min(20 / 40, 10 / 20) = 0.5, then 1.5
  assert ((label != IGNORE).sum(0) > 0).sum() == 30
  assert ((label != IGNORE).sum(1) > 0).sum() == 15


# ----------------------------------------------------------------------------- cat_max_ratio

def two_class_label():
  """48x48: class 1 in a 20x20 corner, class 0 elsewhere, an ignored bottom band."""
  label = np.zeros((48, 48), np.uint8)
  label[:20, :20] = 1
  label[40:] = IGNORE
  return label


def satisfies(crop, ratio):
  """Independent count: >= 2 classes and the largest below `ratio` of labelled pixels."""
  values, counts = np.unique(crop[crop != IGNORE], return_counts=True)
  return len(values) >= 2 and counts.max() < ratio * counts.sum()


def test_cat_max_ratio_redraws_dominated_crops():
  label = two_class_label()
  rows, cols = np.mgrid[:48, :48]
  image = np.stack([rows, cols, rows], -1).astype(np.uint8)

  def success_rate(ratio):
    successes = 0
    for seed in range(100):
      crop_image, crop_label = transforms.random_crop(
          np.random.default_rng(seed), image, label, 16, 16, ignore_label=IGNORE,
          cat_max_ratio=ratio)
      top, left = crop_image[0, 0, :2]
      np.testing.assert_array_equal(crop_label, label[top:top + 16, left:left + 16])
      successes += satisfies(crop_label, 0.75)
    return successes / 100

  # A single random window satisfies 0.75 with probability 0.14; 11 draws: 0.82.
  assert success_rate(1.0) < 0.3
  assert success_rate(0.75) > 0.7


@pytest.mark.parametrize('seed', range(8))
def test_cat_max_ratio_keeps_the_first_good_window_or_the_last_drawn(seed):
  label = two_class_label()
  image = label[..., None]
  draws = np.random.default_rng(seed)
  windows = [transforms.crop_window(draws, label.shape, 16, 16)
             for _ in range(transforms.CROP_TRIES + 1)]
  good = [w for w in windows if satisfies(label[w[0]:w[0] + 16, w[1]:w[1] + 16], 0.75)]
  top, left = (good + windows[-1:])[0]
  _, crop = transforms.random_crop(np.random.default_rng(seed), image, label, 16, 16,
                                   ignore_label=IGNORE, cat_max_ratio=0.75)
  np.testing.assert_array_equal(crop, label[top:top + 16, left:left + 16])


def test_single_class_labels_still_give_a_crop():
  label = np.ones((30, 30), np.uint8)
  image, crop = transforms.random_crop(np.random.default_rng(0), label[..., None], label,
                                       16, 16, cat_max_ratio=0.5)
  assert image.shape == (16, 16, 1) and crop.shape == (16, 16)


# ----------------------------------------------------------------------------- photometric

class FixedDraws:
  """A generator stand-in whose every draw sits at `fraction` of its range."""

  def __init__(self, fraction):
    self.fraction = fraction

  def uniform(self, low=0.0, high=1.0):
    return low + self.fraction * (high - low)

  def integers(self, low, high):
    return low + int(self.fraction * (high - low))


def test_brightness_then_contrast_is_the_direct_formula():
  pixels = np.array([[[0, 10], [100, 200]], [[250, 255], [30, 60]]], np.uint8)  # [2, 2, 2]
  params = transforms.Photometric(brightness_delta=40, contrast_range=(1.2, 1.6), channels=2)
  # fraction 0.25: every op applies, contrast first; delta -20, factor 1.3.
  got = transforms.photometric_distortion(FixedDraws(0.25), pixels, params)
  expected = np.clip(np.clip(pixels.astype(np.float64) - 20, 0, 255) * 1.3, 0, 255)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got.dtype == np.float32
  # fraction 0.75: no op applies.
  np.testing.assert_array_equal(
      transforms.photometric_distortion(FixedDraws(0.75), pixels, params), pixels)


def test_hue_shift_zero_and_saturation_one_are_identities():
  rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3)).astype(np.uint8)
  params = transforms.Photometric(brightness_delta=0, contrast_range=(1, 1),
                                  saturation_range=(1, 1), hue_delta=0)
  for seed in range(10):
    np.testing.assert_allclose(
        transforms.photometric_distortion(np.random.default_rng(seed), rgb, params), rgb,
        atol=1e-3)


def test_photometric_only_touches_the_declared_channels():
  image = np.random.default_rng(1).integers(0, 256, (5, 5, 4)).astype(np.uint8)
  params = transforms.Photometric()  # RGB of an RGB-D image
  changed = [transforms.photometric_distortion(np.random.default_rng(s), image, params)
             for s in range(20)]
  for out in changed:
    np.testing.assert_array_equal(out[..., 3], image[..., 3])
    assert out.min() >= 0 and out.max() <= 255
  assert any(np.abs(out[..., :3] - image[..., :3]).max() > 1 for out in changed)


def test_hsv_matches_colorsys_and_round_trips():
  rgb = np.random.default_rng(2).uniform(0, 255, (50, 3))
  rgb[:3] = [[0, 0, 0], [128, 128, 128], [255, 0, 0]]  # black, gray: hue 0
  hsv = transforms.rgb_to_hsv(rgb)
  expected = np.array([colorsys.rgb_to_hsv(*(pixel / 255)) for pixel in rgb])
  expected[:, 2] *= 255
  np.testing.assert_allclose(hsv, expected, atol=1e-9)
  np.testing.assert_allclose(transforms.hsv_to_rgb(hsv), rgb, atol=1e-9)
  shifted = hsv.copy()
  shifted[:, 0] = (shifted[:, 0] + 1 / 3) % 1  # 120 degrees: red -> green
  expected = [colorsys.hsv_to_rgb(h, s, v / 255) for h, s, v in shifted]
  np.testing.assert_allclose(transforms.hsv_to_rgb(shifted), np.array(expected) * 255,
                             atol=1e-9)
  np.testing.assert_allclose(transforms.hsv_to_rgb(shifted)[2], [0, 255, 0])


def test_photometric_changes_the_image_only_and_follows_the_seed():
  image, rows, _ = coordinates(40, 52)
  params = transforms.Photometric()
  plain_image, plain_label = augment(3, image, rows, flip=False)
  image_a, label_a = augment(3, image, rows, flip=False, photometric=params)
  image_b, label_b = augment(3, image, rows, flip=False, photometric=params)
  np.testing.assert_array_equal(label_a, plain_label)  # geometry is drawn first
  np.testing.assert_array_equal(image_a, image_b)
  np.testing.assert_array_equal(label_a, label_b)
  assert not image_a[label_a == IGNORE].any()  # padding added after the distortion
  others = [augment(seed, image, rows, flip=False, photometric=params)[0] for seed in range(8)]
  assert any(not np.array_equal(other, image_a) for other in others)
  assert image_a.dtype == np.float32 and plain_image.dtype == np.uint8


# ----------------------------------------------------------------------------- channels

@pytest.mark.parametrize('channels, distorted', [(4, 3), (6, 6), (6, 3), (1, 1)])
def test_any_channel_count_is_augmented_and_normalised_per_channel(channels, distorted):
  values = np.arange(1, channels + 1) * 30
  image = np.broadcast_to(values.astype(np.uint8), (30, 40, channels)).copy()
  label = np.zeros((30, 40), np.uint8)
  label[:, 20:] = 1
  mean, std = 0.1 * np.arange(channels), 0.2 + 0.1 * np.arange(channels)
  params = transforms.Photometric(channels=distorted)
  for seed in range(6):
    out, crop = augment(seed, image, label, photometric=params)
    out = transforms.normalize(out, mean, std)
    assert out.shape == (24, 24, channels) and out.dtype == np.float32
    valid = crop != IGNORE
    untouched = (values / 255 - mean) / std  # constant channels survive the resampling
    np.testing.assert_allclose(out[valid][:, distorted:],
                               np.tile(untouched[distorted:], (valid.sum(), 1)), rtol=1e-5)
    np.testing.assert_allclose(out[~valid], np.tile(-mean / std, ((~valid).sum(), 1)),
                               rtol=1e-5)


def test_decode_refuses_an_image_of_another_channel_count():
  spec = type('Spec', (), {'name': 'folder', 'label_map': None})()
  example = {'image': np.zeros((4, 4, 4), np.uint8), 'file_name': b'images/a.npy',
             'segmentation_mask': np.zeros((4, 4, 1), np.uint8)}
  with pytest.raises(DataError, match=r"image images/a.npy has 4 channels but dataset.mean "
                                      r'and dataset.std have 3 values'):
    pipeline.decode(example, spec, 3)
  assert pipeline.decode(example, spec, 4)[0].shape == (4, 4, 4)


@pytest.mark.parametrize('name', ['unet', 'cnn'])
def test_models_take_six_input_channels(name):
  model_fields = {'unet': {'depth': 2, 'features': 4}, 'cnn': {'num_stages': 2, 'features': 4}}
  config = configs.base_config()
  config.model.name = name
  config.model.update(model_fields[name])
  model = models.get_model(config.model, num_classes=3)
  images = jax.ShapeDtypeStruct((1, 32, 32, 6), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert logits.shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------- config

def folder_dataset_config(**fields):
  config = configs.base_config()
  config.model.name = 'unet'
  config.dataset.name = 'folder'
  config.dataset.class_names = ('a', 'b')
  for key, value in fields.items():
    config.dataset[key] = value
  return config


@pytest.mark.parametrize('fields, match', [
    ({'mean': (0.5,) * 4}, r'dataset.mean \(4 values\) and dataset.std \(3\)'),
    ({'std': (0.2, 0.0, 0.2)}, 'dataset.std must be positive'),
    ({'cat_max_ratio': 0.0}, r'cat_max_ratio must be in \(0, 1\]'),
    ({'cat_max_ratio': 1.5}, r'cat_max_ratio must be in \(0, 1\]'),
    ({'base_size': (512, 0)}, 'dataset.base_size must be 0'),
    ({'brightness_delta': -1.0}, r'brightness_delta must be in \[0, 255\]'),
    ({'contrast_range': (1.5, 0.5)}, 'contrast_range must be a'),
    ({'saturation_range': (-0.1, 1.0)}, 'saturation_range must be a'),
    ({'hue_delta': 91}, r'hue_delta must be an int in \[0, 90\]'),
    ({'photometric_channels': 4, 'photometric': True},
     r'photometric_channels must be an int in \[0, 3\]'),
])
def test_bad_augmentation_fields_are_refused(fields, match):
  with pytest.raises(ConfigError, match=match):
    configs.validate(folder_dataset_config(**fields))


def test_photometric_channels_follow_the_channel_count_and_matter_only_when_used():
  # A grayscale folder dataset validates with the default, photometric distortion off or on.
  gray = folder_dataset_config(mean=(0.3,), std=(0.3,))
  configs.validate(gray)
  assert pipeline.photometric(gray.dataset) is None
  gray.dataset.photometric = True
  configs.validate(gray)
  assert pipeline.photometric(gray.dataset).channels == 1
  # A value the run does not use does not stop it; one it uses is checked.
  unused = folder_dataset_config(mean=(0.3,), std=(0.3,), photometric_channels=3)
  configs.validate(unused)
  unused.dataset.photometric = True
  with pytest.raises(ConfigError, match=r'photometric_channels must be an int in \[0, 1\]'):
    configs.validate(unused)


def test_rgb_datasets_need_three_channel_stats():
  config = folder_dataset_config(name='shapes', mean=(0.5,) * 4, std=(0.25,) * 4)
  with pytest.raises(ConfigError, match="dataset 'shapes' has RGB images but dataset.mean "
                                        'has 4 values'):
    configs.validate(config)
  configs.validate(folder_dataset_config(mean=(0.5,) * 6, std=(0.25,) * 6,
                                         photometric_channels=6, base_size=(64, 32),
                                         cat_max_ratio=0.75, photometric=True))
