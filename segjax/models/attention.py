"""Transformer building blocks shared by the ViT, MiT (SegFormer) and Swin encoders and the
Segmenter decoder: scaled dot-product attention, timm's fused-qkv self-attention, the MLP,
exact GELU and stochastic depth.

`attend` computes softmax(q k^T / sqrt(d) + bias) v with the logits and softmax in float32.
Without attention dropout it calls `jax.nn.dot_product_attention`, which lets JAX pick the
fused cuDNN kernel on GPU where it applies and XLA's formulation elsewhere; with dropout on
the attention weights (training with `dropout` > 0) it runs the plain einsum form, the only
one that exposes the weights. Both give the same outputs up to float rounding
(tests/test_attention.py); benchmarks/latency.py times them side by side (`implementation`
selects one while a model is traced).
"""
import contextlib
import contextvars
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

dense_init = nn.initializers.truncated_normal(0.02)  # std 0.02, as timm initialises Linear
MLP_RATIO = 4
IMPLEMENTATIONS = ('auto', 'einsum', 'jax')
_IMPLEMENTATION = contextvars.ContextVar('attention_implementation', default='auto')


def gelu(x):
  """Exact GELU, x * Phi(x), in PyTorch's erf form: flax's `nn.gelu(approximate=False)` uses
  erfc, whose exp and branches XLA:CPU evaluates about twice as slowly; the two differ by
  float rounding (the erf form loses relative accuracy only where GELU is below 1e-7)."""
  return x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype))) / 2


def drop_path_rates(rate, depth):
  """Stochastic depth rate of each block: linear from 0 to `rate` (timm's rule)."""
  return tuple(float(r) for r in np.linspace(0.0, rate, depth))


def attend_einsum(q, k, v, bias=None, dropout=None):
  """q [B, Nq, heads, d], k and v [B, Nk, heads, d] -> [B, Nq, heads, d].

  bias: added to the logits, broadcastable to [B, heads, Nq, Nk] (Swin's relative position
  bias and window masks). dropout: None or a function applied to the weights [B, heads, Nq,
  Nk] (an `nn.Dropout` bound to the module).
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * q.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


@contextlib.contextmanager
def implementation(name):
  """`attend` calls traced inside use `name`: 'auto' (the default), 'einsum' or 'jax'
  (`jax.nn.dot_product_attention`, unless dropout needs the einsum form); for tests and
  benchmarks."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {IMPLEMENTATIONS}, got '
                     f'{name!r}')
  token = _IMPLEMENTATION.set(name)
  try:
    yield
  finally:
    _IMPLEMENTATION.reset(token)


def attend(q, k, v, bias=None, dropout=None):
  """Scaled dot-product attention (shapes as `attend_einsum`): `jax.nn.dot_product_attention`
  unless `dropout` is given or the einsum form is asked for (`implementation`)."""
  if _IMPLEMENTATION.get() == 'einsum' or dropout is not None:
    return attend_einsum(q, k, v, bias, dropout)
  if bias is not None:  # dot_product_attention takes a rank-4 bias in q's dtype
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a residual branch [B, ...] per example with probability `rate`,
  scaling kept ones by 1 / (1 - rate); identity unless training with `rate` > 0. Draws from
  the 'dropout' rng.
  """
  rate: float

  @nn.compact
  def __call__(self, x, *, train):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def weights_dropout(rate, train):
  """The attention-weights dropout for `attend` (None when inactive, so `attend` may use the
  fused kernel)."""
  return nn.Dropout(rate, deterministic=False) if train and rate > 0 else None


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused qkv Dense (3D outputs, split as [3, heads,
  D / heads]) and output Dense `proj`. [B, N, D] -> [B, N, D]."""
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype)
    qkv = dense(3 * dim, name='qkv')(x).reshape(batch, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
    out = attend(q, k, v, dropout=weights_dropout(self.dropout, train))
    out = dense(dim, name='proj')(out.reshape(batch, length, dim))
    return nn.Dropout(self.dropout, deterministic=not train)(out)


class Mlp(nn.Module):
  """fc1 (`ratio` x wider), exact GELU, dropout, fc2, dropout. [B, N, D] -> [B, N, D]."""
  ratio: int = MLP_RATIO
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    dim = x.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype)
    x = gelu(dense(self.ratio * dim, name='fc1')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = dense(dim, name='fc2')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)
