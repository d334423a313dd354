"""Semi-supervised segmentation: train with the labels of a subset of the train split and
use the other examples as unlabelled data (`config.semi_supervised`).

The labelled subset is the first `labelled_count` (or `labelled_fraction` of the split)
examples of a permutation drawn with `split_seed`, not with `config.seed`: runs of every
training seed share one labelled subset, and the subsets of one split_seed are nested. The
unlabelled examples are all the others; their labels are dropped in the pipeline.

Methods (`semi_supervised.method`):
- 'none': supervised training on the labelled subset only (the baseline).
- 'mean_teacher' (Tarvainen & Valpola 2017; for segmentation French et al. 2020): the
  teacher's parameters and BatchNorm statistics are an exponential moving average of the
  student's (`ema_update`, decay `teacher_decay`), kept in `TrainState.teacher` and
  checkpointed with it. The unsupervised loss is the mean squared difference between the
  student's softmax on the strong view and the teacher's on the weak view
  (`consistency_loss`). Evaluation and prediction use the teacher, as the literature reports.
- 'fixmatch' (Sohn et al. 2020; pixel-wise as in UniMatch, Yang et al. 2023): the student's
  own prediction on the weak view (gradient stopped) gives each pixel a pseudo-label, kept
  where its probability is >= `threshold`; the unsupervised loss is the student's
  cross-entropy on the strong view against them, summed over the kept pixels and divided by
  all (valid) unlabelled pixels (`pseudo_label_loss`).

Views of an unlabelled image (`unlabelled_views`): the weak view is the training geometry
only (scale, crop, pad, flip; no photometric distortion); the strong view is the weak view
further distorted by `strong_distortion` and CutOut (`cutout`): both share their geometry,
so pixel (i, j) of one is pixel (i, j) of the other. Padding pixels are excluded from both
losses by the `valid` mask.

The step (`semi_train_step`) takes the labelled and unlabelled batches together, as
`batch = {'image', 'label', 'unlabelled': {'weak', 'strong', 'valid'}}`, so it compiles with
`parallel.compile_step` like the supervised step. The student sees the labelled images and
the strong views in one training-mode forward pass (BatchNorm statistics of both, as in
FixMatch); the weak-view targets come from an inference-mode pass (BatchNorm running
statistics, no dropout). The weight of the unsupervised loss is `weight` times `rampup`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from segjax import losses
from segjax import models as models_lib
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError

METHODS = ('none', 'mean_teacher', 'fixmatch')
RAMPUPS = ('sigmoid', 'linear', 'none')
# The strong view's colour distortion: wider ranges than the dataset.* photometric defaults
# (32, (0.5, 1.5), (0.5, 1.5), 18), about UniMatch's ColorJitter(0.5, 0.5, 0.5, 0.25).
STRONG_DISTORTION = dict(brightness_delta=64.0, contrast_range=(0.4, 1.6),
                         saturation_range=(0.2, 1.8), hue_delta=36)


# ---------------------------------------------------------------------------- data

def labelled_split(num_examples, semi_config):
  """(labelled, unlabelled): sorted int64 indices partitioning range(num_examples).

  The labelled ones are the first `semi_config.labelled_count` (when > 0, else
  round(labelled_fraction * num_examples), at least 1) of a permutation of the indices
  drawn with `semi_config.split_seed`.
  """
  count = semi_config.labelled_count or max(
      1, round(semi_config.labelled_fraction * num_examples))
  if count > num_examples:
    raise ConfigError(f'semi_supervised.labelled_count={count} exceeds the {num_examples} '
                      'training examples; use at most that many')
  order = np.random.default_rng(semi_config.split_seed).permutation(num_examples)
  return np.sort(order[:count]), np.sort(order[count:])


class Subset:
  """The examples of `source` at `indices`, in that order (a random-access source)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]


def split_sources(train_source, semi_config):
  """(labelled source, unlabelled source or None) of the train split.

  With every example labelled (and method 'none') the source itself is the labelled one;
  a method other than 'none' needs at least one unlabelled example (ConfigError).
  """
  labelled, unlabelled = labelled_split(len(train_source), semi_config)
  if semi_config.method == 'none':
    return (train_source if not len(unlabelled) else Subset(train_source, labelled)), None
  if not len(unlabelled):
    raise ConfigError(f'semi_supervised.method={semi_config.method!r} has no unlabelled '
                      f'examples: all {len(labelled)} are labelled; lower '
                      'semi_supervised.labelled_fraction (or labelled_count)')
  return Subset(train_source, labelled), Subset(train_source, unlabelled)


def strong_distortion(channels):
  """The strong view's `transforms.Photometric` (STRONG_DISTORTION) on `channels` channels."""
  return transforms.Photometric(**STRONG_DISTORTION, channels=channels)


def cutout(rng, image, fraction):
  """image [H, W, C] with a rectangle of round(fraction * H) x round(fraction * W) pixels,
  centred on a uniformly drawn pixel and clipped at the borders, set to 0 (a normalised
  image's mean colour). A new array; fraction 0 leaves the image as it is."""
  height, width = image.shape[:2]
  cut_height, cut_width = round(fraction * height), round(fraction * width)
  top = rng.integers(height) - cut_height // 2
  left = rng.integers(width) - cut_width // 2
  image = image.copy()
  image[max(0, top):top + cut_height, max(0, left):left + cut_width] = 0
  return image


def unlabelled_views(rng, image, *, crop_size, min_scale, max_scale, flip, base_size,
                     distortion, cutout_fraction, mean, std):
  """One unlabelled image [H, W, C] uint8 -> (weak, strong, valid).

  weak: `transforms.train_augment`'s geometry (rescale, crop, pad, flip; no colour change),
  normalised, float32 [h, w, C] (h, w: crop_size). strong: the weak crop distorted by
  `distortion` (a `transforms.Photometric`), normalised, then `cutout` with
  `cutout_fraction` (0: none). valid: bool [h, w], False on padding.
  """
  blank = np.zeros(image.shape[:2], np.uint8)  # carried through the geometry; padding is 1
  weak, padding = transforms.train_augment(
      rng, image, blank, crop_size=crop_size, min_scale=min_scale, max_scale=max_scale,
      flip=flip, ignore_label=1, base_size=base_size)
  strong = transforms.normalize(transforms.photometric_distortion(rng, weak, distortion),
                                mean, std)
  if cutout_fraction:
    strong = cutout(rng, strong, cutout_fraction)
  return transforms.normalize(weak, mean, std), strong, padding == 0


def unlabelled_batch_size(config):
  """The global unlabelled batch size: semi_supervised.unlabelled_batch_size or batch_size."""
  return config.semi_supervised.unlabelled_batch_size or config.batch_size


def unlabelled_batches(source, spec, config, *, start_step, process_index=0, process_count=1):
  """The infinite stream of this process's unlabelled batches from `start_step` on: dicts
  of 'weak' and 'strong' float32 [B, h, w, C] and 'valid' bool [B, h, w] (see
  `unlabelled_views`); the labels of `source` are dropped.

  As `pipeline.train_batches`, batch k is a pure function of (config, k); the stream's seed
  is derived from config.seed, distinct from the labelled stream's.
  """
  data = config.dataset
  distortion = strong_distortion(pipeline.photometric_channels(data))

  def augment(example, rng):
    image, _ = pipeline.decode(example, spec, len(data.mean))
    weak, strong, valid = unlabelled_views(
        rng, image, crop_size=data.image_size, min_scale=data.min_scale,
        max_scale=data.max_scale, flip=data.flip, base_size=data.base_size,
        distortion=distortion, cutout_fraction=config.semi_supervised.cutout,
        mean=data.mean, std=data.std)
    return {'weak': weak, 'strong': strong, 'valid': valid}

  seed = int(np.random.SeedSequence((config.seed, 1)).generate_state(1)[0])
  return pipeline.augmented_batches(
      source, augment, seed=seed, local_batch=unlabelled_batch_size(config) // process_count,
      start_step=start_step, process_index=process_index, process_count=process_count,
      num_threads=data.num_threads)


def with_unlabelled(labelled, unlabelled):
  """Yields each batch of `labelled` with the next of `unlabelled` as its 'unlabelled'."""
  for batch, unlabelled_batch in zip(labelled, unlabelled):
    yield {**batch, 'unlabelled': unlabelled_batch}


# ---------------------------------------------------------------------------- pure functions

def ema_update(teacher, student, decay):
  """decay * teacher + (1 - decay) * student, leaf by leaf of two pytrees of one structure."""
  return jax.tree.map(lambda t, s: decay * t + (1 - decay) * s, teacher, student)


def teacher_decay(step, ema_decay):
  """The EMA decay of the update that makes the teacher of student step `step` (>= 1):
  min(ema_decay, 1 - 1 / (step + 1)), Mean Teacher's warm-up (the early teacher weighs the
  few students so far about equally instead of keeping its random initialisation)."""
  return jnp.minimum(ema_decay, 1 - 1 / (step + 1))


def rampup(step, steps, kind='sigmoid'):
  """The unsupervised weight's factor in [0, 1] at `step` of a ramp-up over `steps` steps.

  With t = min(step / steps, 1): 'sigmoid' exp(-5 (1 - t)^2) (Laine & Aila 2017, Mean
  Teacher), 'linear' t. 'none' or steps == 0: 1.
  """
  if kind == 'none' or steps == 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0, 1)
  return t if kind == 'linear' else jnp.exp(-5 * (1 - t) ** 2)


def _valid_mean(values, valid):
  """Mean of values [B, H, W] over the pixels where `valid` [B, H, W] (0 without any)."""
  return jnp.sum(jnp.where(valid, values, 0)) / jnp.maximum(jnp.sum(valid), 1)


def consistency_loss(student_logits, teacher_probs, valid):
  """Mean Teacher's consistency loss: (softmax(student_logits) - teacher_probs)^2 averaged
  over the classes and the `valid` pixels.

  student_logits [B, H, W, C] (strong view), teacher_probs [B, H, W, C] (weak view; no
  gradient flows into them), valid bool [B, H, W]. A float32 scalar, 0 without valid pixels.
  """
  probs = jax.nn.softmax(student_logits.astype(jnp.float32))
  target = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
  return _valid_mean(jnp.mean((probs - target) ** 2, axis=-1), valid)


def pseudo_label_loss(logits_strong, probs_weak, threshold, valid=None):
  """FixMatch's loss -> (loss, mask fraction).

  Each pixel's pseudo-label is the argmax of probs_weak [B, H, W, C] (no gradient flows
  into them); it is kept where that probability is >= `threshold`. loss = the sum over kept
  pixels of the cross-entropy of logits_strong [B, H, W, C] against the pseudo-labels,
  divided by the number of `valid` pixels (bool [B, H, W]; None: all), kept or not
  (FixMatch's convention: confident pixels are not up-weighted when few). mask fraction:
  kept / valid pixels. Both float32 scalars, 0 without valid pixels.
  """
  probs_weak = jax.lax.stop_gradient(probs_weak.astype(jnp.float32))
  if valid is None:
    valid = jnp.ones(probs_weak.shape[:-1], bool)
  pseudo_labels = jnp.argmax(probs_weak, axis=-1)
  kept = valid & (jnp.max(probs_weak, axis=-1) >= threshold)
  log_probs = jax.nn.log_softmax(logits_strong.astype(jnp.float32))
  cross_entropy = -jnp.take_along_axis(log_probs, pseudo_labels[..., None], axis=-1)[..., 0]
  return _valid_mean(jnp.where(kept, cross_entropy, 0), valid), _valid_mean(kept, valid)


def inference_variables(state):
  """The variables {'params', 'batch_stats'} that evaluation and prediction use: the
  teacher's when the state has one (mean teacher), else the student's."""
  if state.teacher is not None:
    return state.teacher
  return {'params': state.params, 'batch_stats': state.batch_stats}


def initial_teacher(params, batch_stats, semi_config):
  """The teacher of a fresh train state: a copy of the student's variables for
  'mean_teacher', else None (no teacher)."""
  if semi_config.method != 'mean_teacher':
    return None
  return jax.tree.map(jnp.copy, {'params': params, 'batch_stats': batch_stats})


def semi_train_step(state, batch, rng, *, pixel_loss, aux_loss_weight, learning_rate_fn,
                    semi_config, axis_name=None):
  """One semi-supervised optimisation step -> (new state, scalar metrics).

  batch: 'image' float32 [B, H, W, C] and 'label' int32 [B, H, W] (labelled), 'unlabelled':
  'weak' and 'strong' float32 [U, H, W, C], 'valid' bool [U, H, W]. loss = the supervised
  loss of the labelled images (`losses.supervised_loss`, auxiliary heads included) +
  semi_config.weight * rampup * the unsupervised loss of `semi_config.method` ('mean_teacher'
  or 'fixmatch', see the module docstring). Under 'mean_teacher' the teacher is then moved
  towards the updated student (`ema_update` with `teacher_decay`). `axis_name`: as in
  `train.train_step` (gradients and metrics averaged over it, sync BatchNorm).
  Metrics: 'loss', 'supervised_loss', 'unsupervised_loss', 'unsupervised_weight',
  'mask_fraction' (fixmatch), 'grad_norm', 'learning_rate' and the supervised loss's parts.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if axis_name:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
  method = semi_config.method
  unlabelled = batch['unlabelled']
  num_labelled = batch['label'].shape[0]
  target_variables = (state.teacher if method == 'mean_teacher'
                      else {'params': state.params, 'batch_stats': state.batch_stats})
  targets = jax.nn.softmax(
      state.apply_fn(target_variables, unlabelled['weak'], train=False).astype(jnp.float32))
  targets = jax.lax.stop_gradient(targets)
  unsupervised_weight = semi_config.weight * rampup(
      state.step, semi_config.rampup_steps, semi_config.rampup)

  def loss_fn(params):
    images = jnp.concatenate([batch['image'], unlabelled['strong']])
    logits, aux_logits, batch_stats = models_lib.train_forward(
        state.apply_fn, {'params': params, 'batch_stats': state.batch_stats}, images,
        step_rng, axis_name)
    supervised, metrics = losses.supervised_loss(
        pixel_loss, logits[:num_labelled], [aux[:num_labelled] for aux in aux_logits],
        batch['label'], aux_loss_weight)
    if method == 'mean_teacher':
      unsupervised = consistency_loss(logits[num_labelled:], targets, unlabelled['valid'])
    else:
      unsupervised, metrics['mask_fraction'] = pseudo_label_loss(
          logits[num_labelled:], targets, semi_config.threshold, unlabelled['valid'])
    loss = supervised + unsupervised_weight * unsupervised
    metrics.update(loss=loss, supervised_loss=supervised, unsupervised_loss=unsupervised)
    return loss, (batch_stats, metrics)

  (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if method == 'mean_teacher':
    student = {'params': new_state.params, 'batch_stats': new_state.batch_stats}
    new_state = new_state.replace(teacher=ema_update(
        state.teacher, student, teacher_decay(new_state.step, semi_config.ema_decay)))
  return new_state, {**metrics, 'unsupervised_weight': unsupervised_weight,
                     'grad_norm': optax.tree.norm(grads),
                     'learning_rate': learning_rate_fn(state.step)}
