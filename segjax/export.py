"""Export of a trained model for deployment: StableHLO (`jax.export`) and ONNX, with a JSON.

  python launch.py --config experiments/unet.py --mode export --output exported/

The model is the workdir's best checkpoint, else its latest, else the whole model of
`config.init_from` (as `--mode predict`). `--output` gets
  model.stablehlo  `jax.export` serialization of logits = f(images), batch size symbolic,
                   lowered for cpu, cuda and tpu; the weights are constants inside it.
                   Read it back with `load_stablehlo` (jax.export.deserialize).
  model.onnx       the same function in ONNX (jax2onnx, opset 23), batch size 1; checked
                   with onnxruntime when installed (`max_relative_difference` in the JSON).
  model.json       what a deployment needs: input size, layout, dtype, normalisation, class
                   names, the checkpoint it came from, versions (`metadata`).

The exported function is the inference that evaluation and `--mode predict` run
(`evaluate.make_predict`: `config.evaluation`'s whole-image or sliding-window mode and its
test-time scales and flips), at one input size: `--export_size`, else
`dataset.eval_pad_size`, else the training crop `dataset.image_size`. Its input is the
image already normalised, float32 [B, H, W, C] (NHWC, RGB): (pixel / 255 - mean) / std per
channel with the JSON's mean and std; an image smaller than H x W is padded at the bottom
and right with 0 (the mean colour, as predict pads) and its logits cropped back. Its
output is float32 logits [B, H, W, num_classes]; the argmax over the last axis is the class
map. The layers are traced in their 'plain' formulation (`segjax.models.kernels`: lax
convolutions and pooling), not the XLA:CPU rewrites, since an artifact runs on other
backends (and converts to ONNX operators one to one).

Every family converts to ONNX (tests/test_export.py), with these limits of jax2onnx 0.17.1:
- a symbolic batch size does not convert (its resize plugin needs static shapes), so
  model.onnx takes batch 1; model.stablehlo takes any batch;
- it has no antialiased resize, so multi-scale testing (`evaluation.scales` other than
  (1.0,)), which resizes views and logits with antialiasing, is refused with that reason
  (flips and sliding windows convert). segjax's layers antialias only a shrinking side
  (`layers.resize_to`) and resample ViT position embeddings by constant matrices.
Two of its bugs are worked around: it leaves NHWC shapes in `value_info` for tensors its
layout pass made NCHW, which onnxruntime rejects at residual additions ("Incompatible
dimensions": every ResNet, MobileNetV3), so the shapes are inferred anew
(`_reinfer_shapes`); and it miscompiles zero-sized broadcasts, which `jnp.pad(mode='edge')`
emits (FCN's learned upsampling concatenates edge slices instead).
"""
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from segjax import configs
from segjax import data as data_lib
from segjax import evaluate as evaluate_lib
from segjax import predict as predict_lib
from segjax.data import transforms
from segjax.errors import ConfigError, SegjaxError
from segjax.models import kernels

STABLEHLO_FILE = 'model.stablehlo'
ONNX_FILE = 'model.onnx'
METADATA_FILE = 'model.json'
PLATFORMS = ('cpu', 'cuda', 'tpu')  # those model.stablehlo is lowered for
ONNX_OPSET = 23
ONNX_BATCH = 1
ONNX_TOLERANCE = 1e-4  # relative max difference to segjax's logits that an export must meet
INSTALL_ONNX = ('pip install onnx onnx-ir onnxruntime && pip install --no-deps '
                'jax2onnx==0.17.1 (--no-deps: its orbax-checkpoint pin would downgrade '
                "segjax's)")


class ExportError(SegjaxError):
  """An artifact could not be written (a missing package, a failed conversion)."""


# ---------------------------------------------------------------------------- the function

def export_size(config, size=None):
  """(height, width) the model is exported at: `size` (a side, (H, W) or 'HxW'), else
  `dataset.eval_pad_size`, else the training crop `dataset.image_size`."""
  if isinstance(size, str):
    try:
      sides = configs.size_value(size.lower()) or ()
    except ValueError:
      sides = ()
    if len(sides) not in (1, 2) or min(sides) < 1:
      raise ConfigError(f'--export_size {size!r} is not a size: pass a side (512) or '
                        'HEIGHTxWIDTH (512x1024)')
    size = tuple(sides) if len(sides) == 2 else sides[0]
  return transforms.height_width(size or config.dataset.get('eval_pad_size')
                                 or config.dataset.image_size)


def inference_function(model, variables, config):
  """images float32 [B, H, W, C] (normalised) -> logits float32 [B, H, W, num_classes]:
  `evaluate.make_predict`'s inference for `config.evaluation` with `variables` closed over
  (so they become constants of an export), traced with the plain layer formulations."""
  num_classes = data_lib.get_spec(config.dataset).num_classes
  predict = evaluate_lib.make_predict(model, config.evaluation, num_classes=num_classes,
                                      crop_size=config.dataset.image_size)

  def infer(images):
    with kernels.forced('plain'):
      return predict(variables, images)

  return infer


def input_spec(batch, height, width, channels):
  """The float32 [batch, height, width, channels] argument; batch: an int or a symbolic
  dimension (`jax.export.symbolic_shape`)."""
  return jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32)


# ---------------------------------------------------------------------------- StableHLO

def export_stablehlo(infer, height, width, channels, path, platforms=PLATFORMS):
  """Writes `infer` at [b, height, width, channels] with a symbolic batch b as a serialized
  `jax.export.Exported` to `path`; returns the Exported."""
  batch, = jax.export.symbolic_shape('b')
  try:
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(
        input_spec(batch, height, width, channels))
    serialized = exported.serialize()
  except ImportError as e:  # serialize() needs the flatbuffers package
    raise ExportError(f'cannot serialize StableHLO ({e}); pip install flatbuffers') from e
  with open(path, 'wb') as f:
    f.write(serialized)
  return exported


def load_stablehlo(path):
  """The `jax.export.Exported` in a model.stablehlo file: `.call(images)` runs it (any batch
  size; jit it to keep the compiled program), `.in_avals` / `.out_avals` give its shapes."""
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


# ---------------------------------------------------------------------------- ONNX

@contextlib.contextmanager
def _quiet(name, level=logging.ERROR):
  """Logger `name` below `level` silenced inside (jax2onnx logs each plugin import that an
  optional package such as equinox or dm_pix is missing for, with a traceback)."""
  logger = logging.getLogger(name)
  old = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(old)


def _import_jax2onnx():
  with _quiet('jax2onnx'):
    try:
      import jax2onnx  # pylint: disable=g-import-not-at-top
      import onnx  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ExportError(f'ONNX export needs jax2onnx and onnx ({e}): {INSTALL_ONNX}') from e
    except Exception as e:  # pylint: disable=broad-except
      raise ExportError(f'jax2onnx does not import beside this jax ({type(e).__name__}: '
                        f'{str(e)[:300]}); segjax is tested with jax2onnx 0.17.1') from e
  return jax2onnx, onnx


def _reinfer_shapes(onnx_lib, model_proto):
  """`model_proto` with its intermediate shapes inferred anew by onnx: jax2onnx 0.17.1 keeps
  NHWC shapes in value_info for tensors its layout pass made NCHW, which onnxruntime
  checks against its own inference (module docstring)."""
  del model_proto.graph.value_info[:]
  return onnx_lib.shape_inference.infer_shapes(model_proto, strict_mode=True)


def convert_onnx(infer, height, width, channels, family='model'):
  """The onnx ModelProto of `infer` at [ONNX_BATCH, height, width, channels], input
  'images', output 'logits'. ExportError naming `family` (config.model.name) and the reason
  if jax2onnx is missing or the conversion fails."""
  jax2onnx, onnx_lib = _import_jax2onnx()
  try:
    with _quiet('jax2onnx'):
      model_proto = jax2onnx.to_onnx(
          infer, [input_spec(ONNX_BATCH, height, width, channels)], model_name=family,
          opset=ONNX_OPSET, input_names=['images'], output_names=['logits'])
    return _reinfer_shapes(onnx_lib, model_proto)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
    if 'antialias' in reason:
      reason += (' (multi-scale testing resizes views and logits with antialiasing: export '
                 "with --config.evaluation.scales='(1.0,)', or use model.stablehlo)")
    raise ExportError(f'model {family!r} did not convert to ONNX with jax2onnx '
                      f'{_version("jax2onnx")}: {type(e).__name__}: {reason}') from e


def run_onnx(path_or_bytes, images):
  """Logits of float32 `images` [1, H, W, C] from the ONNX model at `path_or_bytes` with
  onnxruntime on the CPU; ImportError if onnxruntime is not installed."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only
  session = onnxruntime.InferenceSession(path_or_bytes, options,
                                         providers=['CPUExecutionProvider'])
  return session.run(['logits'], {'images': np.asarray(images, np.float32)})[0]


def relative_difference(actual, expected):
  """max |actual - expected| / max |expected| (0 where both are all zeros)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  difference = np.abs(actual - expected).max()
  return float(difference / scale) if scale else float(difference)


def export_onnx(infer, height, width, channels, path, family='model', reference=None):
  """Writes `infer` as ONNX to `path` (`convert_onnx`). With onnxruntime installed and
  `reference` (a function of images [1, H, W, C] -> logits, e.g. the exported StableHLO),
  runs both on one random input first: a graph onnxruntime cannot run, or a relative max
  difference over ONNX_TOLERANCE, is an ExportError and nothing is written. Returns that
  difference, or None when unchecked."""
  model_proto = convert_onnx(infer, height, width, channels, family)
  serialized = model_proto.SerializeToString()
  difference = None
  if reference is not None:
    try:
      images = np.random.default_rng(0).normal(size=(ONNX_BATCH, height, width, channels))
      images = images.astype(np.float32)
      difference = relative_difference(run_onnx(serialized, images), reference(images))
    except ImportError:
      pass  # onnxruntime missing: written unchecked
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
      raise ExportError(f'model {family!r} converted to an ONNX graph that onnxruntime '
                        f'cannot run: {reason}') from e
    if difference is not None and not difference <= ONNX_TOLERANCE:
      raise ExportError(f"model {family!r}: onnxruntime's logits differ from segjax's by "
                        f'{difference:.2g} (relative max), over {ONNX_TOLERANCE:g}; not '
                        'written')
  with open(path, 'wb') as f:
    f.write(serialized)
  return difference


# ---------------------------------------------------------------------------- metadata

def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def metadata(config, height, width, source, files):
  """The model.json dictionary (see README "Export")."""
  spec = data_lib.get_spec(config.dataset)
  channels = len(config.dataset.mean)
  return {
      'format': 'segjax-export-1',
      'model': config.model.to_dict(),
      'input': {
          'name': 'images', 'layout': 'NHWC', 'dtype': 'float32',
          'shape': ['batch', height, width, channels],
          'height': height, 'width': width, 'channels': channels,
          'normalized': True, 'mean': list(config.dataset.mean),
          'std': list(config.dataset.std),
          'normalization': '(pixel / 255 - mean) / std per channel, RGB pixels in [0, 255]',
          'smaller_images': 'pad at the bottom and right with 0 (after normalisation) and '
                            'crop the logits back',
      },
      'output': {
          'name': 'logits', 'layout': 'NHWC', 'dtype': 'float32',
          'shape': ['batch', height, width, spec.num_classes],
          'classes': 'argmax over the last axis',
      },
      'num_classes': spec.num_classes,
      'class_names': list(spec.class_names),
      'dataset': config.dataset.name,
      'evaluation': config.evaluation.to_dict(),
      'weights': source,
      'files': files,
      'kernels': 'plain',
      'versions': {package: _version(package) for package in
                   ('segjax', 'jax', 'jaxlib', 'flax', 'jax2onnx', 'onnx', 'onnxruntime')},
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


# ---------------------------------------------------------------------------- launch

def export_model(config, workdir, output, size=None, onnx=True):
  """Writes model.stablehlo, model.onnx (unless `onnx` is False) and model.json for the best
  (else latest) checkpoint of `workdir`, or `config.init_from`, into `output`.

  Returns the metadata. A failed ONNX export is printed and recorded in the JSON
  (`files.onnx.error`) after StableHLO is written, then raised as ExportError.
  """
  configs.validate(config)
  height, width = export_size(config, size)
  channels = len(config.dataset.mean)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise SegjaxError(f'cannot create --output {output} ({e.strerror}); pass a writable '
                      'directory') from e
  model, variables, source = predict_lib.restore_variables(config, workdir)
  described = (f'the {source["which"]} checkpoint (step {source["step"]}) in {workdir}'
               if source['step'] else config.init_from)
  print(f'Exporting {described} ({config.model.name}, {height}x{width}x{channels}) to '
        f'{output} ...', flush=True)
  infer = inference_function(model, variables, config)
  exported = export_stablehlo(infer, height, width, channels,
                              os.path.join(output, STABLEHLO_FILE))
  files = {'stablehlo': {'file': STABLEHLO_FILE, 'batch': 'symbolic',
                         'platforms': list(exported.platforms)}}
  error, onnx_path = None, os.path.join(output, ONNX_FILE)
  if os.path.exists(onnx_path):
    os.remove(onnx_path)  # an earlier export's, which must not pass for this one's
  if onnx:
    files['onnx'] = {'file': ONNX_FILE, 'batch': ONNX_BATCH, 'opset': ONNX_OPSET}
    try:
      difference = export_onnx(infer, height, width, channels, onnx_path, config.model.name,
                               reference=jax.jit(exported.call))
      files['onnx']['max_relative_difference'] = difference
    except ExportError as e:
      error = e
      files['onnx'] = {'error': str(e)}
  info = metadata(config, height, width, source, files)
  with open(os.path.join(output, METADATA_FILE), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2)
  written = [name for name in (STABLEHLO_FILE, ONNX_FILE, METADATA_FILE)
             if os.path.exists(os.path.join(output, name))]
  print(f'wrote {", ".join(written)} to {output}', flush=True)
  if error:
    raise ExportError(f'{error} ({STABLEHLO_FILE} and {METADATA_FILE} were written)')
  return info
