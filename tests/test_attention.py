"""The attention formulations agree with each other and with PyTorch's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references
from references import torch
from segjax.models import attention


def qkv(seed, batch=2, queries=12, keys=5, heads=3, dim=8):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(batch, n, heads, dim)).astype(np.float32)
          for n in (queries, keys, keys)]


def torch_attention(q, k, v, bias=None):
  """PyTorch's scaled_dot_product_attention on [B, N, heads, d] arrays."""
  q, k, v = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
  mask = None if bias is None else torch.from_numpy(np.broadcast_to(
      bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2])).copy())
  out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
  return out.transpose(1, 2).numpy()


@references.needs_torch
@pytest.mark.parametrize('with_bias', [False, True])
@pytest.mark.parametrize('name', ['einsum', 'jax'])
def test_each_implementation_matches_pytorch(name, with_bias):
  q, k, v = qkv(0)
  # Swin's form: a per-head relative position bias [heads, Nq, Nk] plus a -100 window mask.
  bias = None
  if with_bias:
    rng = np.random.default_rng(1)
    bias = rng.normal(size=(3, 12, 5)).astype(np.float32)
    bias[:, :4, 3:] = -100.0
  with attention.implementation(name):
    ours = jax.jit(attention.attend)(q, k, v, None if bias is None else jnp.asarray(bias))
  np.testing.assert_allclose(ours, torch_attention(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_agree_across_implementations():
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(2, queries=64, keys=64))
  with attention.implementation('einsum'):
    plain = jax.jit(attention.attend)(q, k, v)
  with attention.implementation('jax'):
    fused = jax.jit(attention.attend)(q, k, v)
  assert plain.dtype == fused.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(plain, np.float32), np.asarray(fused, np.float32),
                             atol=2e-2)


def test_dropout_on_the_weights_uses_the_einsum_form():
  q, k, v = qkv(3)
  dropped = attention.attend(q, k, v, dropout=lambda weights: jnp.zeros_like(weights))
  np.testing.assert_array_equal(dropped, 0.0)  # every weight dropped: nothing attended


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="implementation must be one of \\('auto', 'einsum'"):
    with attention.implementation('flash'):
      pass
