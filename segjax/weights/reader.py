"""Reading a weights file into a flat {key: numpy array}, whatever its format and dtype.

- PyTorch files (`.pth`, `.pt`, `.bin`: torchvision's and timm's state dicts, mmsegmentation's
  `{'state_dict': ..., 'meta': ...}` checkpoints, Hugging Face's `pytorch_model.bin`), read
  with `torch.load(weights_only=True)`; PyTorch is needed for these only.
- `.safetensors` (Hugging Face's `model.safetensors`, timm's hub files), parsed here from
  the format's JSON header and raw little-endian buffers, so float16 and bfloat16 files
  read as well as float32 ones, without PyTorch.
Floating-point tensors come back as float32 (bfloat16 and float16 convert exactly), integer
ones (BatchNorm's `num_batches_tracked`) unchanged. Keys that all start with 'module.'
(DataParallel) lose it.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from segjax.errors import ConfigError

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_WRAPPER_KEYS = ('state_dict', 'model')  # where training checkpoints keep the weights
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
    'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def _as_float32(array):
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) or \
      array.dtype == ml_dtypes.bfloat16 else array


def _read_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f'reading {path} needs PyTorch: `pip install torch`, or convert it to '
                      '.safetensors (safetensors.torch.save_file) elsewhere') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  for key in _WRAPPER_KEYS:
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not isinstance(state, dict):
    raise ConfigError(f'{path} holds a {type(state).__name__}, not a state dict')
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(path):
  """{key: array} of a .safetensors file: 8-byte little-endian header length, a JSON header
  {key: {dtype, shape, data_offsets}} (and '__metadata__'), then the tensors' bytes."""
  with open(path, 'rb') as f:
    header_size, = struct.unpack('<Q', f.read(8))
    if header_size > os.path.getsize(path) - 8:
      raise ValueError(f'header of {header_size} bytes is longer than the file')
    header = json.loads(f.read(header_size))
    data = f.read()
  state = {}
  for key, entry in header.items():
    if key == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry['dtype'])
    if dtype is None:
      raise ValueError(f'{key} has dtype {entry["dtype"]}, which segjax does not read')
    start, stop = entry['data_offsets']
    array = np.frombuffer(data[start:stop], dtype=np.dtype(dtype).newbyteorder('<'))
    state[key] = _as_float32(array.reshape(entry['shape']))
  return state


def read_state_dict(path):
  """The flat {key: numpy array} in the weights file at `path` (module docstring).

  Raises ConfigError for a missing file, an unknown suffix or an unreadable file.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'init_from file {path!r} does not exist')
  if path.endswith('.safetensors'):
    reader = _read_safetensors
  elif path.endswith(TORCH_SUFFIXES):
    reader = _read_torch
  else:
    raise ConfigError(f'init_from {path!r}: unknown format; expected .safetensors or a PyTorch '
                      f'state dict ({", ".join(TORCH_SUFFIXES)})')
  try:
    state = reader(path)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # torch, json and numpy raise many kinds
    raise ConfigError(f'cannot read init_from {path!r} (corrupt or not a checkpoint): '
                      f'{type(e).__name__}: {e}') from e
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state
