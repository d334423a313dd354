"""Shared fixtures: a tiny shapes dataset generated once per session, tiny configs."""
import pytest

from segjax import configs


def tiny_config(data_dir, model_name='unet', **model_fields):
  """A config that trains in seconds: 32x32 images, 24 train / 10 validation examples."""
  config = configs.base_config()
  config.model.name = model_name
  if model_name == 'unet':
    model_fields = {'depth': 2, 'features': 4, **model_fields}
  elif model_name == 'cnn':
    model_fields = {'num_stages': 2, 'features': 4, **model_fields}
  for key, value in model_fields.items():
    config.model[key] = value
  config.dataset.data_dir = str(data_dir)
  config.dataset.image_size = 32
  config.dataset.num_train = 24
  config.dataset.num_validation = 10
  config.dataset.num_threads = 0
  config.batch_size = 4
  config.eval_batch_size = 4
  config.total_steps = 6
  config.warmup_steps = 0
  config.schedule = 'constant'
  config.log_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  return config


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='session')
def sources(data_dir):
  """Train/validation data sources of the tiny shapes dataset (built on first use)."""
  from segjax import data  # pylint: disable=g-import-not-at-top
  return data.load_sources(tiny_config(data_dir).dataset)
