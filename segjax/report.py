"""Evaluation reports on disk: metrics as JSON and Markdown, the confusion matrix as .npy and PNG.

`write` fills `<workdir>/eval_<step>/` with
  metrics.json    scalars, per-class iou/acc/dice by class name (null where absent), context
  metrics.md      the same numbers (in %) as Markdown tables
  confusion.npy   int64 [C, C], rows ground truth, columns prediction
  confusion.png   the row-normalised matrix with class names on the axes
"""
import json
import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from segjax import metrics as metrics_lib

PER_CLASS = ('iou', 'acc', 'dice')
_SCALAR_NAMES = {'miou': 'mIoU', 'macc': 'mAcc', 'aacc': 'aAcc', 'mdice': 'mDice',
                 'fwiou': 'fwIoU'}
_PER_CLASS_NAMES = {'iou': 'IoU', 'acc': 'Acc', 'dice': 'Dice'}
PLOT_DPI = 100
_CELL_TEXT_MAX_CLASSES = 30  # beyond this the per-cell percentages are left out


def _number(value):
  """A float for JSON, None for NaN (an absent class or an empty matrix)."""
  value = float(value)
  return None if math.isnan(value) else value


def _percent(value):
  return '-' if value is None else f'{100 * value:.2f}'


def metrics_record(result, class_names, **context):
  """The JSON-able record of `result` (`metrics.from_confusion`'s dict) plus `context`
  (e.g. step, evaluation settings, checkpoint path)."""
  return {
      **context,
      **{name: _number(result[name]) for name in metrics_lib.SCALARS},
      'per_class': {name: {field: _number(result[field][c]) for field in PER_CLASS}
                    for c, name in enumerate(class_names)},
  }


def markdown(record):
  """Markdown text of a `metrics_record`: the context, a scalar table, a per-class table."""
  context = [f'- {key}: `{value}`' for key, value in record.items()
             if key not in metrics_lib.SCALARS and key != 'per_class']
  lines = ['# Evaluation', '', *context, '',
           '| ' + ' | '.join(_SCALAR_NAMES[name] for name in metrics_lib.SCALARS) + ' |',
           '|' + '---:|' * len(metrics_lib.SCALARS),
           '| ' + ' | '.join(_percent(record[name]) for name in metrics_lib.SCALARS) + ' |',
           '', '| class | ' + ' | '.join(_PER_CLASS_NAMES[f] for f in PER_CLASS) + ' |',
           '|---|' + '---:|' * len(PER_CLASS)]
  for name, values in record['per_class'].items():
    lines.append(f'| {name} | ' + ' | '.join(_percent(values[f]) for f in PER_CLASS) + ' |')
  return '\n'.join(lines) + '\n'


def figure_inches(num_classes):
  """The side of the square confusion plot in inches (pixels: times `PLOT_DPI`)."""
  return min(max(6.0, 2 + 0.35 * num_classes), 30.0)


def plot_confusion(confusion, class_names, path):
  """Saves the row-normalised [C, C] `confusion` (rows ground truth) as a PNG at `path`.

  Each row is divided by its ground-truth pixel count (rows without pixels stay 0), so the
  diagonal is the per-class accuracy. Cells show percentages up to 30 classes.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = len(class_names)
  rows = confusion.sum(axis=1, keepdims=True)
  normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  side = figure_inches(num_classes)
  figure = Figure(figsize=(side, side), dpi=PLOT_DPI)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(normalised, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label='share of the true class')
  font_size = 8 if num_classes <= 60 else 5
  ticks = np.arange(num_classes)
  axes.set_xticks(ticks, class_names, rotation=90, fontsize=font_size)
  axes.set_yticks(ticks, class_names, fontsize=font_size)
  axes.set_xlabel('prediction')
  axes.set_ylabel('ground truth')
  if num_classes <= _CELL_TEXT_MAX_CLASSES:
    for (row, column), value in np.ndenumerate(normalised):
      axes.text(column, row, f'{100 * value:.0f}', ha='center', va='center',
                fontsize=9 if num_classes <= 10 else 6,
                color='white' if value > 0.5 else 'black')
  figure.tight_layout()
  figure.savefig(path, dpi=PLOT_DPI)


def write(directory, result, class_names, **context):
  """Writes metrics.json, metrics.md, confusion.npy and confusion.png into `directory`.

  result: `evaluate.evaluate`'s dict (metrics and `confusion`); context: JSON-able values
  recorded with the metrics (step, evaluation settings, checkpoint path).
  """
  os.makedirs(directory, exist_ok=True)
  record = metrics_record(result, class_names, **context)
  with open(os.path.join(directory, 'metrics.json'), 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(directory, 'metrics.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(record))
  np.save(os.path.join(directory, 'confusion.npy'), np.asarray(result['confusion'], np.int64))
  plot_confusion(result['confusion'], class_names, os.path.join(directory, 'confusion.png'))
  return directory
