"""The reference implementations that parity tests compare segjax with, imported offline.

torch and torchvision (installed with --no-deps: its C extension is a CUDA build whose
`torchvision::` operators are absent, so their fake-kernel registrations are skipped; the
model code is pure PyTorch), mmsegmentation on mmcv-lite (which has no compiled `mmcv.ops`:
a stub module stands in and raises only when an op is used) and Hugging Face transformers.
Each `import_*` skips the calling test when the package is not installed; `torch` is None
without PyTorch.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

try:
  import torch
except ImportError:  # e.g. on Python 3.12+, where PyPI has no small CPU build (README)
  torch = None

# For tests that use `torch` before any import_* below would skip them.
needs_torch = pytest.mark.skipif(torch is None, reason='needs PyTorch')


def import_torch():
  return pytest.importorskip('torch')


def import_torchvision():
  """torchvision, imported with its missing C operators' registrations skipped."""
  torch = import_torch()
  if 'torchvision' in sys.modules:
    return sys.modules['torchvision']
  real = torch.library.register_fake

  def register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith('torchvision::'):
      return lambda fn: fn
    return real(op, *args, **kwargs)

  torch.library.register_fake = register_fake
  try:
    return pytest.importorskip('torchvision')
  finally:
    torch.library.register_fake = real


class _MissingOps(types.ModuleType):
  """Stands in for mmcv.ops: any op it is asked for raises when built or called."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)

    def unavailable(*args, **kwargs):
      raise RuntimeError(f'mmcv.ops.{name} needs the full mmcv build, not mmcv-lite')

    return type(name, (), {'__init__': unavailable, '__call__': unavailable})


def import_mmseg():
  """(mmseg's MODELS registry, the directory of its shipped configs)."""
  import_torch()
  pytest.importorskip('mmcv')
  if 'mmcv.ops' not in sys.modules:
    stub = _MissingOps('mmcv.ops')
    stub.__path__ = []
    stub.__spec__ = importlib.machinery.ModuleSpec('mmcv.ops', None)
    sys.modules['mmcv.ops'] = stub
  mmseg = pytest.importorskip('mmseg')
  import mmseg.models  # pylint: disable=g-import-not-at-top,unused-import
  from mmseg.registry import MODELS  # pylint: disable=g-import-not-at-top
  from mmseg.utils import register_all_modules  # pylint: disable=g-import-not-at-top
  register_all_modules(init_default_scope=True)
  return MODELS, os.path.join(os.path.dirname(mmseg.__file__), '.mim', 'configs')


def mmseg_config(name, keep_preprocessor=False):
  """The mmengine Config of mmseg's shipped config `name` ('deeplabv3plus/...py'), with
  plain BatchNorm for SyncBN and no pretrained-weight download; without
  `keep_preprocessor`, also without its data preprocessor (normalisation, padding)."""
  _, config_dir = import_mmseg()
  from mmengine.config import Config  # pylint: disable=g-import-not-at-top
  config = Config.fromfile(os.path.join(config_dir, name))
  config.model.pop('pretrained', None)
  if not keep_preprocessor:
    config.model.pop('data_preprocessor', None)
  for part in ('backbone', 'decode_head', 'auxiliary_head'):
    if part in config.model and config.model[part] is not None:
      config.model[part].pop('init_cfg', None)
      if config.model[part].get('norm_cfg', {}).get('type') == 'SyncBN':
        config.model[part]['norm_cfg'] = dict(type='BN', requires_grad=True)
  return config


def build_mmseg_model(name, seed=0, keep_preprocessor=False):
  """mmseg's EncoderDecoder of config `name` in eval mode, random weights, randomised
  BatchNorm statistics (so that running averages matter). With `keep_preprocessor` it
  keeps its data preprocessor and its config (`model.cfg`), so that
  `mmseg.apis.inference_model` runs the config's whole test pipeline."""
  torch = import_torch()
  models, _ = import_mmseg()
  torch.manual_seed(seed)
  config = mmseg_config(name, keep_preprocessor)
  model = models.build(config.model)
  model.cfg = config
  randomize_batch_norm(model, seed)
  return model.eval()


def randomize_batch_norm(module, seed=0):
  """Random affine parameters and running statistics for every BatchNorm of `module`."""
  torch = import_torch()
  generator = torch.Generator().manual_seed(seed)
  for layer in module.modules():
    if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      with torch.no_grad():
        count = layer.num_features
        layer.weight.copy_(1 + 0.2 * torch.randn(count, generator=generator))
        layer.bias.copy_(0.2 * torch.randn(count, generator=generator))
        layer.running_mean.copy_(0.2 * torch.randn(count, generator=generator))
        layer.running_var.copy_(0.5 + torch.rand(count, generator=generator))
  return module


def import_transformers():
  """Hugging Face transformers (its PyTorch models, built from a config without the hub). It
  imports torchvision when installed, so that goes through `import_torchvision` first."""
  import_torch()
  if importlib.util.find_spec('torchvision'):
    import_torchvision()
  return pytest.importorskip('transformers')
