"""Optax optimizer and learning-rate schedule built from the config."""
import importlib
import re

import jax
import optax

from segjax.errors import ConfigError

SCHEDULES = ('constant', 'poly', 'cosine')
OPTIMIZERS = ('sgd', 'adam', 'adamw')
DECAYS = ('kernels', 'all')


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


def _path_name(path):
  """A flax parameter path as 'backbone/stages_0/blocks_1/attn/query/kernel'."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _layer_id_function(config):
  """The model module's `layer_id(path, num_layers)` for layer-wise learning-rate decay."""
  module = importlib.import_module(f'segjax.models.{config.model.name}')
  if not hasattr(module, 'layer_id'):
    raise ConfigError(f'optimizer.layer_decay needs a model that numbers its layers; model '
                      f'{config.model.name!r} does not (segjax.models.{config.model.name} has '
                      'no layer_id); set optimizer.layer_decay=0')
  return module.layer_id


def check_param_groups(param_groups):
  """Raises ConfigError unless `param_groups` is ((regex, lr_mult, decay_mult), ...)."""
  for group in param_groups:
    if (len(group) != 3 or not isinstance(group[0], str)
        or not all(isinstance(m, (int, float)) and m >= 0 for m in group[1:])):
      raise ConfigError(f'optimizer.param_groups entries must be (regex, lr_mult, decay_mult) '
                        f'with non-negative multipliers, got {group!r}')
    try:
      re.compile(group[0])
    except re.error as e:
      raise ConfigError(f'optimizer.param_groups pattern {group[0]!r} is not a regex: {e}') \
          from e


def parameter_labels(config):
  """params -> a tree of labels 'group{g}_layer{l}': g indexes `optimizer.param_groups` (the
  first whose regex matches the parameter's path, -1 for none), l the layer id of layer-wise
  decay (0 without it)."""
  groups = [re.compile(pattern) for pattern, _, _ in config.optimizer.param_groups]
  layer_id = _layer_id_function(config) if config.optimizer.layer_decay else None
  num_layers = config.optimizer.layer_decay_layers

  def label(path, _):
    name = _path_name(path)
    group = next((i for i, regex in enumerate(groups) if regex.search(name)), -1)
    layer = layer_id(tuple(name.split('/')), num_layers) if layer_id else 0
    return f'group{group}_layer{layer}'

  return lambda params: jax.tree_util.tree_map_with_path(label, params)


def _group_multipliers(config):
  """{label: (lr_mult, decay_mult)} for every label `parameter_labels` can give. Layer-wise
  decay scales layer l's rate by rate ** (num_layers + 1 - l), l in [0, num_layers + 1]
  (mmsegmentation's LearningRateDecayOptimizerConstructor)."""
  groups = [(1.0, 1.0)] + [(lr, decay) for _, lr, decay in config.optimizer.param_groups]
  rate, num_layers = config.optimizer.layer_decay, config.optimizer.layer_decay_layers
  layers = range(num_layers + 2) if rate else (0,)
  return {f'group{g}_layer{layer}': (lr * (rate ** (num_layers + 1 - layer) if rate else 1.0),
                                     decay)
          for g, (lr, decay) in enumerate(groups, start=-1) for layer in layers}


def _base_optimizer(config, schedule, decay, mask):
  """The optax transformation of `config.optimizer.name` at learning rate `schedule`.

  'sgd' and 'adam' add coupled L2 weight decay to the gradient (as PyTorch's
  `weight_decay`); 'adamw' decays decoupled from the adaptive step (Loshchilov & Hutter).
  """
  name, opt = config.optimizer.name, config.optimizer
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(decay, mask),
                       optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  if name == 'adam':
    return optax.chain(optax.add_decayed_weights(decay, mask),
                       optax.adam(schedule, b1=opt.b1, b2=opt.b2))
  if name == 'adamw':
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=decay, mask=mask)
  raise ConfigError(f'unknown optimizer.name {name!r}; valid: {", ".join(OPTIMIZERS)}')


def create_optimizer(config):
  """The optax transformation of `config.optimizer`, with clipping and weight decay.

  Weight decay applies to kernels only (`optimizer.decay='kernels'`) or to every parameter
  ('all', as mmengine's optimizers). Parameter groups (`optimizer.param_groups`, mmengine's
  paramwise_cfg custom_keys: the first regex found in a parameter's '/'-joined flax path
  gives its learning-rate and weight-decay multipliers) and layer-wise learning-rate decay
  (`optimizer.layer_decay`, the model's `layer_id`) run one optimizer per group through
  `optax.multi_transform`.
  """
  check_param_groups(config.optimizer.param_groups)
  if config.optimizer.decay not in DECAYS:
    raise ConfigError(f'unknown optimizer.decay {config.optimizer.decay!r}; valid: '
                      f'{", ".join(DECAYS)}')
  schedule = learning_rate_schedule(config)
  mask = _decay_mask if config.optimizer.decay == 'kernels' else None
  if not config.optimizer.param_groups and not config.optimizer.layer_decay:
    tx = _base_optimizer(config, schedule, config.weight_decay, mask)
  else:
    def scaled(lr_mult):
      return lambda step: lr_mult * schedule(step)
    tx = optax.multi_transform(
        {label: _base_optimizer(config, scaled(lr_mult), config.weight_decay * decay_mult, mask)
         for label, (lr_mult, decay_mult) in _group_multipliers(config).items()},
        parameter_labels(config))
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
