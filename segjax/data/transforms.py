"""Joint image/label transforms on numpy arrays (one random draw drives both).

Images are [H, W, C] with any number of channels C, uint8 until the photometric distortion
(float32 in [0, 255] after it) and `normalize`; labels are uint8/int [H, W] class maps.
"""
import dataclasses

import numpy as np
from PIL import Image

CROP_TRIES = 10  # extra crops drawn to satisfy cat_max_ratio (mmsegmentation's RandomCrop)


def height_width(size):
  """A size config value (one int side, or a (height, width) pair) -> (height, width)."""
  if isinstance(size, int) and not isinstance(size, bool):
    return size, size
  height, width = size
  return int(height), int(width)


def model_input_shape(dataset_config):
  """[1, H, W, C] of one training crop: `dataset.image_size` and one channel per `mean`."""
  return (1, *height_width(dataset_config.image_size), len(dataset_config.mean))


def resize(image, label, scale):
  """Rescales by `scale`: bilinear for the image, nearest for the label (no new classes)."""
  height, width = label.shape
  return resize_to(image, label, max(1, round(height * scale)), max(1, round(width * scale)))


def resize_to(image, label, height, width):
  """(image, label) resized with PIL to [height, width]: the image bilinear (antialiased when
  shrinking), channel by channel, the label nearest; `label` may be None (returned as is)."""
  size = (width, height)
  channels = [np.asarray(Image.fromarray(image[..., c]).resize(size, Image.BILINEAR))
              for c in range(image.shape[-1])]
  if label is not None:
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
  return np.stack(channels, axis=-1), label


# ---------------------------------------------------------------------------- test protocols
# How the benchmarks' own test pipelines resize an image before inference
# (`config.evaluation.resize`; see `protocol_resize`).

RESIZES = ('', 'fit', 'short_side')

_CV2_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: weights are fixed point, 1.0 = 2048


def fit_size(height, width, bounds):
  """(height, width) of an image of (height, width) rescaled to fit `bounds` keeping its
  aspect: mmcv's `rescale_size` (mmsegmentation's test `Resize(scale=bounds,
  keep_ratio=True)`). bounds: a (long side, short side) pair in either order; the factor is
  min(long bound / long side, short bound / short side), each side int(side * f + 0.5)."""
  long_bound, short_bound = max(bounds), min(bounds)
  factor = min(long_bound / max(height, width), short_bound / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def short_side_size(height, width, side):
  """(height, width) with the short side `side` and the long side int(side * long / short):
  torchvision's `resize(image, side)` (its reference segmentation evaluation)."""
  if width <= height:
    return int(side * height / width), side
  return side, int(side * width / height)


def _cv2_linear_taps(out_size, in_size, *, clamp_weights):
  """Source indices (i0, i1) and fixed-point weights (w0, w1) of cv2 INTER_LINEAR along one
  axis, int32 [out_size] each: output pixel d reads in[i0] * w0 + in[i1] * w1.

  As OpenCV's resizeGeneric_: the source coordinate (d + 0.5) * (in / out) - 0.5 is computed
  in double and rounded to float32, its fraction f becomes the weights rint((1 - f) * 2048)
  and rint(f * 2048) (float32 products, rounded half to even). Outside the image, the
  indices are clamped to the border; along the width (`clamp_weights`) the weights become
  (2048, 0) there too, along the height they are kept (cv2 reads the border row twice).
  """
  scale = 1 / (out_size / in_size)  # cv2: scale_x = 1 / inv_scale_x, in double
  coordinate = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
  index = np.floor(coordinate).astype(np.int64)
  fraction = (coordinate - index.astype(np.float32)).astype(np.float32)
  if clamp_weights:
    outside = (index < 0) | (index >= in_size - 1)
    fraction[outside] = 0
    index = np.clip(index, 0, in_size - 1)
  one = np.float32(1 << _CV2_COEF_BITS)
  w0 = np.rint((np.float32(1) - fraction) * one).astype(np.int32)
  w1 = np.rint(fraction * one).astype(np.int32)
  return (np.clip(index, 0, in_size - 1), np.clip(index + 1, 0, in_size - 1), w0, w1)


def resize_linear_cv2(image, height, width):
  """uint8 [H, W, C] -> uint8 [height, width, C], equal to OpenCV's `cv2.resize(image,
  (width, height), interpolation=cv2.INTER_LINEAR)` (what mmcv's `imresize` calls), emulated
  in numpy so segjax does not need OpenCV; an image of that size already is returned as is.

  OpenCV's uint8 arithmetic: the rows are first interpolated along the width in integers
  (weights of 11 fractional bits, `_cv2_linear_taps`), then along the height by its SIMD
  kernel: each row value shifted right by 4, times its 16-bit weight, the high 16 bits kept
  ((a >> 4) * w >> 16), the two summed and rounded as (s + 2) >> 2. Checked equal to
  cv2 5.1 (x86-64) on hundreds of random sizes, exact 2x shrinks (cv2's INTER_AREA shortcut)
  and 1-pixel sides (tests/test_protocol.py); other OpenCV builds may differ in the last bit
  of a few pixels.
  """
  in_height, in_width = image.shape[:2]
  if (in_height, in_width) == (height, width):
    return image
  x0, x1, a0, a1 = _cv2_linear_taps(width, in_width, clamp_weights=True)
  y0, y1, b0, b1 = _cv2_linear_taps(height, in_height, clamp_weights=False)
  pixels = image.astype(np.int32)

  def along_width(rows):  # int32 [height, width, C], 11 fractional bits
    return rows[:, x0] * a0[None, :, None] + rows[:, x1] * a1[None, :, None]

  top = ((along_width(pixels[y0]) >> 4) * b0[:, None, None]) >> 16
  bottom = ((along_width(pixels[y1]) >> 4) * b1[:, None, None]) >> 16
  return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def protocol_resize(image, label, resize, scale):
  """(image, label) resized as a benchmark's test pipeline resizes them before inference.

  image: uint8 [H, W, C]; label: [H, W] or None. resize ('' leaves both as they are):
  - 'fit': mmsegmentation's `Resize(scale, keep_ratio=True)` (ADE20K (2048, 512),
    Cityscapes (2048, 1024)): the image rescaled to `fit_size(H, W, scale)` with
    `resize_linear_cv2`; the label is not resized (mmseg loads it after the resize and
    compares the logits resized back to it).
  - 'short_side': torchvision's reference evaluation (`T.Resize(scale)`, scale an int): short
    side `scale` (`short_side_size`), image PIL bilinear (antialiased), label PIL nearest
    (the metrics are computed on the resized label).
  """
  if resize == 'fit':
    return resize_linear_cv2(image, *fit_size(*image.shape[:2], scale)), label
  if resize == 'short_side':
    height, width = short_side_size(*image.shape[:2], scale)
    if (height, width) == image.shape[:2]:  # torchvision returns such an image unchanged
      return image, label
    return resize_to(image, label, height, width)
  if resize:
    raise ValueError(f'unknown evaluation.resize {resize!r}; valid: {RESIZES}')
  return image, label


def pad_to(image, label, height, width, ignore_label):
  """Pads bottom/right to at least [height, width]: image with 0, label with `ignore_label`."""
  pad_h, pad_w = max(0, height - label.shape[0]), max(0, width - label.shape[1])
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
  return image, label


def crop_window(rng, shape, height, width):
  """A random (top, left) of a window of at most [height, width] inside `shape` [H, W]."""
  return (rng.integers(max(0, shape[0] - height) + 1),
          rng.integers(max(0, shape[1] - width) + 1))


def dominated(label, ignore_label, cat_max_ratio):
  """Whether `label` has fewer than 2 classes or one holding >= cat_max_ratio of its pixels.

  Pixels of `ignore_label` are not counted.
  """
  counts = np.bincount(label.ravel(), minlength=ignore_label + 1)
  counts[ignore_label] = 0
  counts = counts[counts > 0]
  return len(counts) < 2 or counts.max() >= cat_max_ratio * counts.sum()


def random_crop(rng, image, label, height, width, *, ignore_label=255, cat_max_ratio=1.0):
  """Crops a random window of [height, width] (less along sides shorter than that).

  With cat_max_ratio < 1, as mmsegmentation's RandomCrop: up to CROP_TRIES more windows are
  drawn until one is not `dominated`; the last one drawn is kept otherwise.
  """
  top, left = crop_window(rng, label.shape, height, width)
  single_window = label.shape[0] <= height and label.shape[1] <= width
  if cat_max_ratio < 1 and not single_window:
    for _ in range(CROP_TRIES):
      if not dominated(label[top:top + height, left:left + width], ignore_label,
                       cat_max_ratio):
        break
      top, left = crop_window(rng, label.shape, height, width)
  return (image[top:top + height, left:left + width],
          label[top:top + height, left:left + width])


def rgb_to_hsv(rgb):
  """float [..., 3] RGB in [0, 255] -> HSV: hue in [0, 1) turns, saturation in [0, 1],
  value in [0, 255] (gray pixels get hue 0)."""
  red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = np.maximum(np.maximum(red, green), blue)
  chroma = value - np.minimum(np.minimum(red, green), blue)
  inverse_chroma = 1 / np.where(chroma > 0, chroma, 1)
  hue = np.where(value == red, (green - blue) * inverse_chroma,
                 np.where(value == green, 2 + (blue - red) * inverse_chroma,
                          4 + (red - green) * inverse_chroma))
  saturation = chroma / np.where(value > 0, value, 1)
  return np.stack([(hue / 6) % 1, saturation, value], axis=-1)


def hsv_to_rgb(hsv):
  """Inverse of `rgb_to_hsv`: float [..., 3] HSV -> RGB in [0, 255]."""
  sextant, value = hsv[..., 0] * 6, hsv[..., 2]
  chroma = value * hsv[..., 1]
  rgb = np.empty_like(hsv)
  # Each channel is value minus chroma times a trapezoid of the hue, offset per channel.
  for channel, offset in enumerate((5, 3, 1)):
    k = (offset + sextant) % 6
    rgb[..., channel] = value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1)
  return rgb


@dataclasses.dataclass(frozen=True)
class Photometric:
  """mmsegmentation's PhotoMetricDistortion, on the leading `channels` of an image.

  Brightness adds a delta in [-brightness_delta, brightness_delta]; contrast multiplies by a
  factor in contrast_range; saturation multiplies HSV saturation by a factor in
  saturation_range; hue shifts by an integer in [-hue_delta, hue_delta] in OpenCV's uint8
  hue units of 2 degrees (18: +-36 degrees). Each is applied with probability 1/2, contrast
  before or after the colour ops at random, clipping to [0, 255] after each. Saturation and
  hue need RGB: they apply only when channels == 3; with another count (1: grayscale, or C:
  every band of a multispectral image) the same brightness and contrast apply to each.
  """
  brightness_delta: float = 32
  contrast_range: tuple = (0.5, 1.5)
  saturation_range: tuple = (0.5, 1.5)
  hue_delta: int = 18
  channels: int = 3


def _apply_half_the_time(rng):
  return rng.uniform() < 0.5


def photometric_distortion(rng, image, params):
  """uint8 or float [H, W, C] -> float32 [H, W, C] in [0, 255], distorted as `params` says.

  Channels from `params.channels` on are returned unchanged (as float32).
  """
  image = image.astype(np.float32)
  pixels = image[..., :params.channels]
  if _apply_half_the_time(rng):
    pixels = np.clip(pixels + rng.uniform(-params.brightness_delta, params.brightness_delta),
                     0, 255)
  contrast_first = _apply_half_the_time(rng)
  contrast = rng.uniform(*params.contrast_range) if _apply_half_the_time(rng) else None
  if contrast is not None and contrast_first:
    pixels = np.clip(pixels * contrast, 0, 255)
  if params.channels == 3:
    saturation = rng.uniform(*params.saturation_range) if _apply_half_the_time(rng) else 1
    hue = (rng.integers(-params.hue_delta, params.hue_delta + 1) / 180
           if _apply_half_the_time(rng) else 0)
    if saturation != 1 or hue:
      hsv = rgb_to_hsv(pixels)
      hsv[..., 0] = (hsv[..., 0] + hue) % 1
      hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
      pixels = hsv_to_rgb(hsv)
  if contrast is not None and not contrast_first:
    pixels = np.clip(pixels * contrast, 0, 255)
  image[..., :params.channels] = pixels
  return image


def normalize(image, mean, std):
  """uint8 or float [H, W, C] in [0, 255] -> float32 (image / 255 - mean) / std, per channel."""
  return ((image.astype(np.float32) / 255 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def base_scale(shape, base_size):
  """The factor that fits an image of `shape` [H, W] into `base_size`, keeping its aspect.

  base_size: 0 (the factor is 1), or (long side, short side) bounds as mmsegmentation's
  Resize(scale=..., keep_ratio=True): the largest factor that keeps the long side within the
  first and the short side within the second; one int S stands for (S, S).
  """
  if not base_size:
    return 1.0
  long_bound, short_bound = height_width(base_size)
  return min(max(long_bound, short_bound) / max(shape), min(long_bound, short_bound) / min(shape))


def train_augment(rng, image, label, *, crop_size, min_scale, max_scale, flip, ignore_label,
                  base_size=0, cat_max_ratio=1.0, photometric=None):
  """Random scale, random crop, photometric distortion, pad with ignore, random flip.

  image: [H, W, C] uint8, label: [H, W]. The image is rescaled by `base_scale` times a
  factor drawn in [min_scale, max_scale]; a crop_size window (a side, or (height, width)) is
  cut where the image is larger (`random_crop`, with cat_max_ratio), then the image alone is
  distorted by `photometric` (a `Photometric`, or None) and both are padded at the bottom
  and right (image with 0, label with `ignore_label`) to crop_size. Returns the image
  ([height, width, C], float32 when distorted, else uint8) and the label [height, width].
  """
  height, width = height_width(crop_size)
  scale = base_scale(label.shape, base_size) * rng.uniform(min_scale, max_scale)
  image, label = resize(image, label, scale)
  image, label = random_crop(rng, image, label, height, width, ignore_label=ignore_label,
                             cat_max_ratio=cat_max_ratio)
  if photometric is not None:
    image = photometric_distortion(rng, image, photometric)
  image, label = pad_to(image, label, height, width, ignore_label)
  if flip and rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return image, label
