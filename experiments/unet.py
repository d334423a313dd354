"""U-Net on the embedded shapes dataset (trains in a few minutes on a 2-core CPU).

  python launch.py --config experiments/unet.py
  python launch.py --config experiments/unet.py:depth=4,features=32 --workdir runs/unet_wide

Variants (after the colon): depth (poolings), features (first-level width).
"""
from segjax import configs


def get_config(arg=None):
  variant = configs.parse_arg(arg, depth=3, features=16)
  config = configs.base_config()
  config.model.name = 'unet'
  config.model.depth = variant.depth
  config.model.features = variant.features
  return config
