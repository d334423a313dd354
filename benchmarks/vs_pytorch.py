"""segjax (JAX) against PyTorch: the same architectures, shapes, loss and optimiser, one run.

  python benchmarks/vs_pytorch.py [--models unet,deeplabv3_r50,vit_ti_segmenter]
      [--batch 8 --size 128] [--steps 10 --warmup 2] [--xla_options KEY=VALUE,...]
      [--device cpu|gpu] [--half_precision] [--torch_compile] [--no-channels_last]
      [--other_jax /work/venv312/bin/python]

A model may take its own shape: `--models unet,deeplabv3_r50:4x256` (batch x side).

Models: the `train_step.py` suite entries named in MODELS, built by segjax; the PyTorch
side is `torch_models.from_flax` of the same flax model, and the script asserts that both
have the same number of trainable parameters (and the same multiset of parameter sizes).
Train step on both sides: forward in training mode, pixel-mean softmax cross-entropy
(ignore label as the dataset's), backward, Adam (lr `--learning_rate`, betas 0.9/0.999,
eps 1e-8, no weight decay). Data: one random batch (normal images, uniform labels), the
same arrays on both sides. JAX steps are `train_step.compile_step`'s jitted step (what the
trainer runs); PyTorch runs eager (`--torch_compile`: `torch.compile` of the model), NCHW
or channels_last (`--channels_last`, the default, PyTorch's faster CPU layout for convs).

Timing: `--warmup` steps of each side, then `--steps` repetitions in which every variant
takes one step, in an order rotated each repetition, so the machine's noise falls on all
of them. Figures per variant:
- step median (IQR): seconds of its timed steps; images/s = batch / median;
- GFLOP/s: the FLOPs of XLA's cost analysis of the JAX step (forward + backward + update;
  counted once and used for both frameworks, since the computation is the same) / median;
- % of peak: GFLOP/s over the measured peak, the best rate of a large square matmul
  (float32; bfloat16 with --half_precision) in numpy, JAX and PyTorch at startup;
- compile: JAX lowering + XLA compilation; PyTorch: its first step (eager allocation, or
  torch.compile's compilation with --torch_compile);
- peak MB: JAX: XLA's buffer assignment for the step (`train_step.step_memory_mb`: on CPU
  arguments + unaliased outputs + temporaries); PyTorch on CPU: parameters, buffers,
  optimizer state and batch held before the step plus the peak of the allocations during
  one step (torch.profiler with profile_memory, summed per op in time order); on CUDA:
  `torch.cuda.max_memory_allocated` over one step;
- loss: the first and last training loss (the batch is fixed, so it must fall).
`--xla_options` adds a JAX variant compiled with those XLA options on top of segjax's own
(`parallel.compiler_options`, which the plain JAX variant and the trainer use), e.g.
`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT` (a value may hold commas).
`--other_jax PYTHON` adds the same JAX step under another environment's JAX (JAX 0.11+
needs Python 3.12, this PyTorch build 3.11): a worker process under that interpreter
(`benchmarks/other_jax.py`) takes its turn in the same rotation, so the JAX/PyTorch ratio
of both JAX versions comes from one run (CPU only).
To time JAX with jaxlib's own defaults instead, name the option in XLA_FLAGS (segjax then
leaves it alone), e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution.
Memory allocator: the script re-executes itself under tcmalloc where installed, as launch.py
does (`segjax.host`), so both frameworks run under the allocator segjax trains with;
SEGJAX_TCMALLOC=0 times both with the system malloc. The header names the allocator.

Input pipeline: images/s of segjax's grain training stream (`pipeline.train_batches`:
decode, random rescale, crop, flip, normalise, batch) on the embedded shapes dataset at
each model's batch and size, measured alone before the steps; it must exceed the steps'.

PyTorch is a benchmark dependency only (`pip install torch`). The GPU path (--device gpu:
JAX's GPU backend and CUDA, --half_precision: segjax's bfloat16 compute and
torch.autocast bfloat16) has not been run.
"""
import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time

from segjax import host

if __name__ == '__main__':
  host.preload_tcmalloc()  # as launch.py (both frameworks then run under tcmalloc)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import other_jax
import torch_models
import train_step

from segjax import configs
from segjax import data as data_lib
from segjax import models as models_lib
from segjax.data import pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # command-line name -> train_step.SUITE label
    'unet': 'U-Net (depth 4, 64)',
    'deeplabv3_r50': 'DeepLab v3 R50 OS16',
    'vit_ti_segmenter': 'Segmenter ViT-Ti/16 mask',
}
PEAK_MATMUL_SIDE = {'cpu': 2048, 'gpu': 8192}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS),
                      help=f'comma-separated, from {sorted(MODELS)}; NAME:BxS sets its shape')
  parser.add_argument('--batch', type=int, default=8, help='global batch size')
  parser.add_argument('--size', type=int, default=128, help='square input side, pixels')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per variant')
  parser.add_argument('--learning_rate', type=float, default=1e-3, help='Adam, both sides')
  parser.add_argument('--xla_options', default='',
                      help='KEY=VALUE,... : add a JAX variant compiled with these XLA options')
  parser.add_argument('--other_jax', default='',
                      help='Python interpreter of another environment with segjax and another '
                      'JAX (e.g. a Python 3.12 venv: JAX 0.12): adds its JAX as a variant '
                      '(benchmarks/other_jax.py); CPU only')
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu', 'cuda'))
  parser.add_argument('--half_precision', action='store_true',
                      help='bfloat16 compute: segjax half_precision, torch.autocast')
  parser.add_argument('--torch_compile', action='store_true', help='torch.compile the model')
  parser.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                      help='PyTorch channels_last memory format (default on)')
  parser.add_argument('--pipeline_batches', type=int, default=20,
                      help='batches timed for the input pipeline; 0 skips it')
  parser.add_argument('--data_dir', default='',
                      help="shapes dataset directory ('': a temporary one)")
  return parser.parse_args(argv)


def model_shapes(models, batch, size):
  """'unet,deeplabv3_r50:4x256' -> [('unet', 8, 128), ('deeplabv3_r50', 4, 256)]."""
  shapes = []
  for entry in models.split(','):
    name, _, shape = entry.partition(':')
    if name not in MODELS:
      raise SystemExit(f'error: unknown model {name!r}; use one of {sorted(MODELS)}')
    entry_batch, entry_size = map(int, shape.split('x')) if shape else (batch, size)
    shapes.append((name, entry_batch, entry_size))
  return shapes


def xla_options(text):
  """'a=1,b=x,y' -> {'a': '1', 'b': 'x,y'}: a comma starts a new option only before KEY=."""
  return dict(item.split('=', 1) for item in re.split(r',(?=\w+=)', text) if item)


def benchmark_config(name, batch, size, args):
  """The suite's config of model `name` at `batch` x `size`, with the shared optimiser."""
  suite = {label: (path, overrides) for label, path, overrides in train_step.SUITE}
  path, overrides = suite[MODELS[name]]
  config = train_step.load_config(os.path.join(ROOT, path))
  config.model.update(overrides)
  config.batch_size, config.dataset.image_size = batch, size
  config.optimizer.name, config.optimizer.learning_rate = 'adam', args.learning_rate
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.weight_decay, config.grad_clip_norm = 0.0, 0.0
  config.schedule, config.warmup_steps = 'constant', 0
  config.half_precision = args.half_precision
  return config


# ---------------------------------------------------------------------------- machine peak

def _best_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return min(times)


def matmul_peaks(side, device, half, repeats=5):
  """{framework: GFLOP/s} of the best of `repeats` [side, side] @ [side, side] products."""
  flops = 2 * side**3
  peaks = {}
  if device == 'cpu' and not half:
    a = np.ones((side, side), np.float32)
    peaks['numpy'] = flops / _best_seconds(lambda: a @ a, repeats) / 1e9
  x = jnp.ones((side, side), jnp.bfloat16 if half else jnp.float32)
  product = jax.jit(lambda m: m @ m)
  peaks['jax'] = flops / _best_seconds(lambda: product(x).block_until_ready(), repeats) / 1e9
  t = torch.ones((side, side), dtype=torch.bfloat16 if half else torch.float32,
                 device=device)
  peaks['torch'] = flops / _best_seconds(lambda: _synchronized(t @ t, device), repeats) / 1e9
  return peaks


def _synchronized(result, device):
  if device == 'cuda':
    torch.cuda.synchronize()
  return result


# ---------------------------------------------------------------------------- input pipeline

def pipeline_images_per_second(size, batch, num_batches, data_dir):
  """Images/s of segjax's training stream on a small shapes dataset at `size`, `batch`."""
  config = configs.base_config()
  config.dataset.data_dir = data_dir
  config.dataset.image_size = size
  config.dataset.num_train, config.dataset.num_validation = max(64, 2 * batch), 8
  config.batch_size = batch
  spec = data_lib.get_spec(config.dataset)
  source = data_lib.load_sources(config.dataset)['train']
  batches = pipeline.train_batches(source, spec, config, start_step=0)
  next(batches)  # starts the reader threads
  started = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch / (time.perf_counter() - started)


# ---------------------------------------------------------------------------- the two sides

def torch_train_step(module, optimizer, images, labels, *, ignore_label, autocast):
  """One PyTorch step (forward, cross-entropy, backward, update) -> the loss tensor."""
  optimizer.zero_grad(set_to_none=True)
  with autocast:
    logits = module(images)
  loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_label)
  loss.backward()
  optimizer.step()
  return loss


def _held_bytes(module, optimizer, tensors):
  """Bytes of the parameters, buffers, optimizer state and `tensors` of a PyTorch step."""
  held = list(module.parameters()) + list(module.buffers()) + list(tensors)
  held += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
  return sum(t.numel() * t.element_size() for t in held)


def _cpu_step_peak_bytes(step):
  """Peak of the bytes allocated during `step()` (net per op, ops in time order)."""
  activities = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
    step()
  events = sorted((e for e in profile.events() if e.self_cpu_memory_usage),
                  key=lambda e: e.time_range.start)
  live = peak = 0
  for event in events:
    live += event.self_cpu_memory_usage
    peak = max(peak, live)
  return peak


def torch_variant(flax_model, batch, config, args, device):
  """(step: () -> (loss, seconds), {'params', 'compile_s', 'peak_mb'}, module)."""
  module = torch_models.from_flax(flax_model, batch['image'].shape[-1]).to(device).train()
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  module = module.to(memory_format=memory_format)
  images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).to(device)
  images = images.contiguous(memory_format=memory_format)
  labels = torch.from_numpy(batch['label']).long().to(device)
  optimizer = torch.optim.Adam(module.parameters(), lr=config.optimizer.learning_rate,
                               betas=(config.optimizer.b1, config.optimizer.b2), eps=1e-8)
  forward = torch.compile(module) if args.torch_compile else module
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16,
                            enabled=args.half_precision)
  ignore_label = data_lib.get_spec(config.dataset).ignore_label

  def step():
    started = time.perf_counter()
    loss = torch_train_step(forward, optimizer, images, labels, ignore_label=ignore_label,
                            autocast=autocast)
    loss = _synchronized(loss.item(), device)
    return loss, time.perf_counter() - started

  first_loss, first_s = step()
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated()
  else:
    peak = _held_bytes(module, optimizer, (images, labels)) + _cpu_step_peak_bytes(step)
  figures = {'params': torch_models.num_params(module), 'compile_s': first_s,
             'peak_mb': peak / 2**20, 'first_loss': first_loss}
  return step, figures, module


def check_same_parameters(flax_params, module, label):
  """Asserts equal trainable parameter counts and multisets of sizes (flax vs torch)."""
  flax_sizes = sorted(math.prod(x.shape) for x in jax.tree.leaves(flax_params))
  torch_sizes = sorted(p.numel() for p in module.parameters())
  assert flax_sizes == torch_sizes, (
      f'{label}: parameters differ: segjax {sum(flax_sizes)} in {len(flax_sizes)} arrays, '
      f'torch {sum(torch_sizes)} in {len(torch_sizes)}')


# ---------------------------------------------------------------------------- timing, report

def table_row(label, variant, batch, size, figures, times, gflops, peak, losses):
  q1, median, q3 = np.percentile(times, [25, 50, 75])
  rate = gflops / median
  return (f'| {label} | {variant} | {batch} x {size}x{size} | {figures["params"] / 1e6:.2f} M '
          f'| {median:.3f} s ({q1:.3f}-{q3:.3f}) | {batch / median:.1f} | {rate:.1f} '
          f'| {100 * rate / peak:.0f}% | {figures["compile_s"]:.1f} s '
          f'| {figures["peak_mb"]:.0f} | {losses[0]:.3f} -> {losses[-1]:.3f} |')


def benchmark_model(name, batch_size, size, args, device, peak, workers):
  """Builds, checks, warms up and times every variant of model `name`; prints its rows.

  workers: a contextlib.ExitStack that closes the `--other_jax` worker. Returns {variant:
  images/s}.
  """
  config = benchmark_config(name, batch_size, size, args)
  spec = data_lib.get_spec(config.dataset)
  batch = train_step.random_batch(config, spec.num_classes)
  flax_model = models_lib.get_model(config.model, spec.num_classes)
  label = MODELS[name]

  steps, figures, first_losses = {}, {}, {}
  jax_name = f'jax {jax.__version__}'
  steps[jax_name], figures[jax_name] = train_step.jax_variant(config, batch)
  if args.other_jax:
    worker = workers.enter_context(other_jax.Worker(args.other_jax, config))
    variant = f"jax {worker.figures['jax']}"
    steps[variant], figures[variant] = worker.step, worker.figures
    first_losses[variant] = worker.figures['first_loss']
  if args.xla_options:
    variant = f'{jax_name} [{args.xla_options}]'
    steps[variant], figures[variant] = train_step.jax_variant(config, batch,
                                                            xla_options(args.xla_options))
  variant = 'torch' + (' compile' if args.torch_compile else '') + (
      ' channels_last' if args.channels_last else '')
  steps[variant], figures[variant], module = torch_variant(flax_model, batch, config, args,
                                                           device)
  first_losses[variant] = figures[variant]['first_loss']
  shapes = jax.eval_shape(lambda: flax_model.init(
      jax.random.key(0), jnp.zeros((1, size, size, batch['image'].shape[-1])), train=False))
  check_same_parameters(shapes['params'], module, label)

  for variant, step in steps.items():
    for _ in range(args.warmup):
      loss, _ = step()
      first_losses.setdefault(variant, loss)
  results = train_step.alternate(steps, args.steps)
  gflops = figures[jax_name]['gflops']
  rates = {}
  for variant, (times, losses) in results.items():
    print(table_row(label, variant, batch_size, size, figures[variant], times, gflops, peak,
                    [first_losses.get(variant, losses[0]), losses[-1]]), flush=True)
    rates[variant] = batch_size / float(np.median(times))
  return rates


def main(argv=None):
  args = parse_args(argv)
  device = 'cuda' if args.device in ('gpu', 'cuda') else 'cpu'
  if device == 'cuda' and (jax.default_backend() != 'gpu' or not torch.cuda.is_available()):
    raise SystemExit(f'error: --device gpu needs JAX on GPU (got {jax.default_backend()}) '
                     f'and CUDA PyTorch (available: {torch.cuda.is_available()})')
  if device == 'cuda' and args.other_jax:
    raise SystemExit('error: --other_jax times CPU steps; on a GPU both JAX processes would '
                     'preallocate its memory')
  if device == 'cpu':
    torch.set_num_threads(os.cpu_count())
  shapes = model_shapes(args.models, args.batch, args.size)
  dtype = 'bfloat16' if args.half_precision else 'float32'
  side = PEAK_MATMUL_SIDE['gpu' if device == 'cuda' else 'cpu']
  peaks = matmul_peaks(side, device, args.half_precision)
  peak = max(peaks.values())
  jax_device = jax.devices()[0]
  print(f'{jax.device_count()} x {jax_device.platform} ({jax_device.device_kind}), '
        f'{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; '
        f'jax {jax.__version__}, torch {torch.__version__}; {dtype}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}; {host.malloc_in_use()} malloc')
  print(f'measured peak: {peak:.0f} GFLOP/s, the best {dtype} {side}x{side} matmul of ' +
        ', '.join(f'{k} {v:.0f}' for k, v in peaks.items()))
  print(f'{args.warmup} warm-up and {args.steps} timed steps per variant, alternating; '
        'GFLOP/step from XLA cost analysis of the JAX step, used for both frameworks.\n')

  if args.pipeline_batches:
    with tempfile.TemporaryDirectory() as scratch:
      for batch_size, size in sorted({(b, s) for _, b, s in shapes}):
        rate = pipeline_images_per_second(size, batch_size, args.pipeline_batches,
                                          args.data_dir or scratch)
        print(f'input pipeline (grain, shapes, {batch_size} x {size}x{size}): '
              f'{rate:.0f} images/s')
    print()

  print('| model | framework | batch x input | params | step median (IQR) | images/s '
        '| GFLOP/s | % of peak | compile | peak MB | loss |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  summary = []
  for name, batch_size, size in shapes:
    with contextlib.ExitStack() as workers:
      rates = benchmark_model(name, batch_size, size, args, device, peak, workers)
    torch_rate = [r for v, r in rates.items() if v.startswith('torch')][0]
    summary.append(f'{MODELS[name]}: JAX / PyTorch images/s = ' + ', '.join(
        f'{r / torch_rate:.2f} ({v})' for v, r in rates.items() if v.startswith('jax')))
  print('\n' + '\n'.join(summary))


if __name__ == '__main__':
  main()
