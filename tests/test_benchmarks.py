"""The benchmark script keeps working: its suite builds and its figures are consistent."""
import importlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from segjax import models
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The scripts import each other by module name; one module object each also keeps their
# absl flags defined once.
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


@pytest.fixture(scope='module')
def bench():
  return importlib.import_module('train_step')


def test_every_suite_entry_builds_a_model(bench, monkeypatch):
  monkeypatch.chdir(ROOT)
  for label, path_and_arg, overrides in bench.SUITE:
    config = bench.load_config(path_and_arg)
    config.model.update(overrides)
    assert models.get_model(config.model, num_classes=6) is not None, label


def test_measure_reports_the_model_and_positive_costs(bench):
  config = tiny_config('/unused')
  config.batch_size = 2
  figures, = bench.measure(config, steps=2).values()
  model = models.get_model(config.model, num_classes=6)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  assert figures['params'] == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert figures['gflops'] > 0 and figures['compile_s'] > 0
  assert 0 < figures['min_s'] <= figures['median_s']
  row = bench.row('tiny', jax.__version__, config, figures)
  assert row.startswith(f'| tiny | {jax.__version__} | 2 x 32x32 |') and row.count('|') == 10


def test_other_jax_worker_takes_the_same_step(bench):
  # This interpreter stands in for another environment's: same model, batch and figures.
  config = tiny_config('/unused')
  config.batch_size = 2
  batch = bench.random_batch(config, num_classes=6)
  step, figures = bench.jax_variant(config, batch)
  with bench.other_jax.Worker(sys.executable, config) as worker:
    assert worker.figures['jax'] == jax.__version__
    assert worker.figures['params'] == figures['params'] > 0
    assert worker.figures['gflops'] == pytest.approx(figures['gflops'])
    assert worker.figures['first_loss'] == pytest.approx(step()[0], rel=1e-5)  # warm-up
    results = bench.alternate({'here': step, 'worker': worker.step}, repetitions=2)
  (_, local_losses), (worker_s, worker_losses) = results.values()
  assert len(worker_s) == 2 and min(worker_s) > 0
  assert worker_losses == pytest.approx(local_losses, rel=1e-5)


def test_other_jax_worker_failure_is_reported(bench):
  config = tiny_config('/unused')
  config.model.name = 'no_such_model'
  with pytest.raises(RuntimeError, match='JAX worker .* ended without an answer'):
    bench.other_jax.Worker(sys.executable, config)


def test_profile_attributes_the_step_to_the_models_operations(bench, capsys):
  config = tiny_config('/unused')
  config.batch_size = 2
  ops, step_ms = bench.profile(config, steps=1)
  assert step_ms > 0 and ops and all(ms >= 0 for ms, *_ in ops)
  assert [ms for ms, *_ in ops] == sorted((ms for ms, *_ in ops), reverse=True)
  sources = ' '.join(op_name for *_, op_name in ops)
  # The U-Net's 3x3 convolutions, forward (jvp) and backward (transpose).
  assert 'DoubleConv_0/ConvBNReLU_0/Conv_0' in sources and 'transpose(jvp(Model))' in sources
  bench.print_profile(ops, step_ms, top=3)
  printed = capsys.readouterr().out
  assert f'step {step_ms:.1f} ms (traced)' in printed
  assert '| op kind | ms / step | share |' in printed and printed.count('\n| ') >= 5



@pytest.fixture(scope='module')
def vs_pytorch():
  pytest.importorskip('torch')  # an optional benchmark dependency
  return importlib.import_module('vs_pytorch')


def flax_param_sizes(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  return sorted(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name, fields, size', [
    ('unet', {'depth': 2, 'features': 4}, 32),
    ('deeplab', {'variant': 'v3', 'backbone_depth': 50, 'aspp_features': 256}, 64),
    ('segmenter', {'size': 'tiny', 'patch_size': 16, 'depth': 2, 'decoder': 'mask'}, 32),
])
def test_torch_twin_has_the_flax_models_parameter_sizes(vs_pytorch, name, fields, size):
  model = models.get_model(tiny_config('/unused', model_name=name, **fields).model,
                           num_classes=6)
  twin = vs_pytorch.torch_models.from_flax(model)
  assert sorted(p.numel() for p in twin.parameters()) == flax_param_sizes(model, size)


def test_torch_twin_maps_images_to_logits_and_learns(vs_pytorch):
  import torch  # pylint: disable=g-import-not-at-top
  model = models.get_model(tiny_config('/unused').model, num_classes=6)
  twin = vs_pytorch.torch_models.from_flax(model).train()
  torch.manual_seed(0)
  images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))
  labels[0, 0, 0] = 255  # the ignore label
  assert twin(images).shape == (2, 6, 32, 32)
  optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
  losses = [vs_pytorch.torch_train_step(twin, optimizer, images, labels, ignore_label=255,
                                        autocast=torch.autocast('cpu', enabled=False)).item()
            for _ in range(4)]
  assert losses[-1] < losses[0]


def test_alternate_rotates_the_order_of_the_variants(bench):
  order = []
  steps = {name: (lambda name=name: (order.append(name) or 0.0, 1.0)) for name in 'abc'}
  results = bench.alternate(steps, repetitions=3)
  assert order == list('abcbcacab')
  assert all(times == [1.0] * 3 for times, _ in results.values())


def test_model_shapes_take_the_default_or_their_own(vs_pytorch):
  assert vs_pytorch.model_shapes('unet,deeplabv3_r50:4x256', 8, 128) == [
      ('unet', 8, 128), ('deeplabv3_r50', 4, 256)]
  with pytest.raises(SystemExit, match='unknown model'):
    vs_pytorch.model_shapes('vgg', 8, 128)


@pytest.fixture(scope='module')
def latency():
  return importlib.import_module('latency')


def test_every_latency_suite_entry_builds_a_model(latency, monkeypatch):
  monkeypatch.chdir(ROOT)
  for label, path_and_arg in latency.SUITE + latency.ATTENTION_SUITE:
    config = latency.sweep.load_config(path_and_arg)
    assert models.get_model(config.model, num_classes=6) is not None, label


def test_latency_reports_the_model_and_positive_costs(latency):
  config = tiny_config('/unused')
  figures = latency.speed.measure(config, size=32, batch_size=2, steps=2)
  model = models.get_model(config.model, num_classes=6)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  assert figures['params'] == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert figures['gflops_per_image'] > 0 and figures['compile_s'] > 0
  assert 0 < figures['latency_min_ms'] <= figures['latency_ms']
  assert figures['images_per_s'] > 0
  row = latency.row('tiny', 32, figures)
  assert row.startswith('| tiny | 32x32 |') and row.count('|') == 8
