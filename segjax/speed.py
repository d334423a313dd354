"""Inference speed of a model on random images: batch-1 latency and batched throughput.

The real-time question is how long one image takes: `measure` times the jitted inference
(`model.apply(..., train=False)`, logits at the input size, as evaluation and predict run
it) at batch 1 and at a larger batch, after a warm-up call; host transfers and the input
pipeline are not timed. Used by benchmarks/latency.py (every family) and by sweep reports
(mIoU against latency).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax import data as data_lib
from segjax import models as models_lib
from segjax.data import transforms


def compile_inference(config, batch, size, half_precision=False):
  """-> (compiled logits function of images [batch, H, W, C], variables, images,
  {'params', 'gflops_per_image', 'compile_s'}) for `config`'s model with random weights.
  size: an int side or (H, W) in pixels."""
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  if half_precision:
    model = model.clone(dtype=jnp.bfloat16)
  height, width = transforms.height_width(size)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch, height, width, len(config.dataset.mean))), jnp.float32)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  forward = jax.jit(functools.partial(model.apply, train=False))
  started = time.perf_counter()
  compiled = forward.lower(variables, images).compile()
  compile_s = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  return compiled, variables, images, {
      'params': params, 'gflops_per_image': cost.get('flops', float('nan')) / 1e9 / batch,
      'compile_s': compile_s}


def time_calls(compiled, variables, images, steps):
  """Seconds of each of `steps` calls after a warm-up one."""
  jax.block_until_ready(compiled(variables, images))
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    jax.block_until_ready(compiled(variables, images))
    times.append(time.perf_counter() - started)
  return times


def latency(config, size, steps=10, half_precision=False):
  """(median, min) milliseconds of one image through `config`'s model at `size`, and the
  `compile_inference` figures."""
  compiled, variables, images, figures = compile_inference(config, 1, size, half_precision)
  times = time_calls(compiled, variables, images, steps)
  return 1e3 * float(np.median(times)), 1e3 * min(times), figures


def measure(config, size, batch_size, steps, half_precision=False):
  """{'params', 'gflops_per_image', 'compile_s', 'latency_ms', 'latency_min_ms',
  'images_per_s'} of `config`'s model at `size` (the throughput at `batch_size`)."""
  median_ms, min_ms, figures = latency(config, size, steps, half_precision)
  compiled, variables, images, _ = compile_inference(config, batch_size, size, half_precision)
  batched = time_calls(compiled, variables, images, max(1, steps // 2))
  return {**figures, 'latency_ms': median_ms, 'latency_min_ms': min_ms,
          'images_per_s': batch_size / float(np.median(batched))}
