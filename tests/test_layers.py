"""layers.Conv / layers.ConvTranspose against flax's nn.Conv / nn.ConvTranspose, and the
backend's choice of formulation (`kernels`).

The matrix-product paths must be drop-in: the same parameter tree (names, shapes, init
draws), the same outputs and the same gradients with respect to inputs and parameters.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import kernels
from segjax.models import layers


def _outputs_and_gradients(module, params, x):
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # a non-linear cotangent
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


def _assert_same_as_flax(ours, reference, input_shape):
  x = jax.random.normal(jax.random.key(0), input_shape)
  params = reference.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_array_equal(ours.init(jax.random.key(1), x)['params']['kernel'],
                                params['params']['kernel'])
  expected = _outputs_and_gradients(reference, params, x)
  got = _outputs_and_gradients(ours, params, x)
  assert got[0].shape == expected[0].shape
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('fields, input_shape, fast', [
    (dict(kernel_size=(1, 1)), (2, 9, 7, 5), True),
    (dict(kernel_size=(1, 1), strides=2), (2, 9, 7, 5), True),  # odd sides: ceil(9 / 2)
    (dict(kernel_size=(1, 1), strides=2, padding='VALID', use_bias=False), (2, 9, 7, 5), True),
    (dict(kernel_size=(4, 4), strides=4, padding='VALID'), (2, 18, 13, 3), True),  # cropped
    (dict(kernel_size=(4, 4), strides=4, padding='SAME'), (2, 16, 12, 3), True),
    (dict(kernel_size=(4, 4), strides=4, padding='SAME'), (2, 18, 12, 3), False),  # padded
    (dict(kernel_size=(1, 1), padding=((1, 1), (0, 0))), (2, 6, 6, 3), False),
    (dict(kernel_size=(3, 3), strides=2, kernel_dilation=2), (2, 9, 9, 3), False),
])
def test_conv_equals_flax_conv(fields, input_shape, fast):
  ours, reference = layers.Conv(8, **fields), nn.Conv(8, **fields)
  assert (ours._non_overlapping_patch(jnp.zeros(input_shape)) is not None) == fast
  _assert_same_as_flax(ours, reference, input_shape)


@pytest.mark.parametrize('fields, input_shape, taps', [
    # ASPP-like: rate 6 on an 8x8 map reaches rows 0-1 / 0-7 / 6-7 ...
    (dict(kernel_size=(3, 3), kernel_dilation=6), (2, 8, 8, 3),
     ([(0, 0, 6, 8), (1, 0, 0, 8), (2, 6, 0, 2)],) * 2),
    # ... and rate 12 only through the centre tap.
    (dict(kernel_size=(3, 3), kernel_dilation=12, use_bias=False), (2, 8, 8, 3),
     ([(1, 0, 0, 8)],) * 2),
    # ResNet's explicit padding, a non-square map, per-axis rates.
    (dict(kernel_size=(3, 3), kernel_dilation=(4, 3), padding=((4, 4), (3, 3))), (2, 8, 5, 3),
     ([(0, 0, 4, 8), (1, 0, 0, 8), (2, 4, 0, 4)], [(0, 0, 3, 5), (1, 0, 0, 5), (2, 3, 0, 2)])),
    # An even kernel: 'SAME' pads 1 before and 2 after.
    (dict(kernel_size=(2, 2), kernel_dilation=3), (2, 4, 4, 3),
     ([(0, 0, 1, 4), (1, 2, 0, 2)],) * 2),
    # Kernels as large as the map: a U-Net's 2x2 bottom, FCN's 7x7 fc6 on a 4x4 pool5.
    (dict(kernel_size=(3, 3)), (2, 2, 2, 3), ([(0, 0, 1, 2), (1, 0, 0, 2), (2, 1, 0, 1)],) * 2),
    (dict(kernel_size=(7, 7)), (2, 4, 4, 3),
     ([(0, 0, 3, 4), (1, 0, 2, 4), (2, 0, 1, 4), (3, 0, 0, 4), (4, 1, 0, 3), (5, 2, 0, 2),
       (6, 3, 0, 1)],) * 2),
    # Most taps inside the map (3x3 on 3x3: 0.605 of the work), strided or 'VALID': flax's.
    (dict(kernel_size=(3, 3), kernel_dilation=2), (2, 16, 16, 3), None),
    (dict(kernel_size=(3, 3)), (2, 3, 3, 3), None),
    (dict(kernel_size=(3, 3), kernel_dilation=6, strides=2), (2, 8, 8, 3), None),
    (dict(kernel_size=(3, 3), kernel_dilation=3, padding='VALID'), (2, 8, 8, 3), None),
])
def test_atrous_conv_by_taps_equals_flax_conv(fields, input_shape, taps):
  ours, reference = layers.Conv(8, **fields), nn.Conv(8, **fields)
  plan = ours._sparse_taps(jnp.zeros(input_shape))
  assert (plan and plan[0]) == taps
  _assert_same_as_flax(ours, reference, input_shape)


@pytest.mark.parametrize('fields, fast', [
    (dict(kernel_size=(2, 2), strides=(2, 2)), True),  # U-Net's up-convolution
    (dict(kernel_size=(3, 3), strides=(3, 3), padding='VALID', use_bias=False), True),
    (dict(kernel_size=(3, 3), strides=(2, 2)), False),  # overlapping windows
])
def test_conv_transpose_equals_flax_conv_transpose(fields, fast):
  input_shape = (2, 5, 7, 4)
  ours, reference = layers.ConvTranspose(6, **fields), nn.ConvTranspose(6, **fields)
  assert (ours._non_overlapping_patch(jnp.zeros(input_shape)) is not None) == fast
  _assert_same_as_flax(ours, reference, input_shape)


@pytest.mark.parametrize('fields', [dict(kernel_size=(1, 1)),
                                    dict(kernel_size=(3, 3), kernel_dilation=6)])
def test_bfloat16_compute_keeps_float32_parameters(fields):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  conv = layers.Conv(4, **fields, dtype=jnp.bfloat16)
  params = conv.init(jax.random.key(1), x)
  assert params['params']['kernel'].dtype == jnp.float32
  y = conv.apply(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), nn.Conv(4, **fields).apply(params, x),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('size, stride, padding, input_shape', [
    (2, 2, 0, (2, 8, 6, 3)), (2, 2, 0, (1, 7, 5, 2)),  # odd sides: the last row dropped
    (3, 2, 1, (2, 8, 6, 3)), (3, 2, 1, (1, 7, 5, 2)),  # ResNet's stem pool
])
def test_max_pool_equals_flax_max_pool(size, stride, padding, input_shape):
  x = jax.random.normal(jax.random.key(0), input_shape)  # no ties: one max per window
  reference = lambda x: nn.max_pool(x, (size, size), strides=(stride, stride),
                                    padding=((padding, padding), (padding, padding)))
  pool = lambda x: layers.max_pool(x, size, stride, padding)
  cotangent = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = lambda pool: jax.vjp(pool, x)[1](cotangent)[0]
  np.testing.assert_array_equal(pool(x), reference(x))
  np.testing.assert_array_equal(grad(pool), grad(reference))


def test_max_pool_splits_the_gradient_between_tied_maxima():
  # All-zero windows, as after a ReLU: each 2x2 window's gradient is shared, summing to 1.
  grad = jax.grad(lambda x: layers.max_pool_2x2(x).sum())(jnp.zeros((1, 4, 4, 1)))
  assert jnp.all(grad > 0)
  np.testing.assert_allclose(grad[0, :, :, 0].reshape(2, 2, 2, 2).sum(axis=(1, 3)),
                             jnp.ones((2, 2)))


# ---------------------------------------------------------------------------- formulations

def _primitives(fn, *args):
  return {equation.primitive.name for equation in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_the_cpu_formulations_run_on_the_cpu_backend_only(monkeypatch):
  assert kernels.formulation() == 'cpu'  # these tests run on CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert kernels.formulation() == 'plain'
  monkeypatch.setenv('SEGJAX_KERNELS', 'cpu')
  assert kernels.formulation() == 'cpu'
  monkeypatch.setenv('SEGJAX_KERNELS', 'fast')
  with pytest.raises(ValueError, match=r"SEGJAX_KERNELS must be one of \('cpu', 'plain'\)"):
    kernels.formulation()


def test_plain_formulation_traces_flax_and_lax_ops():
  x = jnp.zeros((1, 8, 8, 3))
  conv = layers.Conv(4, (1, 1))
  params = conv.init(jax.random.key(0), x)
  with kernels.forced('plain'):
    plain = _primitives(lambda x: conv.apply(params, x), x)
    pooled = _primitives(lambda x: layers.max_pool(x, 3, 2, 1), x)
  with kernels.forced('cpu'):
    cpu = _primitives(lambda x: conv.apply(params, x), x)
  assert 'conv_general_dilated' in plain and 'dot_general' not in plain
  assert 'dot_general' in cpu and 'conv_general_dilated' not in cpu
  assert 'reduce_window_max' in pooled


@pytest.mark.parametrize('name,fields', [
    ('deeplab', dict(backbone_depth=18, backbone_width=8, aspp_features=8,
                     low_level_features=4, decoder_features=8)),  # ASPP taps, strided pools
    ('unet', dict(depth=2, features=4)),  # 2x2 up-convolutions and pools
    ('segmenter', dict(size='tiny', patch_size=8, depth=1, pretrained_image_size=32)),
])
def test_formulations_give_the_same_outputs_and_gradients(name, fields):
  from segjax import models  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = models.get_model(ml_collections.ConfigDict({'name': name, **fields}), 3)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)

  def outputs_and_gradients():
    loss = lambda params, x: jnp.sum(jnp.sin(model.apply(
        {**variables, 'params': params}, x, train=False)))
    return model.apply(variables, x, train=False), jax.grad(loss, (0, 1))(
        variables['params'], x)

  with kernels.forced('cpu'):
    cpu = jax.jit(outputs_and_gradients)()
  with kernels.forced('plain'):
    plain = jax.jit(outputs_and_gradients)()
  for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.parametrize('strides,dilation,use_bias', [(1, 1, True), (2, 1, False), (1, 2, False)])
def test_depthwise_conv_formulations_agree(strides, dilation, use_bias):
  """The tap-by-tap 'cpu' depthwise convolution against the grouped convolution ('plain'):
  outputs and gradients, at an odd size."""
  conv = layers.DepthwiseConv(5, strides, dilation, use_bias=use_bias)
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
  variables = conv.init(jax.random.key(1), x)

  def loss(variables, x):
    return jnp.sum(jnp.sin(conv.apply(variables, x)))

  results = {}
  for name in kernels.FORMULATIONS:
    with kernels.forced(name):  # read while tracing: a new jitted function per formulation
      results[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
  assert jax.eval_shape(conv.apply, variables, x).shape == (
      2, -(-9 // strides), -(-7 // strides), 6)
  for ours, plain in zip(jax.tree.leaves(results['cpu']), jax.tree.leaves(results['plain'])):
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)
