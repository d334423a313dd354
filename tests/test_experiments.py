"""Every config in experiments/ builds, validates, and runs one train step at a tiny size."""
import glob
import importlib.util
import os

import pytest

from segjax import configs
from segjax import parallel
from segjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, 'experiments', '**', '*.py'), recursive=True))


def load_get_config(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


def test_every_experiment_is_found():
  names = {os.path.basename(p) for p in EXPERIMENTS}
  assert {'unet.py', 'cnn.py'} <= names


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_experiment_trains_one_step(path, data_dir, tmp_path):
  config = load_get_config(path)()
  configs.validate(config)
  assert config.model.name and config.dataset.name and config.total_steps > 0
  config.dataset.update(data_dir=str(data_dir), num_train=24, num_validation=10,
                        num_threads=0)
  config.batch_size = config.eval_batch_size = 2
  experiment = train.Experiment(config, str(tmp_path))
  batch = parallel.to_global(next(experiment.train_batches(0)), experiment.mesh)
  state, metrics = experiment.train_step(experiment.initial_state, batch,
                                         experiment.train_rng)
  assert int(state.step) == 1 and float(metrics['loss']) > 0


def test_variant_arguments_are_parsed_and_checked():
  get_config = load_get_config(os.path.join(ROOT, 'experiments', 'unet.py'))
  config = get_config('depth=4,features=8')
  assert (config.model.depth, config.model.features) == (4, 8)
  with pytest.raises(configs.ConfigError, match=r"bad config argument 'width=3'.*depth"):
    get_config('width=3')
