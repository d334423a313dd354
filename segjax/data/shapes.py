"""The embedded default dataset: textured shapes on cluttered backgrounds.

A procedurally generated segmentation task that needs no download. Each image holds 1-3
objects drawn from five shape classes (disc, ring, square, triangle, cross) on a
background of colour gradients crossed by lines, with sensor noise. An object's class is
its shape alone: colour, texture (solid, stripes, checks, noise), size, rotation (up to 15
degrees) and position are drawn independently of it, so no per-pixel colour rule can
solve the task. Later objects occlude earlier ones. Pixels
whose 4x4 sub-pixel footprint straddles two labels are marked `IGNORE_LABEL` (the
anti-aliased boundary band). Class frequencies are deliberately unequal.

Everything is deterministic in (split seed, example index), so a given builder config
produces identical files on any machine.
"""
import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

CLASS_NAMES = ('background', 'disc', 'ring', 'square', 'triangle', 'cross')
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255
# Probability of each foreground class for a drawn object (class imbalance on purpose).
OBJECT_CLASS_PROBS = np.array([0.32, 0.12, 0.26, 0.20, 0.10])
SUPERSAMPLE = 4
MAX_ROTATION = np.pi / 12  # objects are upright up to +-15 degrees
_SPLIT_SEED_OFFSET = {'train': 0, 'validation': 1_000_003}


def _shape_mask(shape_class, u, v, radius):
  """Inside-test of one shape class in object-local coordinates (pixels, hi-res)."""
  r = np.hypot(u, v)
  if shape_class == 1:  # disc
    return r < radius
  if shape_class == 2:  # ring
    return (r < radius) & (r > 0.5 * radius)
  if shape_class == 3:  # square
    return np.maximum(np.abs(u), np.abs(v)) < 0.8 * radius
  if shape_class == 4:  # equilateral triangle, circumradius `radius`
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
      angle = np.pi / 2 + 2 * np.pi * k / 3
      inside &= (u * np.cos(angle) + v * np.sin(angle)) > -0.5 * radius
    return inside
  if shape_class == 5:  # plus-shaped cross
    arm = 0.3 * radius
    return (((np.abs(u) < radius) & (np.abs(v) < arm)) |
            ((np.abs(v) < radius) & (np.abs(u) < arm)))
  raise ValueError(f'unknown shape class {shape_class}')


def _texture(rng, u, v, scale):
  """A random fill (solid, stripes, checks or noise) in two close random colours.

  u, v: object-local hi-res pixel coordinates; scale: hi-res pixels per pixel of a
  64-pixel image (periods scale with the image). Returns [h, w, 3] in [0, 1].
  """
  c1 = rng.uniform(0, 1, 3)
  c2 = np.clip(c1 + rng.normal(0, 0.15, 3), 0, 1)
  kind = rng.integers(4)
  if kind == 0:
    weight = np.zeros_like(u)
  elif kind == 1:
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20) * scale
    weight = (np.sin((u * np.cos(angle) + v * np.sin(angle)) * 2 * np.pi / period) > 0)
  elif kind == 2:
    period = rng.uniform(8, 24) * scale
    weight = ((np.floor(u / period) + np.floor(v / period)) % 2)
  else:
    weight = rng.uniform(0, 1, u.shape)
  weight = np.asarray(weight, np.float32)[..., None]
  return (1 - weight) * c1 + weight * c2


def _background(rng, size):
  """Background at hi-res: a two-colour gradient crossed by 1-3 lines, [size, size, 3] in [0, 1]."""
  ys, xs = np.mgrid[0:size, 0:size] / size
  angle = rng.uniform(0, 2 * np.pi)
  t = (xs * np.cos(angle) + ys * np.sin(angle))
  t = (t - t.min()) / (np.ptp(t) + 1e-6)
  image = (1 - t[..., None]) * rng.uniform(0, 1, 3) + t[..., None] * rng.uniform(0, 1, 3)
  pil = Image.fromarray((image * 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for _ in range(rng.integers(1, 4)):
    draw.line(list(rng.uniform(0, size, 4)), fill=tuple(rng.integers(0, 256, 3).tolist()),
              width=int(rng.integers(1, 3)) * SUPERSAMPLE // 2)
  return np.asarray(pil, np.float32) / 255


def generate_example(seed, image_size):
  """Renders one example.

  Args:
    seed: integer seed; the example is a pure function of (seed, image_size).
    image_size: side length in pixels.

  Returns:
    image: uint8 [image_size, image_size, 3].
    label: uint8 [image_size, image_size], values in [0, NUM_CLASSES) or IGNORE_LABEL.
  """
  rng = np.random.default_rng(seed)
  hi = image_size * SUPERSAMPLE
  image = _background(rng, hi)
  label = np.zeros((hi, hi), np.int32)
  ys, xs = np.mgrid[0:hi, 0:hi].astype(np.float32) + 0.5
  scale = hi / 64
  for _ in range(rng.integers(1, 4)):
    shape_class = 1 + rng.choice(len(OBJECT_CLASS_PROBS), p=OBJECT_CLASS_PROBS)
    radius = rng.uniform(8, 18) * scale
    cx, cy = rng.uniform(0.1 * hi, 0.9 * hi, 2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    inside = _shape_mask(shape_class, u, v, radius)
    image = np.where(inside[..., None], _texture(rng, u, v, scale), image)
    label[inside] = shape_class
  # Photometric variation and sensor noise, then box-filter down to the output size.
  image = image * rng.uniform(0.7, 1.2) + rng.uniform(-0.15, 0.15)
  image = image.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean((1, 3))
  image = image + rng.normal(0, 0.03, image.shape)
  image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  blocks = label.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE)
  centre = blocks[:, 0, :, 0]
  pure = (blocks == centre[:, None, :, None]).all((1, 3))
  label = np.where(pure, centre, IGNORE_LABEL).astype(np.uint8)
  return image, label


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Size of the generated dataset. The name must identify the field values."""
  image_size: int = 32
  num_train: int = 4000
  num_validation: int = 500
  seed: int = 0


def builder_config(image_size, num_train, num_validation, seed):
  """A `ShapesConfig` whose name encodes its fields, so each size has its own directory."""
  return ShapesConfig(
      name=f's{image_size}_n{num_train}_v{num_validation}_seed{seed}',
      image_size=image_size, num_train=num_train, num_validation=num_validation, seed=seed)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the embedded shapes dataset (no download; ArrayRecord friendly)."""

  # Prepared data is cached by (config name, version): bump the version whenever the
  # generator's output changes, or users keep reading the old files.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [builder_config(32, 4000, 500, 0)]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        'train': self._generate_examples('train', config.num_train),
        'validation': self._generate_examples('validation', config.num_validation),
    }

  def _generate_examples(self, split, num_examples):
    config = self.builder_config
    base = config.seed * 7_919_999 + _SPLIT_SEED_OFFSET[split]
    for index in range(num_examples):
      image, label = generate_example(base + index, config.image_size)
      yield index, {'image': _png(image), 'segmentation_mask': _png(label)}
