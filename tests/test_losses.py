"""Cross-entropy against a direct numpy computation."""
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses


def numpy_cross_entropy(logits, labels, ignore_label, weights):
  total, norm = 0.0, 0.0
  for logit, label in zip(logits.reshape(-1, logits.shape[-1]), labels.ravel()):
    if label == ignore_label:
      continue
    log_prob = logit - np.log(np.sum(np.exp(logit)))
    total -= weights[label] * log_prob[label]
    norm += weights[label]
  return total / norm


@pytest.mark.parametrize('weighted', [False, True])
def test_cross_entropy_ignores_pixels_and_weights_classes(weighted):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 5, 6))
  labels[0, :2] = 255
  weights = np.array([0.5, 2.0, 1.0]) if weighted else np.ones(3)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_label=255,
                             class_weights=weights if weighted else None)
  assert float(got) == pytest.approx(numpy_cross_entropy(logits, labels, 255, weights),
                                     rel=1e-5)


def test_cross_entropy_of_fully_ignored_batch_is_zero():
  labels = jnp.full((1, 4, 4), 255)
  assert float(losses.cross_entropy(jnp.ones((1, 4, 4, 3)), labels, ignore_label=255)) == 0
