"""Evaluator: whole-image inference over a split, confusion matrix on device, then metrics."""
import jax
import jax.numpy as jnp
import numpy as np

from segjax import metrics as metrics_lib
from segjax import parallel

# Device-side int32 sums are moved to a host int64 total this often (overflow guard).
_HOST_FLUSH_BATCHES = 32


def make_eval_step(model, *, num_classes, ignore_label):
  """(variables, batch) -> [C, C] int32 confusion matrix of the batch's argmax predictions."""

  def eval_step(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    predictions = jnp.argmax(logits, axis=-1)
    return metrics_lib.confusion_matrix(predictions, batch['label'], num_classes=num_classes,
                                        ignore_label=ignore_label)

  return eval_step


def confusion_over(eval_step, variables, batches, mesh):
  """Sums `eval_step` over `batches` (local numpy batches) -> int64 numpy [C, C]."""
  total, pending = None, []
  for batch in batches:
    pending.append(eval_step(variables, parallel.to_global(batch, mesh)))
    if len(pending) == _HOST_FLUSH_BATCHES:
      total = _add(total, pending)
      pending = []
  return _add(total, pending)


def _add(total, pending):
  if not pending:
    return total
  part = np.asarray(jax.device_get(sum(pending)), np.int64)
  return part if total is None else total + part


def evaluate(eval_step, variables, batches, mesh):
  """Metrics dict (see `segjax.metrics.from_confusion`) plus the `confusion` matrix."""
  confusion = confusion_over(eval_step, variables, batches, mesh)
  result = metrics_lib.from_confusion(confusion)
  result['confusion'] = confusion
  return result
