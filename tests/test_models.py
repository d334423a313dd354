"""Model output shapes, BatchNorm modes, and the model lookup by name."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from segjax import models
from segjax.errors import ConfigError


@pytest.mark.parametrize('name,fields', [
    ('cnn', {'num_stages': 3, 'features': 4}),
    ('unet', {'depth': 2, 'features': 4}),
])
def test_logits_at_input_resolution_and_batchnorm_modes(name, fields):
  model = models.get_model(ml_collections.ConfigDict({'name': name, **fields}), num_classes=5)
  images = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (2, 16, 24, 5) and logits.dtype == jnp.float32
  # Training mode normalises with batch statistics and updates the running averages.
  train_logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert train_logits.shape == logits.shape
  assert not jnp.allclose(train_logits, logits)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_unet_depth_and_width_set_the_architecture():
  config = ml_collections.ConfigDict({'name': 'unet', 'depth': 3, 'features': 8})
  model = models.get_model(config, num_classes=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
  kernels = [x.shape for x in jax.tree.leaves(variables['params']) if x.ndim == 4]
  # 2 convs per level (3 encoder, 1 bottleneck, 3 decoder) + 3 up-convs + classifier.
  assert len(kernels) == 2 * 7 + 3 + 1
  assert max(k[-1] for k in kernels) == 8 * 2 ** 3
  with pytest.raises(ValueError, match='divisible by 8'):
    model.init(jax.random.key(0), jnp.zeros((1, 20, 32, 1)), train=False)


def test_unknown_model_name_and_field_are_refused_with_the_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown model.name 'mask2former'.*cnn.*unet"):
    models.get_model(ml_collections.ConfigDict({'name': 'mask2former'}), num_classes=2)
  with pytest.raises(ConfigError, match=r"no field\(s\) \['widht'\].*'features'"):
    models.get_model(ml_collections.ConfigDict({'name': 'unet', 'widht': 3}), num_classes=2)
