"""Evaluation under each benchmark's own test protocol (`config.evaluation.resize`, `.pad`),
against the reference implementations: mmcv's Resize and mmseg's LoadAnnotations and
slide_inference, torchvision's resize, torch's F.interpolate, and OpenCV itself."""
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from segjax import checkpoint
from segjax import configs
from segjax import data
from segjax import evaluate
from segjax import models
from segjax import parallel
from segjax import predict
from segjax import train
from segjax import visualize
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, DataError
from segjax.models import cnn
from conftest import tiny_config
import references

NUM_CLASSES = 6  # the shapes dataset's


def random_variables(model, shape, seed):
  """Random variables of `model` for inputs of `shape`, drawn with numpy (flax's
  initialisers compile slowly here): He-scaled kernels, BatchNorm scales near 1 and random
  statistics, so that the predicted classes vary over an image."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'var':
      return (0.5 + rng.random(leaf.shape)).astype(np.float32)
    if name == 'scale':
      return (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name in ('mean', 'bias'):
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (np.sqrt(2 / fan_in) * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def cnn_model():
  """A tiny BatchNorm CNN with random weights and its jitted apply (any input size)."""
  model = cnn.Model(num_classes=NUM_CLASSES, features=4, num_stages=2)
  variables = random_variables(model, (1, 32, 32, 3), seed=1)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  return model, variables, apply


def torch_resize_logits(logits, height, width):
  """The reference: torch F.interpolate(bilinear, align_corners=False) of NHWC logits."""
  torch = references.import_torch()
  tensor = torch.from_numpy(np.ascontiguousarray(logits)).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(tensor, size=(height, width), mode='bilinear',
                                            align_corners=False)
  return resized.permute(0, 2, 3, 1).numpy()


def confusion(labels, predictions, ignore_label=255):
  valid = labels != ignore_label
  matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(matrix, (labels[valid], predictions[valid]), 1)
  return matrix


# ---------------------------------------------------------------------------- resizes

def test_cv2_linear_emulation_equals_opencv_on_random_sizes():
  cv2 = pytest.importorskip('cv2')
  rng = np.random.default_rng(0)
  sizes = [tuple(rng.integers(1, 160, 4)) for _ in range(300)]
  sizes += [(64, 48, 32, 24), (48, 64, 96, 128), (90, 60, 30, 20), (1, 7, 5, 3), (7, 1, 2, 9)]
  mismatched = []
  for in_h, in_w, out_h, out_w in sizes:
    channels = int(rng.choice([1, 3, 4]))
    image = rng.integers(0, 256, (in_h, in_w, channels), dtype=np.uint8)
    expected = cv2.resize(image, (int(out_w), int(out_h)), interpolation=cv2.INTER_LINEAR)
    got = transforms.resize_linear_cv2(image, out_h, out_w)
    if got.shape != (out_h, out_w, channels) or not np.array_equal(
        got, expected.reshape(out_h, out_w, channels)):
      mismatched.append((in_h, in_w, out_h, out_w, channels))
  assert not mismatched


@pytest.mark.parametrize('height,width,scale', [
    (512, 683, (2048, 512)),  # ADE20K's usual size: already at the test scale
    (1024, 1365, (2048, 512)),
    (1536, 2048, (2048, 512)),
    (400, 300, (2048, 512)),  # upscaled
    (1024, 1024, (2048, 512)),  # an exact halving
    (1024, 2048, (2048, 512)),
    (1024, 2048, (1024, 2048)),  # Cityscapes at its test scale, (short, long) order
    (1023, 777, (1024, 2048)),
])
def test_fit_resize_equals_mmcv_resize(height, width, scale):
  references.import_mmseg()
  from mmseg.registry import TRANSFORMS  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(height + width)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  label = rng.integers(0, 150, (height, width), dtype=np.uint8)
  resize = TRANSFORMS.build(dict(type='Resize', scale=scale, keep_ratio=True))
  expected = resize({'img': image.copy(), 'img_shape': (height, width)})['img']
  got_image, got_label = transforms.protocol_resize(image, label, 'fit', scale)
  assert got_image.shape == expected.shape and got_image.dtype == np.uint8
  np.testing.assert_array_equal(got_image, expected)
  assert got_label is label  # mmseg loads the annotation after the resize
  if transforms.fit_size(height, width, scale) == (height, width):
    assert got_image is image


@pytest.mark.parametrize('height,width,side', [
    (375, 500, 520), (500, 375, 520), (333, 333, 520), (520, 700, 520), (900, 610, 520),
    (31, 45, 24)])
def test_short_side_resize_equals_torchvision(height, width, side):
  torchvision = references.import_torchvision()
  functional = torchvision.transforms.functional
  rng = np.random.default_rng(height * width)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  label = rng.integers(0, 21, (height, width), dtype=np.uint8)
  label[rng.random((height, width)) < 0.1] = 255
  expected_image = np.asarray(functional.resize(Image.fromarray(image), side))
  expected_label = np.asarray(functional.resize(
      Image.fromarray(label), side, interpolation=functional.InterpolationMode.NEAREST))
  got_image, got_label = transforms.protocol_resize(image, label, 'short_side', side)
  assert got_image.shape == expected_image.shape
  np.testing.assert_array_equal(got_image, expected_image)
  np.testing.assert_array_equal(got_label, expected_label)


def test_ade20k_reduce_zero_label_equals_mmseg(tmp_path):
  references.import_mmseg()
  from mmseg.datasets.transforms import LoadAnnotations  # pylint: disable=g-import-not-at-top
  values = np.concatenate([np.arange(151), [255]]).astype(np.uint8)
  raw = np.random.default_rng(0).choice(values, (40, 50)).astype(np.uint8)
  raw.flat[:len(values)] = values  # every value present
  path = str(tmp_path / 'ADE_val_00000001.png')
  Image.fromarray(raw).save(path)
  expected = LoadAnnotations(reduce_zero_label=True).transform(
      {'seg_map_path': path, 'reduce_zero_label': True, 'seg_fields': []})['gt_seg_map']
  with Image.open(path) as png:
    example = {'image': np.zeros((40, 50, 3), np.uint8),
               'segmentation_mask': np.asarray(png)[..., None]}
  _, label = pipeline.decode(example, data.get_spec('ade20k'))
  np.testing.assert_array_equal(label, expected)
  assert label[raw == 0].tolist() == [255] * int((raw == 0).sum())


# ---------------------------------------------------------------------------- sliding windows

KERNEL = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
POOLED = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)


def window_logits_jax(crop):
  """A deterministic 'model' [B, h, w, 4] -> [B, h, w, 5] whose logits depend on the whole
  window (its mean) and on the pixel's place inside it, so a wrong window or average shows."""
  height, width = crop.shape[1:3]
  ramp = (jnp.arange(height)[:, None] * 0.1 + jnp.arange(width)[None, :] * 0.03)
  return (crop @ KERNEL + (crop.mean(axis=(1, 2)) @ POOLED)[:, None, None]
          + ramp[None, :, :, None] * jnp.arange(1, 6))


def window_logits_torch(crop):
  """`window_logits_jax` on NCHW torch tensors."""
  torch = references.import_torch()
  height, width = crop.shape[2:]
  ramp = (torch.arange(height)[:, None] * 0.1 + torch.arange(width)[None, :] * 0.03)
  pixel = torch.einsum('nchw,ck->nkhw', crop, torch.from_numpy(KERNEL))
  pooled = crop.mean(dim=(2, 3)) @ torch.from_numpy(POOLED)
  return pixel + pooled[:, :, None, None] + ramp[None, None] * torch.arange(1, 6)[:, None,
                                                                                   None]


@pytest.mark.parametrize('height,width', [(50, 70), (20, 70), (50, 15), (20, 15), (32, 24)])
def test_slide_without_padding_equals_mmseg_slide_inference(height, width):
  torch = references.import_torch()
  references.import_mmseg()
  from mmseg.models.segmentors import EncoderDecoder  # pylint: disable=g-import-not-at-top
  window, stride = (32, 24), (21, 16)
  rng = np.random.default_rng(height * width)
  image = rng.standard_normal((1, height, width, 4)).astype(np.float32)
  image[0, :, :, 0] = np.arange(height)[:, None]  # channels 0 and 1 tell where a crop is
  image[0, :, :, 1] = np.arange(width)[None, :]
  seen = []

  def encode_decode(crop, metas):
    del metas
    seen.append((int(crop[0, 0, 0, 0]), int(crop[0, 1, 0, 0]), *crop.shape[2:]))
    return window_logits_torch(crop)

  reference = types.SimpleNamespace(
      test_cfg=types.SimpleNamespace(crop_size=window, stride=stride), out_channels=5,
      encode_decode=encode_decode)
  with torch.no_grad():
    expected = EncoderDecoder.slide_inference(
        reference, torch.from_numpy(image).permute(0, 3, 1, 2), [{}])
  (window_h, window_w), offsets = evaluate.slide_windows(height, width, window, stride,
                                                         pad=False)
  assert [(top, left, window_h, window_w) for top, left in offsets] == seen
  got = evaluate.slide_logits(window_logits_jax, jnp.asarray(image), window=window,
                              stride=stride, num_classes=5, pad=False)
  np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-5, atol=1e-4)


def test_slide_with_padding_is_not_mmsegs_for_small_images():
  """The padded protocol (evaluation.pad True) pads an image smaller than the window, so its
  windows differ from mmseg's: the test above can tell them apart."""
  window, offsets = evaluate.slide_windows(20, 70, (32, 24), (21, 16), pad=True)
  assert window == (32, 24) and offsets[0] == (0, 0)
  assert evaluate.slide_windows(20, 70, (32, 24), (21, 16), pad=False)[0] == (20, 24)


# ---------------------------------------------------------------------------- logits resize

@pytest.mark.parametrize('source,target', [
    ((17, 23), (40, 61)),  # growing
    ((64, 64), (15, 13)),  # shrinking by over 4x (no antialiasing)
    ((30, 20), (7, 41)),  # shrinking one side, growing the other
    ((1, 1), (4, 3)),
    ((12, 9), (12, 9)),
])
def test_resize_logits_equals_torch_interpolate(source, target):
  logits = np.random.default_rng(0).standard_normal((2, *source, 7)).astype(np.float32)
  got = np.asarray(evaluate.resize_logits(jnp.asarray(logits), *target))
  assert got.shape == (2, *target, 7)
  np.testing.assert_allclose(got, torch_resize_logits(logits, *target), rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------- evaluation

def evaluate_split(model, variables, config, batches):
  """segjax's confusion matrix of `batches` with `config.evaluation`, as train.py runs it."""
  spec = data.get_spec(config.dataset)
  predict_fn = evaluate.make_predict(model, config.evaluation, num_classes=spec.num_classes,
                                     crop_size=config.dataset.image_size)
  eval_step = jax.jit(evaluate.make_eval_step(predict_fn, num_classes=spec.num_classes,
                                              ignore_label=spec.ignore_label))
  return evaluate.evaluate(eval_step, variables, batches, parallel.make_mesh())['confusion']


def normalised(image, config):
  return transforms.normalize(image, config.dataset.mean, config.dataset.std)[None]


def test_fit_unpadded_evaluation_equals_image_by_image(cnn_model, data_dir, sources):
  """Whole split, resize 'fit' (32x32 -> 40x40, labels kept at 32x32), pad False, against
  each image by hand with the references: cv2's resize, the model on that image alone,
  torch's interpolate of its logits back to 32x32, then argmax and confusion."""
  cv2 = pytest.importorskip('cv2')
  model, variables, apply = cnn_model
  config = tiny_config(data_dir, 'cnn', num_stages=2, features=4)
  config.evaluation.pad = False
  config.evaluation.resize = 'fit'
  config.evaluation.resize_scale = (48, 40)
  configs.validate(config)
  source = sources['validation']
  got = evaluate_split(model, variables, config,
                       pipeline.eval_batches(source, data.get_spec('shapes'), config))
  expected = np.zeros_like(got)
  for i in range(len(source)):
    image, label = source[i]['image'], source[i]['segmentation_mask'][..., 0]
    resized = cv2.resize(image, (40, 40), interpolation=cv2.INTER_LINEAR)
    logits = torch_resize_logits(np.asarray(apply(normalised(resized, config))), 32, 32)
    expected += confusion(label, logits[0].argmax(-1))
  np.testing.assert_array_equal(got, expected)
  labelled = sum(int((source[i]['segmentation_mask'] != 255).sum())
                 for i in range(len(source)))
  assert got.sum() == labelled  # every image once
  assert (got.sum(axis=0) > 0).sum() >= 3  # the model predicts several classes
  # Padding (evaluation.pad True, 32x32 images in batches) gives other logits than the
  # protocol's 40x40 images: the comparison above can fail.
  padded = tiny_config(data_dir, 'cnn', num_stages=2, features=4)
  assert not np.array_equal(evaluate_split(model, variables, padded, pipeline.eval_batches(
      source, data.get_spec('shapes'), padded)), got)


def test_mixed_sizes_are_grouped_by_size_and_counted_once(cnn_model, data_dir):
  """Images of four sizes in batches of 2 rows (as on 2 devices), resize 'short_side' (labels
  resized nearest): each batch holds one size, every image is in one batch once, the filler
  rows count nothing, and the confusion matrix equals torchvision's resize + the model on
  each image alone."""
  torchvision = references.import_torchvision()
  functional = torchvision.transforms.functional
  model, variables, apply = cnn_model
  rng = np.random.default_rng(4)
  shapes = [(20, 28), (24, 24), (20, 28), (17, 31), (24, 24), (20, 28), (40, 13)]
  examples = []
  for height, width in shapes:
    label = rng.integers(0, NUM_CLASSES, (height, width, 1)).astype(np.uint8)
    label[rng.random((height, width, 1)) < 0.2] = 255
    examples.append({'image': rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                     'segmentation_mask': label})
  config = tiny_config(data_dir, 'cnn', num_stages=2, features=4)
  config.eval_batch_size = 2  # at most 2 images wait for a full batch
  config.evaluation.pad = False
  config.evaluation.resize = 'short_side'
  config.evaluation.resize_scale = 16
  spec = data.get_spec('shapes')
  batches = list(pipeline.protocol_batches(examples, spec, config, rows=2))
  real = [int((batch['label'] != 255).any(axis=(1, 2)).sum()) for batch in batches]
  assert all(len(batch['image']) == 2 for batch in batches)
  assert sum(real) == len(examples) and len(batches) >= 4  # 4 sizes, one per batch
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for example in examples:
    image = np.asarray(functional.resize(Image.fromarray(example['image']), 16))
    label = np.asarray(functional.resize(
        Image.fromarray(example['segmentation_mask'][..., 0]), 16,
        interpolation=functional.InterpolationMode.NEAREST))
    expected += confusion(label, np.asarray(apply(normalised(image, config)))[0].argmax(-1))
  np.testing.assert_array_equal(evaluate_split(model, variables, config, batches), expected)


def test_a_size_the_model_cannot_take_unpadded_is_a_clear_error(data_dir):
  config = tiny_config(data_dir)  # U-Net of depth 2: sides divisible by 2
  config.evaluation.pad = False
  model = models.get_model(config.model, 6)
  predict_fn = evaluate.make_predict(model, config.evaluation, num_classes=6, crop_size=32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(DataError, match=re.escape('cannot take a 31x32 image unpadded '
                                                '(evaluation.pad=False)')):
    jax.eval_shape(predict_fn, variables, jnp.zeros((1, 31, 32, 3)))


@pytest.mark.parametrize('fields,message', [
    (dict(resize='bilinear', pad=False), "unknown evaluation.resize 'bilinear'"),
    (dict(resize='fit', pad=False), "evaluation.resize='fit' needs evaluation.resize_scale "
     'as a (long side, short side) pair'),
    (dict(resize='fit', resize_scale=512, pad=False), 'got 512'),
    (dict(resize='fit', resize_scale=(2048, 0), pad=False), 'got (2048, 0)'),
    (dict(resize='short_side', resize_scale=(520, 520), pad=False),
     "evaluation.resize='short_side' needs evaluation.resize_scale as one positive int"),
    (dict(resize='short_side', resize_scale=-1, pad=False), 'got -1'),
    (dict(resize_scale=520), "evaluation.resize_scale is 520 but evaluation.resize is ''"),
    (dict(resize='fit', resize_scale=(2048, 512)),
     "evaluation.resize='fit' needs evaluation.pad=False"),
])
def test_bad_protocol_settings_are_refused(fields, message, data_dir):
  config = tiny_config(data_dir)
  for field, value in fields.items():
    config.evaluation[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    configs.validate(config)


def test_eval_pad_size_without_padding_is_refused(data_dir):
  config = tiny_config(data_dir)
  config.evaluation.pad = False
  config.dataset.eval_pad_size = 64
  with pytest.raises(ConfigError, match=re.escape(
      'dataset.eval_pad_size is 64 but evaluation.pad=False pads nothing')):
    configs.validate(config)


def test_protocol_settings_are_reported():
  config = configs.base_config()
  assert 'pad' not in evaluate.settings(config.evaluation, 32)
  config.evaluation.pad = False
  config.evaluation.resize = 'fit'
  config.evaluation.resize_scale = (2048, 512)
  assert evaluate.settings(config.evaluation, 32) == {
      'mode': 'whole', 'scales': [1.0], 'flip': False, 'pad': False, 'resize': 'fit',
      'resize_scale': [2048, 512]}


# ---------------------------------------------------------------------------- --mode predict

def test_predict_resizes_infers_unpadded_and_writes_at_the_image_size(cnn_model, data_dir,
                                                                      tmp_path):
  cv2 = pytest.importorskip('cv2')
  model, _, _ = cnn_model
  config = tiny_config(data_dir, 'cnn', num_stages=2, features=4)
  config.evaluation.pad = False
  config.evaluation.resize = 'fit'
  config.evaluation.resize_scale = (40, 24)
  state = jax.jit(lambda rng: train.create_train_state(rng, model, config, (1, 32, 32, 3)))(
      jax.random.key(5))
  workdir = str(tmp_path / 'run')
  saver = checkpoint.Checkpoints(workdir, config.max_to_keep)
  saver.save(state)
  saver.wait()
  saver.close()
  rng = np.random.default_rng(6)
  images_dir = tmp_path / 'images'
  images_dir.mkdir()
  inputs = {}
  for name, (height, width) in {'a': (20, 28), 'b': (9, 40), 'c': (20, 28), 'd': (30, 17)}.items():
    inputs[name] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(inputs[name]).save(images_dir / f'{name}.png')
  output = tmp_path / 'out'
  assert predict.predict_files(config, workdir, str(images_dir), str(output)) == (4, 0)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  for name, image in inputs.items():
    height, width = transforms.fit_size(*image.shape[:2], (40, 24))
    resized = (cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
               if (height, width) != image.shape[:2] else image)
    logits = np.asarray(model.apply(variables, normalised(resized, config), train=False))
    expected = torch_resize_logits(logits, *image.shape[:2])[0].argmax(-1)
    with Image.open(output / f'{name}.png') as written:
      np.testing.assert_array_equal(np.asarray(written), expected, err_msg=name)


def test_validation_panels_without_padding(data_dir, tmp_path):
  """Under evaluation.pad False the panels show each image at its label's size (here the
  model saw it at 40x40, resize 'fit'), its ground truth and the prediction resized back."""
  config = tiny_config(data_dir, 'cnn', num_stages=2, features=4)
  config.log_images = 2
  config.evaluation.pad = False
  config.evaluation.resize = 'fit'
  config.evaluation.resize_scale = (48, 40)
  experiment = train.Experiment(config, str(tmp_path))
  pictures = []
  writer = types.SimpleNamespace(images=lambda step, name, images: pictures.append(
      (step, name, images)))
  state = experiment.initial_state.replace(step=jnp.asarray(7))
  visualize.log_validation_panels(experiment, writer, state)
  [(step, name, images)] = pictures
  assert (step, name) == (7, 'val/predictions')
  assert [image.shape for image in images] == [(32, 96, 3)] * 2
  source = experiment.sources['validation']
  colours = visualize.voc_colormap(NUM_CLASSES)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  for image, example in zip(images, (source[0], source[1])):
    label = example['segmentation_mask'][..., 0]
    np.testing.assert_array_equal(image[:, 32:64], visualize.colourize(label, colours, 255))
    resized = transforms.resize_linear_cv2(example['image'], 40, 40)
    logits = experiment.model.apply(variables, normalised(resized, config), train=False)
    prediction = torch_resize_logits(np.asarray(logits), 32, 32)[0].argmax(-1)
    np.testing.assert_array_equal(image[:, 64:], colours[prediction])
