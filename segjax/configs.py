"""Config defaults shared by the experiment files, variant parsing, and validation.

Every experiment's `get_config(arg)` starts from `base_config()` and sets the model; the
`arg` after the colon on the command line (`experiments/unet.py:depth=4,features=32`) is
parsed by `parse_arg` against the variants the file declares.
"""
import ast
import os

import jax
import ml_collections

from segjax import data as data_lib
from segjax import losses
from segjax import models as models_lib
from segjax import optim
from segjax.models import resnet
from segjax.errors import ConfigError


def base_config():
  """Fields every experiment has; defaults train on the embedded shapes dataset."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 4000
  config.batch_size = 16  # global, over all devices and processes
  config.eval_batch_size = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.log_every = 100
  config.max_to_keep = 2

  config.model = ml_collections.ConfigDict({'name': ''})
  # Path of published ImageNet backbone weights (.pth or .safetensors; see segjax/pretrained.py).
  config.init_from = ''

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'shapes'
  config.dataset.data_dir = ''  # '' -> ~/.cache/segjax/tensorflow_datasets
  # Real datasets' original files (read once); '' -> <data_dir>/downloads/manual/<name>.
  config.dataset.source_dir = ''
  # Training crop in pixels: a side or (height, width); shapes: the generated image side.
  config.dataset.image_size = ml_collections.FieldReference(32, field_type=object)
  # Evaluation images and labels are padded (never resized) to this side or (height,
  # width); 0: the largest validation image rounded up to a multiple of 32.
  config.dataset.eval_pad_size = ml_collections.FieldReference(0, field_type=object)
  config.dataset.num_train = 4000  # shapes only: examples generated per split
  config.dataset.num_validation = 500
  config.dataset.generator_seed = 0
  config.dataset.min_scale = 0.75  # random rescale range of training images
  config.dataset.max_scale = 1.5
  config.dataset.flip = True
  config.dataset.mean = (0.5, 0.5, 0.5)  # per-channel, of images scaled to [0, 1]
  config.dataset.std = (0.25, 0.25, 0.25)
  config.dataset.num_threads = 2  # grain reader threads
  config.dataset.check_label_batches = 4  # first batches whose labels are validated
  config.dataset.voc_train_split = 'train_aug'  # voc: 'train_aug' (needs SBD) or 'train'
  config.dataset.pets_boundary = 'class'  # pets: trimap boundary as a class or 'ignore'
  config.dataset.class_names = ()  # folder: one name per class, in class-index order
  config.dataset.palette = ()  # folder: one (r, g, b) per class for colour masks; (): indices
  config.dataset.ignore_colours = ()  # folder: (r, g, b) colours of ignored mask pixels
  config.dataset.image_dir = 'images'  # folder: relative to source_dir, or absolute
  config.dataset.mask_dir = 'masks'
  config.dataset.validation_fraction = 0.1  # folder without train.txt/val.txt

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 3e-3
  config.optimizer.momentum = 0.9  # sgd
  config.optimizer.nesterov = False  # sgd
  config.optimizer.b1 = 0.9  # adam, adamw
  config.optimizer.b2 = 0.999
  config.schedule = 'cosine'
  config.warmup_steps = 100
  config.poly_power = 0.9
  config.end_learning_rate = 0.0  # where 'poly' and 'cosine' end (mmsegmentation: 1e-4)
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0  # 0 disables clipping

  # The loss is a weighted sum of terms (segjax/losses.py): (name, weight) pairs, e.g.
  # --config.loss.terms="(('cross_entropy', 1.0), ('dice', 0.5))". Names: cross_entropy,
  # ohem_cross_entropy, dice, focal, lovasz_softmax.
  config.loss = ml_collections.ConfigDict()
  config.loss.terms = (('cross_entropy', 1.0),)
  # Class weights of the cross-entropy terms: a fixed tuple, one per class (empty: none), or
  # computed at start from the labels of the first `class_weighting_batches` training batches
  # (augmented crops): 'none', 'inverse_frequency' or 'median_frequency' (Eigen & Fergus).
  config.loss.class_weights = ()
  config.loss.class_weighting = 'none'
  config.loss.class_weighting_batches = 50
  config.loss.label_smoothing = 0.0  # cross-entropy terms: target (1 - eps) one-hot + eps / C
  config.loss.ohem_thresh = 0.7  # ohem: keep pixels whose true-class probability is below,
  config.loss.ohem_min_kept = 100000  # and at least this many hardest pixels per image
  config.loss.focal_gamma = 2.0
  config.loss.focal_alpha = ()  # focal: empty, or one weight per class
  config.loss.lovasz_per_image = False  # lovasz_softmax: mean of per-image losses
  # Weight of the auxiliary head's loss (the same terms), for models that have one.
  config.loss.aux_weight = 0.4
  return config


def parse_arg(arg, **defaults):
  """'k1=v1,k2=v2' -> ConfigDict of `defaults` updated by the given values.

  Values are Python literals where they parse as one (numbers, tuples, booleans) and
  strings otherwise. Keys not in `defaults` are refused with the valid ones listed.
  """
  variant = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(f'bad config argument {item!r}: expected key=value with key in '
                        f'{sorted(defaults)}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    variant[key] = value
  return variant


def resnet_depth(name):
  """'resnet50' -> 50, for experiment arguments that name a ResNet backbone."""
  valid = [f'resnet{depth}' for depth in resnet.DEPTHS]
  if name not in valid:
    raise ConfigError(f'unknown backbone {name!r}; valid: {", ".join(valid)}')
  return int(name[len('resnet'):])


def _require(condition, message):
  if not condition:
    raise ConfigError(message)


def _is_size(value):
  """Whether `value` is a positive int or a pair of them (a side, or height and width)."""
  sides = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
  return all(isinstance(side, int) and not isinstance(side, bool) and side > 0
             for side in sides)


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_loss(loss, spec):
  """Refuses unknown loss terms and impossible loss options; `spec` gives the classes."""
  terms = loss.terms
  _require(isinstance(terms, (tuple, list)) and terms and all(
      isinstance(term, (tuple, list)) and len(term) == 2 and isinstance(term[0], str)
      and _is_number(term[1]) for term in terms),
           f'loss.terms must be (name, weight) pairs, e.g. '
           f"(('cross_entropy', 1.0), ('dice', 0.5)); got {terms!r}")
  for name, weight in terms:
    _require(name in losses.LOSSES,
             f'unknown loss term {name!r} in loss.terms; valid: {", ".join(losses.LOSSES)}')
    _require(weight > 0, f'loss term {name!r} has weight {weight}; weights must be positive')
  names = [name for name, _ in terms]
  _require(len(set(names)) == len(names), f'loss.terms names a term twice: {names}')
  _require(loss.class_weighting in losses.CLASS_WEIGHTINGS,
           f'unknown loss.class_weighting {loss.class_weighting!r}; valid: '
           f'{", ".join(losses.CLASS_WEIGHTINGS)}')
  _require(not (loss.class_weights and loss.class_weighting != 'none'),
           'set either loss.class_weights or loss.class_weighting, not both')
  for field in ('class_weights', 'focal_alpha'):
    values = loss[field]
    _require(not values or len(values) == spec.num_classes,
             f'loss.{field} has {len(values)} values; dataset {spec.name!r} has '
             f'{spec.num_classes} classes')
    _require(all(_is_number(v) and v >= 0 for v in values),
             f'loss.{field} must be non-negative numbers, got {values!r}')
  _require(loss.class_weighting_batches > 0, 'loss.class_weighting_batches must be positive')
  _require(0 <= loss.label_smoothing < 1,
           f'loss.label_smoothing must be in [0, 1), got {loss.label_smoothing}')
  _require(0 < loss.ohem_thresh <= 1,
           f'loss.ohem_thresh must be in (0, 1], got {loss.ohem_thresh}')
  _require(loss.ohem_min_kept >= 0,
           f'loss.ohem_min_kept must be >= 0, got {loss.ohem_min_kept}')
  _require(loss.focal_gamma >= 0, f'loss.focal_gamma must be >= 0, got {loss.focal_gamma}')
  _require(loss.aux_weight >= 0, f'loss.aux_weight must be >= 0, got {loss.aux_weight}')


def validate(config):
  """Refuses unknown names and impossible values before anything is built or compiled."""
  model = models_lib.get_model(config.model, num_classes=2)  # name and fields
  if config.init_from:
    _require(os.path.isfile(config.init_from),
             f'init_from file {config.init_from!r} does not exist')
    _require(getattr(model, 'backbone_module', lambda: None)() is not None,
             f'model {config.model.name!r} with these fields cannot start from published '
             'backbone weights; unset init_from')
  spec = data_lib.get_spec(config.dataset)  # and the dataset's own fields
  _require(config.optimizer.name in optim.OPTIMIZERS,
           f'unknown optimizer.name {config.optimizer.name!r}; valid: '
           f'{", ".join(optim.OPTIMIZERS)}')
  _require(config.schedule in optim.SCHEDULES,
           f'unknown schedule {config.schedule!r}; valid: {", ".join(optim.SCHEDULES)}')
  for field in ('total_steps', 'batch_size', 'eval_batch_size', 'eval_every',
                'checkpoint_every', 'log_every', 'max_to_keep'):
    _require(int(config[field]) > 0, f'{field} must be positive, got {config[field]}')
  _require(_is_size(config.dataset.image_size),
           'dataset.image_size must be a positive int or a (height, width) pair of them, '
           f'got {config.dataset.image_size!r}')
  _require(config.dataset.eval_pad_size == 0 or _is_size(config.dataset.eval_pad_size),
           'dataset.eval_pad_size must be 0 (the largest image), a positive int or a '
           f'(height, width) pair of them, got {config.dataset.eval_pad_size!r}')
  _require(0 < config.dataset.min_scale <= config.dataset.max_scale,
           'need 0 < dataset.min_scale <= dataset.max_scale')
  _require(config.optimizer.learning_rate > 0, 'optimizer.learning_rate must be positive')
  _require(0 <= config.end_learning_rate <= config.optimizer.learning_rate,
           f'end_learning_rate ({config.end_learning_rate}) must be in [0, '
           f'optimizer.learning_rate={config.optimizer.learning_rate}]')
  _require(0 <= config.warmup_steps < config.total_steps,
           f'warmup_steps ({config.warmup_steps}) must be in [0, total_steps)')
  _require(len(config.dataset.mean) == len(config.dataset.std),
           'dataset.mean and dataset.std need one value per input channel')
  _validate_loss(config.loss, spec)
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    _require(config[field] % devices == 0,
             f'{field}={config[field]} is not divisible by the {devices} devices; '
             f'use a multiple of {devices}')
