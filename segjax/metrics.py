"""Dataset-level segmentation metrics from a confusion matrix.

`confusion_matrix` runs on device inside the jitted eval step; `from_confusion` turns the
accumulated [C, C] matrix (rows: ground truth, columns: prediction) into numbers on host.
"""
import jax.numpy as jnp
import numpy as np


# The dataset-level scalars of `from_confusion`, in report order.
SCALARS = ('miou', 'macc', 'aacc', 'mdice', 'fwiou')


def confusion_matrix(predictions, labels, *, num_classes, ignore_label):
  """[C, C] int32 counts of (label, prediction) over pixels whose label is a valid class.

  Pixels labelled `ignore_label` (even when it lies inside [0, C)) or outside [0, C) are
  not counted. predictions, labels: int [...] of the same shape.
  """
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, num_classes * labels + predictions, 0)
  counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def from_confusion(confusion):
  """Metrics of a [C, C] confusion matrix (rows ground truth, columns prediction).

  Returns a dict of floats `miou`, `macc`, `aacc`, `mdice`, `fwiou` and per-class numpy
  arrays `iou`, `acc`, `dice` [C]. A class absent from both ground truth and prediction has
  NaN per-class values and `present[c] = False`; the means average the present classes only
  (for `macc`, the classes present in the ground truth). `fwiou`, the frequency-weighted
  IoU, is sum_c freq_c * IoU_c with freq_c the class's share of the ground-truth pixels.
  """
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  in_truth = confusion.sum(axis=1)
  in_prediction = confusion.sum(axis=0)
  union = in_truth + in_prediction - true_positive
  present = union > 0
  in_ground_truth = in_truth > 0
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(present, true_positive / union, np.nan)
    dice = np.where(present, 2 * true_positive / (in_truth + in_prediction), np.nan)
    acc = np.where(in_ground_truth, true_positive / in_truth, np.nan)
  total = confusion.sum()
  return {
      'miou': float(np.mean(iou[present])) if present.any() else float('nan'),
      'macc': float(np.mean(acc[in_ground_truth])) if in_ground_truth.any() else float('nan'),
      'aacc': float(true_positive.sum() / total) if total else float('nan'),
      'mdice': float(np.mean(dice[present])) if present.any() else float('nan'),
      'fwiou': (float(np.sum(in_truth[in_ground_truth] * iou[in_ground_truth]) / total)
                if total else float('nan')),
      'iou': iou, 'acc': acc, 'dice': dice, 'present': present,
  }


def format_table(metrics, class_names):
  """A plain-text report: summary line, then one row per class (absent classes say so)."""
  lines = [f"mIoU {100 * metrics['miou']:.2f}  mAcc {100 * metrics['macc']:.2f}  "
           f"aAcc {100 * metrics['aacc']:.2f}  mDice {100 * metrics['mdice']:.2f}  "
           f"fwIoU {100 * metrics['fwiou']:.2f}",
           f"{'class':<20}{'IoU':>8}{'Acc':>8}{'Dice':>8}"]
  for c, name in enumerate(class_names):
    if not metrics['present'][c]:
      lines.append(f'{name:<20}{"absent":>8}')
      continue
    acc = metrics['acc'][c]
    acc_text = f'{100 * acc:8.2f}' if np.isfinite(acc) else f'{"-":>8}'
    lines.append(f"{name:<20}{100 * metrics['iou'][c]:8.2f}{acc_text}"
                 f"{100 * metrics['dice'][c]:8.2f}")
  return '\n'.join(lines)


def summary(metrics, class_names):
  """The scalar metrics and per-class IoU as a flat dict of floats (for logs)."""
  scalars = {k: metrics[k] for k in SCALARS}
  for c, name in enumerate(class_names):
    if metrics['present'][c]:
      scalars[f'iou/{name}'] = float(metrics['iou'][c])
  return scalars
