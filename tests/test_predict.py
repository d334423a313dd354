"""Prediction on image files (label PNGs, overlays, skipped files) and validation panels."""
import functools
import glob
import io
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2

from segjax import checkpoint
from segjax import configs
from segjax import data
from segjax import metric_writer
from segjax import models
from segjax import predict
from segjax import train
from segjax import visualize
from segjax.errors import ConfigError, SegjaxError
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (pixel mode, height, width); the tiny U-Net's inputs are padded to these buckets.
GOOD_IMAGES = {'a_square': ('RGB', 32, 32), 'b_odd': ('RGB', 20, 28),
               'c_gray': ('L', 17, 40), 'd_wide': ('RGB', 9, 40)}
PADDED = {'a_square': (32, 32), 'b_odd': (32, 32), 'c_gray': (32, 64), 'd_wide': (32, 64)}


def save_best_and_latest(config, model, workdir, size):
  """Saves two train states of `model` with different weights in `workdir`: the best
  checkpoint (step 3) and the latest (step 5), for inputs `size` x `size`. -> (best, latest)."""
  init = jax.jit(lambda rng: train.create_train_state(rng, model, config, (1, size, size, 3)))
  best = init(jax.random.key(1)).replace(step=jnp.asarray(3))
  latest = init(jax.random.key(2)).replace(step=jnp.asarray(5))
  saver = checkpoint.Checkpoints(workdir, config.max_to_keep)
  saver.save_if_best(best, 0.5)
  saver.save(latest)
  saver.wait()
  saver.close()
  return best, latest


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """A workdir whose best checkpoint (step 3) and latest one (step 5) hold different
  weights; the config and model that made them; a jitted model.apply."""
  config = tiny_config(data_dir)
  model = models.get_model(config.model, data.get_spec(config.dataset).num_classes)
  workdir = str(tmp_path_factory.mktemp('predict_run'))
  best, latest = save_best_and_latest(config, model, workdir, 32)
  apply = jax.jit(functools.partial(model.apply, train=False))
  return config, apply, workdir, best, latest


@pytest.fixture(scope='module')
def predicted(run, tmp_path_factory):
  """Predictions of a folder with good images, a corrupt one, an RGBA one and a text file."""
  config, _, workdir, _, _ = run
  images_dir = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  inputs = {}
  for name, (mode, height, width) in GOOD_IMAGES.items():
    shape = (height, width) if mode == 'L' else (height, width, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(images_dir / f'{name}.png')
    inputs[name] = pixels
  (images_dir / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(
      images_dir / 'alpha.png')
  (images_dir / 'notes.txt').write_text('not an image')
  output = str(tmp_path_factory.mktemp('out'))
  counts = predict.predict_files(config, workdir, str(images_dir), output)
  return inputs, images_dir, output, counts


def expected_classes(apply, state, pixels, padded, config):
  """Argmax of the model's logits on the image normalised and zero-padded to `padded`."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  image = np.repeat(pixels[..., None], 3, -1) if pixels.ndim == 2 else pixels
  normalised = (image / 255 - np.array(config.dataset.mean)) / np.array(config.dataset.std)
  batch = np.zeros((1, *padded, 3), np.float32)
  batch[0, :image.shape[0], :image.shape[1]] = normalised
  logits = apply(variables, batch)
  return np.argmax(np.asarray(logits)[0, :image.shape[0], :image.shape[1]], axis=-1)


def test_label_pngs_hold_the_best_checkpoints_argmax(run, predicted):
  config, apply, _, best, latest = run
  inputs, _, output, _ = predicted
  for name, pixels in inputs.items():
    label = Image.open(os.path.join(output, f'{name}.png'))
    assert label.mode == 'P'
    assert label.size == (pixels.shape[1], pixels.shape[0])
    expected = expected_classes(apply, best, pixels, PADDED[name], config)
    np.testing.assert_array_equal(np.asarray(label), expected)
  # The latest checkpoint's weights would have labelled the last image differently.
  assert (expected != expected_classes(apply, latest, pixels, PADDED[name], config)).any()


def test_overlay_blends_image_and_class_colours(predicted):
  inputs, _, output, _ = predicted
  for name, pixels in inputs.items():
    label = Image.open(os.path.join(output, f'{name}.png'))
    palette = np.array(label.getpalette()[:6 * 3]).reshape(6, 3)
    assert palette[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    image = np.repeat(pixels[..., None], 3, -1) if pixels.ndim == 2 else pixels
    expected = image * 0.5 + palette[np.asarray(label)] * 0.5
    got = np.asarray(Image.open(os.path.join(output, f'{name}_overlay.png')))
    assert got.shape == image.shape
    assert np.abs(got - expected).max() <= 0.5


def test_bad_files_are_skipped_and_the_others_written(predicted):
  _, images_dir, output, counts = predicted
  assert counts == (len(GOOD_IMAGES), 2)
  written = sorted(os.listdir(output))
  assert written == sorted([f'{name}.png' for name in GOOD_IMAGES]
                           + [f'{name}_overlay.png' for name in GOOD_IMAGES])
  assert os.path.exists(images_dir / 'notes.txt')  # ignored: not an image extension


def test_skip_messages_and_summary(run, tmp_path, capsys):
  config, _, workdir, _, _ = run
  Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / 'alpha.png')
  (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'good.png')
  output = str(tmp_path / 'out')
  assert predict.predict_files(config, workdir, str(tmp_path / '*.png'), output) == (1, 2)
  lines = capsys.readouterr().out.splitlines()
  assert f'skipped {tmp_path / "alpha.png"}: has 4 channels (mode RGBA); the model takes 3 ' \
         '(one per dataset.mean value): convert it' in lines
  assert any(line.startswith(f'skipped {tmp_path / "corrupt.png"}: cannot be read as an image')
             for line in lines)
  assert lines[-1] == f'wrote 1 predictions to {output}, skipped 2 files'


def test_nothing_predicted_is_an_error(run, tmp_path):
  config, _, workdir, _, _ = run
  (tmp_path / 'corrupt.png').write_bytes(b'nope')
  with pytest.raises(SegjaxError, match='no image of --images .* could be predicted'):
    predict.predict_files(config, workdir, str(tmp_path / 'corrupt.png'), str(tmp_path / 'o'))


def test_empty_glob_and_missing_checkpoint_are_errors(run, tmp_path):
  config, _, workdir, _, _ = run
  with pytest.raises(SegjaxError, match="--images '.*nothing-\\*.jpg' names no image files"):
    predict.predict_files(config, workdir, str(tmp_path / 'nothing-*.jpg'), str(tmp_path))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'good.png')
  with pytest.raises(SegjaxError, match='no checkpoint in .*empty; train first'):
    predict.predict_files(config, str(tmp_path / 'empty'), str(tmp_path / 'good.png'),
                          str(tmp_path / 'out'))


def test_find_images_directory_glob_and_file(tmp_path):
  for name in ('b.JPG', 'a.png', '.hidden.png', 'c.txt', 'sub/d.png'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  assert predict.find_images(str(tmp_path)) == [str(tmp_path / 'a.png'), str(tmp_path / 'b.JPG')]
  assert predict.find_images(str(tmp_path / '**' / '*.png')) == [
      str(tmp_path / 'a.png'), str(tmp_path / 'sub' / 'd.png')]
  assert predict.find_images(str(tmp_path / 'c.txt')) == [str(tmp_path / 'c.txt')]


def test_buckets_bound_the_compiled_sizes():
  assert [predict.bucket_side(s) for s in (1, 32, 33, 100, 375, 500, 513, 1024, 1025, 2048)] \
      == [32, 32, 64, 128, 384, 512, 640, 1024, 1280, 2048]
  assert len({predict.bucket_side(s) for s in range(513, 1025)}) == 4  # one octave
  assert predict.padded_size(300, 500, (512, 512)) == (512, 512)  # eval_pad_size fits
  assert predict.padded_size(300, 600, (512, 512)) == (320, 640)
  assert [predict.padded_batch(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_output_among_the_inputs_is_refused(run, tmp_path):
  config, _, workdir, _, _ = run
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.png')
  with pytest.raises(SegjaxError, match='holds input images'):
    predict.predict_files(config, workdir, str(tmp_path), str(tmp_path))


def test_voc_and_cityscapes_colours():
  config = tiny_config('')
  config.dataset.name = 'voc'
  colours = visualize.class_colours(config.dataset, 21)
  assert colours.dtype == np.uint8 and colours.shape == (21, 3)
  # The published VOC colormap: background, aeroplane, bicycle, bird, boat, person, tvmonitor.
  assert colours[[0, 1, 2, 3, 4, 15, 20]].tolist() == [
      [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [192, 128, 128],
      [0, 64, 128]]
  assert len({tuple(c) for c in visualize.voc_colormap(1000)}) == 1000
  config.dataset.name = 'cityscapes'
  colours = visualize.class_colours(config.dataset, 19)
  assert colours[[0, 10, 13]].tolist() == [[128, 64, 128], [70, 130, 180], [0, 0, 142]]


def test_panels_put_image_truth_and_prediction_side_by_side():
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 4, 5, 3)).astype(np.uint8)
  images = (pixels / 255 - 0.5) / 0.25
  labels = rng.integers(0, 3, (2, 4, 5))
  labels[0, 0, 0] = 255
  predictions = rng.integers(0, 3, (2, 4, 5))
  colours = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
  got = visualize.panels(images, labels, predictions, colours, mean=mean, std=std,
                         ignore_label=255)
  assert got.dtype == np.uint8 and got.shape == (2, 4, 15, 3)
  np.testing.assert_array_equal(got[:, :, :5], pixels)
  assert got[0, 0, 5].tolist() == [0, 0, 0]  # ignored pixel
  np.testing.assert_array_equal(got[1, :, 5:10], colours[labels[1]])
  np.testing.assert_array_equal(got[:, :, 10:], colours[predictions])


def read_events(directory):
  """Every Event in the TFRecord event files under `directory` (no TensorFlow needed)."""
  events = []
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      while header := f.read(12):
        (length,) = struct.unpack('<Q', header[:8])
        events.append(event_pb2.Event.FromString(f.read(length)))
        f.read(4)  # the record's CRC
  return events


def test_validation_panels_reach_tensorboard(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.log_images = 3
  experiment = train.Experiment(config, str(tmp_path))
  writer = metric_writer.MetricWriter(str(tmp_path))
  state = experiment.initial_state.replace(step=jnp.asarray(7))
  visualize.log_validation_panels(experiment, writer, state)
  writer.close()
  images = [(event.step, value) for event in read_events(str(tmp_path / 'tensorboard'))
            for value in event.summary.value if value.HasField('image')]
  assert [(step, value.tag) for step, value in images] == [(7, 'val/predictions')]
  picture = np.asarray(Image.open(io.BytesIO(images[0][1].image.encoded_image_string)))
  assert picture.shape == (3 * 32, 3 * 32, 3)  # 3 panels of 32x32 images, stacked
  # The middle third of each panel is the coloured ground truth of that validation example.
  source = experiment.sources['validation']
  colours = visualize.voc_colormap(6)
  for i in range(3):
    label = source[i]['segmentation_mask'][..., 0]
    truth = visualize.colourize(label, colours, ignore_label=255)
    np.testing.assert_array_equal(picture[32 * i:32 * (i + 1), 32:64], truth)


def test_launch_predict_without_checkpoint_exits_with_the_fix(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.png')
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'experiments/unet.py', '--mode=predict',
       '--images', str(tmp_path / 'a.png'), '--output', str(tmp_path / 'out'),
       f'--workdir={tmp_path / "run"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert f'error: no checkpoint in {tmp_path / "run"}; train first' in result.stderr


def test_log_images_zero_logs_nothing_and_negative_is_refused(tmp_path):
  config = tiny_config(str(tmp_path))
  config.log_images = 0
  writer = metric_writer.MetricWriter(str(tmp_path))
  visualize.log_validation_panels(types.SimpleNamespace(config=config), writer, state=None)
  writer.close()
  assert not any(value.HasField('image') for event in read_events(str(tmp_path / 'tensorboard'))
                 for value in event.summary.value)
  config.log_images = -1
  with pytest.raises(ConfigError, match=r'log_images must be a whole number >= 0 .* got -1'):
    configs.validate(config)
