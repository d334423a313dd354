"""Evaluator: inference over a split (whole image, sliding window, multi-scale and flip test-time
augmentation), the confusion matrix accumulated on device, then metrics.

`make_predict` builds the jittable inference function `(variables, images) -> logits` that the
eval step, prediction and image panels share; `make_eval_step` reduces its argmax to a
confusion matrix per batch, and `evaluate` sums those over a split on host.

Two test protocols (`config.evaluation.pad`): True, every image of a batch padded at the
bottom/right to one size (`pipeline.eval_batches`); False, as the benchmarks' own test
pipelines (mmsegmentation, torchvision), every image inferred alone at its own size after
the protocol's resize (`evaluation.resize`), with no padding at all (padding changes the
logits of models with BatchNorm and global pooling), and its logits resized back to its
label's size (`resize_logits`, as mmseg's `postprocess_result`) before the argmax.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax import metrics as metrics_lib
from segjax import parallel
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, DataError

MODES = ('whole', 'slide')

# Device-side int32 sums are moved to a host int64 total this often (overflow guard).
_HOST_FLUSH_BATCHES = 32


# ---------------------------------------------------------------------------- inference

def window_and_stride(evaluation_config, crop_size=None):
  """((height, width) of the sliding window, (height, width) of its stride), in pixels.

  `evaluation_config.window` 0 means `crop_size` (the training crop, `dataset.image_size`);
  `stride` 0 means two thirds of the window, rounded (mmsegmentation's 512 -> 341).
  """
  window = evaluation_config.window or crop_size
  if not window:
    raise ConfigError('evaluation.window is 0 (the training crop) but no crop size was given; '
                      'set evaluation.window to a side or (height, width)')
  window = transforms.height_width(window)
  stride = evaluation_config.stride or tuple(max(1, round(2 * side / 3)) for side in window)
  return window, transforms.height_width(stride)


def _pad_bottom_right(images, height, width):
  """images [B, h, w, C] padded with 0 (the mean colour after normalisation) at the bottom
  and right to [B, height, width, C]."""
  return jnp.pad(images, ((0, 0), (0, height - images.shape[1]), (0, width - images.shape[2]),
                          (0, 0)))


def whole_logits(infer, images, *, multiple=pipeline.EVAL_PAD_MULTIPLE):
  """Whole-image inference: images [B, H, W, C] -> logits [B, H, W, num_classes].

  `infer` runs on the images padded at the bottom/right to multiples of `multiple` (as the
  eval batches already are), so models that need sizes divisible by their output stride
  (U-Net) take images of any size and any test scale; the padding is cropped off the logits.
  `multiple` 1 (evaluation.pad False): the model runs on the images as they are.
  """
  height, width = images.shape[1:3]
  padded = _pad_bottom_right(images, height + -height % multiple, width + -width % multiple)
  return infer(padded)[:, :height, :width]


def window_starts(size, window, stride):
  """Start offsets of windows of `window` pixels every `stride` along a side of `size` >= window
  pixels; the last window is moved back to end at the border (mmsegmentation's slide)."""
  count = max(size - window + stride - 1, 0) // stride + 1
  return [min(i * stride, size - window) for i in range(count)]


def slide_windows(height, width, window, stride, *, pad=True):
  """((window height, window width), [(top, left), ...]) of the sliding windows over an
  image of (height, width), in the order they are run (row by row).

  pad True: an image smaller than the window along a side is padded to it there (the
  offsets are those of the padded image). pad False: mmsegmentation's `slide_inference`,
  h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1 windows starting at
  min(i * h_stride, h - h_crop) (likewise along the width), so along a side shorter than the
  window there is one window of that side's own length, never padded.
  """
  (window_h, window_w), (stride_h, stride_w) = window, stride
  if not pad:
    window_h, window_w = min(window_h, height), min(window_w, width)
  padded_h, padded_w = max(height, window_h), max(width, window_w)
  offsets = [(top, left) for top in window_starts(padded_h, window_h, stride_h)
             for left in window_starts(padded_w, window_w, stride_w)]
  return (window_h, window_w), offsets


def slide_logits(infer, images, *, window, stride, num_classes, pad=True):
  """Sliding-window inference: images [B, H, W, C] -> logits float32 [B, H, W, num_classes].

  infer: images [B, h, w, C] -> logits [B, h, w, num_classes] for windows of `window` =
  (h, w). With `pad`, images smaller than the window are padded at the bottom/right with 0
  (the mean colour after normalisation) and the padding is cropped off the logits; without,
  the window shrinks to the image along such a side (`slide_windows`, mmsegmentation's
  slide_inference). Logits of overlapping windows are summed and divided by the number of
  windows covering each pixel. The windows are run one after another (`lax.scan`, one
  compiled model call, the memory of one window batch), each on the whole batch of images.
  """
  batch, height, width, channels = images.shape
  (window_h, window_w), offsets = slide_windows(height, width, window, stride, pad=pad)
  padded_h, padded_w = max(height, window_h), max(width, window_w)
  images = _pad_bottom_right(images, padded_h, padded_w)
  offsets = np.array(offsets, np.int32)
  if len(offsets) == 1:  # one window covers the (padded) image: no loop, no division
    return infer(images)[:, :height, :width]
  counts = np.zeros((padded_h, padded_w), np.float32)
  for top, left in offsets:
    counts[top:top + window_h, left:left + window_w] += 1

  def add_window(total, offset):
    top, left = offset[0], offset[1]
    crop = jax.lax.dynamic_slice(images, (0, top, left, 0), (batch, window_h, window_w,
                                                             channels))
    start = (0, top, left, 0)
    region = jax.lax.dynamic_slice(total, start, (batch, window_h, window_w, num_classes))
    return jax.lax.dynamic_update_slice(total, region + infer(crop), start), None

  total = jnp.zeros((batch, padded_h, padded_w, num_classes), jnp.float32)
  total, _ = jax.lax.scan(add_window, total, jnp.asarray(offsets))
  return (total / counts[None, :, :, None])[:, :height, :width]


def scaled_size(height, width, scale):
  """The (height, width) an image of (height, width) takes at `scale` (rounded, >= 1)."""
  return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize(x, height, width):
  """Bilinear resize of [B, h, w, C] to [B, height, width, C] (antialiased when shrinking,
  like the PIL bilinear rescale of the training augmentation)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method='bilinear')


def _bilinear_taps(out_size, in_size):
  """(i0, i1, w1) along one axis of torch's bilinear interpolation with align_corners=False:
  output pixel d reads (1 - w1) * in[i0] + w1 * in[i1] at the source coordinate
  max((d + 0.5) * in / out - 0.5, 0), in float32."""
  scale = np.float32(in_size / out_size)
  source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
                      - np.float32(0.5), np.float32(0))
  index = np.minimum(np.floor(source).astype(np.int32), in_size - 1)
  return index, np.minimum(index + 1, in_size - 1), (source - index).astype(np.float32)


def resize_logits(logits, height, width):
  """logits [B, h, w, K] -> float32 [B, height, width, K], bilinear with half-pixel centres
  and no antialiasing, even when shrinking: torch's `F.interpolate(mode='bilinear',
  align_corners=False)`, which mmsegmentation's `postprocess_result` applies to bring the
  logits back to the label's size. Separable gathers (4 taps per pixel), not a dense
  resampling matrix, so a 512x683 -> 1536x2048 resize of 150 classes stays cheap."""
  logits = logits.astype(jnp.float32)
  for axis, size in ((1, height), (2, width)):
    if logits.shape[axis] != size:
      i0, i1, w1 = _bilinear_taps(size, logits.shape[axis])
      w1 = jnp.asarray(w1).reshape((-1,) + (1,) * (logits.ndim - 1 - axis))
      logits = (jnp.take(logits, i0, axis=axis) * (1 - w1)
                + jnp.take(logits, i1, axis=axis) * w1)
  return logits


def predictions_at(logits, height, width):
  """int32 class maps [B, height, width]: the argmax of logits [B, h, w, K], resized first
  (`resize_logits`) where (h, w) is not (height, width)."""
  if logits.shape[1:3] != (height, width):
    logits = resize_logits(logits, height, width)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def view_logits(infer, images, scale, flip):
  """Logits [B, H, W, K] of one test-time view: `images` [B, H, W, C] resized by `scale` and
  mirrored left-right if `flip`, inferred, and mapped back (un-mirrored, resized to H, W)."""
  height, width = images.shape[1:3]
  if scale != 1:
    images = resize(images, *scaled_size(height, width, scale))
  if flip:
    images = images[:, :, ::-1]
  logits = infer(images)
  if flip:
    logits = logits[:, :, ::-1]
  return resize(logits, height, width) if scale != 1 else logits


def make_predict(model, evaluation_config, *, num_classes, crop_size=None):
  """The inference `predict(variables, images) -> logits` selected by `evaluation_config`.

  images: float32 [B, H, W, C] (normalised, as in the eval batches); logits: float32
  [B, H, W, num_classes] at the input resolution; `predict` is jittable. Fields of
  `evaluation_config` (`config.evaluation`): `mode` 'whole' (`whole_logits`: one model call on
  the image padded to a multiple of 32) or 'slide' (`slide_logits` with `window` and
  `stride`; a window of 0 needs `crop_size`, the training crop `config.dataset.image_size`);
  `scales` (tuple of floats) and `flip` (bool) for test-time augmentation: each scale's view
  is the image resized bilinearly (`scaled_size`), inferred, and its logits resized back;
  with `flip` also the mirrored image, its logits mirrored back. `pad` (default True): with
  False the images are inferred as they are, never padded ('whole': one model call on the
  image; 'slide': `slide_windows` without padding), for batches of equally sized images
  (`pipeline.eval_batches` with evaluation.pad False); a size the model cannot take is a
  DataError.

  With one view (scales of one value, no flip) the result is that view's logits. With
  several, as in mmsegmentation's aug_test, the softmax probabilities of the views are
  averaged and their log is returned, so `softmax(logits)` is the averaged probability and the
  argmax is the prediction. On eval batches padded at the bottom/right (see
  `pipeline.eval_batches`) the padding is rescaled with the image: the image keeps its
  place at the top-left, up to the sub-pixel rounding of the scaled size, and only the
  bilinear taps along its bottom/right border reach into the padding, which the model sees
  as context at scale 1 anyway (and on the left in flipped views); padded pixels never reach
  the metrics.
  """
  if evaluation_config.mode not in MODES:
    raise ConfigError(f'unknown evaluation.mode {evaluation_config.mode!r}; valid: '
                      f'{", ".join(MODES)}')
  if evaluation_config.mode == 'slide':
    window, stride = window_and_stride(evaluation_config, crop_size)
  pad = evaluation_config.get('pad', True)
  flips = (False, True) if evaluation_config.flip else (False,)
  views = [(float(scale), flip) for scale in evaluation_config.scales for flip in flips]

  def predict(variables, images):
    infer = functools.partial(model.apply, variables, train=False)
    if not pad:
      infer = functools.partial(_unpadded, infer)
    if evaluation_config.mode == 'slide':
      infer = functools.partial(slide_logits, infer, window=window, stride=stride,
                                num_classes=num_classes, pad=pad)
    else:
      infer = functools.partial(whole_logits, infer,
                                multiple=pipeline.EVAL_PAD_MULTIPLE if pad else 1)
    if len(views) == 1:
      return view_logits(infer, images, *views[0]).astype(jnp.float32)
    probabilities = sum(jax.nn.softmax(view_logits(infer, images, scale, flip).astype(
        jnp.float32)) for scale, flip in views) / len(views)
    return jnp.log(jnp.maximum(probabilities, jnp.finfo(jnp.float32).tiny))

  return predict


def _unpadded(infer, images):
  """infer(images), a model that cannot take the images' size unpadded being a DataError."""
  try:
    return infer(images)
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise DataError(
        f'the model cannot take a {images.shape[1]}x{images.shape[2]} image unpadded '
        f'(evaluation.pad=False): {first_line}; use evaluation.pad=True, '
        "evaluation.mode='slide', or an evaluation.resize that gives sizes it takes") from e


def settings(evaluation_config, crop_size):
  """The inference settings of `evaluation_config` as a JSON-able dict (window and stride
  resolved, for 'slide' only; pad, resize and resize_scale where they are not the
  defaults)."""
  described = {'mode': evaluation_config.mode,
               'scales': [float(scale) for scale in evaluation_config.scales],
               'flip': bool(evaluation_config.flip)}
  if evaluation_config.mode == 'slide':
    window, stride = window_and_stride(evaluation_config, crop_size)
    described.update(window=list(window), stride=list(stride))
  if not evaluation_config.get('pad', True):
    described['pad'] = False
  if evaluation_config.get('resize', ''):
    scale = evaluation_config.resize_scale
    described.update(resize=evaluation_config.resize,
                     resize_scale=list(scale) if isinstance(scale, (tuple, list)) else scale)
  return described


# ---------------------------------------------------------------------------- confusion matrix

def make_eval_step(predict, *, num_classes, ignore_label):
  """(variables, batch) -> [C, C] int32 confusion matrix of the batch's argmax predictions.

  predict: `make_predict`'s function; batch: `image` [B, h, w, C], `label` int [B, H, W].
  Where (h, w) is not (H, W) (evaluation.resize 'fit': the image was resized, the label
  not), the logits are resized to (H, W) (`predictions_at`) before the argmax.
  """

  def eval_step(variables, batch):
    predictions = predictions_at(predict(variables, batch['image']),
                                 *batch['label'].shape[1:3])
    return metrics_lib.confusion_matrix(predictions, batch['label'], num_classes=num_classes,
                                        ignore_label=ignore_label)

  return eval_step


def confusion_over(eval_step, variables, batches, mesh):
  """Sums `eval_step` over `batches` -> int64 numpy [C, C].

  batches: numpy batches that every process reads whole (each counted once: its devices take
  their rows of it, see `parallel.whole_to_global`).
  """
  total, pending = None, []
  for batch in batches:
    pending.append(eval_step(variables, parallel.whole_to_global(batch, mesh)))
    if len(pending) == _HOST_FLUSH_BATCHES:
      total = _add(total, pending)
      pending = []
  return _add(total, pending)


def _add(total, pending):
  if not pending:
    return total
  part = np.asarray(jax.device_get(sum(pending)), np.int64)
  return part if total is None else total + part


def evaluate(eval_step, variables, batches, mesh):
  """Metrics dict (see `segjax.metrics.from_confusion`) plus the `confusion` matrix."""
  confusion = confusion_over(eval_step, variables, batches, mesh)
  result = metrics_lib.from_confusion(confusion)
  result['confusion'] = confusion
  return result
