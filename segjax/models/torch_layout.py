"""Conversion between flax variables and PyTorch state dicts (torchvision / timm layouts).

A backbone says how the path of one of its flax modules maps to a PyTorch module name
(`module_name(('layer2_0', 'conv1')) -> 'layer2.0.conv1'`); the leaves then map by kind:

  flax (collection, leaf)          PyTorch          layout
  params kernel, 4-D (conv)        weight           [kh, kw, I, O] <-> [O, I, kh, kw]
  params kernel, 2-D (dense)       weight           [I, O] <-> [O, I]
  params scale (norm)              weight
  params bias                      bias
  batch_stats mean / var           running_mean / running_var
  any other leaf (e.g. pos_embed)  its own name     unchanged
"""
import flax.traverse_util
import numpy as np

_TORCH_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _kernel_to_torch(array):
  # Contiguous, so that writers that dump raw buffers (safetensors) store the new layout.
  return np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T)


def _kernel_from_torch(array):
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def torch_key(collection, path, module_name):
  """The PyTorch key of the flax leaf at `path` (module names..., leaf name) in `collection`."""
  *modules, leaf = path
  prefix = module_name(tuple(modules))
  name = _TORCH_LEAF_NAMES.get((collection, leaf), leaf)
  return f'{prefix}.{name}' if prefix else name


def to_torch(variables, module_name):
  """{'params': ..., 'batch_stats': ...} -> flat {PyTorch key: numpy array in its layout}."""
  state = {}
  for collection, tree in variables.items():
    for path, array in flax.traverse_util.flatten_dict(tree).items():
      array = np.asarray(array)
      state[torch_key(collection, path, module_name)] = (
          _kernel_to_torch(array) if path[-1] == 'kernel' else array)
  return state


def from_torch(state, like, module_name):
  """Inverse of `to_torch`: float32 variables shaped like `like` from the PyTorch `state`."""
  variables = {}
  for collection, tree in like.items():
    flat = {}
    for path in flax.traverse_util.flatten_dict(tree):
      array = np.asarray(state[torch_key(collection, path, module_name)], np.float32)
      flat[path] = _kernel_from_torch(array) if path[-1] == 'kernel' else array
    variables[collection] = flax.traverse_util.unflatten_dict(flat)
  return variables
