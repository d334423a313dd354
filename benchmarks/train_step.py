"""Cost of the jitted train step: parameters, FLOPs, compile time, step time, memory.

  python benchmarks/train_step.py --config experiments/unet.py [--config.batch_size=32]
  python benchmarks/train_step.py --suite [--batch_size 8 --size 128 --steps 5]

With --config: one experiment config at its own batch size and crop. With --suite: every
model family and size in SUITE at one stated batch and square resolution, as a Markdown
table. Data are random (the input pipeline is not measured here). Figures:
- params: trainable parameters (BatchNorm statistics excluded);
- GFLOP/step: XLA's cost analysis of the compiled step (forward + backward + update);
- compile: seconds to lower and compile; step: median (and min) seconds of `--steps` timed
  steps after one warm-up; images/s = batch / median step;
- peak MB: XLA's peak buffer estimate for the step (`memory_analysis().peak_memory_in_bytes`).
Set XLA_FLAGS before running to compare compiler options.
"""
import math
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from segjax import data as data_lib
from segjax import losses
from segjax import models as models_lib
from segjax import parallel
from segjax import train
from segjax.data import transforms

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
flags.DEFINE_bool('suite', False, 'Benchmark every entry of SUITE instead of --config.')
flags.DEFINE_integer('batch_size', 8, '--suite: global batch size.')
flags.DEFINE_integer('size', 128, '--suite: square input side, pixels.')
flags.DEFINE_integer('steps', 10, 'Timed steps after the warm-up one.')
FLAGS = flags.FLAGS

# (label, experiment config and its argument, model field overrides).
SUITE = (
    ('cnn (4 stages, 16)', 'experiments/cnn.py', {}),
    ('U-Net (depth 3, 16)', 'experiments/unet.py', {}),
    ('U-Net (depth 4, 64)', 'experiments/unet.py:depth=4,features=64', {}),
    ('FCN-8s R18/4 (CPU default)', 'experiments/fcn.py', {}),
    ('FCN-8s VGG16', 'experiments/fcn.py:backbone=vgg16,width=64', {}),
    ('FCN R50 atrous OS8 + aux head',
     'experiments/fcn.py:backbone=resnet50,width=64,variant=8s_atrous,aux_head=True', {}),
    ('DeepLab v3+ R18/4 OS16 (CPU default)', 'experiments/deeplab.py', {}),
    ('DeepLab v3 R50 OS16', 'experiments/deeplab.py:variant=v3,backbone=resnet50,width=64',
     {'aspp_features': 256}),
    ('DeepLab v3+ R50 OS16',
     'experiments/deeplab.py:backbone=resnet50,width=64',
     {'aspp_features': 256, 'low_level_features': 48, 'decoder_features': 256}),
    ('DeepLab v3+ R50 OS8',
     'experiments/deeplab.py:backbone=resnet50,width=64,output_stride=8',
     {'aspp_features': 256, 'low_level_features': 48, 'decoder_features': 256}),
    ('DeepLab v3+ R101 OS16',
     'experiments/deeplab.py:backbone=resnet101,width=64',
     {'aspp_features': 256, 'low_level_features': 48, 'decoder_features': 256}),
    ('Segmenter ViT-Ti/8 linear, 4 blocks (CPU default)', 'experiments/segmenter.py', {}),
    ('Segmenter ViT-Ti/16 mask',
     'experiments/segmenter.py:decoder=mask,patch_size=16,depth=0,pretrained_image_size=224',
     {}),
    ('Segmenter ViT-S/16 mask', 'experiments/segmenter.py:size=small,decoder=mask,'
     'patch_size=16,depth=0,pretrained_image_size=224', {}),
    ('Segmenter ViT-B/16 mask', 'experiments/segmenter.py:size=base,decoder=mask,'
     'patch_size=16,depth=0,pretrained_image_size=224', {}),
)


def load_config(path_and_arg):
  """'experiments/x.py:arg' -> that file's get_config(arg)."""
  path, _, arg = path_and_arg.partition(':')
  namespace = {'__file__': path}
  with open(path, encoding='utf-8') as f:
    exec(compile(f.read(), path, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['get_config'](arg or None)


def measure(config, steps):
  """{'params', 'gflops', 'compile_s', 'median_s', 'min_s', 'peak_mb'} of `config`'s step."""
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  height, width = transforms.height_width(config.dataset.image_size)
  channels = len(config.dataset.mean)
  rng = np.random.default_rng(0)
  mesh = parallel.make_mesh()
  batch = parallel.to_global({
      'image': rng.normal(size=(config.batch_size, height, width, channels)).astype(
          np.float32),
      'label': rng.integers(0, spec.num_classes, (config.batch_size, height, width)).astype(
          np.int32),
  }, mesh)
  state = train.create_train_state(jax.random.key(0), model, config,
                                   (1, height, width, channels))
  step = jax.jit(lambda s, b, r: train.train_step(
      s, b, r, pixel_loss=losses.make_loss(config.loss, ignore_label=spec.ignore_label,
                                           class_weights=config.loss.class_weights or None),
      aux_loss_weight=config.loss.aux_weight, learning_rate_fn=lambda _: 0.0),
      donate_argnums=0)
  key = jax.random.key(1)
  started = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, batch, key)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - started)
  return {
      'params': sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      'gflops': cost.get('flops', float('nan')) / 1e9,
      'compile_s': compile_s,
      'median_s': float(np.median(times)),
      'min_s': min(times),
      'peak_mb': getattr(memory, 'peak_memory_in_bytes', 0) / 2**20,
  }


def row(label, config, figures):
  height, width = transforms.height_width(config.dataset.image_size)
  return (f"| {label} | {config.batch_size} x {height}x{width} | {figures['params'] / 1e6:.2f} M "
          f"| {figures['gflops']:.1f} | {figures['compile_s']:.1f} s "
          f"| {figures['median_s'] * 1e3:.0f} ms ({figures['min_s'] * 1e3:.0f}) "
          f"| {config.batch_size / figures['median_s']:.1f} | {figures['peak_mb']:.0f} |")


def main(argv):
  del argv
  if FLAGS.suite:
    entries = []
    for label, path_and_arg, overrides in SUITE:
      config = load_config(path_and_arg)
      config.model.update(overrides)
      config.batch_size, config.dataset.image_size = FLAGS.batch_size, FLAGS.size
      entries.append((label, config))
  elif FLAGS.config is not None:
    entries = [(FLAGS.config.model.name, FLAGS.config)]
  else:
    raise app.UsageError('pass --config FILE or --suite')
  device = jax.devices()[0]
  print(f'{jax.device_count()} x {device.platform} ({device.device_kind}), jax {jax.__version__}, '
        f'{FLAGS.steps} timed steps')
  print('| model | batch x input | params | GFLOP/step | compile | step median (min) '
        '| images/s | peak MB |')
  print('|---|---|---|---|---|---|---|---|')
  for label, config in entries:
    print(row(label, config, measure(config, FLAGS.steps)), flush=True)


if __name__ == '__main__':
  app.run(main)
