"""Metric logs in the workdir: TensorBoard event files and `metrics.jsonl`.

Each `write` appends one JSON object `{"step": ..., "split": ..., <metric>: ...}` to
`metrics.jsonl` and one scalar per metric to TensorBoard under `<split>/<metric>`;
`images` logs pictures to TensorBoard only.
"""
import json
import math
import os

import numpy as np
import tensorboardX

from segjax.errors import SegjaxError


def _keep_records_up_to(path, step):
  """Rewrites the JSON lines file `path` without the records after `step` (and without a
  last line cut short by a killed run)."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  if len(kept) < len(lines):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


class MetricWriter:
  """Appends to the workdir's logs; `start_step` (a resumed run's restored step) first
  drops the records of later steps from `metrics.jsonl` and from TensorBoard's view, so the
  logs of an interrupted and resumed run equal an uninterrupted run's."""

  def __init__(self, workdir, enabled=True, start_step=None):
    self.enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    if enabled:
      if start_step is not None:
        _keep_records_up_to(self._path, start_step)
      self._jsonl = open(self._path, 'a', encoding='utf-8')
      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=None if start_step is None else start_step + 1)

  def write(self, step, split, scalars):
    """Logs `scalars` (name -> float) at `step` for `split` ('train' or 'val')."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    record = {'step': int(step), 'split': split}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
    try:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
    except OSError as e:
      raise SegjaxError(f'cannot write {self._path} ({e.strerror}): free disk space or fix '
                        'its permissions, then rerun the same command to resume from the '
                        'last checkpoint') from e
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f'{split}/{name}', value, int(step))
    self._tensorboard.flush()

  def images(self, step, name, images):
    """Logs uint8 [N, H, W, 3] `images` at `step` as one TensorBoard image `name`, the N
    stacked top to bottom (add_images would tile them in rows of 8, too wide for panels)."""
    if not self.enabled:
      return
    self._tensorboard.add_image(name, np.concatenate(images), int(step), dataformats='HWC')
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
