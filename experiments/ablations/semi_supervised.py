"""Ablation: semi-supervised learning with 1/8 of the labels on shapes: supervised on the
labelled eighth only | FixMatch | mean teacher, and the fully supervised reference, 3 seeds.

  python launch.py --config experiments/ablations/semi_supervised.py --mode sweep

The U-Net of experiments/unet.py (depth 3, 16 features, 32x32 crops, batch 16) trained for
1200 steps per run instead of 4000. The labelled eighth (500 of the 4000 training images) is
drawn by semi_supervised.split_seed, so every run sees the same one; the semi-supervised runs
add a batch of 16 unlabelled images (the other 3500) per step. FixMatch: confidence 0.95,
weight 1 (Sohn et al.); mean teacher: EMA decay 0.99, consistency weight 10 (the mean over
classes of a squared probability difference pulls far more weakly than a cross-entropy);
both weights ramp up (sigmoid) over the first 300 steps. These weights are the papers'
defaults or a first guess, not tuned here.
12 runs took 33 minutes on the 2-core CPU while other jobs shared it (a semi-supervised step
costs about 2.5 supervised ones). Results of that run: docs/ablations/semi_supervised/ (and
README, "Ablation results": compare the methods per seed, the seeds' spread is larger).
"""
import os

from segjax import configs
from segjax import sweep

UNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'unet.py')
# (method, labelled fraction, unsupervised weight) of each variant.
VARIANTS = [
    ('none', 1 / 8, 1.0),
    ('fixmatch', 1 / 8, 1.0),
    ('mean_teacher', 1 / 8, 10.0),
    ('none', 1.0, 1.0),
]


def get_config(arg=None):
  configs.parse_arg(arg)  # takes no arguments; override fields with --config.<field>
  config = sweep.experiment_config(UNET)
  config.total_steps = 1200
  config.eval_every = 300
  config.checkpoint_every = 600
  config.semi_supervised.threshold = 0.95
  config.semi_supervised.ema_decay = 0.99
  config.semi_supervised.rampup = 'sigmoid'
  config.semi_supervised.rampup_steps = 300
  return config


def get_hyper(h):
  method, fraction, weight = zip(*VARIANTS)
  return h.product(h.zip(h.sweep('semi_supervised.method', method),
                         h.sweep('semi_supervised.labelled_fraction', fraction),
                         h.sweep('semi_supervised.weight', weight)),
                   h.seeds(3))
