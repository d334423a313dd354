"""Semi-supervised training (segjax/semi.py): the pure losses and updates against direct
numpy formulas, the labelled/unlabelled split and streams, the weak/strong views' shared
geometry, and real mean-teacher and FixMatch steps on a tiny U-Net."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import checkpoint
from segjax import configs
from segjax import data as data_lib
from segjax import models
from segjax import parallel
from segjax import semi
from segjax import train
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, SegjaxError
from conftest import tiny_config

NEUTRAL = transforms.Photometric(brightness_delta=0, contrast_range=(1, 1),
                                 saturation_range=(1, 1), hue_delta=0)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def semi_config(**fields):
  config = configs.base_config().semi_supervised
  config.update(fields)
  return config


# ----------------------------------------------------------------------------- pure functions

def test_ema_update_is_decay_times_teacher_plus_rest_times_student_leaf_by_leaf():
  rng = np.random.default_rng(0)
  teacher = {'params': {'w': rng.normal(size=(3, 2)), 'b': rng.normal(size=2)},
             'batch_stats': {'mean': rng.normal(size=4)}}
  student = jax.tree.map(lambda x: rng.normal(size=x.shape), teacher)
  got = semi.ema_update(teacher, student, 0.9)
  for path in (('params', 'w'), ('params', 'b'), ('batch_stats', 'mean')):
    t, s, g = teacher, student, got
    for key in path:
      t, s, g = t[key], s[key], g[key]
    np.testing.assert_allclose(g, 0.9 * t + 0.1 * s, rtol=1e-12)


def test_teacher_decay_warms_up_then_stays_at_ema_decay():
  got = [float(semi.teacher_decay(step, 0.99)) for step in (1, 2, 9, 99, 1000)]
  np.testing.assert_allclose(got, [1 / 2, 2 / 3, 0.9, 0.99, 0.99], rtol=1e-6)


def test_rampup_values():
  steps = np.array([0, 25, 50, 100, 200])
  t = np.minimum(steps / 100, 1)
  np.testing.assert_allclose([semi.rampup(s, 100, 'sigmoid') for s in steps],
                             np.exp(-5 * (1 - t) ** 2), rtol=1e-6)
  np.testing.assert_allclose([semi.rampup(s, 100, 'linear') for s in steps], t, rtol=1e-6)
  assert float(semi.rampup(0, 100, 'none')) == 1.0 and float(semi.rampup(0, 0)) == 1.0


def test_pseudo_label_loss_and_mask_against_numpy():
  rng = np.random.default_rng(1)
  weak_logits = 3 * rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  strong_logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  valid = rng.uniform(size=(2, 4, 5)) < 0.8
  probs = softmax(weak_logits)
  kept = valid & (probs.max(-1) >= 0.8)
  assert 0 < kept.sum() < valid.sum()  # some valid pixels are not confident enough
  pseudo = probs.argmax(-1)
  log_probs = np.log(softmax(strong_logits))
  cross_entropy = -np.take_along_axis(log_probs, pseudo[..., None], -1)[..., 0]
  expected = (cross_entropy * kept).sum() / valid.sum()

  loss, fraction = semi.pseudo_label_loss(strong_logits, jax.nn.softmax(weak_logits), 0.8,
                                          valid)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(fraction, kept.sum() / valid.sum(), rtol=1e-6)
  all_loss, all_fraction = semi.pseudo_label_loss(strong_logits, probs, 0.8)  # valid: all
  np.testing.assert_allclose(all_loss, (cross_entropy * (probs.max(-1) >= 0.8)).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(all_fraction, (probs.max(-1) >= 0.8).mean(), rtol=1e-6)


def test_pseudo_label_loss_backprops_into_the_strong_view_only():
  rng = np.random.default_rng(2)
  weak, strong = (rng.normal(size=(1, 3, 3, 4)).astype(np.float32) for _ in range(2))
  loss = lambda w, s: semi.pseudo_label_loss(s, jax.nn.softmax(w), 0.0)[0]
  grad_weak, grad_strong = jax.grad(loss, argnums=(0, 1))(weak, strong)
  assert not np.any(grad_weak)
  # d(mean cross-entropy)/d(logits) = (softmax - one_hot(pseudo-label)) / pixels
  one_hot = np.eye(4)[softmax(weak).argmax(-1)]
  np.testing.assert_allclose(grad_strong, (softmax(strong) - one_hot) / 9, atol=1e-6)


def test_consistency_loss_against_numpy_and_no_gradient_into_the_teacher():
  rng = np.random.default_rng(3)
  student, teacher = (rng.normal(size=(2, 3, 4, 5)).astype(np.float32) for _ in range(2))
  valid = rng.uniform(size=(2, 3, 4)) < 0.7
  squared = ((softmax(student) - softmax(teacher)) ** 2).mean(-1)
  loss = lambda s, t: semi.consistency_loss(s, jax.nn.softmax(t), valid)
  np.testing.assert_allclose(loss(student, teacher), squared[valid].mean(), rtol=1e-5)
  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
  assert not np.any(grad_teacher) and np.any(grad_student)
  assert float(semi.consistency_loss(student, softmax(teacher), np.zeros_like(valid))) == 0


# ----------------------------------------------------------------------------- data

def test_labelled_split_is_deterministic_sized_disjoint_and_nested():
  config = semi_config(labelled_fraction=1 / 8)
  labelled, unlabelled = semi.labelled_split(4000, config)
  assert len(labelled) == 500 and len(unlabelled) == 3500
  assert not set(labelled) & set(unlabelled)
  np.testing.assert_array_equal(np.sort(np.concatenate([labelled, unlabelled])),
                                np.arange(4000))
  np.testing.assert_array_equal(semi.labelled_split(4000, config)[0], labelled)
  quarter = semi.labelled_split(4000, semi_config(labelled_fraction=0.25))[0]
  assert set(labelled) <= set(quarter)  # one split_seed: a larger subset holds a smaller
  other = semi.labelled_split(4000, semi_config(labelled_fraction=1 / 8, split_seed=1))[0]
  assert len(other) == 500 and set(other) != set(labelled)
  counted = semi.labelled_split(4000, semi_config(labelled_fraction=0.5, labelled_count=7))
  assert len(counted[0]) == 7
  with pytest.raises(ConfigError, match='labelled_count=4001 exceeds the 4000 training'):
    semi.labelled_split(4000, semi_config(labelled_count=4001))


def test_split_sources_keeps_the_whole_split_only_when_all_are_labelled():
  source = list(range(10))
  assert semi.split_sources(source, semi_config()) == (source, None)
  labelled, unlabelled = semi.split_sources(source, semi_config(labelled_count=3))
  assert len(labelled) == 3 and unlabelled is None  # method 'none': supervised on 3
  labelled, unlabelled = semi.split_sources(
      source, semi_config(method='fixmatch', labelled_count=3))
  assert sorted(list(labelled) + list(unlabelled)) == source and len(unlabelled) == 7
  with pytest.raises(ConfigError, match="method='fixmatch' has no unlabelled examples"):
    semi.split_sources(source, semi_config(method='fixmatch', labelled_count=10))


class _RecordingSource:
  """A source of tiny examples that records which indices were read."""

  def __init__(self, size):
    self.size, self.read = size, set()

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    self.read.add(int(index))
    image = np.full((20, 20, 3), index, np.uint8)
    return {'image': image, 'segmentation_mask': np.zeros((20, 20, 1), np.uint8)}


def test_streams_read_only_their_subset_and_are_pure_functions_of_the_step():
  config = tiny_config('/nonexistent')
  config.batch_size = 2
  config.dataset.image_size = 16
  config.semi_supervised.update(method='fixmatch', labelled_fraction=0.25,
                                unlabelled_batch_size=4)
  spec = data_lib.get_spec(config.dataset)
  source = _RecordingSource(40)
  labelled_source, unlabelled_source = semi.split_sources(source, config.semi_supervised)
  labelled, unlabelled = semi.labelled_split(40, config.semi_supervised)
  labelled_stream = pipeline.train_batches(labelled_source, spec, config, start_step=0)
  for _ in range(8):  # 16 examples: more than the 10 labelled ones
    next(labelled_stream)
  assert source.read == set(labelled.tolist())
  source.read.clear()
  stream = semi.unlabelled_batches(unlabelled_source, spec, config, start_step=0)
  batches = [next(stream) for _ in range(10)]  # 40 examples: more than the 30 unlabelled
  assert source.read == set(unlabelled.tolist())
  assert batches[0]['weak'].shape == (4, 16, 16, 3) and batches[0]['valid'].shape == (4, 16, 16)
  resumed = next(semi.unlabelled_batches(unlabelled_source, spec, config, start_step=7))
  jax.tree.map(np.testing.assert_array_equal, resumed, batches[7])


def coordinate_image(height, width):
  """An image whose channels are 4 * row and 4 * column (cf. tests/test_transforms.py)."""
  rows, cols = np.mgrid[:height, :width]
  return np.stack([4 * rows, 4 * cols, np.full_like(rows, 100)], -1).astype(np.uint8)


def views(seed, distortion, cutout_fraction=0.0):
  return semi.unlabelled_views(
      np.random.default_rng(seed), coordinate_image(30, 40), crop_size=24, min_scale=0.5,
      max_scale=1.5, flip=True, base_size=0, distortion=distortion,
      cutout_fraction=cutout_fraction, mean=(0, 0, 0), std=(1, 1, 1))


@pytest.mark.parametrize('seed', range(6))
def test_weak_and_strong_views_share_their_geometry(seed):
  weak, strong, valid = views(seed, NEUTRAL)
  np.testing.assert_array_equal(strong, weak)  # no colour change: the very same pixels
  # ... of a scaled, cropped, flipped image (not the identity), padded where not valid.
  cols = weak[..., 1] * 255 / 4
  assert valid.any() and not weak[~valid].any()
  assert not np.allclose(cols[valid], np.mgrid[:24, :24][1][valid])
  brighter = transforms.Photometric(brightness_delta=30, contrast_range=(1, 1),
                                    saturation_range=(1, 1), hue_delta=0, channels=3)
  weak_b, strong_b, valid_b = views(seed, brighter)
  np.testing.assert_array_equal(weak_b, weak)
  np.testing.assert_array_equal(valid_b, valid)
  # A brightness shift only: strong - weak is one constant on the blue channel (100, never
  # clipped) wherever the image is, so strong pixel (i, j) shows weak pixel (i, j).
  shift = (strong_b - weak_b)[..., 2][valid] * 255
  np.testing.assert_allclose(shift, shift[0], atol=1e-3)


def test_cutout_zeroes_one_clipped_rectangle():
  image = np.ones((20, 30, 2), np.float32)
  for seed in range(20):
    cut = semi.cutout(np.random.default_rng(seed), image, 0.5)
    zero_rows, zero_cols = np.nonzero(~cut.any(-1))
    height, width = np.ptp(zero_rows) + 1, np.ptp(zero_cols) + 1
    assert zero_rows.size == height * width  # one rectangle
    assert 5 <= height <= 10 and 8 <= width <= 15  # 10 x 15, less where clipped
  assert image.all()  # the input is untouched


def test_strong_views_are_distorted_and_cut():
  weak, strong, valid = views(0, semi.strong_distortion(3), cutout_fraction=0.5)
  changed = np.abs(strong - weak).max(-1) > 1e-6
  assert changed[valid].mean() > 0.2


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize('fields,message', [
    (dict(method='pi'), "unknown semi_supervised.method 'pi'; valid: none, mean_teacher, fixmatch"),
    (dict(method='fixmatch'), 'needs unlabelled examples; set semi_supervised.labelled_fraction'),
    (dict(labelled_fraction=0.0), r'labelled_fraction must be in \(0, 1\], got 0.0'),
    (dict(ema_decay=1.0), r'ema_decay must be in \[0, 1\), got 1.0'),
    (dict(threshold=1.5), r'threshold must be in \[0, 1\], got 1.5'),
    (dict(rampup='cosine'), "unknown semi_supervised.rampup 'cosine'"),
])
def test_invalid_semi_supervised_config_is_refused(fields, message):
  config = tiny_config('/nonexistent')
  config.semi_supervised.update(fields)
  with pytest.raises(ConfigError, match=message):
    configs.validate(config)


def test_semi_supervised_refuses_gradient_accumulation():
  config = tiny_config('/nonexistent')
  config.semi_supervised.update(method='mean_teacher', labelled_fraction=0.5)
  config.grad_accum_steps = 2
  with pytest.raises(ConfigError, match='does not support grad_accum_steps=2'):
    configs.validate(config)


# ----------------------------------------------------------------------------- steps

def semi_experiment(data_dir, workdir, method):
  config = tiny_config(data_dir)
  # At initialisation the tiny U-Net's maximum class probabilities are 0.167-0.224: a
  # threshold of 0.18 keeps about half of the pixels.
  config.semi_supervised.update(method=method, labelled_fraction=0.25, threshold=0.18,
                                weight=2.0, rampup_steps=4, rampup='linear')
  return train.Experiment(config, str(workdir))


@pytest.fixture(scope='module')
def mean_teacher(data_dir, tmp_path_factory):
  return semi_experiment(data_dir, tmp_path_factory.mktemp('mean_teacher'), 'mean_teacher')


def copied(state):
  return jax.tree.map(jnp.copy, state)  # the step donates its input state


def expected_unsupervised_loss(experiment, state, batch, target_variables):
  """The step's unsupervised loss recomputed from its definition, outside the step."""
  unlabelled = batch['unlabelled']
  targets = jax.nn.softmax(state.apply_fn(target_variables, unlabelled['weak'], train=False))
  images = jnp.concatenate([batch['image'], unlabelled['strong']])
  step_rng = jax.random.fold_in(experiment.train_rng, state.step)
  logits, _, _ = models.train_forward(
      state.apply_fn, {'params': state.params, 'batch_stats': state.batch_stats}, images,
      step_rng)
  strong = logits[batch['label'].shape[0]:]
  if experiment.config.semi_supervised.method == 'mean_teacher':
    return semi.consistency_loss(strong, targets, unlabelled['valid']), None
  return semi.pseudo_label_loss(strong, targets, experiment.config.semi_supervised.threshold,
                                unlabelled['valid'])


def test_mean_teacher_step_moves_the_teacher_by_the_ema_formula(mean_teacher):
  experiment = mean_teacher
  assert len(experiment.labelled_source) == 6 and len(experiment.unlabelled_source) == 18
  state = copied(experiment.initial_state)
  batches = experiment.train_batches(0)
  for _ in range(2):  # the second step starts from a teacher != student
    before = jax.device_get(state)
    batch = parallel.to_global(next(batches), experiment.mesh)
    expected_loss, _ = expected_unsupervised_loss(experiment, state, batch, state.teacher)
    state, metrics = experiment.train_step(state, batch, experiment.train_rng)
    after = jax.device_get(state)
    decay = min(0.99, 1 - 1 / (int(after.step) + 1))  # steps 1, 2: 1/2, 2/3
    student = {'params': after.params, 'batch_stats': after.batch_stats}
    expected = jax.tree.map(lambda t, s: decay * t + (1 - decay) * s, before.teacher, student)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7),
                 after.teacher, expected)
    np.testing.assert_allclose(metrics['unsupervised_loss'], expected_loss, rtol=1e-4)
    weight = 2.0 * int(before.step) / 4  # linear ramp-up over 4 steps
    np.testing.assert_allclose(metrics['unsupervised_weight'], weight, rtol=1e-6)
    np.testing.assert_allclose(
        metrics['loss'], metrics['supervised_loss'] + weight * metrics['unsupervised_loss'],
        rtol=1e-5)
  assert not jax.tree.all(jax.tree.map(np.array_equal, after.teacher['params'],
                                       after.params))
  assert semi.inference_variables(state) is state.teacher


def test_checkpoint_with_a_teacher_restores_and_one_without_is_refused(mean_teacher, tmp_path):
  experiment = mean_teacher
  state = copied(experiment.initial_state)
  state, _ = experiment.train_step(state, parallel.to_global(
      next(experiment.train_batches(0)), experiment.mesh), experiment.train_rng)
  saver = checkpoint.Checkpoints(str(tmp_path / 'with'), max_to_keep=2)
  saver.save(state)
  saver.wait()
  restored = checkpoint.Checkpoints(str(tmp_path / 'with'), max_to_keep=2).restore(
      copied(experiment.initial_state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.teacher),
               jax.device_get(state.teacher))
  saver = checkpoint.Checkpoints(str(tmp_path / 'without'), max_to_keep=2)
  saver.save(state.replace(teacher=None))
  saver.wait()
  with pytest.raises(SegjaxError, match='does not fit this config.s model: missing teacher'):
    checkpoint.Checkpoints(str(tmp_path / 'without'), max_to_keep=2).restore(
        copied(experiment.initial_state))


@pytest.mark.slow
def test_fixmatch_step_uses_the_students_confident_weak_predictions(data_dir, tmp_path):
  experiment = semi_experiment(data_dir, tmp_path, 'fixmatch')
  state = copied(experiment.initial_state)
  assert state.teacher is None
  batches = experiment.train_batches(0)
  for _ in range(2):
    batch = parallel.to_global(next(batches), experiment.mesh)
    student = {'params': state.params, 'batch_stats': state.batch_stats}
    expected_loss, expected_fraction = expected_unsupervised_loss(experiment, state, batch,
                                                                  student)
    state, metrics = experiment.train_step(state, batch, experiment.train_rng)
    np.testing.assert_allclose(metrics['unsupervised_loss'], expected_loss, rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(metrics['mask_fraction'], expected_fraction, rtol=1e-6)
  assert 0 < float(metrics['mask_fraction']) < 1
