"""The benchmark script keeps working: its suite builds and its figures are consistent."""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import pytest

from segjax import models
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def bench():
  path = os.path.join(ROOT, 'benchmarks', 'train_step.py')
  spec = importlib.util.spec_from_file_location('train_step_benchmark', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_suite_entry_builds_a_model(bench, monkeypatch):
  monkeypatch.chdir(ROOT)
  for label, path_and_arg, overrides in bench.SUITE:
    config = bench.load_config(path_and_arg)
    config.model.update(overrides)
    assert models.get_model(config.model, num_classes=6) is not None, label


def test_measure_reports_the_model_and_positive_costs(bench):
  config = tiny_config('/unused')
  config.batch_size = 2
  figures = bench.measure(config, steps=2)
  model = models.get_model(config.model, num_classes=6)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  assert figures['params'] == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert figures['gflops'] > 0 and figures['compile_s'] > 0
  assert 0 < figures['min_s'] <= figures['median_s']
  row = bench.row('tiny', config, figures)
  assert row.startswith('| tiny | 2 x 32x32 |') and row.count('|') == 9
