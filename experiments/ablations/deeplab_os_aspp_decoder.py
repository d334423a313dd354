"""Ablation: DeepLab output stride (16 | 8) x ASPP (on | off) x decoder (v3 | v3+), 2 seeds.

  python launch.py --config experiments/ablations/deeplab_os_aspp_decoder.py --mode sweep

The model of experiments/deeplab.py (ResNet-18 at width 16, 64x64 crops, ASPP with the
paper's rates for the output stride) trained for 1000 steps per run instead of 6000: 16 runs
took 26 minutes on the 2-core CPU, sharing it with the slow tests for the last 15. Results of
that run: docs/ablations/deeplab_os_aspp_decoder/ (and README, "Ablation results").
'ASPP off' puts one 1x1 conv-BN-ReLU of the same width in its place (`model.aspp=False`).
At 64x64 crops the last feature map is 4x4 (OS16) or 8x8 (OS8), smaller than the paper's
rates (6-36), so each atrous branch sees only its centre tap: on this dataset the ASPP axis
measures the image-pooling branch and the extra 1x1 branches more than multi-scale context.
"""
import os

from segjax import configs
from segjax import sweep

DEEPLAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'deeplab.py')


def get_config(arg=None):
  configs.parse_arg(arg)  # takes no arguments; override fields with --config.<field>
  config = sweep.experiment_config(DEEPLAB, total_steps=1000)
  config.model.aspp = True  # the field the sweep varies (and --config.model.aspp overrides)
  return config


def get_hyper(h):
  return h.product(h.sweep('model.output_stride', [16, 8]),
                   h.sweep('model.aspp', [True, False]),
                   h.sweep('model.variant', ['v3', 'v3plus']),
                   h.seeds(2))
