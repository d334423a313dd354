"""Times the jitted train step of an experiment config on random data.

  python benchmarks/train_step.py --config experiments/unet.py [--config.batch_size=32] [--steps 20]

Prints compile time and the median/min step time in seconds and images per second.
Set XLA_FLAGS before running to compare compiler options.
"""
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from segjax import data as data_lib
from segjax import models as models_lib
from segjax import parallel
from segjax import train
from segjax.data import transforms

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
flags.DEFINE_integer('steps', 20, 'Timed steps after the first (compiling) one.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  height, width = transforms.height_width(config.dataset.image_size)
  channels = len(config.dataset.mean)
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.normal(size=(config.batch_size, height, width, channels)).astype(
          np.float32),
      'label': rng.integers(0, spec.num_classes, (config.batch_size, height, width)).astype(
          np.int32),
  }
  mesh = parallel.make_mesh()
  state = train.create_train_state(jax.random.key(0), model, config,
                                   (1, height, width, channels))
  step = jax.jit(lambda s, b, r: train.train_step(
      s, b, r, ignore_label=spec.ignore_label, class_weights=None,
      aux_loss_weight=config.loss.aux_weight, learning_rate_fn=lambda _: 0.0),
      donate_argnums=0)
  batch = parallel.to_global(batch, mesh)
  key = jax.random.key(1)
  started = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - started
  times = []
  for _ in range(FLAGS.steps):
    started = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - started)
  median = float(np.median(times))
  print(f'{config.model.name} batch {config.batch_size} x {height}x{width}: compile+first '
        f'{compile_seconds:.1f} s, step median {median * 1e3:.1f} ms (min '
        f'{min(times) * 1e3:.1f}), {config.batch_size / median:.1f} images/s, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)')


if __name__ == '__main__':
  app.run(main)
