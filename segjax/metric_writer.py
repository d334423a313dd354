"""Metric logs in the workdir: TensorBoard event files and `metrics.jsonl`.

Each `write` appends one JSON object `{"step": ..., "split": ..., <metric>: ...}` to
`metrics.jsonl` and one scalar per metric to TensorBoard under `<split>/<metric>`.
"""
import json
import math
import os

import tensorboardX


class MetricWriter:

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, split, scalars):
    """Logs `scalars` (name -> float) at `step` for `split` ('train' or 'val')."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    record = {'step': int(step), 'split': split}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f'{split}/{name}', value, int(step))
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
