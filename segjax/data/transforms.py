"""Joint image/label transforms on numpy arrays (one random draw drives both).

Images are uint8 [H, W, C] until `normalize`; labels are uint8/int [H, W] class maps.
"""
import numpy as np
from PIL import Image


def height_width(size):
  """A size config value (one int side, or a (height, width) pair) -> (height, width)."""
  if isinstance(size, int) and not isinstance(size, bool):
    return size, size
  height, width = size
  return int(height), int(width)


def resize(image, label, scale):
  """Rescales by `scale`: bilinear for the image, nearest for the label (no new classes)."""
  height, width = label.shape
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  channels = [np.asarray(Image.fromarray(image[..., c]).resize(size, Image.BILINEAR))
              for c in range(image.shape[-1])]
  label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
  return np.stack(channels, axis=-1), label


def pad_to(image, label, height, width, ignore_label):
  """Pads bottom/right to at least [height, width]: image with 0, label with `ignore_label`."""
  pad_h, pad_w = max(0, height - label.shape[0]), max(0, width - label.shape[1])
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
  return image, label


def random_crop(rng, image, label, height, width):
  """Crops a random [height, width] window (the inputs must be at least that large)."""
  top = rng.integers(label.shape[0] - height + 1)
  left = rng.integers(label.shape[1] - width + 1)
  return (image[top:top + height, left:left + width],
          label[top:top + height, left:left + width])


def normalize(image, mean, std):
  """uint8 [H, W, C] -> float32 (image / 255 - mean) / std, per channel."""
  return ((image.astype(np.float32) / 255 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def train_augment(rng, image, label, *, crop_size, min_scale, max_scale, flip, ignore_label):
  """Random scale, pad with ignore, random crop, random horizontal flip.

  crop_size: side of a square crop, or (height, width).
  """
  height, width = height_width(crop_size)
  image, label = resize(image, label, rng.uniform(min_scale, max_scale))
  image, label = pad_to(image, label, height, width, ignore_label)
  image, label = random_crop(rng, image, label, height, width)
  if flip and rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return image, label
