"""Every config in experiments/ builds, validates, traces its train step and (slow) runs one
step at a tiny size."""
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import configs
from segjax import parallel
from segjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, 'experiments', '**', '*.py'), recursive=True))


def load_module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_get_config(path):
  return load_module(path).get_config


RECIPES = [(path, name) for path in EXPERIMENTS
           for name in getattr(load_module(path), 'RECIPES', {})]


def shrink_to_shapes(config, data_dir):
  """`config` on a tiny embedded dataset, 32x32 crops and batches of 2; the model unchanged."""
  config.dataset.update(name='shapes', data_dir=str(data_dir), image_size=32, num_train=24,
                        num_validation=10, num_threads=0, mean=(0.5,) * 3, std=(0.25,) * 3)
  config.batch_size = config.eval_batch_size = 2
  return config


def train_one_step(config, workdir):
  experiment = train.Experiment(config, workdir)
  batch = parallel.to_global(next(experiment.train_batches(0)), experiment.mesh)
  state, metrics = experiment.train_step(experiment.initial_state, batch,
                                         experiment.train_rng)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
  return metrics


def test_every_experiment_is_found():
  names = {os.path.basename(p) for p in EXPERIMENTS}
  assert {'unet.py', 'cnn.py'} <= names


def default_on_tiny_data(path, data_dir):
  """The experiment's default config (validated), its model and crop unchanged, on a tiny
  embedded dataset with batches of 2."""
  config = load_get_config(path)()
  configs.validate(config)
  assert config.model.name and config.dataset.name and config.total_steps > 0
  config.dataset.update(data_dir=str(data_dir), num_train=24, num_validation=10,
                        num_threads=0)
  config.batch_size = config.eval_batch_size = 2
  return config


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_experiment_builds_and_traces_its_train_step(path, data_dir, tmp_path):
  # The whole experiment (data, model, initial state, optimiser) and the train step's trace,
  # without the step's XLA compilation (10-50 s each; the slow test below runs the step).
  experiment = train.Experiment(default_on_tiny_data(path, data_dir), str(tmp_path))
  batch = parallel.to_global(next(experiment.train_batches(0)), experiment.mesh)
  state, metrics = jax.eval_shape(experiment.train_step, experiment.initial_state, batch,
                                  experiment.train_rng)
  assert metrics['loss'].shape == () and metrics['loss'].dtype == jnp.float32
  assert jax.tree.structure(state.params) == jax.tree.structure(experiment.initial_state.params)


@pytest.mark.slow
@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_experiment_trains_one_step(path, data_dir, tmp_path):
  config = default_on_tiny_data(path, data_dir)
  assert float(train_one_step(config, str(tmp_path))['loss']) > 0


@pytest.mark.parametrize('path,name', RECIPES,
                         ids=[f'{os.path.basename(p)[:-3]}:{n}' for p, n in RECIPES])
def test_published_recipe_is_complete_and_valid(path, name):
  module = load_module(path)
  config = module.get_config(name)
  assert config.to_dict() == module.get_config(module.RECIPES[name]).to_dict()
  configs.validate(config)
  # A published recipe trains a real dataset with its own optimisation settings.
  assert config.dataset.name != 'shapes'
  assert config.total_steps >= 10_000
  base = configs.base_config().dataset
  assert (config.dataset.mean, config.dataset.std) != (base.mean, base.std)  # the weights'
  crop = config.dataset.image_size
  assert min(crop if isinstance(crop, (tuple, list)) else (crop,)) >= 224
  assert name in module.__doc__, f'{name}: the docstring must name its source and mIoU'


def distinct_models(recipes):
  """The first recipe of each distinct (experiment, model, optimizer) among `recipes`: the
  published-checkpoint recipes of one architecture on several datasets train alike."""
  seen, kept = set(), []
  for path, name in recipes:
    config = load_module(path).get_config(name)
    key = (path, config.model.to_json(), config.optimizer.name, config.loss.aux_weight)
    if key not in seen:
      seen.add(key)
      kept.append((path, name))
  return kept


TRAINED_RECIPES = distinct_models(RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize('path,name', TRAINED_RECIPES,
                         ids=[f'{os.path.basename(p)[:-3]}:{n}' for p, n in TRAINED_RECIPES])
def test_published_recipe_trains_one_step_at_tiny_size(path, name, data_dir, tmp_path):
  config = shrink_to_shapes(load_module(path).get_config(name), data_dir)
  train_one_step(config, str(tmp_path))


ENCODER_VARIANTS = [('unet.py', 'encoder=convnext_tiny'), ('deeplab.py', 'encoder=swin_tiny'),
                    ('deeplab.py', 'encoder=mit_b0')]


@pytest.mark.slow
@pytest.mark.parametrize('experiment,arg', ENCODER_VARIANTS)
def test_hierarchical_encoder_variant_trains_one_step(experiment, arg, data_dir, tmp_path):
  config = load_get_config(os.path.join(ROOT, 'experiments', experiment))(arg)
  config.dataset.update(data_dir=str(data_dir), num_train=24, num_validation=10,
                        num_threads=0)
  config.batch_size = config.eval_batch_size = 2
  assert float(train_one_step(config, str(tmp_path))['loss']) > 0


def test_variant_arguments_are_parsed_and_checked():
  get_config = load_get_config(os.path.join(ROOT, 'experiments', 'unet.py'))
  config = get_config('depth=4,features=8')
  assert (config.model.depth, config.model.features) == (4, 8)
  with pytest.raises(configs.ConfigError, match=r"bad config argument 'width=3'.*depth"):
    get_config('width=3')


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_building_a_variant_leaves_the_default_unchanged(path):
  """Variant defaults may hold mutable FieldReferences: a variant must not leak into them."""
  module = load_module(path)
  default = module.get_config().to_dict()
  for name in getattr(module, 'RECIPES', {}):
    module.get_config(name)
  assert module.get_config().to_dict() == default


CHECKPOINTS = [(path, name, entry) for path in EXPERIMENTS
               for name, entry in getattr(load_module(path), 'CHECKPOINTS', {}).items()]


@pytest.mark.parametrize('path,name,entry', CHECKPOINTS,
                         ids=[f'{os.path.basename(p)[:-3]}:{n}' for p, n, _ in CHECKPOINTS])
def test_published_checkpoint_is_documented_in_its_file_and_the_model_zoo(path, name, entry):
  """Each recipe of a published checkpoint: its docstring names it and its mIoU, and
  docs/model_zoo.md has its row with the same file and mIoU."""
  module = load_module(path)
  _, checkpoint_file, miou = entry
  assert name in module.__doc__ and f'{miou:.2f}'.rstrip('0').rstrip('.') in module.__doc__
  with open(os.path.join(ROOT, 'docs', 'model_zoo.md'), encoding='utf-8') as f:
    rows = [line for line in f if f'`experiments/{os.path.basename(path)}:{name}`' in line]
  assert len(rows) == 1, f'{name}: one row in docs/model_zoo.md'
  assert checkpoint_file in rows[0] and f'| {miou:.2f}'.rstrip('0').rstrip('.') in rows[0]
