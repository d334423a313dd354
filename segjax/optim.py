"""Optax optimizer and learning-rate schedule built from the config."""
import jax
import optax

from segjax.errors import ConfigError

SCHEDULES = ('constant', 'poly', 'cosine')
OPTIMIZERS = ('sgd', 'adam', 'adamw')


def learning_rate_schedule(config):
  """Step -> learning rate: linear warmup over `warmup_steps`, then `config.schedule`.

  'poly' decays as (1 - t)^poly_power and 'cosine' as (1 + cos(pi t)) / 2, t going from 0
  to 1 over the remaining steps, from the base rate to `end_learning_rate`; 'constant'
  stays at the base rate.
  """
  base, end = config.optimizer.learning_rate, config.end_learning_rate
  warmup = config.warmup_steps
  decay_steps = max(1, config.total_steps - warmup)
  if config.schedule == 'constant':
    decay = optax.constant_schedule(base)
  elif config.schedule == 'poly':
    decay = optax.polynomial_schedule(base, end, config.poly_power, decay_steps)
  elif config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base)
  else:
    raise ConfigError(f'unknown schedule {config.schedule!r}; valid: {", ".join(SCHEDULES)}')
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), decay], boundaries=[warmup])


def _decay_mask(params):
  """Weight decay applies to kernels (ndim > 1), not to biases or normalisation scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config):
  """The optax transformation of `config.optimizer.name`, with clipping and weight decay.

  'sgd' and 'adam' add coupled L2 weight decay to the gradient (as PyTorch's
  `weight_decay`); 'adamw' decays decoupled from the adaptive step (Loshchilov & Hutter).
  """
  name = config.optimizer.name
  schedule = learning_rate_schedule(config)
  decay = config.weight_decay
  if name == 'sgd':
    parts = [optax.add_decayed_weights(decay, _decay_mask),
             optax.sgd(schedule, momentum=config.optimizer.momentum,
                       nesterov=config.optimizer.nesterov)]
  elif name == 'adam':
    parts = [optax.add_decayed_weights(decay, _decay_mask),
             optax.adam(schedule, b1=config.optimizer.b1, b2=config.optimizer.b2)]
  elif name == 'adamw':
    parts = [optax.adamw(schedule, b1=config.optimizer.b1, b2=config.optimizer.b2,
                         weight_decay=decay, mask=_decay_mask)]
  else:
    raise ConfigError(f'unknown optimizer.name {name!r}; valid: {", ".join(OPTIMIZERS)}')
  if config.grad_clip_norm:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  return optax.chain(*parts)
