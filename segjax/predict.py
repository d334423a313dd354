"""Prediction on image files with a trained checkpoint.

  python launch.py --config experiments/unet.py --mode predict --images photos/ --output out/

`--images` is a directory (its image files, sorted, not recursive: the extensions of
`segjax.data.folder.IMAGE_EXTENSIONS`, any case, hidden files skipped), a glob (quote it;
`**` recurses; every matching file is tried) or one file. For each image `--output` gets
  <stem>.png          the predicted classes: a palette PNG (mode 'P') whose pixel values are
                      class indices and whose palette is the dataset's class colours
  <stem>_overlay.png  the image blended with the class colours (alpha 0.5, visualize.OVERLAY_ALPHA)
at the image's own size. The model is the workdir's best checkpoint, else its latest; only
the dataset's spec (classes) is needed, not its prepared files.

Inputs are normalised as in evaluation and padded at the bottom and right (never resized)
to `dataset.eval_pad_size` when set and the image fits, else each side to `bucket_side`
(a multiple of 32 from at most four sizes per octave), so a folder of odd sizes compiles a
few shapes, not one per size; images of one padded size are predicted in batches and the
logits cropped back. With `evaluation.pad=False` (a benchmark's test protocol) each image
is instead resized as `evaluation.resize` says (`transforms.protocol_resize`), inferred at
that size without padding (images of one size share batches, one compiled shape per
size), and its logits are resized back to the image's own size (`evaluate.resize_logits`)
before the argmax. Palette, 1-bit, CMYK and YCbCr images are read as RGB, and grayscale
ones too when the model takes 3 channels; an image with another channel count than
`len(dataset.mean)`, a 16-bit or float image, or a file that does not decode is reported as
`skipped <path>: <reason>` and the others continue.
"""
import collections
import functools
import glob
import os

import jax
import numpy as np
from PIL import Image

from segjax import checkpoint as checkpoint_lib
from segjax import configs
from segjax import data as data_lib
from segjax import evaluate as evaluate_lib
from segjax import models as models_lib
from segjax import semi
from segjax import train
from segjax import visualize
from segjax import weights
from segjax.data import folder
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import DataError, SegjaxError

# Read as RGB: colour images stored another way ('1', 1-bit, is read as grayscale).
_AS_RGB_MODES = ('P', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_EIGHT_BIT_MODES = ('L', 'LA', 'RGB', 'RGBA')


# ---------------------------------------------------------------------------- inputs

def find_images(pattern):
  """Sorted paths named by `--images` (a directory, a glob or a file); SegjaxError if none."""
  if os.path.isdir(pattern):
    paths = [os.path.join(pattern, name) for name in os.listdir(pattern)
             if not name.startswith('.')
             and os.path.splitext(name)[1].lower() in folder.IMAGE_EXTENSIONS
             and os.path.isfile(os.path.join(pattern, name))]
  elif os.path.isfile(pattern):
    paths = [pattern]
  else:
    paths = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
  if not paths:
    raise SegjaxError(
        f'--images {pattern!r} names no image files: pass a directory of images '
        f'({" ".join(folder.IMAGE_EXTENSIONS)}), a quoted glob such as "photos/*.jpg", or '
        'one image file')
  return sorted(paths)


def read_image(path, channels):
  """uint8 [H, W, channels] of the image file at `path`; DataError saying why it is unusable."""
  try:
    with Image.open(path) as image:
      if image.mode in _AS_RGB_MODES:
        image = image.convert('RGB')
      elif image.mode == '1':
        image = image.convert('L')
      mode, pixels = image.mode, np.asarray(image)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot be read as an image ({e})') from e
  if mode not in _EIGHT_BIT_MODES:
    raise DataError(f'has pixel mode {mode} (not 8 bits per channel); save it as 8-bit RGB')
  pixels = pixels[..., None] if pixels.ndim == 2 else pixels
  if pixels.shape[-1] == 1 and channels == 3:  # grayscale: the gray value in r, g and b
    pixels = np.repeat(pixels, 3, axis=-1)
  if pixels.shape[-1] != channels:
    raise DataError(f'has {pixels.shape[-1]} channels (mode {mode}); the model takes '
                    f'{channels} (one per dataset.mean value): convert it')
  return pixels


def bucket_side(side, multiple=pipeline.EVAL_PAD_MULTIPLE):
  """`side` rounded up to a multiple of a step that is a quarter of the largest power of two
  <= `side`, and at least `multiple`: four sizes per octave (from 128 up, so padding adds
  under a quarter), e.g. 375 -> 384, 500 -> 512, 1025 -> 1280, 33 -> 64."""
  step = max(multiple, 2 ** (side.bit_length() - 1) // 4)
  step = -(-step // multiple) * multiple
  return -(-side // step) * step


def padded_size(height, width, eval_pad_size):
  """(height, width) an image is padded to for inference: `dataset.eval_pad_size` when set
  and the image fits in it, else each side's `bucket_side`."""
  if eval_pad_size:
    pad_height, pad_width = transforms.height_width(eval_pad_size)
    if height <= pad_height and width <= pad_width:
      return pad_height, pad_width
  return bucket_side(height), bucket_side(width)


# ---------------------------------------------------------------------------- model

def restore_variables(config, workdir):
  """(model, variables {'params', 'batch_stats'} on one device, source) of the best
  checkpoint in `workdir`, else its latest, else the whole model of `config.init_from`;
  source: {'checkpoint': its directory, 'which': 'best' or 'latest', 'step'} or
  {'init_from': the file, 'step': 0}. Builds the model and the train state's shapes only
  (no dataset is read, nothing is initialised); SegjaxError if there is neither."""
  spec = data_lib.get_spec(config.dataset)
  model = models_lib.get_model(config.model, spec.num_classes)
  input_shape = transforms.model_input_shape(config.dataset)
  shapes = jax.eval_shape(functools.partial(train.create_train_state, model=model,
                                            config=config, input_shape=input_shape),
                          jax.random.key(0))
  device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        shapes)
  state = None
  if os.path.isdir(workdir):
    checkpoints = checkpoint_lib.Checkpoints(workdir, config.max_to_keep)
    state, which = checkpoints.restore_best_or_latest(target)
    if state is not None:
      directory = getattr(checkpoints, which).directory
      source = {'checkpoint': os.path.join(str(directory), str(int(state.step))),
                'which': which, 'step': int(state.step)}
    checkpoints.close()
  if state is None and config.init_from:
    like = {'params': shapes.params, 'batch_stats': shapes.batch_stats}
    variables, part, message = weights.load(config.init_from, model, like)
    train.require_whole_model(part, config.init_from)
    print(f'No checkpoint in {workdir}: {message}', flush=True)
    return model, jax.device_put(variables, device), {'init_from': config.init_from, 'step': 0}
  if state is None:
    raise SegjaxError(f'no checkpoint in {workdir}; train first (same --config and --workdir), '
                      'pass the --workdir of a trained run, or published weights with '
                      '--config.init_from=FILE')
  return model, semi.inference_variables(state), source


def padded_batch(count, batch_size):
  """The batch `count` <= `batch_size` images are predicted in: the next power of two, at most
  `batch_size` (few compiled shapes, little wasted work)."""
  return min(batch_size, 1 << (count - 1).bit_length())


def classify(classify_fn, variables, images, size, batch, mean, std):
  """Argmax class maps [h, w] of uint8 `images` (each [h, w, C]), normalised and padded to
  `size` = (height, width) in a batch of `batch` >= len(images), cropped back after inference.

  classify_fn: jitted (variables, float32 [batch, height, width, C]) -> int [batch, height,
  width].
  """
  pixels = np.zeros((batch, *size, len(mean)), np.float32)  # 0: the mean colour
  for i, image in enumerate(images):
    pixels[i, :image.shape[0], :image.shape[1]] = transforms.normalize(image, mean, std)
  predictions = np.asarray(jax.device_get(classify_fn(variables, pixels)))
  return [prediction[:image.shape[0], :image.shape[1]]
          for prediction, image in zip(predictions, images)]


def classify_protocol(classify_fn, variables, inputs, size, batch, mean, std):
  """Argmax class maps [height, width] of uint8 `inputs` (each [h, w, C], one shape),
  normalised and inferred unpadded in a batch of `batch` >= len(inputs) rows (the extra rows
  zero), the logits resized to `size` = (height, width).

  classify_fn: `visualize.make_resized_classify`'s function.
  """
  pixels = np.zeros((batch, *inputs[0].shape[:2], len(mean)), np.float32)
  for i, image in enumerate(inputs):
    pixels[i] = transforms.normalize(image, mean, std)
  predictions = np.asarray(jax.device_get(classify_fn(variables, pixels, size)))
  return list(predictions[:len(inputs)])


# ---------------------------------------------------------------------------- outputs

def label_png(prediction, colours):
  """PIL palette image (mode 'P') of class indices [H, W] with `colours` [K, 3] as palette."""
  picture = Image.frombytes('P', prediction.shape[::-1],
                            prediction.astype(np.uint8).tobytes())
  picture.putpalette(colours.reshape(-1).tolist())
  return picture


def write_outputs(output, stem, image, prediction, colours):
  """Writes <stem>.png (label PNG) and <stem>_overlay.png under `output`."""
  label_png(prediction, colours).save(os.path.join(output, f'{stem}.png'))
  Image.fromarray(visualize.overlay(image, prediction, colours)).save(
      os.path.join(output, f'{stem}_overlay.png'))


def _output_stems(paths, output):
  """{path: output stem} (the file name without extension); SegjaxError if `output` holds
  input images (outputs could overwrite them, and be read as inputs by the next run)."""
  if os.path.realpath(output) in {os.path.realpath(os.path.dirname(path) or '.')
                                  for path in paths}:
    raise SegjaxError(f'--output {output} holds input images; choose another directory')
  return {path: os.path.splitext(os.path.basename(path))[0] for path in paths}


def predict_files(config, workdir, images, output):
  """Predicts every image `images` names (see the module docstring) into `output` with the
  best (else latest) checkpoint of `workdir`; prints a line per skipped file and a summary.

  Returns (number written, number skipped); SegjaxError if nothing could be predicted.
  """
  configs.validate(config)
  paths = find_images(images)
  stems = _output_stems(paths, output)
  spec = data_lib.get_spec(config.dataset)
  if spec.num_classes > 256:
    raise SegjaxError(f'dataset {spec.name!r} has {spec.num_classes} classes; label PNGs '
                      'hold at most 256')
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise SegjaxError(f'cannot create --output {output} ({e.strerror}); pass a writable '
                      'directory') from e
  model, variables, source = restore_variables(config, workdir)
  source = (f'the checkpoint at step {source["step"]} in {workdir}' if source['step']
            else config.init_from)
  print(f'Predicting {len(paths)} files with {source} ...',
        flush=True)
  predict = evaluate_lib.make_predict(model, config.evaluation, num_classes=spec.num_classes,
                                      crop_size=config.dataset.image_size)
  evaluation = config.evaluation
  protocol = not evaluation.pad  # a benchmark's protocol: resized, inferred unpadded
  classify_fn = (visualize.make_resized_classify(predict) if protocol
                 else visualize.make_classify(predict))
  colours = visualize.class_colours(config.dataset, spec.num_classes)
  mean, std = config.dataset.mean, config.dataset.std
  batch_size = config.eval_batch_size // jax.device_count()  # one device's share
  used_stems, written, skipped = {}, 0, 0

  def skip(path, reason):
    nonlocal skipped
    print(f'skipped {path}: {reason}', flush=True)
    skipped += 1

  def run(size, group):  # group: at most batch_size (path, image, model input) triples
    nonlocal written
    rows = padded_batch(len(group), batch_size)
    if protocol:  # size: (model input (h, w), image (height, width))
      predictions = classify_protocol(classify_fn, variables, [x for _, _, x in group],
                                      size[1], rows, mean, std)
    else:
      predictions = classify(classify_fn, variables, [image for _, image, _ in group], size,
                             rows, mean, std)
    for (path, image, _), prediction in zip(group, predictions):
      try:
        write_outputs(output, stems[path], image, prediction, colours)
        written += 1
      except OSError as e:
        skip(path, f'cannot write its outputs ({e})')

  # padded (height, width), or (model input size, image size) -> [(path, image, input)]
  pending = collections.defaultdict(list)
  for path in paths:
    if stems[path] in used_stems:
      skip(path, f'its outputs {stems[path]}.png would overwrite those of '
           f'{used_stems[stems[path]]}; rename one of them')
      continue
    try:
      image = read_image(path, len(mean))
    except DataError as e:
      skip(path, str(e))
      continue
    used_stems[stems[path]] = path
    if protocol:
      model_input, _ = transforms.protocol_resize(image, None, evaluation.resize,
                                                  evaluation.resize_scale)
      size = (model_input.shape[:2], image.shape[:2])
    else:
      model_input, size = image, padded_size(*image.shape[:2], config.dataset.eval_pad_size)
    pending[size].append((path, image, model_input))
    if len(pending[size]) == batch_size:
      run(size, pending.pop(size))
  for size, group in pending.items():
    run(size, group)
  print(f'wrote {written} predictions to {output}, skipped {skipped} files')
  if not written:
    raise SegjaxError(f'no image of --images {images} could be predicted (reasons above)')
  return written, skipped
