"""Orbax checkpoints of the train state: the latest few for resuming, and the best by mIoU.

Layout in the workdir: `checkpoints/<step>/` (the newest `max_to_keep`) and `best/<step>/`
(the one with the highest validation mIoU). Orbax writes each step into a temporary
directory (`<step>.orbax-checkpoint-tmp*`) and renames it when complete, so a crash or a
full disk mid-save leaves earlier steps intact; leftover temporary directories are removed
when the next run opens the workdir. A checkpoint that fails to restore (truncated or
garbled files) is reported with its path and moved to `corrupt_checkpoints/<step>/`, and
the next older one is tried. A checkpoint whose arrays do not fit the model (another model
or optimizer config) is refused, naming the parameters that differ.
The data position needs no separate entry: the input pipeline is a pure function of the
step (see `segjax.data.pipeline.train_batches`).
"""
import errno
import os
import shutil

import jax
import orbax.checkpoint as ocp

from segjax.errors import SegjaxError

_SAVED_FIELDS = ('step', 'params', 'batch_stats', 'opt_state')  # + 'teacher' when not None
# Errors of a write that more space or permissions would fix (tensorstore reports a full
# disk as RESOURCE_EXHAUSTED in a ValueError, Python writes as OSError ENOSPC).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _as_tree(state):
  tree = {field: getattr(state, field) for field in _SAVED_FIELDS}
  if getattr(state, 'teacher', None) is not None:  # the mean teacher of segjax/semi.py
    tree['teacher'] = state.teacher
  return tree


def _key_name(key):
  """A path entry of a pytree ('conv', 0 or 'mu') whether saved as dict key or attribute."""
  for field in ('key', 'name', 'idx'):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _shapes(tree):
  """{'params/conv/kernel': shape} of the leaves of a (metadata) tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(map(_key_name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _check_shapes(saved, target, path):
  """Refuses a checkpoint whose arrays differ from the model's and optimizer's, naming them."""
  problems = []
  parts = [name for name in list(target) + list(saved) if name != 'step']
  for part in dict.fromkeys(parts):
    have, want = _shapes(saved.get(part, {})), _shapes(target.get(part, {}))
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = [f'{k} {have[k]} != {want[k]}' for k in sorted(set(have) & set(want))
                 if have[k] != want[k]]
    for label, names in (('missing', missing), ('unexpected', unexpected),
                         ('mis-shaped (saved != model)', misshaped)):
      if names:
        problems.append(f'{label} {part}: {", ".join(names[:5])}'
                        + (f' and {len(names) - 5} more' if len(names) > 5 else ''))
  if problems:
    raise SegjaxError(f'checkpoint {path} does not fit this config\'s model: '
                      + '; '.join(problems) + '. Use a new --workdir for a changed model or '
                      'optimizer config.')


def _first_line(error):
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def is_storage_error(error):
  """Whether `error` says the disk is full or the directory is not writable."""
  if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
    return True
  return any(word in str(error) for word in ('RESOURCE_EXHAUSTED', 'No space left',
                                             'PERMISSION_DENIED', 'Read-only file system'))


class Checkpoints:
  """Saves and restores `TrainState`s under `workdir`."""

  def __init__(self, workdir, max_to_keep):
    self.workdir = os.path.abspath(workdir)
    options = dict(create=True, cleanup_tmp_directories=True)
    self.latest = ocp.CheckpointManager(
        os.path.join(self.workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **options),
        item_handlers=ocp.StandardCheckpointHandler())
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics['miou'], best_mode='max',
            **options),
        item_handlers=ocp.StandardCheckpointHandler())
    self._saving = None  # (manager, step) of the save in flight

  def latest_step(self):
    return self.latest.latest_step()

  def path(self, step, which='latest'):
    manager = self.latest if which == 'latest' else self.best
    return os.path.join(manager.directory, str(step))

  def _last_good(self, failed_step):
    """'step S (PATH)' of the newest finished checkpoint older than `failed_step`."""
    self.latest.reload()
    steps = [step for step in self.latest.all_steps() if step < failed_step]
    return f'step {max(steps)} ({self.path(max(steps))})' if steps else 'none'

  def _save(self, manager, step, state, **kwargs):
    self.wait()
    self._saving = (manager, step)
    try:
      manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_write_error(e)

  def _raise_write_error(self, error):
    """Re-raises an error of the save in flight, as a `SegjaxError` if storage caused it."""
    manager, step = self._saving
    self._saving = None
    if not is_storage_error(error):
      raise error
    raise SegjaxError(
        f'cannot write the checkpoint of step {step} to {manager.directory} '
        f'({_first_line(error)}): the disk is full or the workdir is not writable. The last '
        f'good checkpoint is {self._last_good(step)}; free space (or fix the permissions) '
        'and rerun the same command to resume from it.') from error

  def save(self, state):
    """Saves `state` at its step (asynchronously; `wait` blocks until it is on disk).

    A write that fails for lack of space or permission raises `SegjaxError` here or in
    the next `save` or `wait`, naming the last good checkpoint.
    """
    step = int(state.step)
    if step not in self.latest.all_steps():
      self._save(self.latest, step, state)

  def save_if_best(self, state, miou):
    """Keeps `state` in best/ if its `miou` beats the best so far."""
    step = int(state.step)
    if step not in self.best.all_steps():
      self._save(self.best, step, state, metrics={'miou': float(miou)})

  def _restore_step(self, manager, step, state):
    """`state` restored from `step` of `manager`; raises `_Corrupt` if it cannot be read."""
    path = os.path.join(manager.directory, str(step))
    try:
      metadata = manager.item_metadata(step)
      saved = metadata.tree if metadata is not None else None
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(path, f'unreadable metadata: {_first_line(e)}') from e
    if saved is None:
      raise _Corrupt(path, 'no array metadata')
    _check_shapes(saved, _as_tree(state), path)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(state))
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      # Shapes and names matched above, so a failure here is in the files themselves.
      raise _Corrupt(path, _first_line(e)) from e
    return state.replace(**restored)

  def _set_aside(self, manager, step):
    """Moves a corrupt checkpoint to <workdir>/corrupt_checkpoints/ (so that this step can
    be saved again) and returns where it went."""
    source = os.path.join(manager.directory, str(step))
    destination = os.path.join(self.workdir, 'corrupt_checkpoints',
                               f'{os.path.basename(manager.directory)}_{step}')
    if jax.process_index() == 0:
      shutil.rmtree(destination, ignore_errors=True)
      os.makedirs(os.path.dirname(destination), exist_ok=True)
      shutil.move(source, destination)
    manager.reload()
    return destination

  def restore(self, state, which='latest'):
    """`state` with the fields of the newest readable checkpoint of `which` ('latest' or
    'best').

    Returns None when there is none. Restored arrays take the shardings of `state`. A
    corrupt checkpoint is reported, set aside, and the next older one is tried; when every
    latest one is corrupt, `SegjaxError` lists them (a corrupt best one gives None).
    """
    manager = self.latest if which == 'latest' else self.best
    steps = sorted(manager.all_steps(), reverse=True)
    if which == 'best':
      steps = [manager.best_step()] if steps else []
    corrupt = []
    for step in steps:
      try:
        return self._restore_step(manager, step, state)
      except _Corrupt as e:
        moved = self._set_aside(manager, step)
        corrupt.append(f'{e.path}: {e.reason}')
        print(f'warning: checkpoint {e.path} is corrupt ({e.reason}); moved it to {moved} '
              'and trying the previous one', flush=True)
    if corrupt and which == 'latest':
      raise SegjaxError(f'no readable {which} checkpoint in {manager.directory}; corrupt: '
                        + '; '.join(corrupt) + '. Start again with a new --workdir.')
    return None

  def restore_best_or_latest(self, state):
    """(restored state, 'best' or 'latest'): the best checkpoint, else the newest readable
    latest one; (None, None) when there is neither."""
    for which in ('best', 'latest'):
      restored = self.restore(state, which)
      if restored is not None:
        return restored, which
    return None, None

  def wait(self):
    """Blocks until the saves in flight are on disk (see `save` for write errors)."""
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._saving is None:
        raise
      self._raise_write_error(e)
    self._saving = None

  def close(self):
    self.latest.close()
    self.best.close()


class _Corrupt(Exception):
  """A checkpoint directory whose files cannot be read back."""

  def __init__(self, path, reason):
    super().__init__(f'{path}: {reason}')
    self.path, self.reason = path, reason
