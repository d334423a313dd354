"""Property: any mutation of a valid config passes validation or is refused by a ConfigError
of one line, before anything is compiled; never another exception.

Mutations replace 1-3 fields (any section, the model's fields included) by values of wrong
types, non-positive or huge numbers, NaN, bad tuples or None; add unknown names; pick other
models, datasets and DeepLab output strides; and fake 1-4 devices so that batch sizes stop
dividing. The configs are rebuilt from plain dicts (as an experiment file might), so the
ConfigDict's own type locking does not hide what validate must catch.
"""
import collections
import copy
from unittest import mock

import hypothesis
from hypothesis import strategies as st
import jax
import ml_collections
import numpy as np
import pytest

from segjax import configs
from segjax import models
from segjax import parallel
from segjax import train
from segjax.errors import ConfigError
from conftest import tiny_config

OUTCOMES = collections.Counter()


def _leaf_paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


BASE = tiny_config('/nonexistent-data').to_dict()
PATHS = sorted(_leaf_paths(BASE)) + [
    ('model', 'output_stride'), ('model', 'backbone_depth'), ('model', 'variant')]

WEIRD_VALUES = st.one_of(
    st.integers(-3, 3), st.integers(4, 10**6), st.sampled_from([0.0, -1.5, 0.5, 2.5, 1e9]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=6), st.sampled_from(['adam', 'sgd', 'deeplab', 'unet', 'folder', 'voc',
                                          'cross_entropy', 'skip', 'pmap', 'slide']),
    st.tuples(st.integers(-2, 64), st.integers(-2, 64)),
    st.lists(st.one_of(st.integers(-1, 300), st.floats(-1, 2), st.text(max_size=3)),
             max_size=4).map(tuple),
    st.sampled_from([(('cross_entropy', 1.0), ('dice', -1.0)), (('nope', 1.0),), ((1, 2),),
                     ((0, 0, 0), (255, 0, 0)), (8, 16), ('a', 'b')]),
)


@st.composite
def mutations(draw):
  """[(path, value)] of 1-3 changes, and the device count to pretend."""
  changes = []
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(['value', 'value', 'value', 'unknown', 'model', 'dataset']))
    if kind == 'value':
      changes.append((draw(st.sampled_from(PATHS)), draw(WEIRD_VALUES)))
    elif kind == 'unknown':
      section = draw(st.sampled_from([(), ('dataset',), ('optimizer',), ('loss',), ('model',)]))
      changes.append((section + (draw(st.sampled_from(['widht', 'lr', 'steps'])),),
                      draw(WEIRD_VALUES)))
    elif kind == 'model':
      changes.append((('model', 'name'), draw(st.sampled_from(models.model_names()))))
    else:
      changes.append((('dataset', 'name'),
                      draw(st.sampled_from(['shapes', 'folder', 'voc', 'pets', 'cityscapes']))))
  return changes, draw(st.integers(1, 4))


def mutated(changes):
  tree = copy.deepcopy(BASE)
  for path, value in changes:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
      node[path[-1]] = value
  return ml_collections.ConfigDict(tree)


def check_valid_or_refused_in_one_line(case):
  changes, devices = case
  config = mutated(changes)
  with mock.patch.object(jax, 'device_count', lambda: devices):
    try:
      configs.validate(config)
      OUTCOMES['valid'] += 1
    except ConfigError as e:
      message = str(e)
      assert message and '\n' not in message, (changes, message)
      OUTCOMES['refused'] += 1


FUZZ = dict(deadline=None, database=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])


@hypothesis.settings(max_examples=60, **FUZZ)
@hypothesis.given(mutations())
def test_mutated_config_is_valid_or_refused_in_one_line(case):
  check_valid_or_refused_in_one_line(case)


@pytest.mark.slow
@hypothesis.settings(max_examples=400, **FUZZ)
@hypothesis.given(mutations())
def test_many_mutated_configs_are_valid_or_refused_in_one_line(case):
  check_valid_or_refused_in_one_line(case)


def test_fuzz_ran_and_found_both_outcomes():
  """Runs after the property (file order); records what it tried (pytest -s prints it)."""
  print(f'\nconfig mutations: {sum(OUTCOMES.values())} ({OUTCOMES["valid"]} valid, '
        f'{OUTCOMES["refused"]} refused with a ConfigError)')
  assert OUTCOMES['refused'] > 0


PLAUSIBLE = st.lists(st.one_of(
    st.tuples(st.just(('batch_size',)), st.sampled_from([1, 2, 3, 4, 8])),
    st.tuples(st.just(('dataset', 'image_size')), st.sampled_from([16, 24, 30, 32, 48])),
    st.tuples(st.just(('model', 'depth')), st.sampled_from([1, 2, 3, 5])),
    st.tuples(st.just(('optimizer', 'name')), st.sampled_from(['sgd', 'adam', 'adamw'])),
    st.tuples(st.just(('loss', 'terms')), st.sampled_from([(('dice', 1.0),),
                                                           (('focal', 1.0),)]))),
    min_size=1, max_size=3)


@pytest.mark.slow  # compiles up to 4 train steps
@hypothesis.settings(max_examples=4, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(PLAUSIBLE)
def test_plausible_mutation_runs_a_step_or_is_refused(tmp_path_factory, data_dir, changes):
  """Each change is of the right type, so validate decides alone; what it passes must train."""
  config = tiny_config(data_dir)
  for path, value in changes:
    (config[path[0]] if len(path) == 2 else config)[path[-1]] = value
  try:
    experiment = train.Experiment(config, str(tmp_path_factory.mktemp('fuzz')))
  except ConfigError as e:
    assert '\n' not in str(e)
    return
  batch = parallel.to_global(next(experiment.train_batches(0)), experiment.mesh)
  state, metrics = experiment.train_step(experiment.initial_state, batch, experiment.train_rng)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
