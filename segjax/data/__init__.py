"""Datasets by name: each has a spec (classes, ignore label) and TFDS data sources per split."""
import dataclasses
import os
from typing import Callable

from segjax.data import shapes
from segjax.errors import ConfigError, DataError

DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'segjax', 'tensorflow_datasets')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model and the metrics need to know about a dataset's labels.

  Label maps hold class indices in [0, num_classes) or `ignore_label` (not scored).
  """
  name: str
  class_names: tuple[str, ...]
  ignore_label: int
  load: Callable  # (dataset_config, data_dir) -> {'train': source, 'validation': source}

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


DATASETS = {
    'shapes': DatasetSpec(
        name='shapes', class_names=shapes.CLASS_NAMES, ignore_label=shapes.IGNORE_LABEL,
        load=_load_shapes),
}


def get_spec(name):
  """The `DatasetSpec` called `name`; an unknown name lists the valid ones."""
  if name not in DATASETS:
    raise ConfigError(f'unknown dataset.name {name!r}; valid names: {", ".join(sorted(DATASETS))}')
  return DATASETS[name]


def resolve_data_dir(data_dir):
  """`dataset.data_dir`, or the per-user cache when it is empty."""
  return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


def load_sources(dataset_config):
  """Random-access data sources of the train and validation splits of `dataset_config.name`."""
  spec = get_spec(dataset_config.name)
  data_dir = resolve_data_dir(dataset_config.data_dir)
  try:
    return spec.load(dataset_config, data_dir)
  except OSError as e:
    raise DataError(f'cannot prepare or read dataset {spec.name!r} in {data_dir}: {e}; '
                    'set --config.dataset.data_dir to a writable directory') from e
