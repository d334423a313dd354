"""Confusion matrix and metrics against independent numpy computations."""
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import metrics


def reference_confusion(predictions, labels, num_classes, ignore_label):
  """Pixel-by-pixel loop: the obvious definition."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for truth, predicted in zip(labels.ravel(), predictions.ravel()):
    if truth != ignore_label and 0 <= truth < num_classes:
      confusion[truth, predicted] += 1
  return confusion


@pytest.mark.parametrize('ignore_label', [255, 0, 2])
def test_confusion_matrix_matches_pixel_loop(ignore_label):
  rng = np.random.default_rng(ignore_label)
  num_classes = 4
  labels = rng.integers(0, num_classes, (3, 9, 7))
  labels[rng.uniform(size=labels.shape) < 0.2] = ignore_label
  predictions = rng.integers(0, num_classes, labels.shape)
  got = metrics.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels),
                                 num_classes=num_classes, ignore_label=ignore_label)
  expected = reference_confusion(predictions, labels, num_classes, ignore_label)
  np.testing.assert_array_equal(np.asarray(got), expected)
  if 0 <= ignore_label < num_classes:
    # Pixels labelled with an in-range ignore label are dropped, not scored as that class.
    assert expected[ignore_label].sum() == 0
    assert np.asarray(got).sum() == np.sum(labels != ignore_label)


def test_metrics_match_direct_formulas():
  rng = np.random.default_rng(1)
  confusion = rng.integers(0, 50, (5, 5))
  result = metrics.from_confusion(confusion)
  for c in range(5):
    tp = confusion[c, c]
    fp = confusion[:, c].sum() - tp
    fn = confusion[c, :].sum() - tp
    assert result['iou'][c] == pytest.approx(tp / (tp + fp + fn))
    assert result['dice'][c] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result['acc'][c] == pytest.approx(tp / (tp + fn))
  assert result['miou'] == pytest.approx(np.mean(result['iou']))
  assert result['aacc'] == pytest.approx(np.trace(confusion) / confusion.sum())


def test_absent_class_is_excluded_not_nan():
  # Class 2 appears neither in the ground truth nor in the predictions.
  confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
  result = metrics.from_confusion(confusion)
  assert list(result['present']) == [True, True, False]
  assert np.isnan(result['iou'][2])
  assert result['miou'] == pytest.approx((8 / 11 + 9 / 12) / 2)
  assert np.isfinite([result['miou'], result['macc'], result['mdice'], result['aacc']]).all()
  table = metrics.format_table(result, ['road', 'car', 'bike'])
  assert 'bike' in table and 'absent' in table.splitlines()[-1]


def test_class_only_predicted_counts_as_zero_iou():
  # Class 2 never occurs in the ground truth but is predicted: a real error, IoU 0.
  confusion = np.array([[8, 0, 2], [0, 10, 0], [0, 0, 0]])
  result = metrics.from_confusion(confusion)
  assert result['present'][2] and result['iou'][2] == 0
  assert result['miou'] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
  assert result['macc'] == pytest.approx((0.8 + 1.0) / 2)  # accuracy: classes in truth


def test_metrics_match_per_pixel_masks():
  """Every metric from boolean masks of the pixels, not from a confusion matrix."""
  rng = np.random.default_rng(3)
  num_classes, ignore_label = 5, 255
  labels = rng.choice([0, 1, 2, 4, ignore_label], size=(2, 16, 12), p=[.4, .2, .2, .1, .1])
  predictions = rng.choice([0, 1, 2, 3], size=labels.shape)  # 3: predicted, never true
  confusion = metrics.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels),
                                       num_classes=num_classes, ignore_label=ignore_label)
  result = metrics.from_confusion(np.asarray(confusion))

  valid = labels != ignore_label
  iou, dice, acc, frequency = {}, {}, {}, {}
  for c in range(num_classes):
    truth, predicted = (labels == c) & valid, (predictions == c) & valid
    both, either = np.sum(truth & predicted), np.sum(truth | predicted)
    if either:
      iou[c] = both / either
      dice[c] = 2 * both / (truth.sum() + predicted.sum())
    if truth.any():
      acc[c] = both / truth.sum()
      frequency[c] = truth.sum() / valid.sum()
  assert sorted(iou) == [0, 1, 2, 3, 4] and sorted(acc) == [0, 1, 2, 4]
  assert result['miou'] == pytest.approx(np.mean(list(iou.values())))
  assert result['mdice'] == pytest.approx(np.mean(list(dice.values())))
  assert result['macc'] == pytest.approx(np.mean(list(acc.values())))
  assert result['aacc'] == pytest.approx(np.mean(predictions[valid] == labels[valid]))
  assert result['fwiou'] == pytest.approx(sum(frequency[c] * iou[c] for c in frequency))
  for c in range(num_classes):
    assert result['iou'][c] == pytest.approx(iou[c])
  assert 'fwIoU' in metrics.format_table(result, [str(c) for c in range(num_classes)])
  assert set(metrics.summary(result, [])) == {'miou', 'macc', 'aacc', 'mdice', 'fwiou'}


def test_frequency_weighted_iou_on_a_small_matrix():
  # Ground-truth pixels 10 and 30; IoU 8/(10+10-8) = 2/3 and 28/(30+30-28) = 7/8.
  confusion = np.array([[8, 2], [2, 28]])
  assert metrics.from_confusion(confusion)['fwiou'] == pytest.approx(
      0.25 * 2 / 3 + 0.75 * 7 / 8)
