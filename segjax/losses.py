"""Pixel losses. Logits are [B, H, W, C]; labels int [B, H, W] with an ignore label."""
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, *, ignore_label, class_weights=None):
  """Softmax cross-entropy averaged over the non-ignored pixels (a scalar, float32).

  With `class_weights` [C], pixel i has weight w[y_i] and the result is
  sum_i w[y_i] * ce_i / sum_i w[y_i] over valid pixels (PyTorch's weighted 'mean').
  A batch without valid pixels gives 0, not NaN.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return jnp.sum(per_pixel * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
