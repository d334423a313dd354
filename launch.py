"""Trains, evaluates or predicts with a segjax experiment.

  python launch.py --config experiments/unet.py [--config.total_steps=4000] [--workdir DIR]
  python launch.py --config experiments/unet.py --mode eval
  python launch.py --config experiments/unet.py --mode predict --images DIR_OR_GLOB --output DIR
  python launch.py --config experiments/unet.py --mode export --output DIR [--export_size HxW]
  python launch.py --config experiments/ablations/unet_size.py --mode sweep [--dry_run]
  python launch.py --mode report --workdir runs/unet_size

Rerunning the same command with the same workdir resumes from its latest checkpoint (a
sweep skips its finished points and resumes the interrupted one).
"""
import os
import re
import sys

from segjax import host

if __name__ == '__main__':
  host.preload_tcmalloc()  # before the slow imports below: re-executes under tcmalloc

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from segjax import export
from segjax import parallel
from segjax import predict
from segjax import sweep
from segjax import train
from segjax.errors import SegjaxError
# pylint: enable=wrong-import-position

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with a variant: path.py[:arg].',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, logs and metrics (default: runs/<config name>).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export', 'sweep', 'report'],
                  'train: train (or resume) then evaluate; eval: evaluate the best checkpoint; '
                  'predict: label the --images with the best checkpoint into --output; '
                  'export: write the best checkpoint as model.stablehlo, model.onnx and '
                  'model.json into --output; '
                  "sweep: train every point of the config file's get_hyper in <workdir>/<point>; "
                  "report: rewrite a sweep's results.md/csv/png in --workdir.")
flags.DEFINE_bool('dry_run', False,
                  '--mode sweep: print one launch command per point instead of training.')
flags.DEFINE_string('images', None, '--mode predict: a directory of images (not recursive), '
                    'a quoted glob ("**" recurses) or one image file.')
flags.DEFINE_string('output', None, '--mode predict: directory for <stem>.png (class-index '
                    'palette PNG) and <stem>_overlay.png per image; --mode export: directory '
                    'for model.stablehlo, model.onnx and model.json.')
flags.DEFINE_string('export_size', None, '--mode export: the input size, a side or HxW '
                    '(default: dataset.eval_pad_size, else the crop dataset.image_size).')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process runs: host:port of process 0, the same for every process; '
                    'with --num_processes and --process_id. TPU pods and SLURM jobs need none '
                    'of the three (detected).')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: how many processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this one, in [0, num_processes).')
FLAGS = flags.FLAGS


def default_workdir():
  """runs/<config file stem>[_<variant arg>], e.g. runs/unet or runs/unet_depth=4."""
  path, _, arg = config_flags.get_config_filename(FLAGS['config']).partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += '_' + re.sub(r'[^\w=.-]+', '_', arg)
  return os.path.join('runs', name)


def parse_flags(argv):
  """absl's flag parsing, with a bad variant argument or override reported as one line."""
  try:
    return FLAGS(argv)
  except (SegjaxError, flags.Error) as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # --config.<field> names no field of the config
    field = str(e).strip('"\'')
    given = [a.split('=')[0] for a in argv if a.startswith('--config.') and field in a]
    sys.exit(f'error: {given[0] if given else field} names no field of the config; the '
             'experiment file and segjax/configs.py list the fields')


def load_config():
  """FLAGS.config, or exit with one line naming the file and why it did not load."""
  config = FLAGS.config
  try:
    config.keys()  # a config file that failed to load raises on first use
  except OSError as e:
    path = config_flags.get_config_filename(FLAGS['config'])
    reason = str(e).strip().splitlines()[-1].strip()
    sys.exit(f'error: cannot load config file {path}: {reason}')
  return config


def sweep_or_report():
  """--mode sweep: trains (or with --dry_run prints) every point of the config's sweep;
  --mode report: rewrites the results of the sweep in the workdir from its finished runs."""
  workdir = FLAGS.workdir or default_workdir()
  try:
    if FLAGS.mode == 'report':
      print(sweep.write_report(workdir))
      return
    config, config_file = load_config(), config_flags.get_config_filename(FLAGS['config'])
    points = sweep.load_points(config_file)
    if FLAGS.dry_run:
      overrides = config_flags.get_override_values(FLAGS['config'])
      print('\n'.join(sweep.dry_run(config_file, overrides, points, workdir)))
    else:
      print(sweep.run_sweep(config, points, workdir, config_file=config_file))
  except SegjaxError as e:
    sys.exit(f'error: {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save and read at INFO
  if FLAGS.config is None and not (FLAGS.mode == 'report' and FLAGS.workdir):
    sys.exit('error: --config is required (--mode report needs only --workdir)')
  if FLAGS.dry_run and FLAGS.mode != 'sweep':
    sys.exit('error: --dry_run is for --mode sweep')
  if FLAGS.mode in ('sweep', 'report'):
    sweep_or_report()
    return
  if FLAGS.mode == 'predict' and not (FLAGS.images and FLAGS.output):
    sys.exit('error: --mode predict needs --images DIR_OR_GLOB and --output DIR')
  if FLAGS.mode == 'export' and not FLAGS.output:
    sys.exit('error: --mode export needs --output DIR')
  if FLAGS.images and FLAGS.mode != 'predict':
    sys.exit('error: --images is for --mode predict')
  if FLAGS.output and FLAGS.mode not in ('predict', 'export'):
    sys.exit('error: --output is for --mode predict and --mode export')
  if FLAGS.export_size and FLAGS.mode != 'export':
    sys.exit('error: --export_size is for --mode export')
  config = load_config()
  workdir = FLAGS.workdir or default_workdir()
  try:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)  # before anything touches devices
    advice = host.tcmalloc_advice(jax.default_backend())
    if advice and jax.process_index() == 0:
      logging.warning(advice)
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == 'eval':
      train.evaluate_checkpoint(config, workdir)
    elif FLAGS.mode == 'export':
      export.export_model(config, workdir, FLAGS.output, FLAGS.export_size)
    else:
      predict.predict_files(config, workdir, FLAGS.images, FLAGS.output)
  except SegjaxError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
