"""Ablation: loss terms (CE | CE + Dice | CE + Lovasz-softmax) x class weighting (none |
median frequency) for the U-Net on shapes, 2 seeds.

  python launch.py --config experiments/ablations/losses.py --mode sweep

The model of experiments/unet.py (depth 3, 16 features, 32x32) trained for 1000 steps per
run instead of 4000: 12 runs took 28 minutes on the 2-core CPU while tests shared it (a
Lovasz-softmax step costs about twice the others). Median-frequency weights (Eigen & Fergus)
are computed from the labels of the first 50 training batches and weight the cross-entropy
term only. Results of that run: docs/ablations/losses/ (and README, "Ablation results").
"""
import os

from segjax import configs
from segjax import sweep

UNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'unet.py')
LOSSES = [
    (('cross_entropy', 1.0),),
    (('cross_entropy', 1.0), ('dice', 1.0)),
    (('cross_entropy', 1.0), ('lovasz_softmax', 1.0)),
]


def get_config(arg=None):
  configs.parse_arg(arg)  # takes no arguments; override fields with --config.<field>
  return sweep.experiment_config(UNET, total_steps=1000)


def get_hyper(h):
  return h.product(h.sweep('loss.terms', LOSSES),
                   h.sweep('loss.class_weighting', ['none', 'median_frequency']),
                   h.seeds(2))
