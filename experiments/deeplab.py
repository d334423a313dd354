"""DeepLab v3 / v3+ on the atrous ResNet: a CPU-sized default and the published recipes.

  python launch.py --config experiments/deeplab.py
  python launch.py --config experiments/deeplab.py:variant=v3,output_stride=8
  python launch.py --config experiments/deeplab.py:v3plus_r101_os16_voc \
      --config.dataset.data_dir=/data/tfds --config.init_from=/weights/resnet101-63fe2227.pth

Arguments after the colon: `variant` (v3 | v3plus), `backbone` (resnet18/34/50/101),
`output_stride` (8 | 16), `width` (ResNet base width; 64 as published), `dataset`
(shapes | voc | cityscapes | ade20k), or one of the RECIPES names below.

`dataset=shapes` (default) is sized for a 2-core CPU: ResNet-18 at a quarter of the
published width, 64x64 crops, narrow heads, Adam; it reaches about 0.8 validation mIoU in
10 minutes. Any other dataset applies that dataset's published training recipe field by
field (crop, global batch, schedule and steps, base learning rate, weight decay, scale
range, ImageNet normalisation) and the published widths; start from ImageNet weights with
`--config.init_from` (torchvision's `resnet101-63fe2227.pth` / `resnet50-0676ba61.pth`,
see segjax/pretrained.py).

Recipes (name: source, published validation mIoU, single-scale):
  v3_r101_os16_voc         DeepLab v3 paper (Chen et al. 2017, arXiv 1706.05587), Table 5:
                           multi-grid (1, 2, 4), ASPP + image pooling, OS16: 77.21 on VOC 2012 val.
  v3plus_r101_os16_voc     DeepLab v3+ paper (Chen et al. 2018, arXiv 1802.02611), Table 3:
                           ResNet-101, train and eval OS16, decoder: 78.85 on VOC 2012 val.
  v3plus_r50_os8_voc       mmsegmentation deeplabv3plus_r50-d8_512x512_40k_voc12aug: 76.81.
  v3plus_r50_os8_cityscapes   mmsegmentation deeplabv3plus_r50-d8_512x1024_80k: 80.09.
  v3plus_r101_os8_cityscapes  mmsegmentation deeplabv3plus_r101-d8_512x1024_80k: 80.97.
  v3plus_r50_os8_ade20k    mmsegmentation deeplabv3plus_r50-d8_512x512_160k_ade20k: 43.95.
  v3plus_r101_os8_ade20k   mmsegmentation deeplabv3plus_r101-d8_512x512_160k_ade20k: 45.47.
The mmsegmentation recipes dilate its way (`contract_dilation`, rates (1, 1, 2, 4) without
multi-grid) and augment its way (rescale to fit 2048 x 512, or 2048 x 1024 on Cityscapes,
then ratio 0.5-2.0, crops with at most 75% of one class, photometric distortion). Differences from those sources: mmsegmentation uses ResNet-V1c (a three-conv
stem) and an auxiliary FCN head on stage 3 (loss weight 0.4) and decays every parameter;
segjax uses torchvision's ResNet, no auxiliary head, and decays only kernels. The papers' VOC runs
start from ImageNet (v3+ from a JFT/ImageNet-pretrained Xception in its best rows; the
rows above are its ResNet-101 ones).
"""
from segjax import configs

RECIPES = {
    'v3_r101_os16_voc': 'variant=v3,backbone=resnet101,output_stride=16,dataset=voc',
    'v3plus_r101_os16_voc': 'variant=v3plus,backbone=resnet101,output_stride=16,dataset=voc',
    'v3plus_r50_os8_voc': 'variant=v3plus,backbone=resnet50,output_stride=8,dataset=voc_mmseg',
    'v3plus_r50_os8_cityscapes':
        'variant=v3plus,backbone=resnet50,output_stride=8,dataset=cityscapes',
    'v3plus_r101_os8_cityscapes':
        'variant=v3plus,backbone=resnet101,output_stride=8,dataset=cityscapes',
    'v3plus_r50_os8_ade20k': 'variant=v3plus,backbone=resnet50,output_stride=8,dataset=ade20k',
    'v3plus_r101_os8_ade20k':
        'variant=v3plus,backbone=resnet101,output_stride=8,dataset=ade20k',
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Training recipe per dataset: crop, global batch, steps, base LR, weight decay, end LR, and
# the model and dataset fields that differ from the DeepLab papers'.
_PAPER_VOC = dict(name='voc', crop=513, batch=16, steps=30_000, lr=0.007, wd=1e-4, end_lr=0.0)
# mmsegmentation also rescales to fit 2048 x 512 (x 1024 for Cityscapes) before the random
# ratio, crops with at most 75% of one class and distorts colours.
_MMSEG_AUGMENT = dict(base_size=(2048, 512), cat_max_ratio=0.75, photometric=True)
_MMSEG = dict(lr=0.01, wd=5e-4, end_lr=1e-4, data=_MMSEG_AUGMENT,
              model=dict(multi_grid=(1, 1, 1), contract_dilation=True))
DATASET_RECIPES = {
    # DeepLab papers: 513x513 crops, batch 16, poly(0.9) from 0.007, 30k steps on train_aug.
    'voc': _PAPER_VOC,
    # mmsegmentation: SGD momentum 0.9, poly(0.9) down to 1e-4.
    'voc_mmseg': dict(name='voc', crop=512, batch=16, steps=40_000, **_MMSEG),
    'cityscapes': dict(name='cityscapes', crop=(512, 1024), batch=8, steps=80_000,
                       **{**_MMSEG, 'data': {**_MMSEG_AUGMENT, 'base_size': (2048, 1024)}}),
    'ade20k': dict(name='ade20k', crop=512, batch=16, steps=160_000, **_MMSEG),
}


def _shapes_config(config):
  """The 2-core CPU setting on the embedded dataset (see the module docstring)."""
  config.dataset.image_size = 64
  config.model.update(aspp_features=64, low_level_features=16, decoder_features=64)
  config.total_steps = 6000
  config.eval_every = config.checkpoint_every = 2000
  return config


def _published_recipe(config, recipe):
  """The dataset's published training recipe (SGD, poly, ImageNet normalisation)."""
  config.model.update(recipe.get('model', {}))
  config.dataset.name = recipe['name']
  config.dataset.image_size = recipe['crop']
  config.dataset.min_scale, config.dataset.max_scale = 0.5, 2.0
  config.dataset.mean, config.dataset.std = IMAGENET_MEAN, IMAGENET_STD
  config.dataset.update(recipe.get('data', {}))
  config.batch_size = recipe['batch']
  config.eval_batch_size = 8
  config.total_steps = recipe['steps']
  config.eval_every = config.checkpoint_every = recipe['steps'] // 8
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = recipe['lr']
  config.optimizer.momentum = 0.9
  config.weight_decay = recipe['wd']
  config.end_learning_rate = recipe['end_lr']
  config.schedule, config.poly_power, config.warmup_steps = 'poly', 0.9, 0
  return config


def get_config(arg=None):
  arg = RECIPES.get(arg, arg)
  variant = configs.parse_arg(arg, variant='v3plus', backbone='resnet18', output_stride=16,
                              width=0, dataset='shapes')
  on_shapes = variant.dataset == 'shapes'
  if not on_shapes and variant.dataset not in DATASET_RECIPES:
    raise configs.ConfigError(f'deeplab.py has no recipe for dataset {variant.dataset!r}; use '
                              f'shapes or one of {sorted(DATASET_RECIPES)}')
  config = configs.base_config()
  config.model.name = 'deeplab'
  config.model.variant = variant.variant
  config.model.backbone_depth = configs.resnet_depth(variant.backbone)
  config.model.output_stride = variant.output_stride
  config.model.backbone_width = variant.width or (16 if on_shapes else 64)
  if on_shapes:
    return _shapes_config(config)
  return _published_recipe(config, DATASET_RECIPES[variant.dataset])
