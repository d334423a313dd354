"""Pixel losses for semantic segmentation, and the weighted sum a config asks for.

Every term is a pure function `(logits, labels, *, ignore_label, <options>) -> loss`:
logits [B, H, W, C] of any float dtype (computed in float32), labels int [B, H, W]. Pixels
labelled `ignore_label` (or anything outside [0, C)) change nothing, and a batch without a
valid pixel gives 0, never NaN. The result is a float32 scalar.

`make_loss(config.loss, ...)` combines the terms of `config.loss.terms`, a tuple of
(name, weight) pairs, e.g. `(('cross_entropy', 1.0), ('dice', 0.5))`; on the command line
`--config.loss.terms="(('cross_entropy', 1.0), ('dice', 0.5))"`. Class weights (fixed, or
computed once from training-label counts by `class_weights_from_counts`) apply to the two
cross-entropy terms.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError, DataError

CLASS_WEIGHTINGS = ('none', 'inverse_frequency', 'median_frequency')
DICE_SMOOTH = 1.0  # added to the numerator and denominator of every class's Dice score


def _valid_and_safe(labels, num_classes, ignore_label):
  """(valid bool [B, H, W], labels with invalid pixels set to class 0)."""
  labels = jnp.asarray(labels)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  return valid, jnp.where(valid, labels, 0)


def _true_class(values, safe_labels):
  """values [B, H, W, C] -> [B, H, W]: each pixel's value for its labelled class.

  A one-hot select and sum (exact: the other terms are zeros) rather than take_along_axis,
  whose gradient is a scatter-add over every pixel that XLA:CPU runs slowly.
  """
  one_hot = safe_labels[..., None] == jnp.arange(values.shape[-1])
  return jnp.sum(jnp.where(one_hot, values, 0), axis=-1)


def _pixel_cross_entropy(log_probs, safe_labels, label_smoothing):
  """[B, H, W]: -sum_c q_c log p_c with q = (1 - eps) * one_hot + eps / C."""
  nll = -_true_class(log_probs, safe_labels)
  if not label_smoothing:
    return nll
  return (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)


def _weighted_mean(per_pixel, mask, safe_labels, class_weights):
  """sum_i m_i w[y_i] l_i / sum_i m_i w[y_i] (PyTorch's weighted 'mean'); 0 if empty."""
  weights = mask.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return jnp.sum(per_pixel * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def cross_entropy(logits, labels, *, ignore_label, class_weights=None, label_smoothing=0.0):
  """Softmax cross-entropy averaged over the valid pixels.

  class_weights: None or [C]; pixel i counts with weight w[y_i] (also under smoothing,
    whose uniform part PyTorch would weight per class instead).
  label_smoothing: eps in [0, 1); the target is (1 - eps) * one_hot + eps / C.
  """
  logits = logits.astype(jnp.float32)
  valid, safe_labels = _valid_and_safe(labels, logits.shape[-1], ignore_label)
  per_pixel = _pixel_cross_entropy(jax.nn.log_softmax(logits), safe_labels, label_smoothing)
  return _weighted_mean(per_pixel, valid, safe_labels, class_weights)


def ohem_mask(logits, labels, *, ignore_label, thresh, min_kept):
  """bool [B, H, W]: the hard pixels online hard example mining trains on.

  mmsegmentation's OHEMPixelSampler with a threshold: with p_i the softmax probability of
  pixel i's true class and k = min_kept * B, keep the valid pixels with
  p_i < max(thresh, p_(k)), p_(k) the (k+1)-th smallest p over the batch's valid pixels, so
  at least the k hardest pixels are kept (fewer only on ties at p_(k)). When there are at
  most k valid pixels all are kept (mmsegmentation then drops those equal to the largest p).
  """
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  valid, safe_labels = _valid_and_safe(labels, logits.shape[-1], ignore_label)
  # Invalid pixels get p = inf: never kept, and sorted after all valid ones.
  prob = jnp.where(valid, _true_class(jax.nn.softmax(logits), safe_labels), jnp.inf)
  num_kept = min_kept * labels.shape[0]
  kth_smallest = jnp.sort(prob.ravel())[num_kept] if num_kept < prob.size else jnp.inf
  return prob < jnp.maximum(thresh, kth_smallest)


def ohem_cross_entropy(logits, labels, *, ignore_label, thresh, min_kept,
                       class_weights=None, label_smoothing=0.0):
  """`cross_entropy` averaged over the pixels `ohem_mask` keeps (mmsegmentation averages
  over all B*H*W pixels instead, which scales the loss by the kept fraction)."""
  kept = ohem_mask(logits, labels, ignore_label=ignore_label, thresh=thresh,
                   min_kept=min_kept)
  logits = logits.astype(jnp.float32)
  _, safe_labels = _valid_and_safe(labels, logits.shape[-1], ignore_label)
  per_pixel = _pixel_cross_entropy(jax.nn.log_softmax(logits), safe_labels, label_smoothing)
  return _weighted_mean(per_pixel, kept, safe_labels, class_weights)


def dice(logits, labels, *, ignore_label):
  """1 - mean over all C classes of the soft Dice score over the whole batch.

  Dice_c = (2 sum_i p_ic y_ic + s) / (sum_i p_ic + sum_i y_ic + s) over valid pixels, p the
  softmax, y the one-hot labels, s = DICE_SMOOTH (a class absent from labels and
  prediction scores 1).
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  valid, safe_labels = _valid_and_safe(labels, num_classes, ignore_label)
  mask = valid[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits) * mask
  one_hot = jax.nn.one_hot(safe_labels, num_classes) * mask
  axes = (0, 1, 2)
  overlap = jnp.sum(probs * one_hot, axes)
  total = jnp.sum(probs, axes) + jnp.sum(one_hot, axes)
  return 1 - jnp.mean((2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH))


def focal(logits, labels, *, ignore_label, gamma, alpha=None):
  """Softmax focal loss (Lin et al. 2017) averaged over the valid pixels.

  FL_i = -alpha[y_i] (1 - p_i)^gamma log p_i, p_i the probability of the true class.
  alpha: None (1 for every class) or [C]; Lin et al.'s binary alpha a is (1 - a, a).
  """
  logits = logits.astype(jnp.float32)
  valid, safe_labels = _valid_and_safe(labels, logits.shape[-1], ignore_label)
  log_p = _true_class(jax.nn.log_softmax(logits), safe_labels)
  # 1 - p without cancellation; the floor keeps the gradient finite for gamma < 1 at p = 1.
  one_minus_p = jnp.maximum(-jnp.expm1(log_p), jnp.finfo(jnp.float32).tiny)
  per_pixel = -(one_minus_p ** gamma) * log_p
  if alpha is not None:
    per_pixel = per_pixel * jnp.asarray(alpha, jnp.float32)[safe_labels]
  return jnp.sum(jnp.where(valid, per_pixel, 0)) / jnp.maximum(jnp.sum(valid), 1)


def _lovasz_class(errors, foreground):
  """Lovasz extension of the Jaccard loss of one class over N pixels (both [N]).

  errors |y - p| sorted in decreasing order are dotted with the gradient of the Jaccard
  loss: J_k = 1 - (G - F_k) / (G + K_k), with G the class's pixels, F_k and K_k the
  foreground and background pixels among the k largest errors; grad_k = J_k - J_(k-1).
  Ignored pixels must have error 0: they then sort after every pixel with an error and
  whatever they change in J_k multiplies an error of 0.
  """
  order = jnp.argsort(-errors)
  errors, foreground = errors[order], foreground[order]
  num_foreground = jnp.sum(foreground)
  intersection = num_foreground - jnp.cumsum(foreground)
  union = num_foreground + jnp.cumsum(1 - foreground)  # >= 1: G > 0 or K_1 = 1
  jaccard = 1 - intersection / union
  gradient = jnp.concatenate([jaccard[:1], jnp.diff(jaccard)])
  return jnp.dot(errors, gradient)


def _lovasz_flat(probs, labels, valid):
  """(loss averaged over present classes, whether any class is present) of pixels [N, C]."""
  num_classes = probs.shape[-1]
  foreground = (labels[:, None] == jnp.arange(num_classes)) & valid[:, None]
  foreground = foreground.astype(jnp.float32)
  errors = jnp.abs(foreground - probs) * valid[:, None]
  per_class = jax.vmap(_lovasz_class, in_axes=1)(errors, foreground)
  present = jnp.sum(foreground, axis=0) > 0
  num_present = jnp.sum(present)
  loss = jnp.sum(jnp.where(present, per_class, 0)) / jnp.maximum(num_present, 1)
  return loss, num_present > 0


def lovasz_softmax(logits, labels, *, ignore_label, per_image=False):
  """Lovasz-softmax loss (Berman et al. 2018) over the classes present in the labels.

  per_image=False: one loss over all the batch's pixels; True: the mean over the images
  that have a valid pixel (the reference code also counts images without any as 0).
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  valid, safe_labels = _valid_and_safe(labels, num_classes, ignore_label)
  probs = jax.nn.softmax(logits)
  if not per_image:
    return _lovasz_flat(probs.reshape(-1, num_classes), safe_labels.ravel(), valid.ravel())[0]
  batch = labels.shape[0]
  losses, present = jax.vmap(_lovasz_flat)(probs.reshape(batch, -1, num_classes),
                                           safe_labels.reshape(batch, -1),
                                           valid.reshape(batch, -1))
  return jnp.sum(jnp.where(present, losses, 0)) / jnp.maximum(jnp.sum(present), 1)


LOSSES = {
    'cross_entropy': cross_entropy,
    'ohem_cross_entropy': ohem_cross_entropy,
    'dice': dice,
    'focal': focal,
    'lovasz_softmax': lovasz_softmax,
}


def _term(name, loss_config, ignore_label, class_weights):
  """The loss function `name` with its options from `loss_config` bound."""
  options = {
      'cross_entropy': dict(class_weights=class_weights,
                            label_smoothing=loss_config.label_smoothing),
      'ohem_cross_entropy': dict(class_weights=class_weights,
                                 label_smoothing=loss_config.label_smoothing,
                                 thresh=loss_config.ohem_thresh,
                                 min_kept=loss_config.ohem_min_kept),
      'dice': {},
      'focal': dict(gamma=loss_config.focal_gamma,
                    alpha=tuple(loss_config.focal_alpha) or None),
      'lovasz_softmax': dict(per_image=loss_config.lovasz_per_image),
  }[name]
  return functools.partial(LOSSES[name], ignore_label=ignore_label, **options)


def make_loss(loss_config, *, ignore_label, class_weights):
  """`(logits, labels) -> (sum_t weight_t * term_t, {name_t: term_t})` for loss_config.terms.

  class_weights: None or [C], used by the cross-entropy terms in place of
  loss_config.class_weights (the caller resolves fixed or computed weights).
  """
  terms = [(name, float(weight), _term(name, loss_config, ignore_label, class_weights))
           for name, weight in loss_config.terms]

  def loss(logits, labels):
    values = {name: fn(logits, labels) for name, _, fn in terms}
    return sum(weight * values[name] for name, weight, _ in terms), values

  return loss


# ---------------------------------------------------------------------------- class weights

def supervised_loss(pixel_loss, logits, aux_logits, labels, aux_weight):
  """The loss of a model's logits [B, H, W, C] and its auxiliary heads' (a sequence of
  [B, H, W, C], maybe empty) against labels [B, H, W] -> (loss, metrics).

  loss = pixel_loss(logits) + aux_weight * the sum of pixel_loss(aux) (`pixel_loss` from
  `make_loss`). metrics: 'loss', '<term>_loss' for each term of the main head's loss when
  there are several, and 'main_loss', 'aux_loss' with auxiliary heads.
  """
  loss, terms = pixel_loss(logits, labels)
  parts = {f'{name}_loss': value for name, value in terms.items()} if len(terms) > 1 else {}
  if aux_logits:
    aux_loss = sum(pixel_loss(aux, labels)[0] for aux in aux_logits)
    parts.update(main_loss=loss, aux_loss=aux_loss)
    loss = loss + aux_weight * aux_loss
  return loss, {'loss': loss, **parts}


def count_label_pixels(label_batches, num_classes, ignore_label):
  """Pixel counts of the labels in `label_batches` (iterable of int [B, H, W] arrays).

  Returns (class_pixels [C], image_pixels [C]) int64: the valid pixels of each class, and
  the valid pixels of the images in which that class appears.
  """
  class_pixels = np.zeros(num_classes, np.int64)
  image_pixels = np.zeros(num_classes, np.int64)
  for labels in label_batches:
    for image in np.asarray(labels).reshape(len(labels), -1):
      valid = (image != ignore_label) & (image >= 0) & (image < num_classes)
      counts = np.bincount(image[valid], minlength=num_classes)
      class_pixels += counts
      image_pixels += np.where(counts > 0, counts.sum(), 0)
  return class_pixels, image_pixels


def class_weights_from_counts(class_pixels, image_pixels, method):
  """Per-class loss weights [C] (float64) from `count_label_pixels`'s counts.

  'inverse_frequency': w_c = N / (C n_c), n_c the class's pixels, N all valid pixels (each
    class then carries the same total weight).
  'median_frequency': Eigen & Fergus (2015): w_c = median(f) / f_c with
    f_c = n_c / (valid pixels of the images where c appears), median over the seen classes.
  A class never seen is at least as rare as the rarest seen one and gets the largest weight.
  """
  class_pixels = np.asarray(class_pixels, np.float64)
  seen = class_pixels > 0
  if not seen.any():
    raise DataError('no labelled pixel in the labels scanned for class weights')
  if method == 'inverse_frequency':
    frequency = class_pixels / class_pixels.sum()
    reference = 1 / len(class_pixels)
  elif method == 'median_frequency':
    frequency = class_pixels / np.maximum(image_pixels, 1)
    reference = np.median(frequency[seen])
  else:
    raise ConfigError(f'unknown class weighting {method!r}; valid: '
                     f'{", ".join(CLASS_WEIGHTINGS[1:])}')
  weights = reference / np.where(seen, frequency, np.inf)
  return np.where(seen, weights, weights.max())
