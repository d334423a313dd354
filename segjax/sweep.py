"""Sweeps over config fields: expansion, a resumable runner, and the results report.

An ablation file (experiments/ablations/*.py) defines `get_config(arg)` and `get_hyper(h)`,
where `h` is this module. A sweep is a list of points; a point is a dict of dotted config
fields (as after `--config.`) to values, built from axes with `sweep`, `seeds`, `product`
and `zip`:

  def get_hyper(h):
    return h.product(h.sweep('model.output_stride', [16, 8]),
                     h.sweep('model.variant', ['v3', 'v3plus']),
                     h.seeds(2))

`python launch.py --config FILE --mode sweep` calls `run_sweep`, which trains each point in
its own run directory `<workdir>/<point name>` and writes there, next to the trainer's
files, `summary.json`: the point's overrides, `finished`, the final validation metrics,
`params`, `step_time_s` and `wall_time_s`. Points whose summary says finished (with the same
config) are skipped; interrupted ones resume from their checkpoints. `<workdir>/sweep.json`
lists the config file and the points in order (a `--dry_run` writes it too, so runs started
by a cluster scheduler from the printed commands are reported alike).

`write_report(workdir)` groups the finished runs by variant (a point without its `seed`)
and writes `results.md`, `results.csv` and `results.png` (mIoU per variant with error bars,
the validation mIoU curves, and mIoU against the batch-1 inference latency each run measures
after training, `segjax.speed`, at its training crop on the machine that trained it).
"""
import builtins
import copy
import csv
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import configs
from segjax import data as data_lib
from segjax import models as models_lib
from segjax import speed
from segjax import train
from segjax.data import transforms
from segjax.errors import ConfigError, SegjaxError

SEED_FIELD = 'seed'
PLAN_FILE = 'sweep.json'
SUMMARY_FILE = 'summary.json'
_UNSAFE = re.compile(r'[^\w.+-]+')  # runs of characters kept out of run directory names


# ---------------------------------------------------------------------------- expansion

def _merged(parts):
  """One point from several, refusing a field set by two of them."""
  point = {}
  for part in parts:
    repeated = sorted(set(point) & set(part))
    if repeated:
      raise ConfigError(f'sweep field(s) {repeated} are set by two axes; give each field '
                        'one axis')
    point.update(part)
  return point


def sweep(field, values):
  """One axis: a point {field: value} per value, in order."""
  return [{field: value} for value in values]


def seeds(n):
  """An axis over `config.seed` 0 .. n-1: repeated runs of every variant."""
  return sweep(SEED_FIELD, range(n))


def product(*axes):
  """All combinations of the axes' points; the last axis varies fastest."""
  return [_merged(parts) for parts in itertools.product(*axes)]


def zip(*axes):  # pylint: disable=redefined-builtin
  """The axes' points paired in order (the i-th of each); the axes must be equally long."""
  lengths = [len(axis) for axis in axes]
  if len(set(lengths)) > 1:
    raise ConfigError(f'zip needs axes of equal length, got lengths {lengths}')
  return [_merged(parts) for parts in builtins.zip(*axes)]


# ---------------------------------------------------------------------------- points

def _value_text(value):
  """A value as a flag's text: strings as they are, anything else as its Python literal."""
  return value if isinstance(value, str) else repr(value)


def point_name(point):
  """A run directory name from a point's overrides, e.g. 'model.output_stride=8,seed=0'.

  Characters other than letters, digits, '.', '+' and '-' in values become '_'; names over
  120 characters are cut and end in a hash of the whole.
  """
  name = ','.join(f'{field}={_UNSAFE.sub("_", _value_text(value)).strip("_")}'
                  for field, value in point.items())
  if len(name) > 120:
    name = name[:100] + '-' + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def variant_of(point):
  """The point without its seed: runs of one variant differ only in `seed`."""
  return {field: value for field, value in point.items() if field != SEED_FIELD}


def _load_module(path):
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path_and_arg):
  """'experiments/x.py:arg' (as launch.py's --config) -> that file's get_config(arg)."""
  return experiment_config(*path_and_arg.split(':', 1))


def experiment_config(path, arg=None, *, total_steps=None):
  """`get_config(arg)` of the experiment file at `path`: ablations start from one.

  total_steps: a shorter schedule for every run of the ablation, evaluated 4 times and
  checkpointed twice; None keeps the experiment's.
  """
  config = _load_module(path).get_config(arg)
  if total_steps is not None:
    config.total_steps = total_steps
    config.eval_every = max(1, total_steps // 4)
    config.checkpoint_every = max(1, total_steps // 2)
  return config


def load_points(config_file):
  """The sweep of an ablation file ('path.py' or 'path.py:arg'): its `get_hyper(h)`."""
  path = config_file.partition(':')[0]
  module = _load_module(path)
  if not hasattr(module, 'get_hyper'):
    raise ConfigError(f'{path} defines no get_hyper(h); a sweep needs one (see '
                      'segjax/sweep.py)')
  points = module.get_hyper(sys.modules[__name__])
  if not points or not all(isinstance(p, dict) and p for p in points):
    raise ConfigError(f'{path}: get_hyper(h) must return a non-empty list of points '
                      f'(dicts of field -> value), got {points!r}')
  names = [point_name(p) for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f'{path}: get_hyper(h) gives the same point twice: {repeated}')
  return points


def with_overrides(config, point):
  """A copy of `config` with the point's fields set; unknown fields and types refused."""
  config = copy.deepcopy(config)
  for field, value in point.items():
    try:
      config.update_from_flattened_dict({field: value})
    except (KeyError, AttributeError) as e:
      raise ConfigError(f'sweep field {field!r} names no field of the config; the ablation '
                        "file's get_config must define it") from e
    except TypeError as e:
      raise ConfigError(f'sweep value {value!r} does not fit field {field!r}: {e}') from e
  return config


def launch_command(config_file, run_dir, overrides):
  """The shell command that trains one point: launch.py with its workdir and overrides."""
  args = ['python', 'launch.py', '--config', config_file, '--workdir', run_dir]
  args += [f'--config.{field}={_value_text(value)}' for field, value in overrides.items()]
  return shlex.join(args)


def _write_json(path, value):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)


def _read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _write_plan(workdir, config_file, points):
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, PLAN_FILE), {
      'config': config_file,
      'points': [{'name': point_name(p), 'overrides': p} for p in points]})


def dry_run(config_file, cli_overrides, points, workdir):
  """Writes `<workdir>/sweep.json`; returns one launch command per point.

  cli_overrides: the sweep command's own `--config.*` values (field -> value), repeated in
  every command; a point's value wins over them for the fields it sets.
  """
  _write_plan(workdir, config_file, points)
  return [launch_command(config_file, os.path.join(workdir, point_name(p)),
                         {**cli_overrides, **p}) for p in points]


# ---------------------------------------------------------------------------- runner

def count_parameters(config):
  """Trainable parameters of `config`'s model (BatchNorm statistics excluded).

  Shapes only (`jax.eval_shape` of the model's init), so nothing is computed.
  """
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  images = jax.ShapeDtypeStruct(transforms.model_input_shape(config.dataset), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), images)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def _config_json(config):
  return json.loads(config.to_json_best_effort())


def is_finished(run_dir, config):
  """Whether `run_dir` holds a finished run of exactly `config` (summary + config.json)."""
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  config_path = os.path.join(run_dir, 'config.json')
  if not (os.path.exists(summary_path) and os.path.exists(config_path)):
    return False
  return _read_json(summary_path).get('finished') is True and (
      _read_json(config_path) == _config_json(config))


def read_metrics(run_dir):
  """The records of `<run_dir>/metrics.jsonl` (dicts with 'step', 'split', metrics)."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def median_step_time(records, resumed=False):
  """Median seconds per training step over the logged intervals of a run, or None.

  The trainer logs `steps_per_second` averaged since it (re)started, so in a run trained in
  one go the time at a record is step / steps_per_second, and each interval between records
  gives its own seconds per step; the median leaves out the first interval's compile and the
  intervals holding an evaluation. For a `resumed` run (or steps that do not increase, or
  derived intervals that are not positive) it falls back to the median of
  1 / steps_per_second, which includes them.
  """
  train_records = [r for r in records if r['split'] == 'train'
                   and isinstance(r.get('steps_per_second'), (int, float))]
  if not train_records:
    return None
  steps = np.asarray([0] + [r['step'] for r in train_records], np.float64)
  average = 1 / np.asarray([r['steps_per_second'] for r in train_records])  # s per step
  if not resumed and np.all(np.diff(steps) > 0):
    interval = np.diff(np.concatenate([[0.0], steps[1:] * average])) / np.diff(steps)
    if np.all(interval > 0):
      return float(np.median(interval))
  return float(np.median(average))


def _log_summary(records, total_steps, resumed=False):
  """{'metrics': final validation metrics, 'step_time_s'} from a run's records, or None
  if no validation at `total_steps` was logged (the run has not finished)."""
  val = [r for r in records if r['split'] == 'val']
  if not val or val[-1]['step'] < total_steps:
    return None
  metrics = {k: v for k, v in val[-1].items() if k not in ('step', 'split')}
  return {'metrics': metrics, 'step_time_s': median_step_time(records, resumed)}


def _train_point(config, point, run_dir):
  """Trains one point; writes its summary.json (also, unfinished, when interrupted)."""
  os.makedirs(run_dir, exist_ok=True)
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  previous = _read_json(summary_path) if os.path.exists(summary_path) else {}
  # Wall time of earlier, interrupted attempts at this point counts too.
  carried = 0.0 if previous.get('finished', True) else previous.get('wall_time_s', 0.0)
  checkpoints = os.path.join(run_dir, 'checkpoints')  # segjax/checkpoint.py's directory
  resumed = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
  started = time.time()
  try:
    train.train_and_evaluate(config, run_dir)
  except BaseException:
    _write_json(summary_path, {'overrides': point, 'finished': False,
                               'wall_time_s': carried + time.time() - started})
    raise
  wall_time = carried + time.time() - started
  logged = _log_summary(read_metrics(run_dir), config.total_steps, resumed)
  if logged is None:
    raise SegjaxError(f'{run_dir}/metrics.jsonl has no validation at step '
                      f'{config.total_steps} after training; the run did not finish')
  latency_ms, _, _ = speed.latency(config, config.dataset.image_size)
  _write_json(summary_path, {'overrides': point, 'finished': True, **logged,
                             'params': count_parameters(config), 'wall_time_s': wall_time,
                             'latency_ms': latency_ms})


def run_sweep(config, points, workdir, *, config_file):
  """Trains every point of the sweep in `<workdir>/<point name>`, skipping finished ones.

  config: the ablation's config (with the command line's overrides); every point's config
  is validated before anything trains. Rewrites the report after each point; returns the
  report's markdown.
  """
  point_configs = [with_overrides(config, p) for p in points]
  for point, point_config in builtins.zip(points, point_configs):
    try:
      configs.validate(point_config)
    except ConfigError as e:
      raise ConfigError(f'sweep point {point_name(point)}: {e}') from e
  _write_plan(workdir, config_file, points)
  for i, (point, point_config) in enumerate(builtins.zip(points, point_configs)):
    run_dir = os.path.join(workdir, point_name(point))
    if is_finished(run_dir, point_config):
      print(f'[{i + 1}/{len(points)}] {run_dir}: finished, skipped')
      continue
    print(f'[{i + 1}/{len(points)}] {run_dir}: training')
    _train_point(point_config, point, run_dir)
    write_report(workdir)
  return write_report(workdir)


# ---------------------------------------------------------------------------- report

def _as_tuples(value):
  """JSON lists back to the tuples the configs use (for display and grouping)."""
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _run_summary(run_dir):
  """A finished run's summary: its summary.json, or, for a run started by a launch command
  (no summary.json), one built from its config.json and metrics.jsonl without wall time.
  None if the run has not finished."""
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  if os.path.exists(summary_path):
    summary = _read_json(summary_path)
    return summary if summary.get('finished') else None
  config_path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(config_path):
    return None
  config = ml_collections.ConfigDict(_read_json(config_path))
  logged = _log_summary(read_metrics(run_dir), config.total_steps)
  if logged is None:
    return None
  return {'finished': True, **logged, 'params': count_parameters(config), 'wall_time_s': None,
          'latency_ms': None}


def _val_curve(run_dir):
  """{step: validation mIoU} of a run (the last evaluation at each step)."""
  return {r['step']: r['miou'] for r in read_metrics(run_dir) if r['split'] == 'val'}


def _mean_std(values):
  """Mean and sample standard deviation (ddof=1; NaN for a single value) of floats."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return float(np.mean(values)), std


def _mean_or_none(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _variant_rows(workdir):
  """(fields, class names, rows, runs finished, runs planned) of the sweep in `workdir`.

  A row per variant with finished runs, in sweep order: 'variant' (field -> value), 'seeds',
  'miou_mean', 'miou_std', 'class_iou' (name -> mean over the runs where the class was
  present), 'params', 'step_time_s', 'wall_time_s' and 'latency_ms' (batch-1 inference at
  the training crop, measured after training; means over its runs), 'curve'
  (step -> mean validation mIoU over the runs, at the steps all of them evaluated).
  """
  plan_path = os.path.join(workdir, PLAN_FILE)
  if not os.path.exists(plan_path):
    raise SegjaxError(f'no {PLAN_FILE} in {workdir}; run the sweep (--mode sweep, or with '
                      '--dry_run) with this --workdir first')
  plan = _read_json(plan_path)['points']
  variants, runs = {}, {}  # key -> variant; key -> [(summary, validation curve)]
  fields, class_names = [], []
  for entry in plan:
    variant = {k: _as_tuples(v) for k, v in variant_of(entry['overrides']).items()}
    fields += [f for f in variant if f not in fields]
    run_dir = os.path.join(workdir, entry['name'])
    summary = _run_summary(run_dir)
    if summary is not None:
      class_names += [k[len('iou/'):] for k in summary['metrics']
                      if k.startswith('iou/') and k[len('iou/'):] not in class_names]
      key = json.dumps(variant)
      variants[key] = variant
      runs.setdefault(key, []).append((summary, _val_curve(run_dir)))
  rows = []
  for key, variant_runs in runs.items():
    summaries = [s for s, _ in variant_runs]
    miou_mean, miou_std = _mean_std([s['metrics']['miou'] for s in summaries])
    class_iou = {}
    for name in class_names:
      present = [s['metrics'][f'iou/{name}'] for s in summaries
                 if isinstance(s['metrics'].get(f'iou/{name}'), (int, float))]
      class_iou[name] = float(np.mean(present)) if present else None
    common_steps = sorted(set.intersection(*(set(c) for _, c in variant_runs)))
    rows.append({
        'variant': variants[key], 'seeds': len(summaries),
        'miou_mean': miou_mean, 'miou_std': miou_std, 'class_iou': class_iou,
        'params': summaries[0]['params'],
        'step_time_s': _mean_or_none([s['step_time_s'] for s in summaries]),
        'wall_time_s': _mean_or_none([s['wall_time_s'] for s in summaries]),
        'latency_ms': _mean_or_none([s.get('latency_ms') for s in summaries]),
        'curve': {step: float(np.mean([c[step] for _, c in variant_runs]))
                  for step in common_steps}})
  finished = sum(len(r) for r in runs.values())
  return fields, class_names, rows, finished, len(plan)


def _display(value):
  return _value_text(value).replace('|', '\\|')


def _short_text(value):
  """A value as a plot label: weighted terms (('cross_entropy', 1.0), ('dice', 0.5)) as
  'cross_entropy + 0.5 dice', anything else as `_value_text`."""
  if (isinstance(value, (tuple, list)) and value and all(
      isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str) for t in value)):
    return ' + '.join(name if weight == 1 else f'{weight:g} {name}' for name, weight in value)
  return _value_text(value)


def _label(variant):
  """A short label of a variant for plots: last field components, e.g. 'output_stride=8'."""
  items = [f'{field.rsplit(".", 1)[-1]}={_short_text(v)}' for field, v in variant.items()]
  return ', '.join(items) or 'seeds only'


def _cell(value, spec, scale=1):
  """`scale * value` formatted by `spec`, or '-' where there is no value."""
  return '-' if value is None or math.isnan(value) else format(scale * value, spec)


def _markdown(config_file, fields, class_names, rows, finished, planned):
  header = [*fields, 'seeds', 'val mIoU (%)', *(f'{n} IoU' for n in class_names),
            'params (M)', 'step (ms)', 'wall (min)', 'latency (ms)']
  lines = [f'Sweep of `{config_file}`: {finished} of {planned} runs finished. Final '
           'validation mIoU as mean ± sample std over seeds; per-class IoU, step time, '
           'wall time (per run) and batch-1 inference latency at the training crop are '
           'means over seeds.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    miou = f"{100 * row['miou_mean']:.2f}"
    if not math.isnan(row['miou_std']):
      miou += f" ± {100 * row['miou_std']:.2f}"
    cells = [f'`{_display(row["variant"][f])}`' if f in row['variant'] else '' for f in fields]
    cells += [str(row['seeds']), miou]
    cells += [_cell(v, '.2f', 100) for v in row['class_iou'].values()]
    cells += [_cell(row['params'], '.3f', 1e-6), _cell(row['step_time_s'], '.1f', 1000),
              _cell(row['wall_time_s'], '.1f', 1 / 60), _cell(row['latency_ms'], '.1f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _write_csv(path, fields, class_names, rows):
  """One row per variant; metrics as fractions (as in metrics.jsonl), times in seconds."""
  with open(path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([*fields, 'seeds', 'miou_mean', 'miou_std',
                     *(f'iou/{n}' for n in class_names), 'params', 'step_time_s',
                     'wall_time_s', 'latency_ms'])
    for row in rows:
      values = [row['seeds'], row['miou_mean'], row['miou_std'], *row['class_iou'].values(),
                row['params'], row['step_time_s'], row['wall_time_s'], row['latency_ms']]
      writer.writerow([_value_text(row['variant'][f]) if f in row['variant'] else ''
                       for f in fields]
                      + ['' if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for v in values])


def _plot(path, rows):
  """Final mIoU per variant with ±std error bars (top; one line per variant, best on top),
  the validation mIoU curves (middle, legend under them) and, where runs measured their
  latency, final mIoU against batch-1 inference latency (bottom, points labelled)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = [_label(row['variant']) for row in rows]
  order = sorted(range(len(rows)), key=lambda i: rows[i]['miou_mean'])
  timed = [i for i, row in enumerate(rows) if row['latency_ms'] is not None]
  heights = [1 + 0.3 * len(rows), 3.5] + ([3.5] if timed else [])
  # Axes 7 inches wide; the labels go outside them, kept by bbox_inches='tight' on saving.
  figure, axes = plt.subplots(len(heights), 1, figsize=(7, 1.5 * len(heights) + sum(heights)),
                              gridspec_kw={'height_ratios': heights, 'hspace': 0.6})
  bars, curves = axes[:2]
  bars.errorbar([100 * rows[i]['miou_mean'] for i in order], range(len(rows)),
                xerr=[0 if math.isnan(rows[i]['miou_std']) else 100 * rows[i]['miou_std']
                      for i in order], fmt='o', capsize=4)
  bars.set_yticks(range(len(rows)), [labels[i] for i in order], fontsize=8)
  bars.set_xlabel('final validation mIoU (%), mean ± sample std over seeds')
  bars.grid(axis='x', alpha=0.3)
  for row, label in builtins.zip(rows, labels):
    steps = sorted(row['curve'])
    curves.plot(steps, [100 * row['curve'][s] for s in steps], marker='.', label=label)
  curves.set_xlabel('step')
  curves.set_ylabel('validation mIoU (%),\nmean over seeds')
  curves.grid(alpha=0.3)
  curves.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.15))
  if timed:
    speed_axes = axes[2]
    speed_axes.errorbar([rows[i]['latency_ms'] for i in timed],
                        [100 * rows[i]['miou_mean'] for i in timed],
                        yerr=[0 if math.isnan(rows[i]['miou_std']) else 100 * rows[i]['miou_std']
                              for i in timed], fmt='o', capsize=4)
    for i in timed:
      speed_axes.annotate(labels[i], (rows[i]['latency_ms'], 100 * rows[i]['miou_mean']),
                          fontsize=7, xytext=(4, 4), textcoords='offset points')
    speed_axes.set_xlabel('batch-1 inference latency at the training crop (ms)')
    speed_axes.set_ylabel('final validation mIoU (%)')
    speed_axes.grid(alpha=0.3)
  figure.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(figure)


def write_report(workdir):
  """Writes results.md, results.csv and results.png in `workdir` from its finished runs;
  returns the markdown."""
  fields, class_names, rows, finished, planned = _variant_rows(workdir)
  if not rows:
    raise SegjaxError(f'no finished runs in {workdir} yet; run the sweep first')
  config_file = _read_json(os.path.join(workdir, PLAN_FILE))['config']
  markdown = _markdown(config_file, fields, class_names, rows, finished, planned)
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(markdown)
  _write_csv(os.path.join(workdir, 'results.csv'), fields, class_names, rows)
  _plot(os.path.join(workdir, 'results.png'), rows)
  return markdown
