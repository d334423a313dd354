"""Orbax checkpoints of the train state: the latest few for resuming, and the best by mIoU.

Layout in the workdir: `checkpoints/<step>/` (the newest `max_to_keep`) and `best/<step>/`
(the one with the highest validation mIoU). Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save leaves earlier steps intact.
The data position needs no separate entry: the input pipeline is a pure function of the
step (see `segjax.data.pipeline.train_batches`).
"""
import os

import jax
import orbax.checkpoint as ocp

from segjax.errors import SegjaxError

_SAVED_FIELDS = ('step', 'params', 'batch_stats', 'opt_state')


def _as_tree(state):
  return {field: getattr(state, field) for field in _SAVED_FIELDS}


def _shapes(tree):
  """{'params/conv/kernel': shape} of the leaves of a (metadata) tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def _check_shapes(saved, target, path):
  """Refuses a checkpoint whose parameters differ from the model's, naming them."""
  problems = []
  for part in ('params', 'batch_stats'):
    have, want = _shapes(saved.get(part, {})), _shapes(target[part])
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
                      + '; '.join(problems) + '. Use a new --workdir for a changed config.')


class Checkpoints:
  """Saves and restores `TrainState`s under `workdir`."""

  def __init__(self, workdir, max_to_keep):
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics['miou'], best_mode='max',
            create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self):
    return self.latest.latest_step()

  def save(self, state):
    """Saves `state` at its step (asynchronously; `wait` blocks until it is on disk)."""
    step = int(state.step)
    if step not in self.latest.all_steps():
      self.latest.save(step, args=ocp.args.StandardSave(_as_tree(state)))

  def save_if_best(self, state, miou):
    """Keeps `state` in best/ if its `miou` beats the best so far."""
    step = int(state.step)
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.StandardSave(_as_tree(state)),
                     metrics={'miou': float(miou)})

  def restore(self, state, which='latest'):
    """`state` with the fields of the newest checkpoint of `which` ('latest' or 'best').

    Returns None when there is none. Restored arrays take the shardings of `state`.
    """
    manager = self.latest if which == 'latest' else self.best
    step = manager.latest_step() if which == 'latest' else manager.best_step()
    if step is None:
      return None
    path = os.path.join(manager.directory, str(step))
    _check_shapes(manager.item_metadata(step).tree, _as_tree(state), path)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(state))
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise SegjaxError(
          f'checkpoint {path} does not fit this config\'s model and optimizer '
          f'({first_line[:300]}); use a new --workdir for a changed config') from e
    return state.replace(**restored)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()
