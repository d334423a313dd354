"""Trains or evaluates a segjax experiment.

  python launch.py --config experiments/unet.py [--config.total_steps=4000] [--workdir DIR]
  python launch.py --config experiments/unet.py --mode eval

Rerunning the same command with the same workdir resumes from its latest checkpoint.
"""
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from segjax import train
from segjax.errors import SegjaxError

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with a variant: path.py[:arg].',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, logs and metrics (default: runs/<config name>).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (or resume) then evaluate; eval: evaluate the best checkpoint.')
flags.mark_flags_as_required(['config'])
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save and read at INFO
  config = load_config()
  workdir = FLAGS.workdir or default_workdir()
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir)
  except SegjaxError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
