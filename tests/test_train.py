"""The train step, optimizer, checkpoints and config validation on a tiny U-Net."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from segjax import checkpoint
from segjax import configs
from segjax import losses
from segjax import models
from segjax import optim
from segjax import parallel
from segjax import train
from segjax.errors import ConfigError, SegjaxError
from conftest import tiny_config


@pytest.fixture(scope='module')
def experiment(data_dir, tmp_path_factory):
  """One compiled tiny experiment shared by the tests of this module."""
  return train.Experiment(tiny_config(data_dir), str(tmp_path_factory.mktemp('workdir')))


def fresh_state(experiment):
  # The train step donates its input state, so each test starts from its own copy.
  return jax.tree.map(jnp.copy, experiment.initial_state)


def global_batch(experiment, step=0):
  return parallel.to_global(next(experiment.train_batches(step)), experiment.mesh)


def test_train_steps_decrease_the_loss(experiment):
  state, batch = fresh_state(experiment), global_batch(experiment)
  losses = []
  for _ in range(20):
    state, metrics = experiment.train_step(state, batch, experiment.train_rng)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.85 * losses[0], losses
  assert int(state.step) == 20


def test_checkpoint_restores_identical_state_and_next_loss(experiment, tmp_path):
  state = fresh_state(experiment)
  for step in range(3):
    state, _ = experiment.train_step(state, global_batch(experiment, step),
                                     experiment.train_rng)
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2)
  saver.save(state)
  saver.wait()
  restored = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2).restore(
      fresh_state(experiment))
  assert int(restored.step) == 3
  expected = jax.device_get((state.params, state.batch_stats, state.opt_state))
  got = jax.device_get((restored.params, restored.batch_stats, restored.opt_state))
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  batch = global_batch(experiment, 3)
  _, metrics_a = experiment.train_step(state, batch, experiment.train_rng)
  _, metrics_b = experiment.train_step(restored, batch, experiment.train_rng)
  assert float(metrics_a['loss']) == float(metrics_b['loss'])


def test_best_checkpoint_keeps_the_highest_miou(experiment, tmp_path):
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2)
  state = fresh_state(experiment)
  for step, miou in [(1, 0.3), (2, 0.5), (3, 0.4)]:
    saver.save_if_best(state.replace(step=jnp.asarray(step)), miou)
    saver.wait()
  assert saver.best.best_step() == 2
  assert saver.restore(fresh_state(experiment), 'latest') is None


def test_evaluate_counts_every_validation_pixel(experiment, sources):
  result = experiment.evaluate(experiment.initial_state)
  labels = np.stack([sources['validation'][i]['segmentation_mask'][..., 0] for i in range(10)])
  assert result['confusion'].sum() == np.sum(labels != experiment.spec.ignore_label)


def test_learning_rate_schedules():
  config = configs.base_config()
  config.total_steps, config.warmup_steps = 110, 10
  config.optimizer.learning_rate = 1.0
  for name, mid in [('constant', 1.0), ('poly', 0.5 ** 0.9), ('cosine', 0.5)]:
    config.schedule = name
    schedule = optim.learning_rate_schedule(config)
    assert float(schedule(5)) == pytest.approx(0.5)  # linear warmup
    assert float(schedule(60)) == pytest.approx(mid, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1.0 if name == 'constant' else 0.0, abs=1e-6)


def test_weight_decay_skips_biases_and_norm_scales():
  config = configs.base_config()
  config.optimizer.name, config.weight_decay, config.optimizer.learning_rate = 'sgd', 0.1, 1.0
  config.optimizer.momentum, config.warmup_steps = 0.0, 0
  config.schedule = 'constant'
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}
  tx = optim.create_optimizer(config)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.1)
  np.testing.assert_allclose(updates['bias'], 0.0)


@pytest.mark.parametrize('field,value,message', [
    ('optimizer.name', 'lamb', "unknown optimizer.name 'lamb'; valid: sgd, adam, adamw"),
    ('schedule', 'step', "unknown schedule 'step'"),
    ('model.name', 'nope', "unknown model.name 'nope'; valid names: cnn, deeplab, .*unet"),
    ('dataset.name', 'nope', "unknown dataset.name 'nope'; valid names: ade20k, cityscapes, coco_voc, folder, pets, shapes, voc"),
    ('batch_size', 0, 'batch_size must be positive'),
    ('loss.class_weights', (1.0, 2.0), 'loss.class_weights has 2 values'),
])
def test_invalid_config_is_refused_before_building(field, value, message):
  config = tiny_config('/nonexistent')
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    configs.validate(config)


def test_batch_must_divide_over_devices(monkeypatch):
  config = tiny_config('/nonexistent')
  config.batch_size = 6
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  with pytest.raises(ConfigError, match='batch_size=6 is not divisible by the 4 devices'):
    configs.validate(config)


def test_checkpoint_of_another_model_is_refused(experiment, tmp_path):
  saver = checkpoint.Checkpoints(str(tmp_path), max_to_keep=2)
  saver.save(fresh_state(experiment))
  saver.wait()
  wider = models.get_model(
      ml_collections.ConfigDict({'name': 'unet', 'depth': 2, 'features': 8}), num_classes=6)
  other = train.create_train_state(jax.random.key(0), wider, experiment.config, (1, 32, 32, 3))
  with pytest.raises(SegjaxError, match=(
      r'checkpoint .*/checkpoints/0 does not fit this config.s model: mis-shaped \(saved != '
      r'model\) params: ConvTranspose_0/bias \(8,\) != \(16,\)')):
    checkpoint.Checkpoints(str(tmp_path), max_to_keep=2).restore(other)


class _ModelWithAuxHead(nn.Module):
  """Two 1x1 convolutions: the main logits, and auxiliary logits sown as a real model does."""

  @nn.compact
  def __call__(self, images, *, train):
    if train:
      self.sow('intermediates', 'aux_logits', nn.Conv(3, (1, 1), name='aux')(images))
    return nn.Conv(3, (1, 1), name='main')(images)


def _numpy_cross_entropy(logits, labels, ignore_label):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != ignore_label
  picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return -picked[valid].mean()


def test_auxiliary_head_loss_is_added_with_its_weight():
  model = _ModelWithAuxHead()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 4)).astype(np.int32)
  labels[0, 0] = 255
  variables = model.init(jax.random.key(0), images, train=True)
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  batch_stats={}, tx=optax.sgd(0.0))
  _, metrics = train.train_step(
      state, {'image': images, 'label': labels}, jax.random.key(1),
      pixel_loss=losses.make_loss(configs.base_config().loss, ignore_label=255,
                                  class_weights=None),
      aux_loss_weight=0.4, learning_rate_fn=lambda step: 0.0)
  conv = lambda p: np.einsum('bhwc,cd->bhwd', images, p['kernel'][0, 0]) + p['bias']
  main = _numpy_cross_entropy(conv(variables['params']['main']), labels, 255)
  aux = _numpy_cross_entropy(conv(variables['params']['aux']), labels, 255)
  np.testing.assert_allclose(metrics['main_loss'], main, rtol=1e-5)
  np.testing.assert_allclose(metrics['aux_loss'], aux, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], main + 0.4 * aux, rtol=1e-5)
