"""Pictures of predictions: class colours, coloured label maps, overlays, and the validation
panels that training logs to TensorBoard.

Class colours (`class_colours`): the dataset's own where it has them (Cityscapes' official
trainId colours, a folder dataset's `dataset.palette`), else the Pascal VOC colormap, which is
VOC's own palette and, being a bijection of the class index's bits, gives distinct colours to
any number of classes (class 0 black).
"""
import itertools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from segjax import evaluate as evaluate_lib
from segjax import semi
from segjax.data import pipeline

OVERLAY_ALPHA = 0.5  # weight of the class colour in an overlay
PANEL_MAX_SIDE = 512  # larger validation images are subsampled in the panels

# trainId order (segjax.data.cityscapes.CLASS_NAMES), from cityscapesScripts' labels.py.
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32))


# ---------------------------------------------------------------------------- colours

def voc_colormap(num_classes):
  """uint8 [num_classes, 3]: the VOC devkit's `labelcolormap`.

  The bits of class index i are dealt round-robin to r, g, b, from each channel's most
  significant bit down (bit 0 of i -> bit 7 of r, bit 1 -> bit 7 of g, bit 2 -> bit 7 of
  b, bit 3 -> bit 6 of r, ...), so distinct indices below 2**24 get distinct colours.
  """
  index = np.arange(num_classes, dtype=np.int64)
  colours = np.zeros((num_classes, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      colours[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
  return colours.astype(np.uint8)


def class_colours(dataset_config, num_classes):
  """uint8 [num_classes, 3] class colours of `dataset_config` (`config.dataset`)."""
  if dataset_config.name == 'cityscapes':
    return np.asarray(CITYSCAPES_COLOURS, np.uint8)
  if dataset_config.name == 'folder' and dataset_config.palette:
    return np.asarray(dataset_config.palette, np.uint8)
  return voc_colormap(num_classes)


def colourize(labels, colours, ignore_label=None):
  """Class-index maps int [..., H, W] -> uint8 [..., H, W, 3]; `ignore_label` pixels (and any
  value outside [0, len(colours))) black."""
  labels = np.asarray(labels)
  valid = (labels >= 0) & (labels < len(colours))
  if ignore_label is not None:
    valid &= labels != ignore_label
  return np.where(valid[..., None], colours[np.where(valid, labels, 0)], 0).astype(np.uint8)


def as_rgb(image):
  """uint8 [..., H, W, C] -> [..., H, W, 3]: one channel repeated, else the first three."""
  return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)


def overlay(image, labels, colours, alpha=OVERLAY_ALPHA):
  """uint8 [H, W, 3]: `image` uint8 [H, W, C] blended with the colours of `labels` [H, W],
  round(image * (1 - alpha) + colour * alpha)."""
  blended = (as_rgb(image).astype(np.float32) * (1 - alpha)
             + colours[labels].astype(np.float32) * alpha)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- panels

def denormalize(images, mean, std):
  """Normalised float [..., C] (see `transforms.normalize`) -> uint8 [..., C]."""
  pixels = (np.asarray(images, np.float32) * np.asarray(std, np.float32)
            + np.asarray(mean, np.float32)) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def panels(images, labels, predictions, colours, *, mean, std, ignore_label):
  """uint8 [N, H, 3W, 3]: per example, the image, its coloured ground truth (ignored pixels
  black) and its coloured prediction, side by side.

  images: normalised float32 [N, H, W, C]; labels, predictions: int [N, H, W].
  """
  return np.concatenate([as_rgb(denormalize(images, mean, std)),
                         colourize(labels, colours, ignore_label),
                         colourize(predictions, colours)], axis=2)


def make_classify(predict):
  """Jitted (variables, images float32 [B, H, W, C]) -> int32 [B, H, W] argmax class maps of
  `predict` (`segjax.evaluate.make_predict`'s logits)."""
  return jax.jit(lambda variables, images: jnp.argmax(predict(variables, images), axis=-1))


def make_resized_classify(predict):
  """Jitted (variables, images float32 [B, h, w, C], (height, width)) -> int32 [B, height,
  width]: the argmax of `predict`'s logits resized to (height, width) where they differ
  (`evaluate.predictions_at`; evaluation.pad False, a label or image of another size)."""
  return jax.jit(lambda variables, images, size: evaluate_lib.predictions_at(
      predict(variables, images), *size), static_argnums=2)


_PANEL_INPUTS = weakref.WeakKeyDictionary()  # Experiment -> its `_panel_inputs`


def _panel_inputs(experiment):
  """(images [N, H, W, C], labels [N, H, W], classify) of `experiment`'s panels: the first
  `config.log_images` validation examples as evaluated (padded to the evaluation pad size),
  read once per experiment; classify: jitted (variables, images) -> argmax int32 [N, H, W]."""
  if experiment not in _PANEL_INPUTS:
    config, source = experiment.config, experiment.sources['validation']
    count = min(config.log_images, len(source))
    batches = list(itertools.islice(pipeline.eval_batches(source, experiment.spec, config),
                                    -(-count // config.eval_batch_size)))
    _PANEL_INPUTS[experiment] = (
        np.concatenate([batch['image'] for batch in batches])[:count],
        np.concatenate([batch['label'] for batch in batches])[:count],
        make_classify(experiment.predict))
  return _PANEL_INPUTS[experiment]


def _protocol_panel_inputs(experiment):
  """([(image [h, w, C], label [H, W])], classify) of `experiment`'s panels under
  evaluation.pad False: the first `config.log_images` validation examples as evaluated
  (`pipeline.protocol_examples`), read once per experiment; classify: jitted (variables,
  images [1, h, w, C], (H, W)) -> int32 [1, H, W], the logits resized to the label's size."""
  if experiment not in _PANEL_INPUTS:
    config, source = experiment.config, experiment.sources['validation']
    examples = list(itertools.islice(
        pipeline.protocol_examples(source, experiment.spec, config), config.log_images))
    _PANEL_INPUTS[experiment] = (examples, make_resized_classify(experiment.predict))
  return _PANEL_INPUTS[experiment]


def _stacked(pictures):
  """uint8 [N, H_i, W_i, 3] panels of different sizes, each padded with black at the right to
  the widest, as a list `MetricWriter.images` stacks top to bottom."""
  width = max(picture.shape[1] for picture in pictures)
  return [np.pad(picture, ((0, 0), (0, width - picture.shape[1]), (0, 0)))
          for picture in pictures]


def _protocol_panels(experiment, state):
  """The panels of `_protocol_panel_inputs`' examples, one image at a time at its own size:
  the image shown at its label's size (nearest pixels), each panel subsampled by a whole
  stride when a side is over PANEL_MAX_SIDE."""
  config = experiment.config
  examples, classify = _protocol_panel_inputs(experiment)
  colours = class_colours(config.dataset, experiment.spec.num_classes)
  variables = semi.inference_variables(state)
  pictures = []
  for image, label in examples:
    prediction = np.asarray(jax.device_get(classify(variables, image[None], label.shape)))[0]
    rows = np.arange(label.shape[0]) * image.shape[0] // label.shape[0]
    columns = np.arange(label.shape[1]) * image.shape[1] // label.shape[1]
    image = image[rows][:, columns]
    stride = -(-max(label.shape) // PANEL_MAX_SIDE)
    pictures.append(panels(image[None, ::stride, ::stride], label[None, ::stride, ::stride],
                           prediction[None, ::stride, ::stride], colours,
                           mean=config.dataset.mean, std=config.dataset.std,
                           ignore_label=experiment.spec.ignore_label)[0])
  return _stacked(pictures)


def log_validation_panels(experiment, writer, state):
  """Logs panels (see `panels`) of the first `config.log_images` validation images, predicted
  by `state`, to TensorBoard under 'val/predictions' at `state.step`.

  One forward pass on those images, compiled once per experiment (under evaluation.pad
  False, one per image size: each image alone, see `_protocol_panels`). Images with a side
  over PANEL_MAX_SIDE are subsampled by a whole stride. Every process computes the
  predictions (the state is a global array); only the main process's writer writes.
  """
  config = experiment.config
  if not config.log_images:
    return
  if not config.evaluation.pad:
    writer.images(int(state.step), 'val/predictions', _protocol_panels(experiment, state))
    return
  images, labels, classify = _panel_inputs(experiment)
  predictions = np.asarray(jax.device_get(classify(semi.inference_variables(state), images)))
  stride = -(-max(labels.shape[1:]) // PANEL_MAX_SIDE)
  images, labels, predictions = (x[:, ::stride, ::stride]
                                 for x in (images, labels, predictions))
  pictures = panels(images, labels, predictions,
                    class_colours(config.dataset, experiment.spec.num_classes),
                    mean=config.dataset.mean, std=config.dataset.std,
                    ignore_label=experiment.spec.ignore_label)
  writer.images(int(state.step), 'val/predictions', pictures)
