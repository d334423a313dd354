"""Which formulation of a layer runs on which backend, decided in this one place.

segjax's layers (`segjax.models.layers`) state their computations the plain way, as flax and
lax ops (`nn.Conv`, `nn.ConvTranspose`, `nn.max_pool`). On XLA:CPU some of these run much
faster written otherwise (measured with benchmarks/train_step.py, README "Speed"):
convolutions with non-overlapping windows (1x1, patch embeddings, 2x2 up-convolutions) as
matrix products, stride-1 convolutions whose taps mostly read padding (ASPP's atrous rates)
tap by tap, and max pooling as the maximum of strided slices. Those 'cpu' formulations are
used on the CPU backend only; on GPU and TPU the 'plain' ops run (cuDNN and the TPU
convolution units handle them as one op), until a measurement there says otherwise. Both
give the same outputs and gradients up to float rounding (tests/test_layers.py).

`SEGJAX_KERNELS=plain` (or `cpu`) in the environment, or the `forced` context while a
function is traced, overrides the choice (for tests and benchmarks).
"""
import contextlib
import contextvars
import os

import jax

FORMULATIONS = ('cpu', 'plain')
_FORCED = contextvars.ContextVar('forced_formulation', default=None)


def _checked(name, where):
  if name not in FORMULATIONS:
    raise ValueError(f'{where} must be one of {FORMULATIONS}, got {name!r}')
  return name


def formulation():
  """'cpu' or 'plain': the formulation of the layers traced now (module docstring)."""
  forced = _FORCED.get() or os.environ.get('SEGJAX_KERNELS')
  if forced:
    return _checked(forced, 'SEGJAX_KERNELS')
  return 'cpu' if jax.default_backend() == 'cpu' else 'plain'


@contextlib.contextmanager
def forced(name):
  """Layers traced inside use the formulation `name` ('cpu' or 'plain') on any backend."""
  token = _FORCED.set(_checked(name, 'the forced formulation'))
  try:
    yield
  finally:
    _FORCED.reset(token)
