"""Sweeps: expansion, dry-run commands, the resumable runner, and the results report."""
import csv
import glob
import json
import os
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from segjax import configs
from segjax import sweep
from segjax.errors import ConfigError, SegjaxError
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'ablations', '*.py')))
CLASSES = ('background', 'disc', 'ring', 'square', 'triangle', 'cross')


# ---------------------------------------------------------------------------- expansion

def test_product_varies_the_last_axis_fastest():
  points = sweep.product(sweep.sweep('a', [1, 2]), sweep.sweep('b', ['x', 'y', 'z']))
  assert points == [{'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 1, 'b': 'z'},
                    {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}, {'a': 2, 'b': 'z'}]
  assert list(points[0]) == ['a', 'b']  # fields keep the axes' order


def test_zip_pairs_axes_in_order_and_nests_in_product():
  paired = sweep.zip(sweep.sweep('model.depth', [2, 3]), sweep.sweep('model.features', [32, 16]))
  assert paired == [{'model.depth': 2, 'model.features': 32},
                    {'model.depth': 3, 'model.features': 16}]
  points = sweep.product(paired, sweep.seeds(3))
  assert len(points) == 6
  assert [p['seed'] for p in points] == [0, 1, 2, 0, 1, 2]
  assert [p['model.depth'] for p in points] == [2, 2, 2, 3, 3, 3]


def test_seeds_and_bad_axes():
  assert sweep.seeds(3) == [{'seed': 0}, {'seed': 1}, {'seed': 2}]
  with pytest.raises(ConfigError, match=r'equal length, got lengths \[2, 3\]'):
    sweep.zip(sweep.sweep('a', [1, 2]), sweep.sweep('b', [1, 2, 3]))
  with pytest.raises(ConfigError, match=r"\['a'\] are set by two axes"):
    sweep.product(sweep.sweep('a', [1]), sweep.sweep('a', [2]))


def test_point_names_are_readable_and_path_safe():
  point = {'loss.terms': (('cross_entropy', 1.0), ('dice', 0.5)), 'model.variant': 'v3',
           'seed': 1}
  assert sweep.point_name(point) == (
      'loss.terms=cross_entropy_1.0_dice_0.5,model.variant=v3,seed=1')
  long_name = sweep.point_name({'x': 'a' * 300})
  assert len(long_name) <= 120 and long_name != sweep.point_name({'x': 'a' * 299})


def test_overrides_set_fields_on_a_copy_and_refuse_unknown_ones():
  config = configs.base_config()
  config.lock()
  changed = sweep.with_overrides(config, {'optimizer.learning_rate': 0.1, 'seed': 3})
  assert (changed.optimizer.learning_rate, changed.seed) == (0.1, 3)
  assert (config.optimizer.learning_rate, config.seed) == (3e-3, 0)
  with pytest.raises(ConfigError, match="sweep field 'model.widht' names no field"):
    sweep.with_overrides(config, {'model.widht': 3})
  with pytest.raises(ConfigError, match="sweep value 'big' does not fit field 'batch_size'"):
    sweep.with_overrides(config, {'batch_size': 'big'})


@pytest.mark.parametrize('path', ABLATIONS, ids=os.path.basename)
def test_every_ablation_expands_to_valid_configs(path):
  points = sweep.load_points(path)
  base = sweep.experiment_config(path)
  assert len(points) >= 4 and len({sweep.point_name(p) for p in points}) == len(points)
  assert len({p['seed'] for p in points}) >= 2, 'an ablation repeats each variant over seeds'
  for point in points:
    configs.validate(sweep.with_overrides(base, point))
  module = sweep._load_module(path)  # pylint: disable=protected-access
  assert f'experiments/ablations/{os.path.basename(path)} --mode sweep' in module.__doc__


def test_an_ablation_without_get_hyper_is_refused():
  with pytest.raises(ConfigError, match='defines no get_hyper'):
    sweep.load_points(os.path.join(ROOT, 'experiments', 'unet.py'))


# ---------------------------------------------------------------------------- dry run

def parse_launch_command(command):
  """The config and workdir that launch.py would build from a printed command."""
  argv = shlex.split(command)
  assert argv[:2] == ['python', 'launch.py']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv[1:])
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(argv[1:])
  return values.config, values.workdir


def test_dry_run_prints_commands_that_rebuild_each_point(tmp_path):
  config_file = 'experiments/ablations/losses.py'
  workdir = str(tmp_path / 'losses')
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config', config_file, '--mode', 'sweep', '--dry_run',
       f'--workdir={workdir}', '--config.total_steps=7',
       '--config.dataset.image_size=(32, 48)', '--config.dataset.data_dir=/tmp/my data'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  commands = result.stdout.strip().splitlines()
  points = sweep.load_points(os.path.join(ROOT, config_file))
  assert len(commands) == len(points)
  cli = {'total_steps': 7, 'dataset.image_size': (32, 48), 'dataset.data_dir': '/tmp/my data'}
  base = sweep.with_overrides(sweep.experiment_config(os.path.join(ROOT, config_file)), cli)
  cwd = os.getcwd()
  os.chdir(ROOT)  # the commands name the config file relative to the repository
  try:
    for command, point in zip(commands, points):
      config, run_dir = parse_launch_command(command)
      assert run_dir == os.path.join(workdir, sweep.point_name(point))
      assert config.to_dict() == sweep.with_overrides(base, point).to_dict()
  finally:
    os.chdir(cwd)
  plan = json.load(open(os.path.join(workdir, 'sweep.json')))
  assert plan['config'] == config_file
  assert [p['name'] for p in plan['points']] == [sweep.point_name(p) for p in points]


# ---------------------------------------------------------------------------- runner

class FakeTrainer:
  """Stands in for train.train_and_evaluate: logs a run's files, records the calls, and
  raises KeyboardInterrupt on the run named `interrupt`."""

  def __init__(self, interrupt=None):
    self.calls = []
    self.interrupt = interrupt

  def __call__(self, config, workdir):
    self.calls.append(os.path.basename(workdir))
    if os.path.basename(workdir) == self.interrupt:
      self.interrupt = None
      raise KeyboardInterrupt
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    miou = 0.5 + 0.1 * config.seed + config.optimizer.learning_rate
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': config.total_steps, 'split': 'train', 'loss': 1.0,
                          'steps_per_second': 4.0}) + '\n')
      f.write(json.dumps({'step': config.total_steps, 'split': 'val', 'miou': miou,
                          'iou/background': 0.9}) + '\n')
    return {'miou': miou}


def test_runner_skips_finished_points_and_resumes_the_interrupted_one(
    tmp_path, data_dir, monkeypatch):
  config = tiny_config(data_dir)
  config.lock()
  points = sweep.product(sweep.sweep('optimizer.learning_rate', [0.01, 0.02]), sweep.seeds(2))
  names = [sweep.point_name(p) for p in points]
  workdir = str(tmp_path)
  fake = FakeTrainer(interrupt=names[2])
  monkeypatch.setattr(sweep.train, 'train_and_evaluate', fake)

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(config, points, workdir, config_file='ablation.py')
  assert fake.calls == names[:3]
  interrupted = json.load(open(os.path.join(workdir, names[2], 'summary.json')))
  assert interrupted['finished'] is False and interrupted['wall_time_s'] >= 0

  fake.calls = []
  markdown = sweep.run_sweep(config, points, workdir, config_file='ablation.py')
  assert fake.calls == names[2:]  # finished points skipped, the interrupted one rerun
  assert '4 of 4 runs finished' in markdown
  summary = json.load(open(os.path.join(workdir, names[3], 'summary.json')))
  assert summary['finished'] and summary['overrides'] == points[3]
  assert summary['metrics']['miou'] == pytest.approx(0.5 + 0.1 + 0.02)
  assert summary['step_time_s'] == 0.25
  assert summary['latency_ms'] > 0  # measured after training
  resumed = json.load(open(os.path.join(workdir, names[2], 'summary.json')))
  assert resumed['finished'] and resumed['wall_time_s'] >= interrupted['wall_time_s']

  fake.calls = []
  sweep.run_sweep(config, points, workdir, config_file='ablation.py')
  assert fake.calls == []
  # A changed config is not the finished run any more: every point trains (resumes) again.
  longer = sweep.with_overrides(config, {'total_steps': 8})
  sweep.run_sweep(longer, points, workdir, config_file='ablation.py')
  assert fake.calls == names


def test_step_time_is_the_median_interval_without_compile_and_evaluation():
  # Log every 10 steps at 0.1 s/step; compile adds 20 s to the first interval and an
  # evaluation 5 s to the fourth. The trainer logs the average rate since it started.
  seconds = np.full(8, 1.0)
  seconds[0] += 20
  seconds[3] += 5
  steps = 10 * np.arange(1, 9)
  records = [{'step': int(step), 'split': 'train', 'steps_per_second': step / elapsed}
             for step, elapsed in zip(steps, np.cumsum(seconds))]
  records.insert(4, {'step': 40, 'split': 'val', 'miou': 0.5})
  assert sweep.median_step_time(records) == pytest.approx(0.1)
  # A resumed run: the median of the logged averages instead.
  averages = [1 / r['steps_per_second'] for r in records if r['split'] == 'train']
  assert sweep.median_step_time(records, resumed=True) == pytest.approx(np.median(averages))
  assert sweep.median_step_time([{'step': 40, 'split': 'val', 'miou': 0.5}]) is None


def test_runner_refuses_a_bad_point_before_training(tmp_path, data_dir, monkeypatch):
  fake = FakeTrainer()
  monkeypatch.setattr(sweep.train, 'train_and_evaluate', fake)
  config = tiny_config(data_dir)
  points = sweep.sweep('optimizer.name', ['adam', 'lamb'])
  with pytest.raises(ConfigError, match="point optimizer.name=lamb: unknown optimizer.name"):
    sweep.run_sweep(config, points, str(tmp_path), config_file='ablation.py')
  assert fake.calls == []


def test_tiny_sweep_end_to_end(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.total_steps = 2
  config.lock()
  points = sweep.product(sweep.sweep('model.features', [4, 8]), sweep.seeds(1))
  workdir = str(tmp_path)
  sweep.run_sweep(config, points, workdir, config_file='tiny.py')
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  assert [row['model.features'] for row in rows] == ['4', '8']
  for point, row in zip(points, rows):
    run_dir = os.path.join(workdir, sweep.point_name(point))
    final = [r for r in sweep.read_metrics(run_dir) if r['split'] == 'val'][-1]
    assert final['step'] == 2
    assert float(row['miou_mean']) == final['miou'] and row['miou_std'] == ''
    assert float(row['iou/background']) == final['iou/background']
    assert int(row['params']) == unet_parameters(point['model.features'], depth=2)
  lines = len(sweep.read_metrics(os.path.join(workdir, sweep.point_name(points[0]))))
  sweep.run_sweep(config, points, workdir, config_file='tiny.py')  # all finished: skipped
  assert len(sweep.read_metrics(os.path.join(workdir, sweep.point_name(points[0])))) == lines


# ---------------------------------------------------------------------------- report

def unet_parameters(features, depth, channels=3, classes=6):
  """segjax's U-Net parameter count by formula: 3x3 convs without bias, each followed by a
  BatchNorm (scale, bias); 2x2 transposed convs and the 1x1 classifier with biases."""
  def double_conv(cin, cout):
    return 9 * cin * cout + 9 * cout * cout + 4 * cout
  widths = [features * 2 ** level for level in range(depth + 1)]
  encoder = sum(double_conv(([channels] + widths)[level], widths[level])
                for level in range(depth + 1))
  decoder = sum(4 * widths[level + 1] * widths[level] + widths[level]
                + double_conv(2 * widths[level], widths[level]) for level in range(depth))
  return encoder + decoder + widths[0] * classes + classes


def write_fake_run(run_dir, metrics, curve, **summary):
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for step, miou in curve.items():
      f.write(json.dumps({'step': step, 'split': 'val', 'miou': miou}) + '\n')
  if summary:
    with open(os.path.join(run_dir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump({'metrics': metrics, **summary}, f)


def test_report_from_fake_finished_runs(tmp_path, data_dir):
  rng = np.random.default_rng(0)
  workdir = str(tmp_path)
  terms = [(('cross_entropy', 1.0),), (('cross_entropy', 1.0), ('dice', 0.5))]
  points = sweep.product(sweep.sweep('loss.terms', terms), sweep.seeds(3))
  expected = {}  # variant index -> list of per-run summaries
  for i, point in enumerate(points):
    metrics = {'miou': float(rng.uniform(0.5, 0.9)),
               **{f'iou/{name}': float(rng.uniform(0.3, 1.0)) for name in CLASSES}}
    if i == 1:
      del metrics['iou/ring']  # absent from that run's prediction and labels
    summary = {'finished': i != 5, 'overrides': point, 'params': 1000 + i // 3,
               'step_time_s': float(rng.uniform(0.05, 0.1)),
               'wall_time_s': float(rng.uniform(60, 120)),
               'latency_ms': float(rng.uniform(5, 20))}
    write_fake_run(os.path.join(workdir, sweep.point_name(point)), metrics,
                   {100: metrics['miou'] / 2, 200: metrics['miou']}, **summary)
    if i != 5:  # the last run did not finish: left out
      expected.setdefault(i // 3, []).append(summary | {'metrics': metrics})
  # A run started from a --dry_run command: no summary.json, only the trainer's files.
  cluster_config = tiny_config(data_dir)
  cluster_config.model.features = 6
  cluster_point = {'loss.terms': (('dice', 1.0),), 'seed': 0}
  cluster_dir = os.path.join(workdir, sweep.point_name(cluster_point))
  write_fake_run(cluster_dir, None, {3: 0.2, 6: 0.4})
  with open(os.path.join(cluster_dir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(cluster_config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'sweep.json'), 'w', encoding='utf-8') as f:
    json.dump({'config': 'ablation.py', 'points': [
        {'name': sweep.point_name(p), 'overrides': p} for p in points + [cluster_point]]}, f)

  markdown = sweep.write_report(workdir)
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  assert [row['loss.terms'] for row in rows] == [repr(t) for t in terms] + ["(('dice', 1.0),)"]
  assert '6 of 7 runs finished' in markdown
  for index, row in enumerate(rows[:2]):
    runs = expected[index]
    mious = [r['metrics']['miou'] for r in runs]
    assert int(row['seeds']) == len(runs)
    assert float(row['miou_mean']) == pytest.approx(np.mean(mious), abs=1e-15)
    assert float(row['miou_std']) == pytest.approx(np.std(mious, ddof=1), abs=1e-15)
    for name in CLASSES:
      present = [r['metrics'][f'iou/{name}'] for r in runs if f'iou/{name}' in r['metrics']]
      assert float(row[f'iou/{name}']) == pytest.approx(np.mean(present), abs=1e-15)
    assert int(row['params']) == 1000 + index
    assert float(row['step_time_s']) == pytest.approx(np.mean([r['step_time_s'] for r in runs]))
    assert float(row['wall_time_s']) == pytest.approx(np.mean([r['wall_time_s'] for r in runs]))
    assert float(row['latency_ms']) == pytest.approx(np.mean([r['latency_ms'] for r in runs]))
    cells = f"| {100 * np.mean(mious):.2f} ± {100 * np.std(mious, ddof=1):.2f} |"
    assert cells in markdown
  cluster = rows[2]
  assert float(cluster['miou_mean']) == 0.4 and cluster['miou_std'] == ''
  assert cluster['wall_time_s'] == cluster['step_time_s'] == cluster['latency_ms'] == ''
  assert int(cluster['params']) == unet_parameters(6, depth=2)
  with open(os.path.join(workdir, 'results.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_report_mode_of_launch(tmp_path):
  workdir = str(tmp_path)
  point = {'seed': 0}
  write_fake_run(os.path.join(workdir, sweep.point_name(point)),
                 {'miou': 0.75, 'iou/background': 0.5}, {10: 0.75}, finished=True,
                 overrides=point, params=12, step_time_s=0.1, wall_time_s=30.0)
  with open(os.path.join(workdir, 'sweep.json'), 'w', encoding='utf-8') as f:
    json.dump({'config': 'x.py', 'points': [{'name': 'seed=0', 'overrides': point}]}, f)
  report = subprocess.run([sys.executable, 'launch.py', '--mode', 'report',
                           f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  assert '| 1 | 75.00 | 50.00 | 0.000 | 100.0 | 0.5 |' in report.stdout
  assert os.path.exists(os.path.join(workdir, 'results.png'))
  missing = subprocess.run([sys.executable, 'launch.py', '--mode', 'report',
                            f'--workdir={tmp_path / "none"}'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert missing.returncode == 1 and 'error: no sweep.json in' in missing.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'error: --config is required (--mode report needs only --workdir)'),
    (['--config', 'experiments/unet.py', '--dry_run'], 'error: --dry_run is for --mode sweep'),
    (['--config', 'experiments/unet.py', '--mode', 'sweep'],
     'error: experiments/unet.py defines no get_hyper(h)'),
])
def test_bad_sweep_commands_fail_with_one_line(args, message):
  result = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  assert message in result.stderr and 'Traceback' not in result.stderr


def test_report_without_finished_runs_is_an_error(tmp_path):
  with open(tmp_path / 'sweep.json', 'w', encoding='utf-8') as f:
    json.dump({'config': 'x.py', 'points': [{'name': 'seed=0', 'overrides': {'seed': 0}}]}, f)
  with pytest.raises(SegjaxError, match='no finished runs'):
    sweep.write_report(str(tmp_path))


def test_plot_labels_name_the_last_field_component_and_weighted_terms_shortly():
  variant = {'loss.terms': (('cross_entropy', 1.0), ('dice', 0.5)),
             'loss.class_weighting': 'none', 'model.output_stride': 8}
  assert sweep._label(variant) == ('terms=cross_entropy + 0.5 dice, class_weighting=none, '
                                   'output_stride=8')
  assert sweep._label({}) == 'seeds only'
