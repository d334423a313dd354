"""Ablation: U-Net depth (2 | 3 | 4 poolings) x width (8 | 16 first-level features) on
shapes, 3 seeds.

  python launch.py --config experiments/ablations/unet_size.py --mode sweep

The U-Net of experiments/unet.py (32x32 crops) trained for 1000 steps per run instead of
4000: 18 runs took 31 minutes on the 2-core CPU while tests shared it (less when idle).
Results of that run: docs/ablations/unet_size/ (and README, "Ablation results").
"""
import os

from segjax import configs
from segjax import sweep

UNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'unet.py')


def get_config(arg=None):
  configs.parse_arg(arg)  # takes no arguments; override fields with --config.<field>
  return sweep.experiment_config(UNET, total_steps=1000)


def get_hyper(h):
  return h.product(h.sweep('model.depth', [2, 3, 4]),
                   h.sweep('model.features', [8, 16]),
                   h.seeds(3))
