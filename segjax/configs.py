"""Config defaults shared by the experiment files, variant parsing, and validation.

Every experiment's `get_config(arg)` starts from `base_config()` and sets the model; the
`arg` after the colon on the command line (`experiments/unet.py:depth=4,features=32`) is
parsed by `parse_arg` against the variants the file declares.
"""
import ast
import copy
import os

import jax
import jax.numpy as jnp
import ml_collections

from segjax import data as data_lib
from segjax import evaluate as evaluate_lib
from segjax import losses
from segjax import models as models_lib
from segjax import optim
from segjax import parallel
from segjax import semi
from segjax import weights
from segjax.data import transforms
from segjax.models.backbones import resnet
from segjax.errors import ConfigError


# ImageNet statistics of images in [0, 1] (torchvision's; mmseg's 123.675, ... over 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
  # A step with a NaN or Inf loss or gradient norm: 'stop' training (naming the step and
  # the last good checkpoint) or 'skip' it (the parameters stay those of the step before).
  config.nonfinite = 'stop'
  config.log_images = 4  # validation images shown as TensorBoard panels per evaluation; 0: none
  # How the step spans the devices (segjax/parallel.py): 'jit' (XLA partitions one program)
  # or 'pmap' (per-device replicas, gradients averaged with lax.pmean, sync BatchNorm).
  config.parallelism = 'jit'
  config.half_precision = False  # bfloat16 compute; float32 parameters, optimizer and loss
  config.grad_accum_steps = 1  # micro-batches per optimizer step, each batch_size / this

  config.model = ml_collections.ConfigDict({'name': ''})
  # Published weights to start from: a whole segmentation checkpoint or a backbone's
  # (.pth/.pt/.bin or .safetensors; mmseg, torchvision, timm, Hugging Face; segjax/weights).
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
  config.dataset.min_scale = 0.75  # random rescale range of training images (mmseg's
  config.dataset.max_scale = 1.5  # ratio_range), relative to base_size
  # Training images are first rescaled to fit (long side, short side) keeping their aspect,
  # as mmseg's Resize(scale=(2048, 512), keep_ratio=True); one int S: (S, S); 0: no rescale.
  config.dataset.base_size = ml_collections.FieldReference(0, field_type=object)
  # Redraw a training crop (up to 10 times) while one class holds >= this fraction of its
  # labelled pixels or it has a single class (mmseg's RandomCrop); 1.0: off.
  config.dataset.cat_max_ratio = 1.0
  config.dataset.flip = True
  # mmseg's PhotoMetricDistortion of training images (the labels are untouched).
  config.dataset.photometric = False
  config.dataset.brightness_delta = 32.0  # added value in [-delta, delta], of 0-255 pixels
  config.dataset.contrast_range = (0.5, 1.5)  # pixels multiplied by a factor in this range
  config.dataset.saturation_range = (0.5, 1.5)  # HSV saturation multiplied likewise
  config.dataset.hue_delta = 18  # hue shifted by an int in [-delta, delta], units of 2 degrees
  # Leading image channels distorted: 3 (RGB) gets all four ops, another count only
  # brightness and contrast (e.g. 1 for grayscale, all bands of a multispectral image);
  # 0: every channel (one per dataset.mean value).
  config.dataset.photometric_channels = 0
  # Per-channel, of images scaled to [0, 1]; their length is the number of input channels
  # (dataset 'folder' reads any count, e.g. RGB-D or multispectral .npy; the others are RGB).
  config.dataset.mean = (0.5, 0.5, 0.5)
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
  # Weight decay applies to 'kernels' (ndim > 1: not biases, norm scales) or to 'all' (mmengine).
  config.optimizer.decay = 'kernels'
  # Parameter groups, mmengine's paramwise_cfg custom_keys: ((regex, lr_mult, decay_mult), ...);
  # the first regex found in a parameter's '/'-joined flax path ('decoder/classifier/kernel')
  # scales its learning rate and weight decay; unmatched parameters get (1.0, 1.0).
  config.optimizer.param_groups = ()
  # Layer-wise learning-rate decay (BEiT, ConvNeXt; mmseg's LearningRateDecayOptimizerConstructor):
  # layer l of the model's `layer_id` trains at rate ** (layer_decay_layers + 1 - l); 0: off.
  config.optimizer.layer_decay = 0.0
  config.optimizer.layer_decay_layers = 12
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

  # Validation inference (segjax/evaluate.py::make_predict).
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.mode = 'whole'  # 'whole' image, or 'slide' (sliding window)
  # slide: window side or (height, width), 0: the training crop dataset.image_size; stride
  # between windows, 0: two thirds of the window (overlapping logits are averaged).
  config.evaluation.window = ml_collections.FieldReference(0, field_type=object)
  config.evaluation.stride = ml_collections.FieldReference(0, field_type=object)
  # Test-time augmentation: image scales (e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)) and a
  # horizontal flip of each; the softmax probabilities of all views are averaged.
  config.evaluation.scales = (1.0,)
  config.evaluation.flip = False
  # The test protocol. pad True: images padded at the bottom/right to one size and inferred in
  # batches of eval_batch_size (dataset.eval_pad_size). pad False: as the benchmarks' own test
  # pipelines, every image inferred alone at its own size, never padded (the logits of models
  # with BatchNorm and global pooling change with padding); 'slide' windows shrink to images
  # smaller than them (mmsegmentation's slide_inference).
  config.evaluation.pad = True
  # With pad False, each image is first resized: '' not at all; 'fit' as mmsegmentation's test
  # Resize(scale=resize_scale, keep_ratio=True), resize_scale a (long side, short side) pair
  # ((2048, 512) ADE20K, (2048, 1024) Cityscapes), cv2-exact bilinear, labels kept at their
  # size and the logits resized back to it; 'short_side' as torchvision's reference
  # evaluation, T.Resize(resize_scale) with an int (520), labels resized nearest.
  config.evaluation.resize = ''
  config.evaluation.resize_scale = ml_collections.FieldReference(0, field_type=object)

  # Semi-supervised training (segjax/semi.py): the labels of a subset of the train split,
  # the other examples as unlabelled data.
  config.semi_supervised = ml_collections.ConfigDict()
  # 'none' (supervised, on the labelled subset), 'mean_teacher' or 'fixmatch'.
  config.semi_supervised.method = 'none'
  config.semi_supervised.labelled_fraction = 1.0  # of the train split whose labels are used
  config.semi_supervised.labelled_count = 0  # > 0: this many labelled examples instead
  config.semi_supervised.split_seed = 0  # draws the labelled subset (not config.seed)
  config.semi_supervised.unlabelled_batch_size = 0  # global; 0: batch_size
  config.semi_supervised.weight = 1.0  # of the unsupervised loss, after the ramp-up
  config.semi_supervised.rampup = 'sigmoid'  # of the weight: 'sigmoid', 'linear' or 'none'
  config.semi_supervised.rampup_steps = 0  # steps until the full weight; 0: from the start
  config.semi_supervised.ema_decay = 0.99  # mean_teacher: the teacher's EMA decay
  config.semi_supervised.threshold = 0.95  # fixmatch: pseudo-label confidence to keep a pixel
  config.semi_supervised.cutout = 0.5  # strong view: CutOut rectangle's side fraction; 0: off
  return config


def parse_arg(arg, **defaults):
  """'k1=v1,k2=v2' -> ConfigDict of `defaults` updated by the given values.

  Values are Python literals where they parse as one (numbers, tuples, booleans) and
  strings otherwise. Keys not in `defaults` are refused with the valid ones listed.
  """
  variant = ml_collections.ConfigDict(copy.deepcopy(defaults))  # FieldReferences are shared
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


def expand_recipe(arg, recipes):
  """'recipe_name,k=v' -> the recipe's 'k=v' list from `recipes` followed by the overrides;
  any other `arg` unchanged."""
  first, _, rest = (arg or '').partition(',')
  if first in recipes:
    return ','.join(filter(None, (recipes[first], rest)))
  return arg


def size_value(value):
  """A size argument of an experiment: '512x1024' -> (512, 1024) (height x width, or long x
  short for base sizes), '' -> 0 (unset); an int or a tuple stays as it is."""
  if isinstance(value, str):
    return tuple(int(side) for side in value.split('x')) if value else 0
  return value


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


def _validate_evaluation(evaluation, crop_size):
  """Refuses an unknown inference mode, bad window/stride sizes, non-positive scales and test
  protocols that do not fit together (resize, resize_scale, pad)."""
  modes = ', '.join(evaluate_lib.MODES)
  _require(evaluation.mode in evaluate_lib.MODES,
           f'unknown evaluation.mode {evaluation.mode!r}; valid: {modes}')
  for field in ('window', 'stride'):
    _require(evaluation[field] == 0 or _is_size(evaluation[field]),
             f'evaluation.{field} must be 0 (the default), a positive int or a (height, width) '
             f'pair of them, got {evaluation[field]!r}')
  window, stride = evaluate_lib.window_and_stride(evaluation, crop_size)
  _require(all(s <= w for s, w in zip(stride, window)),
           f'evaluation.stride {stride} is larger than the window {window}: pixels between '
           'windows would get no prediction; use a stride <= evaluation.window')
  scales = evaluation.scales
  _require(isinstance(scales, (tuple, list)) and scales
           and all(_is_number(s) and s > 0 for s in scales),
           f'evaluation.scales must be a non-empty tuple of positive numbers, e.g. (0.5, 1.0, '
           f'1.5), got {scales!r}')
  _validate_protocol(evaluation)


def _validate_protocol(evaluation):
  """Refuses an unknown evaluation.resize, a resize_scale that does not fit it, and a resize
  with padding (no benchmark pads resized images)."""
  resize, scale = evaluation.resize, evaluation.resize_scale
  _require(resize in transforms.RESIZES,
           f"unknown evaluation.resize {resize!r}; valid: '' (none), 'fit', 'short_side'")
  if resize == 'fit':
    _require(isinstance(scale, (tuple, list)) and len(scale) == 2 and _is_size(scale),
             "evaluation.resize='fit' needs evaluation.resize_scale as a (long side, short "
             'side) pair of positive ints, e.g. (2048, 512) for ADE20K or (2048, 1024) for '
             f'Cityscapes, got {scale!r}')
  elif resize == 'short_side':
    _require(_is_size(scale) and not isinstance(scale, (tuple, list)),
             "evaluation.resize='short_side' needs evaluation.resize_scale as one positive "
             f'int, the short side (torchvision: 520), got {scale!r}')
  else:
    _require(scale == 0, f'evaluation.resize_scale is {scale!r} but evaluation.resize is '
             "'' (no resize); set evaluation.resize='fit' or 'short_side', or leave "
             'resize_scale at 0')
  _require(not resize or not evaluation.pad,
           f'evaluation.resize={resize!r} needs evaluation.pad=False: the test protocols '
           'that resize infer each image alone at its own size, unpadded')


def _validate_semi_supervised(semi_config, config):
  """Refuses an unknown method and impossible semi-supervised fields (segjax/semi.py)."""
  _require(semi_config.method in semi.METHODS,
           f'unknown semi_supervised.method {semi_config.method!r}; valid: '
           f'{", ".join(semi.METHODS)}')
  _require(0 < semi_config.labelled_fraction <= 1,
           'semi_supervised.labelled_fraction must be in (0, 1], got '
           f'{semi_config.labelled_fraction}')
  for field in ('labelled_count', 'unlabelled_batch_size', 'rampup_steps'):
    _require(semi_config[field] >= 0,
             f'semi_supervised.{field} must be >= 0, got {semi_config[field]}')
  _require(semi_config.weight >= 0,
           f'semi_supervised.weight must be >= 0, got {semi_config.weight}')
  _require(semi_config.rampup in semi.RAMPUPS,
           f'unknown semi_supervised.rampup {semi_config.rampup!r}; valid: '
           f'{", ".join(semi.RAMPUPS)}')
  _require(0 <= semi_config.ema_decay < 1,
           f'semi_supervised.ema_decay must be in [0, 1), got {semi_config.ema_decay}')
  _require(0 <= semi_config.threshold <= 1,
           f'semi_supervised.threshold must be in [0, 1], got {semi_config.threshold}')
  _require(0 <= semi_config.cutout < 1,
           f'semi_supervised.cutout must be in [0, 1) (0: off), got {semi_config.cutout}')
  if semi_config.method == 'none':
    return
  _require(config.grad_accum_steps == 1,
           f'semi_supervised.method={semi_config.method!r} does not support '
           f'grad_accum_steps={config.grad_accum_steps}; set grad_accum_steps=1')
  _require(semi_config.labelled_fraction < 1 or semi_config.labelled_count > 0,
           f'semi_supervised.method={semi_config.method!r} needs unlabelled examples; set '
           'semi_supervised.labelled_fraction below 1 (or labelled_count)')
  devices = jax.device_count()
  _require(semi.unlabelled_batch_size(config) % devices == 0,
           f'semi_supervised.unlabelled_batch_size={semi.unlabelled_batch_size(config)} is not '
           f'divisible by the {devices} devices; use a multiple of {devices}')


def _is_range(value):
  """Whether `value` is a (lower, upper) pair of numbers with 0 <= lower <= upper."""
  return (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value))
          and 0 <= value[0] <= value[1])


def _validate_augmentation(data, distorted):
  """Refuses impossible input channels and augmentation fields of `data` (config.dataset);
  the photometric fields only when `distorted` (photometric distortion or a strong view)."""
  channels = len(data.mean)
  _require(channels > 0 and len(data.std) == channels,
           f'dataset.mean ({len(data.mean)} values) and dataset.std ({len(data.std)}) need '
           'one value per input channel')
  _require(all(_is_number(s) and s > 0 for s in data.std),
           f'dataset.std must be positive numbers, got {tuple(data.std)!r}')
  _require(data.name == 'folder' or channels == 3,
           f'dataset {data.name!r} has RGB images but dataset.mean has {channels} values; '
           "give 3, or use dataset 'folder' for other channel counts")
  _require(data.base_size == 0 or _is_size(data.base_size),
           'dataset.base_size must be 0 (no rescale), a positive int or a (long side, short '
           f'side) pair of them, got {data.base_size!r}')
  _require(_is_number(data.cat_max_ratio) and 0 < data.cat_max_ratio <= 1,
           f'dataset.cat_max_ratio must be in (0, 1] (1: off), got {data.cat_max_ratio!r}')
  _require(isinstance(data.photometric, bool),
           f'dataset.photometric must be True or False, got {data.photometric!r}')
  _require(_is_number(data.brightness_delta) and 0 <= data.brightness_delta <= 255,
           f'dataset.brightness_delta must be in [0, 255], got {data.brightness_delta!r}')
  for field in ('contrast_range', 'saturation_range'):
    _require(_is_range(data[field]),
             f'dataset.{field} must be a (lower, upper) pair with 0 <= lower <= upper, got '
             f'{data[field]!r}')
  _require(isinstance(data.hue_delta, int) and 0 <= data.hue_delta <= 90,
           f'dataset.hue_delta must be an int in [0, 90] (units of 2 degrees), got '
           f'{data.hue_delta!r}')
  _require(not distorted or isinstance(data.photometric_channels, int)
           and 0 <= data.photometric_channels <= channels,
           f'dataset.photometric_channels must be an int in [0, {channels}] (the channels of '
           f'dataset.mean; 0: all of them), got {data.photometric_channels!r}')


_KINDS = {bool: ('True or False', (bool,)), int: ('an int', (int,)),
          float: ('a number', (int, float)), str: ('a string', (str,)),
          tuple: ('a tuple', (tuple, list))}


def _check_names_and_types(config, defaults, prefix=''):
  """Refuses fields that `defaults` (base_config) lacks and values of another type than its
  default's, so the checks after compare numbers with numbers. `model` has its own fields
  (checked by get_model) and object-typed fields (a size or a pair) are checked one by one."""
  for name in config.keys():
    path = prefix + name
    _require(name in defaults, f'unknown config field {path!r}; the fields of '
             f'{prefix.rstrip(".") or "the config"} are: {", ".join(sorted(defaults.keys()))}')
    value, default = config[name], defaults[name]
    if isinstance(default, ml_collections.ConfigDict):
      _require(isinstance(value, (dict, ml_collections.ConfigDict)),
               f'{path} must be a section of fields, got {value!r}')
      if path != 'model':
        _check_names_and_types(value, default, path + '.')
      continue
    kind = defaults.get_ref(name).get_type()
    if kind not in _KINDS:
      continue
    description, types = _KINDS[kind]
    _require(isinstance(value, types) and (kind is bool or not isinstance(value, bool)),
             f'{path} must be {description} like its default {default!r}, got {value!r}')


def _check_model_input(model, config):
  """Traces (never compiles) the model on a training crop, so a crop size the model cannot
  take (e.g. not divisible by its stride) or a bad model field value is a ConfigError."""
  crop = jax.ShapeDtypeStruct(transforms.model_input_shape(config.dataset), jnp.float32)
  height, width = crop.shape[1:3]
  try:
    jax.eval_shape(lambda images: model.init(jax.random.key(0), images, train=False), crop)
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise ConfigError(f'model {config.model.name!r} cannot take the {height}x{width} '
                      f'dataset.image_size crops: {first_line}') from e


def validate(config):
  """Refuses unknown names and impossible values before anything is built or compiled."""
  _check_names_and_types(config, base_config())
  model = models_lib.get_model(config.model, num_classes=2)  # name and fields
  if config.init_from:
    _require(os.path.isfile(config.init_from),
             f'init_from file {config.init_from!r} does not exist')
    weights.check_loadable(model)
  spec = data_lib.get_spec(config.dataset)  # and the dataset's own fields
  _require(config.optimizer.name in optim.OPTIMIZERS,
           f'unknown optimizer.name {config.optimizer.name!r}; valid: '
           f'{", ".join(optim.OPTIMIZERS)}')
  _require(config.optimizer.decay in optim.DECAYS,
           f'unknown optimizer.decay {config.optimizer.decay!r}; valid: '
           f'{", ".join(optim.DECAYS)}')
  optim.check_param_groups(config.optimizer.param_groups)
  _require(0 <= config.optimizer.layer_decay <= 1 and config.optimizer.layer_decay_layers >= 1,
           'optimizer.layer_decay must be in [0, 1] (0: off) and optimizer.layer_decay_layers '
           f'>= 1, got {config.optimizer.layer_decay} and '
           f'{config.optimizer.layer_decay_layers}')
  if config.optimizer.layer_decay:
    optim.parameter_labels(config)  # the model must number its layers
  _require(config.schedule in optim.SCHEDULES,
           f'unknown schedule {config.schedule!r}; valid: {", ".join(optim.SCHEDULES)}')
  for field in ('total_steps', 'batch_size', 'eval_batch_size', 'eval_every',
                'checkpoint_every', 'log_every', 'max_to_keep'):
    _require(int(config[field]) > 0, f'{field} must be positive, got {config[field]}')
  _require(isinstance(config.log_images, int) and config.log_images >= 0,
           f'log_images must be a whole number >= 0 (0: no image panels), got '
           f'{config.log_images!r}')
  _require(_is_size(config.dataset.image_size),
           'dataset.image_size must be a positive int or a (height, width) pair of them, '
           f'got {config.dataset.image_size!r}')
  _require(config.dataset.eval_pad_size == 0 or _is_size(config.dataset.eval_pad_size),
           'dataset.eval_pad_size must be 0 (the largest image), a positive int or a '
           f'(height, width) pair of them, got {config.dataset.eval_pad_size!r}')
  _require(config.evaluation.pad or config.dataset.eval_pad_size == 0,
           f'dataset.eval_pad_size is {config.dataset.eval_pad_size!r} but '
           'evaluation.pad=False pads nothing; set dataset.eval_pad_size to 0')
  _require(0 < config.dataset.min_scale <= config.dataset.max_scale,
           'need 0 < dataset.min_scale <= dataset.max_scale')
  _validate_augmentation(config.dataset, config.dataset.photometric
                         or config.semi_supervised.method != 'none')
  _require(config.optimizer.learning_rate > 0, 'optimizer.learning_rate must be positive')
  _require(0 <= config.end_learning_rate <= config.optimizer.learning_rate,
           f'end_learning_rate ({config.end_learning_rate}) must be in [0, '
           f'optimizer.learning_rate={config.optimizer.learning_rate}]')
  _require(0 <= config.warmup_steps < config.total_steps,
           f'warmup_steps ({config.warmup_steps}) must be in [0, total_steps)')
  _validate_loss(config.loss, spec)
  _validate_evaluation(config.evaluation, config.dataset.image_size)
  _require(config.parallelism in parallel.PARALLELISMS,
           f'unknown parallelism {config.parallelism!r}; valid: '
           f'{", ".join(parallel.PARALLELISMS)}')
  _require(not config.half_precision or hasattr(model, 'dtype'),
           f'model {config.model.name!r} has no dtype field; unset half_precision')
  accum = config.grad_accum_steps
  _require(accum > 0, f'grad_accum_steps must be positive, got {accum}')
  # Every device takes an equal share of each micro-batch (under 'pmap' too: per process,
  # batch_size / processes over the local devices, as all processes have as many devices).
  devices = jax.device_count()
  per_step = devices * accum
  _require(config.batch_size % per_step == 0,
           f'batch_size={config.batch_size} is not divisible by the {devices} devices'
           + (f' x grad_accum_steps={accum}' if accum > 1 else '')
           + f'; use a multiple of {per_step}')
  _require(config.eval_batch_size % devices == 0,
           f'eval_batch_size={config.eval_batch_size} is not divisible by the {devices} '
           f'devices; use a multiple of {devices}')
  _validate_semi_supervised(config.semi_supervised, config)
  _require(config.nonfinite in ('stop', 'skip'),
           f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
  _require(config.dataset.name != 'shapes' or not config.dataset.eval_pad_size
           or _is_size(config.dataset.eval_pad_size)
           and min(transforms.height_width(config.dataset.eval_pad_size))
           >= config.dataset.image_size,
           f'dataset.eval_pad_size {config.dataset.eval_pad_size!r} is smaller than the '
           f'{config.dataset.image_size}-pixel shapes images; set it to 0 or at least '
           f'{config.dataset.image_size}')
  _check_model_input(model, config)
