"""End to end through launch.py in subprocesses: train, resume, evaluate, stop, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    '--config.model.depth=2', '--config.model.features=4', '--config.dataset.image_size=32',
    '--config.dataset.num_train=24', '--config.dataset.num_validation=10',
    '--config.batch_size=4', '--config.eval_batch_size=4', '--config.warmup_steps=0',
    '--config.log_every=2', '--config.eval_every=4', '--config.checkpoint_every=4',
]


def launch(*args, data_dir, check=True, **kwargs):
  command = [sys.executable, 'launch.py', '--config', 'experiments/unet.py', *TINY,
             f'--config.dataset.data_dir={data_dir}', *args]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          **kwargs)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_train_resume_and_evaluate(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  first = launch('--config.total_steps=4', f'--workdir={workdir}', data_dir=data_dir)
  assert 'mIoU' in first.stdout + first.stderr
  assert 'background' in first.stdout + first.stderr  # per-class table with names
  records = read_metrics(workdir)
  assert {r['split'] for r in records} == {'train', 'val'}
  assert records[-1]['split'] == 'val' and records[-1]['step'] == 4
  assert {'miou', 'macc', 'aacc', 'mdice', 'iou/background'} <= set(records[-1])
  assert {'loss', 'learning_rate'} <= set(records[0])
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'unet'

  # The same command again: nothing left to train, so it only re-evaluates.
  again = launch('--config.total_steps=4', f'--workdir={workdir}', data_dir=data_dir)
  assert 'Training is complete (step 4 of 4)' in again.stdout
  # More steps: resumes from step 4, not from scratch.
  more = launch('--config.total_steps=8', f'--workdir={workdir}', data_dir=data_dir)
  assert 'Resuming from the checkpoint at step 4' in more.stdout
  train_steps = [r['step'] for r in read_metrics(workdir) if r['split'] == 'train']
  assert train_steps == [2, 4, 6, 8]

  evaluated = launch('--config.total_steps=8', f'--workdir={workdir}', '--mode=eval',
                     data_dir=data_dir)
  assert 'Evaluation of the checkpoint at step' in evaluated.stdout
  assert 'mIoU' in evaluated.stdout


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  command = [sys.executable, 'launch.py', '--config', 'experiments/unet.py', *TINY,
             f'--config.dataset.data_dir={data_dir}', '--config.total_steps=100000',
             '--config.eval_every=100000', '--config.checkpoint_every=100000',
             f'--workdir={workdir}']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path)):
    assert time.time() < deadline and process.poll() is None, process.communicate()
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 1
  assert 'stopped by SIGTERM after step' in stderr and 'Traceback' not in stderr
  saved = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 2
  resumed = launch(f'--config.total_steps={saved[0] + 2}', f'--workdir={workdir}',
                   data_dir=data_dir)
  assert f'Resuming from the checkpoint at step {saved[0]}' in resumed.stdout


@pytest.mark.parametrize('args,message', [
    (['--config.model.name=mask2former'], "error: unknown model.name 'mask2former'; valid names"),
    (['--config.optimizer.name=lamb'], "error: unknown optimizer.name 'lamb'"),
    (['--config.batch_size=0'], 'error: batch_size must be positive'),
    (['--workdir=/proc/segjax'], "error: workdir '/proc/segjax' is not writable"),
    (['--config.loss.class_weights=(1.0,2.0)'], 'error: loss.class_weights has 2 values'),
])
def test_bad_input_fails_early_with_one_line(args, message, data_dir):
  result = launch(*args, data_dir=data_dir, check=False)
  assert result.returncode == 1
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args,message', [
    (['--config', 'experiments/nope.py'],
     'error: cannot load config file experiments/nope.py: [Errno 2] No such file'),
    (['--config', 'experiments/unet.py:widht=3'], "error: bad config argument 'widht=3'"),
    (['--config', 'experiments/unet.py', '--config.model.widht=3'],
     'error: --config.model.widht names no field of the config'),
])
def test_bad_config_file_or_argument_is_one_line(args, message):
  result = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert message in result.stderr and 'Traceback' not in result.stderr


def test_trains_data_parallel_over_two_devices(tmp_path, data_dir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workdir = str(tmp_path / 'run')
  launch('--config.total_steps=2', f'--workdir={workdir}', data_dir=data_dir, env=env)
  assert read_metrics(workdir)[-1]['split'] == 'val'
  odd = launch('--config.batch_size=3', '--config.total_steps=2', f'--workdir={workdir}',
               data_dir=data_dir, env=env, check=False)
  assert 'error: batch_size=3 is not divisible by the 2 devices' in odd.stderr
