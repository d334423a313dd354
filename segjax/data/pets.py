"""Oxford-IIIT Pet, segmentation trimaps (pet / background / boundary).

Splits: train = the official trainval list, 3,680 images; validation = the official test
list, 3,669 images (as TFDS's `oxford_iiit_pet` 'train' and 'test'). The trimaps hold
1 = pet (foreground), 2 = background, 3 = the unclassified boundary band around the pet.
`label_map(boundary)` maps them to classes 0 = foreground, 1 = background and, with
`dataset.pets_boundary='class'`, 2 = boundary; with 'ignore' the boundary is 255 (ignored).

TFDS's own `oxford_iiit_pet` builder cannot be used here: it needs the two tar files
themselves (about 790 MB + 19 MB, checksum-verified; offline only from its manual dir) and
re-encodes 12 corrupt images with `tf.image`, so preparing it needs TensorFlow. This builder
reads the extracted files instead and converts such images with PIL.
"""
import os

from segjax.data import prepare
from segjax.errors import ConfigError

IGNORE_LABEL = 255
BOUNDARY_CHOICES = ('class', 'ignore')

LAYOUT = """\
Oxford-IIIT Pet is read from {source} in this layout (both tar files extracted there;
an oxford-iiit-pet/ directory holding them, as torchvision writes it, is accepted too):
  images/<Breed>_<n>.jpg
  annotations/trimaps/<Breed>_<n>.png
  annotations/trainval.txt and annotations/test.txt
Get images.tar.gz and annotations.tar.gz from the Oxford-IIIT Pet Dataset page of the
Visual Geometry Group, University of Oxford (www.robots.ox.ac.uk/~vgg/data/pets)."""


def class_names(boundary):
  return ('foreground', 'background') + (('boundary',) if boundary == 'class' else ())


def label_map(boundary):
  """Raw trimap value (index) -> class index or IGNORE_LABEL, 256 entries."""
  classes = {1: 0, 2: 1, 3: 2 if boundary == 'class' else IGNORE_LABEL}
  return tuple(classes.get(raw, IGNORE_LABEL) for raw in range(256))


def check_config(dataset_config):
  """Raises `ConfigError` for a bad `dataset.pets_boundary`."""
  if dataset_config.pets_boundary not in BOUNDARY_CHOICES:
    raise ConfigError(f'dataset.pets_boundary must be one of {BOUNDARY_CHOICES}, got '
                      f'{dataset_config.pets_boundary!r}')


class OxfordPetTrimaps(prepare.FilesBuilder, skip_registration=True):
  """Oxford-IIIT Pet images with their trimaps, prepared from the original files."""

  name = 'oxford_pet_trimaps'
  HOMEPAGE = 'https://www.robots.ox.ac.uk/~vgg/data/pets/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset({1, 2, 3})

  def find_examples(self, source):
    layout = LAYOUT.format(source=source)
    root = prepare.first_dir([os.path.join(source, 'oxford-iiit-pet'), source])
    lists = {'train': os.path.join(root, 'annotations', 'trainval.txt'),
             'validation': os.path.join(root, 'annotations', 'test.txt')}
    needed = [os.path.join(root, 'images'), os.path.join(root, 'annotations', 'trimaps'),
              *lists.values()]
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
      raise prepare.missing_files_error('Oxford-IIIT Pet', missing, layout)
    images = prepare.files_by_stem(os.path.join(root, 'images'), '.jpg')
    trimaps = prepare.files_by_stem(os.path.join(root, 'annotations', 'trimaps'), '.png')
    splits, missing = {}, []
    for split, list_file in lists.items():
      names = prepare.read_names(list_file)
      missing += [os.path.join(root, 'images', f'{name}.jpg')
                  for name in names if name not in images]
      missing += [os.path.join(root, 'annotations', 'trimaps', f'{name}.png')
                  for name in names if name not in trimaps]
      splits[split] = [(images.get(name), trimaps.get(name)) for name in names]
    if missing:
      raise prepare.missing_files_error('Oxford-IIIT Pet', missing, layout)
    return splits


def load(dataset_config, data_dir):
  builder = OxfordPetTrimaps(data_dir=data_dir)
  return prepare.load(builder, prepare.source_dir(dataset_config, data_dir))
