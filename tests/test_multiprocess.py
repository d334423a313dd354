"""Two processes (2 CPU devices each, gloo collectives) train through launch.py exactly like one
process with 4 devices, under both `parallelism` modes ('jit' and 'pmap'); their checkpoint
restores in a single one-device process.

The pair gets `--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id i` and
shares one workdir, as processes of a pod share a bucket. Each reads its half of every
global batch (4 of 8 images); the global batch and the programs are the same as the single
process's, only the cross-process reductions go through gloo, so the final parameters are
compared to 1e-6 (float32 rounding of reordered sums; SGD keeps it from growing).
"""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from segjax import checkpoint
from segjax import data as data_lib
from segjax import models
from segjax import train
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Overrides of experiments/unet.py, mirrored by `config` below for restoring in this process.
OVERRIDES = {
    'model.depth': 2, 'model.features': 4, 'dataset.image_size': 32,
    'dataset.num_train': 24, 'dataset.num_validation': 10, 'dataset.num_threads': 0,
    'batch_size': 8, 'eval_batch_size': 4, 'total_steps': STEPS, 'warmup_steps': 0,
    'log_every': 1, 'eval_every': STEPS, 'checkpoint_every': STEPS,
    'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.05, 'schedule': 'constant',
}
TOLERANCE = 1e-6

pytestmark = pytest.mark.slow


def config(data_dir):
  config = tiny_config(data_dir)
  for field, value in OVERRIDES.items():
    section, _, key = field.rpartition('.')
    (config[section] if section else config)[key] = value
  return config


def launch_command(data_dir, workdir, *args, parallelism='jit'):
  flags = [f'--config.{field}={value}'
           for field, value in {**OVERRIDES, 'parallelism': parallelism}.items()]
  return [sys.executable, 'launch.py', '--config', 'experiments/unet.py', *flags,
          f'--config.dataset.data_dir={data_dir}', f'--workdir={workdir}', *args]


def environment(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module', params=['jit', 'pmap'])
def runs(request, data_dir, sources, tmp_path_factory):
  """Workdirs of the two-process run and of the one-process run with 4 devices, both with
  `parallelism` = the param (the `sources` fixture prepares the dataset first, so the
  processes only read it)."""
  del sources
  parallelism = request.param
  pair, single = (str(tmp_path_factory.mktemp(f'{name}_{parallelism}'))
                  for name in ('pair', 'single'))
  address = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(
      launch_command(data_dir, pair, f'--coordinator_address={address}', '--num_processes=2',
                     f'--process_id={index}', parallelism=parallelism),
      cwd=ROOT, env=environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  single_run = subprocess.run(launch_command(data_dir, single, parallelism=parallelism),
                              cwd=ROOT, env=environment(4), capture_output=True, text=True,
                              timeout=900)
  for process in processes:
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
  assert single_run.returncode == 0, single_run.stderr[-3000:]
  return pair, single


def restore(data_dir, workdir):
  """The latest checkpoint of `workdir`, restored in this one-device process."""
  cfg = config(data_dir)
  model = models.get_model(cfg.model, data_lib.get_spec(cfg.dataset).num_classes)
  template = train.create_train_state(jax.random.key(0), model, cfg, (1, 32, 32, 3))
  state = checkpoint.Checkpoints(workdir, max_to_keep=2).restore(template)
  assert state is not None and int(state.step) == STEPS
  return jax.device_get((state.params, state.batch_stats, state.opt_state))


def test_two_processes_train_like_one(runs, data_dir):
  pair, single = runs
  assert jax.device_count() == 1
  got, expected = restore(data_dir, pair), restore(data_dir, single)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE),
               got, expected)
  # Only process 0 logs: one record per step, the same losses.
  pair_metrics, single_metrics = read_metrics(pair), read_metrics(single)
  assert [r['step'] for r in pair_metrics] == [r['step'] for r in single_metrics]
  assert [r['step'] for r in pair_metrics if r['split'] == 'train'] == [1, 2, 3]
  for a, b in zip(pair_metrics, single_metrics):
    if a['split'] == 'train':
      assert a['loss'] == pytest.approx(b['loss'], abs=TOLERANCE)


def test_validation_counts_each_pixel_once_and_restores_in_one_process(runs, data_dir,
                                                                       sources):
  pair, single = runs
  labels = np.stack([sources['validation'][i]['segmentation_mask'][..., 0] for i in range(10)])
  labelled = int(np.sum(labels != data_lib.get_spec(config(data_dir).dataset).ignore_label))
  confusion = {workdir: np.load(os.path.join(workdir, f'eval_{STEPS}', 'confusion.npy'))
               for workdir in (pair, single)}
  assert confusion[pair].sum() == confusion[single].sum() == labelled
  np.testing.assert_array_equal(confusion[pair], confusion[single])

  evaluated = subprocess.run(launch_command(data_dir, pair, '--mode=eval'), cwd=ROOT,
                             env=environment(1), capture_output=True, text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f'checkpoint at step {STEPS}' in evaluated.stdout
  np.testing.assert_array_equal(
      np.load(os.path.join(pair, f'eval_{STEPS}', 'confusion.npy')), confusion[pair])
  miou = float(re.search(r'mIoU (\d+\.\d+)', evaluated.stdout).group(1))
  assert miou == pytest.approx(100 * read_metrics(pair)[-1]['miou'], abs=0.006)
