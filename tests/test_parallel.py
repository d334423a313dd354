"""Data parallelism: 1 vs 8 devices, 'jit' vs 'pmap', gradient accumulation, half precision,
the config checks and multi-process start-up.

The training comparisons run once, in a subprocess with 8 CPU devices
(tests/parallel_compare.py, which states the runs), so this process keeps its one device.
Tolerance: 1e-5 on the largest absolute difference of the per-step losses, final parameters
and BatchNorm statistics after 3 SGD steps (values of order 0.01-1). The compared runs compute
the same sums in another order (per device, per micro-batch), so they differ by float32
rounding: measured 1-2.4e-7, a 40x margin (SGD, not Adam, whose normalised updates would
magnify rounding in near-zero gradients). The controls show the comparisons can fail: 'pmap'
without sync BN differs from 'jit' by 1.5e-2, accumulation with BatchNorm by 0.65.
The 'jit' vs 'pmap' and accumulation runs use batches without ignored pixels: the mean of
per-device (per-micro-batch) pixel means is the global mean only when each holds as many
labelled pixels.
"""
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from segjax import configs
from segjax import parallel
from segjax.errors import ConfigError
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def compared():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, os.path.join('tests', 'parallel_compare.py')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_and_eight_devices_train_alike(compared):
  assert compared['bn_1_vs_8_devices'] < TOLERANCE


@pytest.mark.slow
def test_pmap_matches_jit_because_batch_norm_is_synced(compared):
  assert compared['bn_jit_vs_pmap'] < TOLERANCE
  assert compared['bn_jit_vs_pmap_without_sync'] > 1e-3


@pytest.mark.slow
def test_mean_teacher_step_is_the_same_under_pmap_and_over_devices(compared):
  assert compared['mean_teacher_jit_vs_pmap'] < TOLERANCE
  assert compared['mean_teacher_1_vs_8_devices'] < TOLERANCE
  assert compared['mean_teacher_moved'] > 1e-3  # the teacher is not the student


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(compared):
  assert compared['accumulate_4_vs_whole'] < TOLERANCE
  assert compared['accumulate_2_pmap_vs_whole'] < TOLERANCE
  # With BatchNorm the micro-batches are normalised by their own statistics: not the same.
  assert compared['bn_accumulate_4_vs_whole'] > 1e-3


@pytest.mark.slow
def test_half_precision_computes_in_bf16_and_keeps_float32_state(compared):
  assert compared['half_param_dtypes'] == ['float32', 'int32']  # int32: step counters
  assert compared['half_logits_dtype'] == 'float32'
  assert compared['half_bf16_convolutions'] == 5  # every convolution of the 2-stage CNN
  # bf16 has 8 bits of mantissa: the losses agree with float32 to about 1%.
  np.testing.assert_allclose(compared['half_losses'], compared['losses'], rtol=1e-2)
  assert compared['half_losses'] != compared['losses']


@pytest.mark.parametrize('field,value,message', [
    ('parallelism', 'spmd', "unknown parallelism 'spmd'; valid: jit, pmap"),
    ('grad_accum_steps', 0, 'grad_accum_steps must be positive, got 0'),
    ('grad_accum_steps', 3, r'batch_size=4 is not divisible by the 1 devices x '
                            r'grad_accum_steps=3; use a multiple of 3'),
])
def test_invalid_parallel_config_is_refused(field, value, message):
  config = tiny_config('/nonexistent')
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    configs.validate(config)


def test_micro_batches_must_divide_over_devices(monkeypatch):
  config = tiny_config('/nonexistent')
  config.batch_size, config.grad_accum_steps = 8, 2
  configs.validate(config)
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ConfigError, match='batch_size=8 is not divisible by the 8 devices x '
                                        'grad_accum_steps=2; use a multiple of 16'):
    configs.validate(config)


def test_distributed_flags_come_all_three_or_none(monkeypatch):
  with pytest.raises(ConfigError, match='give all of --coordinator_address, --num_processes '
                                        'and --process_id'):
    parallel.initialize_distributed('127.0.0.1:1234', None, 0)
  for variable in ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(variable, raising=False)
  assert not parallel.on_multi_process_cluster()  # this test machine has no TPU
  assert not parallel.initialize_distributed()
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert parallel.on_multi_process_cluster()


def test_whole_batch_is_placed_once_over_the_devices():
  mesh = parallel.make_mesh()
  batch = {'label': np.arange(12, dtype=np.int32).reshape(4, 3)}
  placed = parallel.whole_to_global(batch, mesh)['label']
  assert placed.sharding == parallel.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(placed), batch['label'])


def _conv_step(state, batch, rng, axis_name=None):
  """A convolution's weight gradient as a stand-in train step (the op the options target)."""
  del rng, axis_name
  def loss(kernel):
    return jax.lax.conv_general_dilated(batch, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()
  return state - jax.grad(loss)(state), {}


def test_cpu_steps_compile_with_segjax_xla_options(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  mesh = parallel.make_mesh()
  assert parallel.compiler_options(mesh) == parallel.CPU_COMPILER_OPTIONS
  kernel, images = np.ones((3, 3, 2, 4), np.float32), np.ones((2, 5, 5, 2), np.float32)
  args = (kernel, parallel.to_global(images, mesh), jax.random.key(0))
  new_kernel, _ = parallel.compile_step(_conv_step, mesh, 'jit')(*args)
  np.testing.assert_allclose(np.asarray(new_kernel)[1, 1], 1 - 2 * 25)  # centre tap: all pixels
  # The options reach XLA: a value it does not know fails the compilation.
  monkeypatch.setattr(parallel, 'CPU_COMPILER_OPTIONS',
                      {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH_FUSION'})
  with pytest.raises(Exception, match='NO_SUCH_FUSION'):
    parallel.compile_step(_conv_step, mesh, 'jit').lower(*args).compile()


def test_xla_flags_and_other_platforms_keep_their_own_options(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert parallel.compiler_options(parallel.make_mesh()) == {}
  monkeypatch.delenv('XLA_FLAGS')
  gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform='gpu')]))
  assert parallel.compiler_options(gpu_mesh) == {}
