"""Trains tiny models a few steps in several parallel settings on the same global batches and
prints one JSON object of the results; run by tests/test_parallel.py in a subprocess with 8
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), so pytest keeps one.

Each run starts from the same initial state and sees the same three global batches
(image [16, 16, 16, 3], label [16, 16, 16] with 3 classes); a result holds its per-step
losses and final parameters and BatchNorm statistics, and a comparison the largest absolute
difference between two runs.
"""
import contextlib
import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import configs
from segjax import losses
from segjax import models
from segjax import optim
from segjax import parallel
from segjax import semi
from segjax import train

NUM_CLASSES = 3
BATCH, SIDE, STEPS = 16, 16, 3


class NoBatchNorm(nn.Module):
  """Two convolutions without BatchNorm: gradient accumulation is exact for it."""
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train):
    del train
    return nn.Conv(self.num_classes, (1, 1))(nn.relu(nn.Conv(8, (3, 3))(images)))


def make_config(semi_method='none'):
  config = configs.base_config()
  config.semi_supervised.method = semi_method
  config.optimizer.name = 'sgd'  # Adam would magnify float noise in near-zero gradients
  config.optimizer.learning_rate = 0.05
  config.schedule = 'constant'
  config.warmup_steps = 0
  return config


def make_batches(ignored_fraction):
  """STEPS global batches; a share `ignored_fraction` of the labels is the ignore label 255."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    label = rng.integers(0, NUM_CLASSES, (BATCH, SIDE, SIDE)).astype(np.int32)
    label[rng.random(label.shape) < ignored_fraction] = 255
    batches.append({'image': rng.normal(size=(BATCH, SIDE, SIDE, 3)).astype(np.float32),
                    'label': label})
  return batches


def with_unlabelled(batches):
  """`batches` with an 'unlabelled' batch of BATCH weak/strong views (every pixel valid, so
  per-device means of the consistency loss are global means)."""
  rng = np.random.default_rng(1)
  views = lambda: rng.normal(size=(BATCH, SIDE, SIDE, 3)).astype(np.float32)
  return [{**batch, 'unlabelled': {'weak': views(), 'strong': views(),
                                   'valid': np.ones((BATCH, SIDE, SIDE), bool)}}
          for batch in batches]


def run(model, batches, *, devices, parallelism='jit', grad_accum_steps=1, semi_method='none'):
  """Trains `model` on `batches` over the first `devices` devices -> (losses, params, stats,
  the final state). `semi_method` 'mean_teacher' runs `semi.semi_train_step` instead."""
  config = make_config(semi_method)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  init = functools.partial(train.create_train_state, model=model, config=config,
                           input_shape=(1, SIDE, SIDE, 3))
  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  options = dict(pixel_loss=losses.make_loss(config.loss, ignore_label=255, class_weights=None),
                 aux_loss_weight=0.4, learning_rate_fn=optim.learning_rate_schedule(config))
  if semi_method == 'none':
    step = functools.partial(train.train_step, **options, grad_accum_steps=grad_accum_steps)
  else:
    step = functools.partial(semi.semi_train_step, **options,
                             semi_config=config.semi_supervised)
  step = parallel.compile_step(step, mesh, parallelism)
  step_losses = []
  for batch in batches:
    state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(1))
    step_losses.append(float(metrics['loss']))
  params, stats = jax.device_get((state.params, state.batch_stats))
  return step_losses, params, stats, state


def max_difference(a, b):
  """Largest absolute difference between the losses, parameters and statistics of two runs."""
  leaves = zip(jax.tree.leaves(a[:3]), jax.tree.leaves(b[:3]))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def main():
  assert jax.device_count() == 8, jax.device_count()
  results = {}
  cnn = models.get_model(
      ml_collections.ConfigDict({'name': 'cnn', 'num_stages': 2, 'features': 4}), NUM_CLASSES)
  with_ignored = make_batches(ignored_fraction=0.1)
  one = run(cnn, with_ignored, devices=1)
  results['bn_1_vs_8_devices'] = max_difference(one, run(cnn, with_ignored, devices=8))
  results['losses'] = one[0]

  # Without the ignore label every device and every micro-batch has as many labelled pixels,
  # so means of per-device (per-micro-batch) pixel means are the global-batch means.
  plain = make_batches(ignored_fraction=0.0)
  eight = run(cnn, plain, devices=8)
  results['bn_jit_vs_pmap'] = max_difference(eight, run(cnn, plain, devices=8,
                                                         parallelism='pmap'))
  synced_batch_norm = models.layers.synced_batch_norm  # control: 'pmap' without sync BN
  models.layers.synced_batch_norm = lambda axis_name: contextlib.nullcontext()
  unsynced = run(cnn, plain, devices=8, parallelism='pmap')
  models.layers.synced_batch_norm = synced_batch_norm
  results['bn_jit_vs_pmap_without_sync'] = max_difference(eight, unsynced)

  no_bn = NoBatchNorm(NUM_CLASSES)
  whole = run(no_bn, plain, devices=8)
  results['accumulate_4_vs_whole'] = max_difference(whole, run(no_bn, plain, devices=8,
                                                               grad_accum_steps=4))
  results['accumulate_2_pmap_vs_whole'] = max_difference(
      whole, run(no_bn, plain, devices=8, parallelism='pmap', grad_accum_steps=2))
  # Control: with BatchNorm each micro-batch is normalised by its own statistics.
  results['bn_accumulate_4_vs_whole'] = max_difference(
      eight, run(cnn, plain, devices=8, grad_accum_steps=4))

  # Mean teacher: labelled and unlabelled images share the BatchNorm batch; the teacher
  # (an EMA of the synced student) is compared with the other state.
  semi_batches = with_unlabelled(plain)
  semi_jit = run(cnn, semi_batches, devices=8, semi_method='mean_teacher')
  semi_pmap = run(cnn, semi_batches, devices=8, parallelism='pmap', semi_method='mean_teacher')
  semi_one = run(cnn, semi_batches, devices=1, semi_method='mean_teacher')
  teacher = lambda result: jax.device_get((result[3].teacher['params'],
                                            result[3].teacher['batch_stats']))
  results['mean_teacher_jit_vs_pmap'] = max(max_difference(semi_jit, semi_pmap),
                                            max_difference(teacher(semi_jit), teacher(semi_pmap)))
  results['mean_teacher_1_vs_8_devices'] = max(max_difference(semi_one, semi_jit),
                                               max_difference(teacher(semi_one), teacher(semi_jit)))
  results['mean_teacher_moved'] = max_difference(teacher(semi_jit), semi_jit[1:3])

  half = run(cnn.clone(dtype=jnp.bfloat16), with_ignored, devices=8)
  state = half[3]
  results['half_param_dtypes'] = sorted({str(x.dtype) for x in jax.tree.leaves(
      (state.params, state.batch_stats, state.opt_state))})
  results['half_losses'] = half[0]
  images = jnp.asarray(with_ignored[0]['image'])
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = functools.partial(cnn.clone(dtype=jnp.bfloat16).apply, train=False)
  hlo = jax.jit(apply).lower(variables, images).as_text()
  results['half_logits_dtype'] = str(jax.eval_shape(apply, variables, images).dtype)
  results['half_bf16_convolutions'] = sum(  # the 1x1 classifier is a dot (layers.Conv)
      ('convolution' in line or 'dot_general' in line) and 'bf16' in line
      for line in hlo.splitlines())
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
