"""Each loss term against a direct numpy computation, ignore labels, class weights, config."""
import itertools

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import pytest

from segjax import configs
from segjax import data
from segjax import losses
from segjax import train
from segjax.data import pipeline
from segjax.errors import ConfigError
from conftest import tiny_config

IGNORE = 255


def random_case(seed=0, shape=(2, 5, 6), num_classes=3, scale=1.0):
  """float32 logits [B, H, W, C] and int32 labels [B, H, W] with a block of ignored pixels."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(*shape, num_classes))).astype(np.float32)
  labels = rng.integers(0, num_classes, shape).astype(np.int32)
  labels[0, :2] = IGNORE
  return logits, labels


def softmax(logits):
  logits = np.asarray(logits, np.float64)
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def valid_pixels(logits, labels):
  """(probabilities [N, C], labels [N]) of the non-ignored pixels, float64."""
  valid = labels != IGNORE
  return softmax(logits)[valid], labels[valid]


# ---------------------------------------------------------------------------- references

def numpy_cross_entropy(logits, labels, weights, smoothing=0.0, kept=None):
  kept = labels != IGNORE if kept is None else kept
  num_classes = logits.shape[-1]
  total, norm = 0.0, 0.0
  for logit, label in zip(logits[kept], labels[kept]):
    log_prob = np.log(softmax(logit))
    target = np.full(num_classes, smoothing / num_classes)
    target[label] += 1 - smoothing
    total -= weights[label] * np.dot(target, log_prob)
    norm += weights[label]
  return total / norm


def numpy_ohem_keep(logits, labels, thresh, min_kept):
  """mmsegmentation's OHEMPixelSampler.sample with a threshold, written out."""
  valid = labels != IGNORE
  probs = softmax(logits)
  true_prob = np.take_along_axis(probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  sorted_prob = np.sort(true_prob[valid])
  batch_kept = min_kept * labels.shape[0]
  threshold = max(sorted_prob[min(batch_kept, sorted_prob.size - 1)], thresh)
  return valid & (true_prob < threshold)


def numpy_dice(logits, labels, smooth=1.0):
  probs, labels = valid_pixels(logits, labels)
  scores = []
  for c in range(probs.shape[1]):
    truth = labels == c
    scores.append((2 * probs[truth, c].sum() + smooth) / (probs[:, c].sum() + truth.sum() + smooth))
  return 1 - np.mean(scores)


def numpy_focal(logits, labels, gamma, alpha=None):
  probs, labels = valid_pixels(logits, labels)
  p = probs[np.arange(len(labels)), labels]
  weight = np.ones(len(labels)) if alpha is None else np.asarray(alpha)[labels]
  return np.mean(-weight * (1 - p) ** gamma * np.log(p))


def numpy_lovasz_class(errors, truth):
  """Berman et al.: sum_k e_(k) (Delta_J({1..k}) - Delta_J({1..k-1})), errors sorted down,
  Delta_J(M) = 1 - |G minus M| / |G union M| evaluated on sets, with no cumulative sums."""
  order = np.argsort(-errors, kind='stable')
  ground = set(np.flatnonzero(truth))

  def jaccard_loss(mistakes):
    return 1 - len(ground - mistakes) / len(ground | mistakes)

  loss, previous = 0.0, 0.0
  for k in range(1, len(order) + 1):
    current = jaccard_loss(set(order[:k]))
    loss += errors[order[k - 1]] * (current - previous)
    previous = current
  return loss


def numpy_lovasz_softmax(probs, labels):
  """Over pixels [N, C] already stripped of ignored ones; mean over present classes."""
  per_class = [numpy_lovasz_class(np.abs((labels == c) - probs[:, c]), labels == c)
               for c in range(probs.shape[1]) if np.any(labels == c)]
  return np.mean(per_class) if per_class else 0.0


# ---------------------------------------------------------------------------- the terms

@pytest.mark.parametrize('weighted,smoothing', [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_cross_entropy_matches_numpy(weighted, smoothing):
  logits, labels = random_case()
  weights = np.array([0.5, 2.0, 1.0]) if weighted else np.ones(3)
  got = losses.cross_entropy(logits, labels, ignore_label=IGNORE,
                             class_weights=weights if weighted else None,
                             label_smoothing=smoothing)
  expected = numpy_cross_entropy(logits, labels, weights, smoothing)
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_by_hand():
  # Logits (0, log 3): p = (1/4, 3/4); eps = 0.5 -> target (1/4, 3/4) for label 1.
  logits = np.array([[[[0.0, np.log(3.0)]]]], np.float32)
  got = losses.cross_entropy(logits, np.array([[[1]]]), ignore_label=IGNORE,
                             label_smoothing=0.5)
  expected = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
  assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('thresh,min_kept', [(0.7, 2), (0.05, 4), (0.3, 0)])
def test_ohem_keeps_the_pixels_mmsegmentation_keeps(thresh, min_kept):
  logits, labels = random_case(seed=1, scale=2.0)
  kept = np.asarray(losses.ohem_mask(logits, labels, ignore_label=IGNORE, thresh=thresh,
                                     min_kept=min_kept))
  expected = numpy_ohem_keep(logits, labels, thresh, min_kept)
  np.testing.assert_array_equal(kept, expected)
  assert kept.sum() >= min(min_kept * 2, np.sum(labels != IGNORE))
  got = losses.ohem_cross_entropy(logits, labels, ignore_label=IGNORE, thresh=thresh,
                                  min_kept=min_kept)
  assert float(got) == pytest.approx(
      numpy_cross_entropy(logits, labels, np.ones(3), kept=expected), rel=1e-5)


def test_ohem_by_hand():
  # True-class probabilities 0.9, 0.6, 0.2, 0.1 and one ignored pixel.
  p = np.array([0.9, 0.6, 0.2, 0.1, 0.5])
  logits = np.log(np.stack([p, 1 - p], -1)).reshape(1, 1, 5, 2).astype(np.float32)
  labels = np.array([[[0, 0, 0, 0, IGNORE]]])
  keep = lambda thresh, min_kept: np.asarray(losses.ohem_mask(
      logits, labels, ignore_label=IGNORE, thresh=thresh, min_kept=min_kept))[0, 0].tolist()
  assert keep(0.7, 1) == [False, True, True, True, False]  # below the threshold
  assert keep(0.15, 3) == [False, True, True, True, False]  # the 3 hardest
  assert keep(0.15, 1) == [False, False, False, True, False]
  assert keep(0.15, 4) == [True, True, True, True, False]  # all valid when k >= valid pixels


def test_ohem_min_kept_counts_per_image():
  logits, labels = random_case(seed=12, scale=2.0)
  kept = losses.ohem_mask(logits, labels, ignore_label=IGNORE, thresh=1e-9, min_kept=3)
  assert int(np.sum(kept)) == 2 * 3


def test_dice_matches_numpy():
  logits, labels = random_case(seed=2)
  got = losses.dice(logits, labels, ignore_label=IGNORE)
  assert float(got) == pytest.approx(numpy_dice(logits, labels), rel=1e-5)


@pytest.mark.parametrize('gamma,alpha', [(2.0, None), (0.5, (0.25, 1.0, 0.5))])
def test_focal_matches_numpy(gamma, alpha):
  logits, labels = random_case(seed=3)
  got = losses.focal(logits, labels, ignore_label=IGNORE, gamma=gamma, alpha=alpha)
  assert float(got) == pytest.approx(numpy_focal(logits, labels, gamma, alpha), rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
  logits, labels = random_case(seed=4)
  focal = losses.focal(logits, labels, ignore_label=IGNORE, gamma=0.0)
  ce = losses.cross_entropy(logits, labels, ignore_label=IGNORE)
  assert float(focal) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize('per_image', [False, True])
def test_lovasz_softmax_matches_numpy(per_image):
  logits, labels = random_case(seed=5, shape=(2, 4, 5), num_classes=4)
  labels[1, 0, 0] = 3  # class 3 present in image 1 only, so 'present' differs per image
  labels[0][labels[0] == 3] = 0
  got = losses.lovasz_softmax(logits, labels, ignore_label=IGNORE, per_image=per_image)
  if per_image:
    expected = np.mean([numpy_lovasz_softmax(*valid_pixels(l, y)) for l, y in zip(logits, labels)])
  else:
    expected = numpy_lovasz_softmax(*valid_pixels(logits, labels))
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_lovasz_softmax_per_image_skips_images_without_labels():
  logits, labels = random_case(seed=11, shape=(2, 3, 4))
  labels[1] = IGNORE
  got = losses.lovasz_softmax(logits, labels, ignore_label=IGNORE, per_image=True)
  expected = numpy_lovasz_softmax(*valid_pixels(logits[0], labels[0]))
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_lovasz_softmax_of_hard_predictions_is_the_jaccard_loss():
  # With 0/1 probabilities the Lovasz extension equals 1 - IoU of each present class.
  labels = np.array([[[0, 0, 1, 1], [0, 2, 2, IGNORE]]])
  predicted = np.array([[[0, 1, 1, 1], [0, 2, 0, 3]]])
  logits = 100.0 * np.eye(4, dtype=np.float32)[predicted]
  got = losses.lovasz_softmax(logits, labels, ignore_label=IGNORE)
  # Class 0: 2 / 4 pixels; class 1: 2 / 3; class 2: 1 / 2; class 3 is absent from the labels.
  assert float(got) == pytest.approx(np.mean([1 - 2 / 4, 1 - 2 / 3, 1 - 1 / 2]), rel=1e-6)
  perfect = 100.0 * np.eye(4, dtype=np.float32)[np.where(labels == IGNORE, 3, labels)]
  assert float(losses.lovasz_softmax(perfect, labels, ignore_label=IGNORE)) == pytest.approx(
      0, abs=1e-12)


# ---------------------------------------------------------------------------- all terms

TERMS = {
    'cross_entropy': dict(label_smoothing=0.1, class_weights=(1.0, 2.0, 0.5)),
    'ohem_cross_entropy': dict(thresh=0.7, min_kept=5),
    'dice': {},
    'focal': dict(gamma=0.5, alpha=(0.2, 0.3, 0.5)),
    'lovasz_softmax': dict(per_image=True),
}


@pytest.mark.parametrize('name', TERMS)
def test_ignored_pixels_change_nothing(name):
  loss = lambda logits, labels: float(losses.LOSSES[name](
      logits, labels, ignore_label=IGNORE, **TERMS[name]))
  logits, labels = random_case(seed=6)
  other_logits = logits.copy()
  other_logits[labels == IGNORE] = np.random.default_rng(7).normal(
      size=(np.sum(labels == IGNORE), 3)) * 5
  assert loss(other_logits, labels) == loss(logits, labels)
  labels[0, 4, 0] = 7  # outside [0, C): ignored too
  changed = logits.copy()
  changed[0, 4, 0] += 10
  assert loss(changed, labels) == pytest.approx(loss(logits, labels), rel=1e-6)


@pytest.mark.parametrize('name', TERMS)
def test_gradients_are_finite_and_fully_ignored_batches_give_zero(name):
  loss = lambda logits, labels: losses.LOSSES[name](
      logits, labels, ignore_label=IGNORE, **TERMS[name])
  logits, labels = random_case(seed=8, scale=30.0)  # saturated probabilities
  for case_labels in (labels, np.full_like(labels, IGNORE)):
    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits), case_labels)
    assert np.isfinite(grad).all() and np.isfinite(value)
  assert float(value) == 0 and not np.any(grad)
  assert losses.LOSSES[name](logits.astype(jnp.bfloat16), labels, ignore_label=IGNORE,
                             **TERMS[name]).dtype == jnp.float32


def test_make_loss_sums_the_weighted_terms():
  config = configs.base_config().loss
  config.terms = (('cross_entropy', 1.0), ('dice', 0.5), ('lovasz_softmax', 2.0))
  config.label_smoothing = 0.1
  logits, labels = random_case(seed=9)
  total, terms = losses.make_loss(config, ignore_label=IGNORE, class_weights=(1.0, 2.0, 3.0))(
      logits, labels)
  ce = numpy_cross_entropy(logits, labels, [1.0, 2.0, 3.0], 0.1)
  dice = numpy_dice(logits, labels)
  lovasz = numpy_lovasz_softmax(*valid_pixels(logits, labels))
  assert sorted(terms) == ['cross_entropy', 'dice', 'lovasz_softmax']
  np.testing.assert_allclose([terms['cross_entropy'], terms['dice'], terms['lovasz_softmax']],
                             [ce, dice, lovasz], rtol=1e-5)
  assert float(total) == pytest.approx(ce + 0.5 * dice + 2.0 * lovasz, rel=1e-5)


class _PixelLinear(nn.Module):
  """Logits [B, H, W, 3] from a 1x1 convolution."""

  @nn.compact
  def __call__(self, images, *, train):
    del train
    return nn.Conv(3, (1, 1))(images)


def test_train_step_logs_each_term_of_the_loss():
  config = configs.base_config().loss
  config.terms = (('cross_entropy', 1.0), ('dice', 0.5))
  logits, labels = random_case(seed=10)
  images = logits[..., :2]
  model = _PixelLinear()
  variables = model.init(jax.random.key(0), images, train=True)
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  batch_stats={}, tx=optax.sgd(0.0))
  _, metrics = train.train_step(
      state, {'image': images, 'label': labels}, jax.random.key(1),
      pixel_loss=losses.make_loss(config, ignore_label=IGNORE, class_weights=None),
      aux_loss_weight=0.4, learning_rate_fn=lambda step: 0.0)
  assert sorted(metrics) == ['cross_entropy_loss', 'dice_loss', 'grad_norm', 'learning_rate',
                             'loss']
  model_logits = np.asarray(model.apply(variables, images, train=True))
  ce = numpy_cross_entropy(model_logits, labels, np.ones(3))
  dice = numpy_dice(model_logits, labels)
  np.testing.assert_allclose([metrics['cross_entropy_loss'], metrics['dice_loss'],
                              metrics['loss']], [ce, dice, ce + 0.5 * dice], rtol=1e-5)


# ---------------------------------------------------------------------------- class weights

def test_count_label_pixels():
  labels = np.array([[[0, 0], [1, IGNORE]], [[0, 2], [2, 2]]])
  class_pixels, image_pixels = losses.count_label_pixels([labels[:1], labels[1:]], 4, IGNORE)
  np.testing.assert_array_equal(class_pixels, [3, 1, 3, 0])
  np.testing.assert_array_equal(image_pixels, [3 + 4, 3, 4, 0])


def numpy_median_frequency_weights(images, num_classes, ignore_label):
  """Eigen & Fergus, image by image, from label images [N, H, W] that hold every class."""
  class_pixels, image_pixels = np.zeros(num_classes), np.zeros(num_classes)
  for image in images:
    for c in range(num_classes):
      if np.any(image == c):
        class_pixels[c] += np.sum(image == c)
        image_pixels[c] += np.sum(image != ignore_label)
  frequency = class_pixels / image_pixels
  return np.median(frequency) / frequency


def test_median_frequency_weights_by_hand():
  # f = (60/100, 30/50, 10/100) = (0.6, 0.6, 0.1); median 0.6.
  weights = losses.class_weights_from_counts([60, 30, 10], [100, 50, 100], 'median_frequency')
  np.testing.assert_allclose(weights, [1.0, 1.0, 6.0])
  # An unseen class gets the largest weight; the median is over seen classes (0.6, 0.1).
  weights = losses.class_weights_from_counts([60, 0, 10], [100, 0, 100], 'median_frequency')
  np.testing.assert_allclose(weights, [0.35 / 0.6, 3.5, 3.5])


def test_inverse_frequency_weights_by_hand():
  weights = losses.class_weights_from_counts([60, 30, 10], [100, 100, 100], 'inverse_frequency')
  np.testing.assert_allclose(weights, [100 / 180, 100 / 90, 100 / 30])
  np.testing.assert_allclose(np.dot(weights, [60, 30, 10]) / 100, 1.0)  # mean pixel weight


def test_class_weights_are_computed_from_the_first_training_batches(sources):
  config = tiny_config('/unused')
  config.loss.class_weighting, config.loss.class_weighting_batches = 'median_frequency', 3
  spec = data.get_spec(config.dataset)
  weights = train.loss_class_weights(config, spec, sources['train'])
  batches = pipeline.train_batches(sources['train'], spec, config, start_step=0)
  labels = np.concatenate([batch['label'] for batch in itertools.islice(batches, 3)])
  assert labels.shape == (3 * 4, 32, 32)
  np.testing.assert_allclose(
      weights, numpy_median_frequency_weights(labels, spec.num_classes, spec.ignore_label))
  assert weights[0] < 0.5 < 1 < max(weights)  # the background dominates
  config.loss.class_weighting = 'none'
  assert train.loss_class_weights(config, spec, sources['train']) is None


# ---------------------------------------------------------------------------- config

def test_terms_parse_from_the_command_line():
  argv = ['prog', "--config.loss.terms=(('cross_entropy', 1.0), ('dice', 0.5))",
          '--config.loss.focal_alpha=(0.25, 0.75)']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', configs.base_config(), flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.loss.terms == (('cross_entropy', 1.0), ('dice', 0.5))
  assert flag_values.config.loss.focal_alpha == (0.25, 0.75)


@pytest.mark.parametrize('field,value,message', [
    ('terms', (('dice', 1.0), ('lovasz', 1.0)),
     "unknown loss term 'lovasz' in loss.terms; valid: cross_entropy, ohem_cross_entropy, "
     'dice, focal, lovasz_softmax$'),
    ('terms', ('dice',), r"loss.terms must be \(name, weight\) pairs, e.g. "),
    ('terms', (), 'loss.terms must be'),
    ('terms', (('dice', 1.0), ('dice', 2.0)), 'loss.terms names a term twice'),
    ('terms', (('dice', 0.0),), "loss term 'dice' has weight 0.0; weights must be positive"),
    ('class_weighting', 'median', "unknown loss.class_weighting 'median'; valid: none, "
     'inverse_frequency, median_frequency$'),
    ('class_weights', (1.0, 2.0), 'loss.class_weights has 2 values'),
    ('focal_alpha', (1.0,), 'loss.focal_alpha has 1 values'),
    ('label_smoothing', 1.0, r'loss.label_smoothing must be in \[0, 1\)'),
    ('ohem_thresh', 0.0, r'loss.ohem_thresh must be in \(0, 1\]'),
    ('ohem_min_kept', -1, 'loss.ohem_min_kept must be >= 0'),
    ('focal_gamma', -1.0, 'loss.focal_gamma must be >= 0'),
])
def test_invalid_loss_config_is_one_line_config_error(field, value, message):
  config = tiny_config('/nonexistent')
  config.loss[field] = value
  with pytest.raises(ConfigError, match=message) as error:
    configs.validate(config)
  assert '\n' not in str(error.value)


def test_fixed_and_computed_class_weights_are_exclusive():
  config = tiny_config('/nonexistent')
  config.loss.class_weights = (1.0,) * 6
  config.loss.class_weighting = 'inverse_frequency'
  with pytest.raises(ConfigError, match='set either loss.class_weights or '
                     'loss.class_weighting, not both'):
    configs.validate(config)
