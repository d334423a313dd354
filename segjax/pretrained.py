"""Starting a model's backbone from published ImageNet weights on disk (`config.init_from`).

Accepted files (downloaded by the user beforehand; nothing is fetched at run time):
- a PyTorch state dict (`.pth`, `.pt`, `.bin`), e.g. torchvision's `resnet50-0676ba61.pth`
  (the file behind `torchvision.models.resnet50(weights='IMAGENET1K_V1')`, cached in
  `~/.cache/torch/hub/checkpoints/`) or one written with `torch.save(model.state_dict(), path)`.
  Reading it needs PyTorch (`pip install torch`); a checkpoint dict holding the weights under
  'state_dict' or 'model' also works.
- a `.safetensors` file, e.g. a timm model from the Hugging Face hub
  (`timm/resnet50.tv_in1k/model.safetensors`, `timm/vit_base_patch16_224.augreg_in21k_ft_in1k/
  model.safetensors`); read with the safetensors numpy API, no PyTorch needed.

Only the backbone is loaded; heads and decoders keep their fresh initialisation. Names and
shapes are checked first: a mismatch is refused with the missing, unexpected and mis-shaped
keys listed. Each backbone module (`segjax.models.resnet`, `vgg`, `vit`) defines the name and
layout mapping (`to_torch` / `from_torch`), the classifier keys it skips (`UNUSED_KEYS`) and
the keys it can adapt to another shape (`RESIZABLE_KEYS`, e.g. ViT position embeddings).
"""
import os

import numpy as np

from segjax.errors import ConfigError

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_WRAPPER_KEYS = ('state_dict', 'model')  # where training checkpoints keep the weights
_STRIPPED_PREFIXES = ('module.',)  # added by DataParallel / DistributedDataParallel
_SHOWN_KEYS = 8  # keys listed per kind of mismatch


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
  return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  return safetensors_numpy.load_file(path)


def read_state_dict(path):
  """The flat {name: numpy array} in the checkpoint file at `path`, with any 'module.' dropped."""
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
  except Exception as e:  # pylint: disable=broad-except  # torch/safetensors raise many kinds
    raise ConfigError(f'cannot read init_from {path!r} (corrupt or not a checkpoint): '
                      f'{type(e).__name__}: {e}') from e
  for prefix in _STRIPPED_PREFIXES:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def _listed(keys):
  keys = sorted(keys)
  more = f' ... and {len(keys) - _SHOWN_KEYS} more' if len(keys) > _SHOWN_KEYS else ''
  return ', '.join(keys[:_SHOWN_KEYS]) + more


def check_keys(state, expected, resizable=()):
  """Raises ConfigError listing missing, unexpected and mis-shaped keys of `state`.

  state, expected: {name: array}; keys in `resizable` may differ in shape.
  """
  missing = set(expected) - set(state)
  unexpected = set(state) - set(expected)
  misshaped = [f'{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})'
               for k in sorted(set(state) & set(expected))
               if k not in resizable and state[k].shape != expected[k].shape]
  problems = [f'{what} keys ({len(keys)}): {_listed(keys)}' for what, keys in
              (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped))
              if keys]
  if problems:
    raise ConfigError('the checkpoint does not fit the backbone; ' + '; '.join(problems))


def load_backbone(path, model, variables):
  """`variables` of `model` with the 'backbone' subtree replaced by the weights at `path`.

  variables: {'params': ..., 'batch_stats': ...} of the whole model (host or device arrays).
  Raises ConfigError when the model cannot take published weights or the file does not fit.
  """
  converter = model.backbone_module() if hasattr(model, 'backbone_module') else None
  if converter is None:
    raise ConfigError(f'model {type(model).__module__.rsplit(".", 1)[-1]!r} with these fields '
                      'has no backbone that published weights fit; unset init_from')
  like = {c: tree['backbone'] for c, tree in variables.items() if 'backbone' in tree}
  expected = converter.to_torch(like)
  state = {k: v for k, v in read_state_dict(path).items()
           if not k.startswith(converter.UNUSED_KEYS) and not k.endswith('num_batches_tracked')}
  try:
    check_keys(state, expected, converter.RESIZABLE_KEYS)
  except ConfigError as e:
    raise ConfigError(f'init_from {path!r}: {e}') from None
  loaded = converter.from_torch(state, like)
  return {c: {**tree, 'backbone': loaded[c]} if c in loaded else tree
          for c, tree in variables.items()}
