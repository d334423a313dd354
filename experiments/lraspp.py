"""LR-ASPP on MobileNetV3 (Howard et al., ICCV 2019): a CPU-sized default and torchvision's recipe.

  python launch.py --config experiments/lraspp.py
  python launch.py --config experiments/lraspp.py:backbone=mobilenet_v3_large,image_size=64
  python launch.py --config experiments/lraspp.py:lraspp_mobilenet_v3_small_voc \
      --config.dataset.data_dir=/data/tfds \
      --config.init_from=/weights/mobilenet_v3_small-047dcff4.pth

Arguments after the colon: comma-separated key=value with the keys of `DEFAULTS`, or a
recipe name from `RECIPES`, optionally followed by overrides
(`torchvision_lraspp_mobilenet_v3_large,total_steps=1000`).

Default (`dataset=shapes`), sized for a 2-core CPU: LR-ASPP on MobileNetV3-Small (the
published architecture, dilated, 128 inter channels; the paper's model for low resources,
a step of Large costs about 3.5 times as much), trained from scratch with Adam 3e-3 and
cosine decay on 96x96 shapes (at 64x64 the stride-8 scores cap what the thin classes can
reach; see experiments/fcn.py), 4000 steps of 16 images. On an idle 2-core CPU (JAX
0.10.2, tcmalloc) the whole command took 8 min 46 s, building the 96x96 dataset
(experiments/fcn.py's, shared) included: about 2 min; the 4000 steps 6 min 24 s. It reached 75.7
validation mIoU (background 96.8, disc 83.1, ring 61.0, square 74.4, triangle 71.7, cross
67.4; 50.2 at step 1000, 69.3 at 2000, 74.3 at 3000; 8-12 steps/s). An earlier run of the
same config gave 76.3 (one seed each: float summation order moves the last digit); 3000
steps in all gave 71.5.

Recipes (`RECIPES`): images normalised with ImageNet's mean and std, ImageNet-initialised
through --config.init_from (torchvision's mobilenet_v3_large-8738ca79.pth or
mobilenet_v3_small-047dcff4.pth; segjax/weights/), trained as torchvision's
references/segmentation README trains `lraspp_mobilenet_v3_large`: `train.py --dataset coco
-b 4 --model lraspp_mobilenet_v3_large --wd 0.000001` on 8 GPUs, i.e. global batch 32, SGD
momentum 0.9 at train.py's default learning rate 0.01 (the README passes `--lr 0.02` to the
ResNet models only), weight decay 1e-6, poly(0.9) per iteration over 30 epochs of its COCO
subset (~92k images: ~86.7k steps), no auxiliary loss, crop 480 after a random resize of the
short side to 260-1040 (segjax rescales by 0.5-2.0 of the image), flip; evaluated with the
short side resized to 520 (PIL bilinear; labels nearest), whole images, no padding.
torchvision decays every parameter, segjax only kernels.

  lraspp_mobilenet_v3_small_voc   the same recipe on MobileNetV3-Small (VOC 2012 train_aug);
                                  torchvision publishes no LR-ASPP Small weights or mIoU.

Published checkpoints (CHECKPOINTS: the architecture reproduced exactly, so the file loads
whole with `--config.init_from=FILE`, and the source's test protocol; evaluate with
  python launch.py --config experiments/lraspp.py:torchvision_lraspp_mobilenet_v3_large \
      --config.init_from=/weights/lraspp_mobilenet_v3_large-d234d4ea.pth \
      --config.dataset.data_dir=/data --mode eval
and see docs/model_zoo.md for the parity measured against the reference code):
  torchvision_lraspp_mobilenet_v3_large: torchvision's
    `lraspp_mobilenet_v3_large(weights='COCO_WITH_VOC_LABELS_V1')`, file
    lraspp_mobilenet_v3_large-d234d4ea.pth (download.pytorch.org/models/): 57.9 mIoU (pixel
    accuracy 91.2) on torchvision's COCO val2017 subset with VOC's 21 classes. The recipe
    uses that dataset (`dataset=coco_voc`, from COCO's own files; segjax/data/coco_voc.py),
    so `--mode eval` measures the published setting; `lraspp_mobilenet_v3_small_voc`
    trains the Small model with the same recipe on VOC 2012 (no published number).
"""
from segjax import configs

NORMALIZATION = {'shapes': ((0.5,) * 3, (0.25,) * 3),
                 'imagenet': (configs.IMAGENET_MEAN, configs.IMAGENET_STD)}

DEFAULTS = dict(
    # model
    backbone='mobilenet_v3_small', inter_channels=128, dilated=True,
    # data
    dataset='shapes', image_size=96, min_scale=1.0, max_scale=1.25, flip=True, norm='shapes',
    # optimisation
    batch_size=16, total_steps=4000, optimizer='adam', learning_rate=3e-3, momentum=0.9,
    weight_decay=0.0, schedule='cosine', end_lr=0.0, warmup_steps=100,
    # evaluation protocol: resize '' | 'short_side' (torchvision) and its short side, and
    # pad=False to infer every image alone at its own size
    eval_resize='', eval_scale=0, eval_pad=True,
)


def _arg(**fields):
  return ','.join(f'{key}={value}' for key, value in fields.items())


_TORCHVISION = dict(
    dataset='coco_voc', image_size=480, min_scale=0.5, max_scale=2.0, flip=True, norm='imagenet',
    batch_size=32, total_steps=86_730, optimizer='sgd', learning_rate=0.01, momentum=0.9,
    weight_decay=1e-6, schedule='poly', end_lr=0.0, warmup_steps=0, eval_resize='short_side',
    eval_scale=520, eval_pad=False)

RECIPES = {
    'lraspp_mobilenet_v3_small_voc': _arg(**{**_TORCHVISION, 'dataset': 'voc'},
                                          backbone='mobilenet_v3_small'),
}
# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
CHECKPOINTS = {
    'torchvision_lraspp_mobilenet_v3_large': (
        _arg(**_TORCHVISION, backbone='mobilenet_v3_large'),
        'lraspp_mobilenet_v3_large-d234d4ea.pth', 57.9),
}
RECIPES.update({name: arg for name, (arg, _, _) in CHECKPOINTS.items()})


def get_config(arg=None):
  variant = configs.parse_arg(configs.expand_recipe(arg, RECIPES), **DEFAULTS)
  if variant.norm not in NORMALIZATION:
    raise configs.ConfigError(f'unknown norm {variant.norm!r}; use one of '
                              f'{sorted(NORMALIZATION)}')
  config = configs.base_config()
  config.model.name = 'lraspp'
  for field in ('backbone', 'inter_channels', 'dilated'):
    config.model[field] = variant[field]

  config.dataset.name = variant.dataset
  config.dataset.image_size = variant.image_size
  config.dataset.min_scale = variant.min_scale
  config.dataset.max_scale = variant.max_scale
  config.dataset.flip = variant.flip
  config.dataset.mean, config.dataset.std = NORMALIZATION[variant.norm]
  config.evaluation.resize = variant.eval_resize
  config.evaluation.resize_scale = variant.eval_scale
  config.evaluation.pad = variant.eval_pad

  config.batch_size = variant.batch_size
  if variant.dataset != 'shapes':
    config.eval_batch_size = 8  # whole validation images
  config.total_steps = variant.total_steps
  config.eval_every = config.checkpoint_every = max(1, variant.total_steps // 4)
  config.optimizer.name = variant.optimizer
  config.optimizer.learning_rate = variant.learning_rate
  config.optimizer.momentum = variant.momentum
  config.weight_decay = variant.weight_decay
  config.schedule = variant.schedule
  config.end_learning_rate = variant.end_lr
  config.warmup_steps = variant.warmup_steps
  return config
