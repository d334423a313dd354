"""Datasets by name: each has a spec (classes, ignore label) and TFDS data sources per split.

`config.dataset.name` selects one of `DATASETS`:
  shapes      the embedded, generated default (segjax/data/shapes.py)
  folder      the user's own image and mask directories (folder.py)
  voc         Pascal VOC 2012 + SBD train_aug (voc.py)
  coco_voc    COCO 2017 with VOC's 21 classes, torchvision's segmentation set (coco_voc.py)
  cityscapes  Cityscapes fine, 19 trainIds (cityscapes.py)
  ade20k      ADE20K as ADEChallengeData2016, 150 classes (ade20k.py)
  pets        Oxford-IIIT Pet trimaps (pets.py)
The real ones are prepared once from the user's files in `dataset.source_dir` (see
prepare.py); a missing file is a `DataError` that shows the expected layout.
"""
import dataclasses
import os
from typing import Callable, Optional

from segjax.data import ade20k
from segjax.data import cityscapes
from segjax.data import coco_voc
from segjax.data import folder
from segjax.data import pets
from segjax.data import shapes
from segjax.data import voc
from segjax.errors import ConfigError, DataError

DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'segjax', 'tensorflow_datasets')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model and the metrics need to know about a dataset's labels.

  The prepared files hold each dataset's raw label values; `label_map` (256 entries, raw
  value -> class index or ignore label; None: the raw values are the classes) turns them
  into label maps of class indices in [0, num_classes) or `ignore_label` (not scored).
  `segjax.data.pipeline.decode` applies it.
  """
  name: str
  class_names: tuple[str, ...]
  ignore_label: int
  load: Callable  # (dataset_config, data_dir) -> {'train': source, 'validation': source}
  label_map: Optional[tuple[int, ...]] = None

  @property
  def num_classes(self):
    return len(self.class_names)


def _load_shapes(dataset_config, data_dir):
  """Builds (once) and opens the embedded shapes dataset as ArrayRecord data sources."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = shapes.builder_config(dataset_config.image_size, dataset_config.num_train,
                                 dataset_config.num_validation, dataset_config.generator_seed)
  # TFDS wants the predefined configs by name and refuses equal custom ones.
  if config.name in shapes.Shapes.builder_configs:
    config = config.name
  builder = shapes.Shapes(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    print(f'Generating the embedded shapes dataset into {builder.data_dir} (once) ...',
          flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare(file_format='array_record')
  return builder.as_data_source()


def _shapes_spec(dataset_config):
  if dataset_config is not None and (isinstance(dataset_config.image_size, bool)
                                     or not isinstance(dataset_config.image_size, int)):
    raise ConfigError("dataset 'shapes' generates square images: dataset.image_size must be "
                      f'one int (their side), got {dataset_config.image_size!r}')
  return DatasetSpec('shapes', shapes.CLASS_NAMES, shapes.IGNORE_LABEL, _load_shapes)


def _require_config(dataset_config, name, fields):
  if dataset_config is None:
    raise ConfigError(f'the classes of dataset {name!r} depend on {fields}: pass the dataset '
                      'config (config.dataset) to get_spec, not only its name')


def _folder_spec(dataset_config):
  _require_config(dataset_config, 'folder', 'dataset.class_names')
  folder.check_config(dataset_config)
  return DatasetSpec('folder', tuple(dataset_config.class_names), folder.IGNORE_LABEL,
                     folder.load)


def _voc_spec(dataset_config):
  if dataset_config is not None:
    voc.check_config(dataset_config)
  return DatasetSpec('voc', voc.CLASS_NAMES, voc.IGNORE_LABEL, voc.load)


def _coco_voc_spec(dataset_config):
  del dataset_config  # no dataset-specific fields
  return DatasetSpec('coco_voc', coco_voc.CLASS_NAMES, coco_voc.IGNORE_LABEL, coco_voc.load)


def _cityscapes_spec(dataset_config):
  del dataset_config  # no dataset-specific fields
  return DatasetSpec('cityscapes', cityscapes.CLASS_NAMES, cityscapes.IGNORE_LABEL,
                     cityscapes.load, cityscapes.LABEL_MAP)


def _ade20k_spec(dataset_config):
  del dataset_config  # no dataset-specific fields
  return DatasetSpec('ade20k', ade20k.CLASS_NAMES, ade20k.IGNORE_LABEL, ade20k.load,
                     ade20k.LABEL_MAP)


def _pets_spec(dataset_config):
  _require_config(dataset_config, 'pets', 'dataset.pets_boundary')
  pets.check_config(dataset_config)
  boundary = dataset_config.pets_boundary
  return DatasetSpec('pets', pets.class_names(boundary), pets.IGNORE_LABEL, pets.load,
                     pets.label_map(boundary))


# Name -> (dataset config, or None for the defaults) -> DatasetSpec.
DATASETS = {
    'shapes': _shapes_spec,
    'folder': _folder_spec,
    'voc': _voc_spec,
    'coco_voc': _coco_voc_spec,
    'cityscapes': _cityscapes_spec,
    'ade20k': _ade20k_spec,
    'pets': _pets_spec,
}


def get_spec(dataset):
  """The `DatasetSpec` of `dataset`: the dataset config (`config.dataset`), or a name.

  A name alone is enough for the datasets whose classes do not depend on the config (not
  'folder' nor 'pets'). Dataset-specific config fields are validated here (`ConfigError`).
  """
  name = dataset if isinstance(dataset, str) else dataset.name
  if name not in DATASETS:
    raise ConfigError(f'unknown dataset.name {name!r}; valid names: {", ".join(sorted(DATASETS))}')
  return DATASETS[name](None if isinstance(dataset, str) else dataset)


def resolve_data_dir(data_dir):
  """`dataset.data_dir`, or the per-user cache when it is empty."""
  return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


def load_sources(dataset_config):
  """Random-access data sources of the train and validation splits of `dataset_config.name`."""
  spec = get_spec(dataset_config)
  data_dir = resolve_data_dir(dataset_config.data_dir)
  try:
    return spec.load(dataset_config, data_dir)
  except OSError as e:
    raise DataError(f'cannot prepare or read dataset {spec.name!r} in {data_dir}: {e}; '
                    'dataset.data_dir must be writable (and dataset.source_dir, for '
                    'the real datasets, readable)') from e
