"""Reliability: exact preemption, checkpoints that survive crashes, corruption and full disks,
divergence that never leaves a NaN model.

The preemption tests run launch.py in subprocesses and kill them (SIGKILL, SIGTERM) at random
steps; the per-step losses of the killed-and-resumed run must equal, bit for bit, those of an
uninterrupted reference run of the same config (same program on the same machine).
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from segjax import checkpoint
from segjax import data
from segjax import models
from segjax import train
from segjax.data import pipeline
from segjax.errors import DataError, SegjaxError
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 24

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config

def get_config():
  config = tiny_config({data_dir!r})
  config.total_steps = {total_steps}
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_every = 1000  # only after the last step
  config.max_to_keep = 3
  return config
"""


# ----------------------------------------------------------------------------- preemption

@pytest.fixture(scope='module')
def config_file(data_dir, tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'tiny.py'
  path.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, 'tests'), data_dir=str(data_dir),
                                     total_steps=TOTAL_STEPS))
  return str(path)


def launch_command(config_file, workdir):
  return [sys.executable, 'launch.py', '--config', config_file, f'--workdir={workdir}']


def train_losses(workdir):
  """{step: loss} of metrics.jsonl's train records; a step logged twice fails the test."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if record['split'] == 'train':
        assert record['step'] not in losses, f'step {record["step"]} logged twice'
        losses[record['step']] = record['loss']
  return losses


def last_logged_step(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f if line.endswith('\n')]
  return max(steps, default=0)


def run_until_killed(config_file, workdir, at_step, sig):
  """Starts training and sends `sig` once metrics.jsonl shows step `at_step`.

  Returns (killed: whether the signal arrived before the run ended, stdout, stderr).
  """
  process = subprocess.Popen(launch_command(config_file, workdir), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while process.poll() is None and last_logged_step(workdir) < at_step:
    assert time.time() < deadline, 'the run made no progress in 300 s'
    time.sleep(0.02)
  killed = process.poll() is None
  if killed:
    process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=300)
  return killed, stdout, stderr


def finish(config_file, workdir):
  result = subprocess.run(launch_command(config_file, workdir), cwd=ROOT, text=True,
                          capture_output=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def reference_losses(config_file, tmp_path_factory):
  """Per-step losses of an uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  finish(config_file, workdir)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
  return losses


def kill_resume_and_compare(config_file, workdir, reference_losses, kills):
  """Kills a run at each (step, signal) of `kills`, resumes it each time, finishes it, and
  checks every step's loss against the uninterrupted run. Returns how many kills landed."""
  landed = 0
  for at_step, sig in kills:
    killed, stdout, stderr = run_until_killed(config_file, workdir, at_step, sig)
    landed += killed
    if killed and sig == signal.SIGTERM:
      # SIGTERM: a checkpoint of the very step it stopped at, then a one-line exit.
      stopped = int(stderr.split('stopped by SIGTERM after step ')[1].split(';')[0])
      assert f'checkpoint saved to {workdir}/checkpoints/{stopped}.' in stderr
      assert 'Traceback' not in stderr
      assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
  resumed = finish(config_file, workdir)
  assert 'Resuming from the checkpoint at step' in resumed.stdout
  assert train_losses(workdir) == reference_losses  # exact: every step, once, same float
  return landed


@pytest.mark.slow  # four launch.py runs: about a minute unloaded, several on a busy machine
def test_sigkill_and_sigterm_at_random_steps_resume_exactly(config_file, reference_losses,
                                                            tmp_path):
  rng = random.Random(7)
  kills = [(rng.randint(3, TOTAL_STEPS // 2), signal.SIGKILL),
           (rng.randint(TOTAL_STEPS // 2 + 1, TOTAL_STEPS - 3), signal.SIGTERM)]
  landed = kill_resume_and_compare(config_file, str(tmp_path / 'run'), reference_losses, kills)
  assert landed >= 1


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_repeated_sigkills_at_random_steps_resume_exactly(config_file, reference_losses,
                                                          tmp_path, seed):
  rng = random.Random(seed)
  steps = sorted(rng.sample(range(2, TOTAL_STEPS - 1), 3))
  kills = [(step, rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]))
           for step in steps]
  landed = kill_resume_and_compare(config_file, str(tmp_path / 'run'), reference_losses, kills)
  assert landed >= 2


def test_resumed_log_drops_records_after_the_checkpoint(tmp_path):
  from segjax import metric_writer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  writer = metric_writer.MetricWriter(workdir)
  for step in range(1, 6):
    writer.write(step, 'train', {'loss': float(step)})
  writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 6, "spl')  # a line cut short by SIGKILL
  metric_writer.MetricWriter(workdir, start_step=3).close()
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope='module')
def tiny_state(data_dir):
  model = models.get_model(tiny_config(data_dir).model, num_classes=6)
  return train.create_train_state(jax.random.key(0), model, tiny_config(data_dir),
                                  (1, 32, 32, 3))


def saved_steps(workdir, tiny_state, steps=(1, 2, 3)):
  """Checkpoints of `tiny_state` (params shifted by the step) at `steps`."""
  saver = checkpoint.Checkpoints(workdir, max_to_keep=5)
  for step in steps:
    params = jax.tree.map(lambda x, s=step: x + s, tiny_state.params)
    saver.save(tiny_state.replace(step=jnp.asarray(step), params=params))
    saver.wait()
  saver.close()
  return os.path.join(workdir, 'checkpoints')


def truncate_data_files(path):
  for root, _, names in os.walk(os.path.join(path, 'default')):
    if os.path.basename(root) == 'd':
      for name in names:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(8)


def garble_metadata(path):
  with open(os.path.join(path, 'default', '_METADATA'), 'w', encoding='utf-8') as f:
    f.write('{"tree_metadata": ')


def remove_item(path):
  shutil.rmtree(os.path.join(path, 'default'))


@pytest.mark.parametrize('corrupt', [truncate_data_files, garble_metadata, remove_item])
def test_corrupt_latest_checkpoint_is_reported_and_the_previous_restores(
    tiny_state, tmp_path, capsys, corrupt):
  directory = saved_steps(str(tmp_path), tiny_state)
  corrupt(os.path.join(directory, '3'))
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=5)
  restored = saver.restore(tiny_state)
  assert int(restored.step) == 2
  expected = jax.tree.map(lambda x: x + 2, tiny_state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.params, expected)
  warning = capsys.readouterr().out
  assert f'warning: checkpoint {directory}/3 is corrupt' in warning
  assert f'moved it to {tmp_path}/corrupt_checkpoints/checkpoints_3' in warning
  # Step 3 can be trained and saved again.
  saver.save(restored.replace(step=jnp.asarray(3)))
  saver.wait()
  assert saver.latest.all_steps() == [1, 2, 3]


def test_no_readable_checkpoint_is_an_error_listing_them(tiny_state, tmp_path):
  directory = saved_steps(str(tmp_path), tiny_state, steps=(1, 2))
  truncate_data_files(os.path.join(directory, '1'))
  garble_metadata(os.path.join(directory, '2'))
  with pytest.raises(SegjaxError, match=(
      f'no readable latest checkpoint in {directory}; corrupt: {directory}/2: unreadable '
      f'metadata: .*; {directory}/1: .*Start again with a new --workdir')):
    checkpoint.Checkpoints(str(tmp_path), max_to_keep=5).restore(tiny_state)


def test_save_interrupted_midway_leaves_the_previous_checkpoint(tiny_state, tmp_path):
  # What a kill during Orbax's save leaves: a partly written temporary directory.
  directory = saved_steps(str(tmp_path), tiny_state, steps=(1, 2))
  partial = os.path.join(directory, '3.orbax-checkpoint-tmp-1234567')
  shutil.copytree(os.path.join(directory, '2'), partial)
  truncate_data_files(partial)
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=5)
  assert int(saver.restore(tiny_state).step) == 2
  saver.save(tiny_state.replace(step=jnp.asarray(3)))
  saver.wait()
  assert saver.latest.all_steps() == [1, 2, 3]
  assert not os.path.exists(partial)  # cleaned up when the workdir was opened


def test_checkpoint_of_another_optimizer_is_refused_naming_its_state(tiny_state, tmp_path,
                                                                     data_dir):
  saved_steps(str(tmp_path), tiny_state, steps=(1,))
  sgd = train.TrainState.create(apply_fn=tiny_state.apply_fn, params=tiny_state.params,
                                batch_stats=tiny_state.batch_stats,
                                tx=optax.sgd(0.1, momentum=0.9))
  with pytest.raises(SegjaxError, match=(
      r'checkpoint .*/checkpoints/1 does not fit this config.s model: missing opt_state: '
      r'.*trace.*; unexpected opt_state: .*mu.*Use a new --workdir')):
    checkpoint.Checkpoints(str(tmp_path), max_to_keep=5).restore(sgd)


def _tmpfs(path, size):
  """Mounts a tmpfs of `size` at `path`, or skips the test where that is not allowed."""
  os.makedirs(path)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, check=False)
  if result.returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root); the monkeypatched test '
                'covers the full disk')


def test_full_disk_during_save_names_the_last_good_checkpoint(tiny_state, tmp_path):
  disk = tmp_path / 'disk'
  _tmpfs(disk, '2m')
  try:
    workdir = str(disk / 'run')
    saver = checkpoint.Checkpoints(workdir, max_to_keep=5)
    saver.save(tiny_state.replace(step=jnp.asarray(1)))
    saver.wait()
    with pytest.raises(OSError):  # fill the disk
      with open(disk / 'filler', 'wb') as f:
        while True:
          f.write(b'\0' * 65536)
    with pytest.raises(SegjaxError, match=(
        f'cannot write the checkpoint of step 2 to {workdir}/checkpoints .*: the disk is '
        f'full or the workdir is not writable. The last good checkpoint is step 1 '
        f'\\({workdir}/checkpoints/1\\); free space')):
      saver.save(tiny_state.replace(step=jnp.asarray(2)))
      saver.wait()
    os.remove(disk / 'filler')
    restored = checkpoint.Checkpoints(workdir, max_to_keep=5).restore(tiny_state)
    assert int(restored.step) == 1
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def test_write_error_during_save_names_the_last_good_checkpoint(tiny_state, tmp_path,
                                                                monkeypatch):
  """The portable version of the full disk: Orbax's writes raise ENOSPC."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=5)
  saver.save(tiny_state.replace(step=jnp.asarray(1)))
  saver.wait()

  async def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(async_path, 'write_text', full_disk)
  with pytest.raises(SegjaxError, match=(
      r'cannot write the checkpoint of step 2 .*No space left on device.*The last good '
      r'checkpoint is step 1')):
    saver.save(tiny_state.replace(step=jnp.asarray(2)))
    saver.wait()
  monkeypatch.undo()
  assert int(checkpoint.Checkpoints(str(tmp_path), 5).restore(tiny_state).step) == 1


# ----------------------------------------------------------------------------- divergence

def test_nonfinite_step_is_flagged_and_skipped_inside_the_step():
  params = {'w': jnp.ones(3)}
  state = train.TrainState.create(apply_fn=None, params=params, batch_stats={},
                                  tx=optax.adam(0.1))

  def step_fn(state, batch, rng):
    del rng
    loss, grads = jax.value_and_grad(lambda p: jnp.sum(p['w'] * batch))(state.params)
    return state.apply_gradients(grads=grads), {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  bad = jnp.array([1.0, jnp.nan, 1.0])
  for skip in (False, True):
    guarded = jax.jit(train.with_nonfinite_check(step_fn, skip=skip))
    good_state, good = guarded(state, jnp.ones(3), None)
    assert float(good['nonfinite']) == 0.0 and not np.allclose(good_state.params['w'], 1.0)
    bad_state, flagged = guarded(state, bad, None)
    assert float(flagged['nonfinite']) == 1.0 and int(bad_state.step) == 1
    if skip:  # the update is dropped: parameters and optimizer state as before the step
      np.testing.assert_array_equal(bad_state.params['w'], params['w'])
      jax.tree.map(np.testing.assert_array_equal, bad_state.opt_state, state.opt_state)
    else:
      assert np.isnan(bad_state.params['w']).any()


BAD_STEP = 3


@pytest.fixture
def nan_images_at_step_3(monkeypatch):
  """Training batches whose images are NaN at step BAD_STEP (counted from 1)."""
  original = train.Experiment.train_batches

  def poisoned(self, start_step):
    for step, batch in enumerate(original(self, start_step), start_step + 1):
      if step == BAD_STEP:
        batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
      yield batch

  monkeypatch.setattr(train.Experiment, 'train_batches', poisoned)


def divergence_config(data_dir, nonfinite):
  config = tiny_config(data_dir)
  config.total_steps, config.log_every, config.checkpoint_every = 6, 4, 2
  config.eval_every = 1000
  config.nonfinite = nonfinite
  return config


def test_nan_step_stops_training_naming_it_and_the_last_good_checkpoint(
    data_dir, tmp_path, nan_images_at_step_3):
  workdir = str(tmp_path / 'run')
  with pytest.raises(SegjaxError, match=(
      r'training diverged: the loss or gradient norm is NaN or Inf at step 3 .*The last good '
      rf'checkpoint is step 2 \({workdir}/checkpoints/2\)')):
    train.train_and_evaluate(divergence_config(data_dir, 'stop'), workdir)
  # The NaN state was never saved, nor logged.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert not f.read()


def test_nan_step_is_skipped_when_configured(data_dir, tmp_path, nan_images_at_step_3, capsys):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(divergence_config(data_dir, 'skip'), workdir)
  assert 'warning: skipped step(s) [3]' in capsys.readouterr().out
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  logged = {r['step']: r for r in records if r['split'] == 'train'}
  assert logged[4]['skipped_steps'] == 1 and logged[6]['skipped_steps'] == 0
  assert all(np.isfinite(r['loss']) for r in logged.values())
  experiment = train.Experiment(divergence_config(data_dir, 'skip'), workdir)
  final = experiment.checkpoints.restore(experiment.initial_state)
  assert int(final.step) == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(final.params)))


# ----------------------------------------------------------------------------- bad data

def write_pair(source, stem, image_size, mask_size):
  rng = np.random.default_rng(len(stem))
  os.makedirs(source / 'images', exist_ok=True)
  os.makedirs(source / 'masks', exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)).save(
      source / 'images' / f'{stem}.png')
  Image.fromarray(rng.integers(0, 2, mask_size, dtype=np.uint8)).save(
      source / 'masks' / f'{stem}.png')


def folder_dataset(tmp_path, source):
  config = tiny_config(tmp_path / 'tfds').dataset
  config.name, config.source_dir, config.class_names = 'folder', str(source), ('a', 'b')
  return config


def test_folder_unreadable_and_mismatched_pairs_are_skipped_and_listed(tmp_path, capsys):
  source = tmp_path / 'mine'
  for stem in ('good1', 'good2', 'val1'):
    write_pair(source, stem, (6, 5), (6, 5))
  write_pair(source, 'wrong_size', (6, 5), (5, 6))
  write_pair(source, 'broken', (6, 5), (6, 5))
  (source / 'images' / 'broken.png').write_bytes(b'\x89PNG truncated')
  (source / 'train.txt').write_text('good1\nwrong_size\nbroken\ngood2\n')
  (source / 'val.txt').write_text('val1\n')
  sources = data.load_sources(folder_dataset(tmp_path, source))
  assert len(sources['train']) == 2 and len(sources['validation']) == 1
  warning = capsys.readouterr().out
  assert 'warning: segmentation_folder: skipped 2 of the 4 image/label pairs' in warning
  assert f'{source / "masks" / "wrong_size.png"} is 5x6 but its image' in warning
  assert f'{source / "images" / "broken.png"}: unreadable' in warning


def test_folder_split_of_only_bad_pairs_is_an_error_listing_them(tmp_path):
  source = tmp_path / 'mine'
  write_pair(source, 'good', (6, 5), (6, 5))
  write_pair(source, 'wrong_size', (6, 5), (5, 5))
  (source / 'train.txt').write_text('good\n')
  (source / 'val.txt').write_text('wrong_size\n')
  with pytest.raises(DataError, match=(
      r'(?s)1 problem\(s\) in the validation split .*wrong_size.png is 5x5 but its image')):
    data.load_sources(folder_dataset(tmp_path, source))


def test_out_of_range_labels_stop_at_the_first_batch_with_values_and_fix():
  spec = data.get_spec('shapes')
  batches = iter([{'label': np.array([[[0, 7], [255, 9]]])}, {'label': np.zeros((1, 2, 2))}])
  with pytest.raises(DataError, match=(
      r"dataset 'shapes' \(train split\) has label values \[7, 9\] outside \[0, 6\) and "
      r'ignore_label 255; rewrite those masks')):
    next(pipeline.checked(batches, spec, 'train split', num_checked=4))
