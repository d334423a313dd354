"""Parameter groups and layer-wise learning-rate decay against PyTorch's optimizers with the
same param groups (what mmengine's paramwise_cfg builds)."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references
from references import torch
from segjax import configs
from segjax import optim
from segjax.errors import ConfigError

PARAMS = {  # a flax-like tree: a backbone with a norm, a decoder head
    'backbone': {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'norm': {'scale': (4,),
                                                                       'bias': (4,)}},
    'decode_head': {'classifier': {'kernel': (4, 5), 'bias': (5,)}},
}


def tree(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), PARAMS,
                      is_leaf=lambda x: isinstance(x, tuple))


def adamw_config(param_groups=(), decay='kernels'):
  config = configs.base_config()
  config.optimizer.update(name='adamw', learning_rate=1e-2, param_groups=param_groups,
                          decay=decay)
  config.update(weight_decay=0.1, warmup_steps=0, schedule='constant')
  return config


def run_segjax(config, steps=3):
  params = tree(0)
  tx = optim.create_optimizer(config)
  state = tx.init(params)
  for step in range(steps):
    updates, state = tx.update(tree(10 + step), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params


def run_torch(groups, steps=3):
  """groups: [(leaf paths, lr, weight_decay)] -> the parameters after torch AdamW steps."""
  flat = {'/'.join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree(0))}
  tensors = {name: torch.tensor(value, requires_grad=True) for name, value in flat.items()}
  optimizer = torch.optim.AdamW(
      [{'params': [tensors[n] for n in names], 'lr': lr, 'weight_decay': wd}
       for names, lr, wd in groups], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
  for step in range(steps):
    grads = {'/'.join(k.key for k in path): np.asarray(v)
             for path, v in jax.tree_util.tree_leaves_with_path(tree(10 + step))}
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(grads[name])
    optimizer.step()
  return {name: t.detach().numpy() for name, t in tensors.items()}


def flat(params):
  return {'/'.join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(params)}


KERNELS = ['backbone/conv/kernel', 'decode_head/classifier/kernel']


@references.needs_torch
def test_without_groups_adamw_matches_torch_decaying_kernels_only():
  ours = flat(run_segjax(adamw_config()))
  others = [n for n in flat(tree(0)) if n not in KERNELS]
  theirs = run_torch([(KERNELS, 1e-2, 0.1), (others, 1e-2, 0.0)])
  for name in ours:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)


@references.needs_torch
def test_segformer_style_groups_match_torch_param_groups():
  # mmseg's SegFormer: custom_keys {'norm': decay_mult 0, 'head': lr_mult 10}, decay on all.
  groups = (('norm', 1.0, 0.0), ('head', 10.0, 1.0))
  ours = flat(run_segjax(adamw_config(groups, decay='all')))
  norm = ['backbone/norm/bias', 'backbone/norm/scale']
  head = ['decode_head/classifier/bias', 'decode_head/classifier/kernel']
  rest = ['backbone/conv/bias', 'backbone/conv/kernel']
  theirs = run_torch([(norm, 1e-2, 0.0), (head, 0.1, 0.1), (rest, 1e-2, 0.1)])
  for name in ours:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_first_matching_group_wins():
  config = adamw_config((('classifier/bias', 0.0, 0.0), ('classifier', 10.0, 1.0)))
  labels = flat(optim.parameter_labels(config)(tree(0)))
  assert labels['decode_head/classifier/bias'] == 'group0_layer0'
  assert labels['decode_head/classifier/kernel'] == 'group1_layer0'
  assert labels['backbone/conv/kernel'] == 'group-1_layer0'
  np.testing.assert_array_equal(  # lr_mult 0: frozen
      flat(run_segjax(config))['decode_head/classifier/bias'], flat(tree(0))[
          'decode_head/classifier/bias'])


@pytest.fixture
def numbered_model(monkeypatch):
  """A model module whose layer_id numbers the backbone's conv 1 and its norm 2 (of 2)."""
  module = types.ModuleType('segjax.models.numbered')
  module.layer_id = lambda path, num_layers: (
      num_layers + 1 if path[0] != 'backbone' else {'conv': 1, 'norm': 2}[path[1]])
  monkeypatch.setitem(sys.modules, 'segjax.models.numbered', module)
  return 'numbered'


@references.needs_torch
def test_layer_decay_scales_learning_rates_as_mmseg(numbered_model):
  config = adamw_config()
  config.model.name = numbered_model
  config.optimizer.update(layer_decay=0.5, layer_decay_layers=2)
  # mmseg: scale = decay_rate ** (num_layers + 2 - layer_id - 1) with num_layers 2.
  ours = flat(run_segjax(config))
  conv = ['backbone/conv/kernel', 'backbone/conv/bias']
  norm = ['backbone/norm/scale', 'backbone/norm/bias']
  head = ['decode_head/classifier/kernel', 'decode_head/classifier/bias']
  theirs = run_torch([([conv[0]], 1e-2 * 0.25, 0.1), ([conv[1]], 1e-2 * 0.25, 0.0),
                      (norm, 1e-2 * 0.5, 0.0), ([head[0]], 1e-2, 0.1), ([head[1]], 1e-2, 0.0)])
  for name in ours:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_decay_needs_a_numbered_model():
  config = adamw_config()
  config.model.name = 'unet'
  config.optimizer.layer_decay = 0.9
  with pytest.raises(ConfigError, match="model 'unet' does not .*set optimizer.layer_decay=0"):
    optim.create_optimizer(config)


@pytest.mark.parametrize('groups,message', [
    ((('head', 10.0),), r'entries must be \(regex, lr_mult, decay_mult\)'),
    ((('head', -1.0, 1.0),), 'non-negative multipliers'),
    ((('(head', 1.0, 1.0),), "pattern '\\(head' is not a regex"),
])
def test_bad_param_groups_are_refused(groups, message):
  with pytest.raises(ConfigError, match=message):
    optim.create_optimizer(adamw_config(groups))


def test_unknown_decay_is_refused():
  with pytest.raises(ConfigError, match="unknown optimizer.decay 'biases'; valid: kernels, all"):
    optim.create_optimizer(adamw_config(decay='biases'))
