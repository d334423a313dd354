"""Cost of the jitted train step: parameters, FLOPs, compile time, step time, memory.

  python benchmarks/train_step.py --config experiments/unet.py [--config.batch_size=32]
  python benchmarks/train_step.py --suite [--batch_size 8 --size 128 --steps 5]
  python benchmarks/train_step.py --config experiments/deeplab.py --profile 20
  python benchmarks/train_step.py --suite --match 'SegFormer|UPerNet' \
      --other_jax /work/venv312/bin/python

With --config: one experiment config at its own batch size and crop. With --suite: every
model family and size in SUITE at one stated batch and square resolution, as a Markdown
table. Data are random (the input pipeline is not measured here). Figures:
- params: trainable parameters (BatchNorm statistics excluded);
- GFLOP/step: XLA's cost analysis of the compiled step (forward + backward + update);
- compile: seconds to lower and compile; step: median (and min) seconds of `--steps` timed
  steps after one warm-up; images/s = batch / median step;
- peak MB: XLA's buffer assignment for the step (`step_memory_mb`): its peak estimate where
  the backend gives one, else arguments + unaliased outputs + temporaries (CPU).
--other_jax PYTHON also times each step under that interpreter's segjax and JAX (e.g. a
Python 3.12 venv with JAX 0.12; `benchmarks/other_jax.py`), alternating step by step with
this process's, one row per JAX version. Set XLA_FLAGS before running to compare compiler
options. The script re-executes itself
under tcmalloc where installed, as launch.py does (`segjax.host`; SEGJAX_TCMALLOC=0 keeps
the system malloc); the header names the allocator.

--profile N (with --config) then traces `--steps` steps with jax.profiler and prints where
the step's time goes: milliseconds per step by XLA op kind (the fused instruction's name
without its number, e.g. ynn_fusion, copy_bitcast_fusion, dot) and the N slowest ops with
their output shape and the JAX operation they come from (the HLO op_name, e.g.
.../aspp/atrous2/Conv_0/conv_general_dilated, under transpose(...) for the backward pass).
Op times come from the trace events named after the compiled HLO instructions (XLA:CPU's
thunks); a backend whose events carry kernel names instead reports nothing there. The traced
step's wall time is printed next to their sum: work a thunk hands to a thread pool (XLA:CPU's
own convolutions) runs outside its event, so the sum can fall well short of the step.
"""
import collections
import contextlib
import functools
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time

from segjax import host

if __name__ == '__main__':
  host.preload_tcmalloc()  # as launch.py: before the slow imports below

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from segjax import data as data_lib
from segjax import losses
from segjax import models as models_lib
from segjax import parallel
from segjax import sweep
from segjax import train
from segjax.data import transforms
import other_jax
# pylint: enable=wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
flags.DEFINE_bool('suite', False, 'Benchmark every entry of SUITE instead of --config.')
flags.DEFINE_string('match', '', '--suite: only the entries whose label this regular '
                    "expression finds (e.g. 'SegFormer|UPerNet').")
flags.DEFINE_integer('batch_size', 8, '--suite: global batch size.')
flags.DEFINE_integer('size', 128, '--suite: square input side, pixels.')
flags.DEFINE_integer('steps', 10, 'Timed steps after the warm-up one.')
flags.DEFINE_string('other_jax', '', 'Python interpreter of another environment with segjax '
                    'and another JAX (e.g. a Python 3.12 venv: JAX 0.12): time each step '
                    'under both JAX versions, alternating (benchmarks/other_jax.py).')
flags.DEFINE_integer('profile', 0, '--config: also profile the step and print this many '
                     'slowest ops (0: no profile).')
FLAGS = flags.FLAGS

# The published ViT encoders (patch embedding, all blocks) over the CPU default's fields.
_PUBLISHED_VIT = ('stem=patch,stem_convs_per_stage=1,patch_size=16,depth=0,'
                  'pretrained_image_size=224')

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
    ('Segmenter ViT-Ti/8 conv stem, linear, 4 blocks (CPU default)',
     'experiments/segmenter.py', {}),
    ('Segmenter ViT-Ti/16 mask', f'experiments/segmenter.py:{_PUBLISHED_VIT},decoder=mask', {}),
    ('Segmenter ViT-S/16 mask',
     f'experiments/segmenter.py:{_PUBLISHED_VIT},size=small,decoder=mask', {}),
    ('Segmenter ViT-B/16 mask',
     f'experiments/segmenter.py:{_PUBLISHED_VIT},size=base,decoder=mask', {}),
    ('SegFormer-B0, 64-channel decoder (CPU default)', 'experiments/segformer.py', {}),
    ('SegFormer-B0', 'experiments/segformer.py:hf_segformer_b0_ade', {}),
    ('UPerNet reduced ConvNeXt (CPU default)', 'experiments/upernet.py', {}),
    ('UPerNet ConvNeXt-T', 'experiments/upernet.py:mmseg_upernet_convnext_tiny_ade', {}),
    ('UPerNet Swin-T', 'experiments/upernet.py:mmseg_upernet_swin_tiny_ade', {}),
    ('LR-ASPP MobileNetV3-Small (CPU default)', 'experiments/lraspp.py', {}),
    ('LR-ASPP MobileNetV3-Large',
     'experiments/lraspp.py:torchvision_lraspp_mobilenet_v3_large', {}),
)


load_config = sweep.load_config


def random_batch(config, num_classes, seed=0):
  """{'image': float32 [B, H, W, C] normal, 'label': int32 [B, H, W] uniform classes} (numpy)
  at `config`'s batch size, crop and channel count."""
  height, width = transforms.height_width(config.dataset.image_size)
  rng = np.random.default_rng(seed)
  return {
      'image': rng.normal(size=(config.batch_size, height, width,
                                len(config.dataset.mean))).astype(np.float32),
      'label': rng.integers(0, num_classes, (config.batch_size, height, width)).astype(np.int32),
  }


def step_memory_mb(compiled):
  """MB of buffers XLA assigns to one call of `compiled`: the backend's peak where it
  reports one (GPU), else arguments + outputs not aliased to them + temporaries (CPU)."""
  memory = compiled.memory_analysis()
  peak = getattr(memory, 'peak_memory_in_bytes', 0)
  if not peak:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return peak / 2**20


def compile_step(config, batch, compiler_options=None):
  """Builds `config`'s model and train state and compiles its train step for `batch`.

  batch: numpy {'image', 'label'} (`random_batch`); `config.half_precision` computes in
  bfloat16 as the trainer does. The step is jitted as the trainer's ('jit' parallelism of
  `parallel.compile_step`: shardings, donation, segjax's XLA options), with
  `compiler_options` added for this compilation only (e.g.
  {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}).
  Returns (compiled step, state, device batch, rng key, {'params', 'gflops', 'compile_s',
  'peak_mb'}); call `run_step(compiled, state, batch, key)` to step (the state is donated).
  """
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  if config.half_precision:
    model = model.clone(dtype=jnp.bfloat16)
  mesh = parallel.make_mesh()
  batch = parallel.to_global(batch, mesh)
  state = train.create_train_state(jax.random.key(0), model, config,
                                   (1, *batch['image'].shape[1:]))
  step = parallel.compile_step(functools.partial(
      train.train_step,
      pixel_loss=losses.make_loss(config.loss, ignore_label=spec.ignore_label,
                                  class_weights=config.loss.class_weights or None),
      aux_loss_weight=config.loss.aux_weight, learning_rate_fn=lambda _: 0.0), mesh, 'jit')
  key = jax.random.key(1)
  started = time.perf_counter()
  compiled = step.lower(state, batch, key).compile(compiler_options)
  compile_s = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, batch, key, {
      'params': sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      'gflops': cost.get('flops', float('nan')) / 1e9,
      'compile_s': compile_s,
      'peak_mb': step_memory_mb(compiled),
  }


def run_step(compiled, state, batch, key):
  """One step, waited for -> (new state, metrics, seconds)."""
  started = time.perf_counter()
  state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  return state, metrics, time.perf_counter() - started


def warm_step(config):
  """`compile_step` on a random batch of `config`, then one untimed step -> the same tuple,
  the figures with that step's 'first_loss'."""
  spec = data_lib.get_spec(config.dataset)
  compiled, state, batch, key, figures = compile_step(config,
                                                      random_batch(config, spec.num_classes))
  state, metrics, _ = run_step(compiled, state, batch, key)
  return compiled, state, batch, key, {**figures, 'first_loss': float(metrics['loss'])}


def jax_variant(config, batch, compiler_options=None):
  """`compile_step` as a step function: (step: () -> (loss, seconds), its figures)."""
  compiled, state, device_batch, key, figures = compile_step(config, batch, compiler_options)

  def step():
    nonlocal state
    state, metrics, seconds = run_step(compiled, state, device_batch, key)
    return float(metrics['loss']), seconds

  return step, figures


def alternate(steps, repetitions):
  """Runs each of `steps` ({name: () -> (loss, seconds)}) `repetitions` times, one of each
  per repetition in an order rotated every repetition, so the machine's noise falls on all
  of them -> {name: (seconds list, losses)}."""
  names = list(steps)
  results = {name: ([], []) for name in names}
  for rep in range(repetitions):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      loss, seconds = steps[name]()
      results[name][0].append(seconds)
      results[name][1].append(loss)
  return results


def measure(config, steps, other_python=''):
  """`config`'s step under this process's JAX and, with `other_python`, under that
  interpreter's JAX (`other_jax.Worker`), one warm-up step each, then `steps` timed steps
  alternating -> {jax version: {'params', 'gflops', 'compile_s', 'peak_mb', 'median_s',
  'min_s'}}."""
  spec = data_lib.get_spec(config.dataset)
  step, figures = jax_variant(config, random_batch(config, spec.num_classes))
  step()
  variants = {jax.__version__: (step, figures)}
  with contextlib.ExitStack() as stack:
    if other_python:
      worker = stack.enter_context(other_jax.Worker(other_python, config))
      version = worker.figures['jax']
      variants[version if version not in variants else f'{version} ({other_python})'] = (
          worker.step, worker.figures)
    results = alternate({version: step for version, (step, _) in variants.items()}, steps)
  return {version: {**figures, 'median_s': float(np.median(results[version][0])),
                    'min_s': min(results[version][0])}
          for version, (_, figures) in variants.items()}


def _instructions(hlo_text):
  """Compiled HLO text -> {instruction name: (output shape, JAX op_name or '')}."""
  found = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) ', line)
    if match:
      op_name = re.search(r'op_name="([^"]+)"', line)
      found[match.group(1)] = (match.group(2), op_name.group(1) if op_name else '')
  return found


def profile(config, steps):
  """Device time of `config`'s step per HLO instruction, from a jax.profiler trace of `steps`
  steps -> ([(ms per step, instruction, output shape, JAX op_name)], slowest first; median
  wall ms of the traced steps)."""
  compiled, state, batch, key, _ = warm_step(config)
  instructions = _instructions(compiled.as_text())
  seconds = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, _, step_s = run_step(compiled, state, batch, key)
      seconds.append(step_s)
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  micros = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in instructions:
      micros[event['name']] += event['dur']
  ops = [(us / 1e3 / steps, name, *instructions[name]) for name, us in micros.most_common()]
  return ops, float(np.median(seconds)) * 1e3


def print_profile(ops, step_ms, top):
  """Markdown tables of `profile`'s ops: time by op kind, then the `top` slowest ops."""
  total = sum(ms for ms, *_ in ops)
  kinds = collections.Counter()
  for ms, name, *_ in ops:
    kinds[re.sub(r'\.\d+$', '', name)] += ms
  print(f'\nstep {step_ms:.1f} ms (traced); named ops {total:.1f} ms per step. Ops on several '
        'threads overlap; work an op hands to a thread pool is outside its event (XLA:CPU\'s '
        'own convolutions show only their launch), so the sum can fall short of the step.\n')
  print('| op kind | ms / step | share |\n|---|---|---|')
  for kind, ms in kinds.most_common(12):
    print(f'| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |')
  print('\n| ms / step | op | output | from |\n|---|---|---|---|')
  for ms, name, shape, op_name in ops[:top]:
    print(f'| {ms:.1f} | {name} | {shape} | {op_name} |')


def row(label, version, config, figures):
  height, width = transforms.height_width(config.dataset.image_size)
  return (f"| {label} | {version} | {config.batch_size} x {height}x{width} "
          f"| {figures['params'] / 1e6:.2f} M "
          f"| {figures['gflops']:.1f} | {figures['compile_s']:.1f} s "
          f"| {figures['median_s'] * 1e3:.0f} ms ({figures['min_s'] * 1e3:.0f}) "
          f"| {config.batch_size / figures['median_s']:.1f} | {figures['peak_mb']:.0f} |")


def main(argv):
  del argv
  if FLAGS.suite:
    entries = []
    for label, path_and_arg, overrides in SUITE:
      if not re.search(FLAGS.match, label):
        continue
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
        f'{FLAGS.steps} timed steps, {host.malloc_in_use()} malloc')
  print('| model | jax | batch x input | params | GFLOP/step | compile | step median (min) '
        '| images/s | peak MB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for label, config in entries:
    for version, figures in measure(config, FLAGS.steps, FLAGS.other_jax).items():
      print(row(label, version, config, figures), flush=True)
  if FLAGS.profile and not FLAGS.suite:
    print_profile(*profile(FLAGS.config, FLAGS.steps), FLAGS.profile)


if __name__ == '__main__':
  app.run(main)
