"""Models by module name: `config.model.name = 'unet'` -> `segjax.models.unet.Model`.

Every model module exposes a `flax.linen` `Model` whose `__call__(images, *, train)` maps
images [B, H, W, C] to logits [B, H, W, num_classes] at input resolution.
"""
import dataclasses
import importlib
import pkgutil

from segjax.errors import ConfigError
from segjax.models import layers

_NOT_MODELS = ('attention', 'backbones', 'kernels', 'layers')  # the backbones and building blocks


def model_names():
  """Names of the modules in this package that define a `Model`."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_MODELS)


def get_model(model_config, num_classes):
  """Builds `Model(num_classes=..., **fields)` from `model_config` (a ConfigDict with `name`)."""
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in model_names():
    raise ConfigError(f'unknown model.name {name!r}; valid names: {", ".join(model_names())}')
  model_class = importlib.import_module(f'segjax.models.{name}').Model
  accepted = {f.name for f in dataclasses.fields(model_class)} - {'parent', 'name'}
  unknown = sorted(set(fields) - accepted)
  if unknown:
    raise ConfigError(f'model {name!r} has no field(s) {unknown}; its fields are '
                      f'{sorted(accepted - {"num_classes"})}')
  try:
    return model_class(num_classes=num_classes, **fields)
  except ValueError as e:  # a field's value refused at construction
    raise ConfigError(f'model {name!r}: {e}') from e


def train_forward(apply_fn, variables, images, dropout_rng, axis_name=None):
  """A training-mode forward pass -> (logits, aux_logits, batch_stats).

  images [B, H, W, C] -> logits [B, H, W, num_classes]; aux_logits: the logits [B, H, W,
  num_classes] of the auxiliary heads, which a model sows as 'aux_logits' in
  'intermediates' (an empty tuple without one); batch_stats: the updated BatchNorm
  statistics (those of `variables` for a model without BatchNorm). With `axis_name`,
  BatchNorm averages its statistics over that axis (sync BN).
  """
  with layers.synced_batch_norm(axis_name):
    logits, updates = apply_fn(variables, images, train=True,
                               mutable=['batch_stats', 'intermediates'],
                               rngs={'dropout': dropout_rng})
  aux_logits = updates.get('intermediates', {}).get('aux_logits', ())
  return logits, aux_logits, updates.get('batch_stats', variables['batch_stats'])
