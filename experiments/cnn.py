"""Plain CNN baseline (conv/pool encoder, 1x1 classifier, bilinear upsampling) on shapes.

  python launch.py --config experiments/cnn.py
  python launch.py --config experiments/cnn.py:num_stages=3,features=16

Variants (after the colon): num_stages (output stride 2**(num_stages-1)), features.
"""
from segjax import configs


def get_config(arg=None):
  variant = configs.parse_arg(arg, num_stages=4, features=16)
  config = configs.base_config()
  config.model.name = 'cnn'
  config.model.num_stages = variant.num_stages
  config.model.features = variant.features
  # Steps are cheap (about 4x a U-Net's) and it learns shape context more slowly.
  config.total_steps = 10000
  config.eval_every = config.checkpoint_every = 2500
  return config
