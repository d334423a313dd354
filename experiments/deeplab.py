"""DeepLab v3 / v3+ on the atrous ResNet: a CPU-sized default and the published recipes.

  python launch.py --config experiments/deeplab.py
  python launch.py --config experiments/deeplab.py:variant=v3,output_stride=8
  python launch.py --config experiments/deeplab.py:encoder=convnext_tiny \
      --config.init_from=/weights/timm/convnext_tiny.fb_in1k/model.safetensors
  python launch.py --config experiments/deeplab.py:v3plus_r101_os16_voc \
      --config.dataset.data_dir=/data/tfds --config.init_from=/weights/resnet101-63fe2227.pth

Arguments after the colon: `variant` (v3 | v3plus), `backbone` (resnet18/34/50/101),
`encoder` ('' for the ResNet; convnext_tiny/small/base, swin_tiny/small/base or
mit_b0..b5 in its place, at stride 32 with ASPP rates 3, 6, 9, starting from their ImageNet
weights with --config.init_from: timm, Hugging Face, mmpretrain or mmseg files, see
segjax/weights/),
`output_stride` (8 | 16), `width` (ResNet base width; 64 as published), `head` (paper |
torchvision | mmseg), `stem` (torchvision | deep), `aux_head`, `dataset` (shapes | voc (the
DeepLab papers' recipe) | voc_mmseg | cityscapes | ade20k (mmseg's) | coco_voc
(torchvision's, on its COCO subset with VOC's classes) | voc_torchvision (the same recipe on
VOC 2012)), or one of the RECIPES names below.

`dataset=shapes` (default) is sized for a 2-core CPU: ResNet-18 at a quarter of the
published width, 64x64 crops, narrow heads, Adam; it reaches about 0.8 validation mIoU in
10 minutes. Any other dataset applies that dataset's published training recipe field by
field (crop, global batch, schedule and steps, base learning rate, weight decay, scale
range, ImageNet normalisation) and the published widths; start from ImageNet weights with
`--config.init_from` (torchvision's `resnet101-63fe2227.pth` / `resnet50-0676ba61.pth`,
mmseg's resnet50_v1c for stem=deep; see segjax/weights/).

Recipes (name: source, published validation mIoU, single-scale):
  v3_r101_os16_voc         DeepLab v3 paper (Chen et al. 2017, arXiv 1706.05587), Table 5:
                           multi-grid (1, 2, 4), ASPP + image pooling, OS16: 77.21 on VOC 2012 val.
  v3plus_r101_os16_voc     DeepLab v3+ paper (Chen et al. 2018, arXiv 1802.02611), Table 3:
                           ResNet-101, train and eval OS16, decoder: 78.85 on VOC 2012 val.

Published checkpoints (CHECKPOINTS: the architecture reproduced exactly, so the file loads
whole with `--config.init_from=FILE`, and the source's test protocol; evaluate with
  python launch.py --config experiments/deeplab.py:NAME --config.init_from=/weights/FILE \
      --config.dataset.data_dir=/data --mode eval
and see docs/model_zoo.md for the parity measured against the reference code):
  torchvision_deeplabv3_resnet50, torchvision_deeplabv3_resnet101
      torchvision's `deeplabv3_resnet50/101(weights='COCO_WITH_VOC_LABELS_V1')`, files
      deeplabv3_resnet50_coco-cd0a2569.pth / deeplabv3_resnet101_coco-586e9e4e.pth
      (download.pytorch.org/models/): 66.4 / 67.4 mIoU on torchvision's COCO val2017 subset
      with VOC's 21 classes. The recipes use that dataset (`coco_voc`, from COCO's own
      files; segjax/data/coco_voc.py), so `--mode eval` measures the published setting and
      training is on torchvision's COCO train2017 subset; on VOC 2012 (the same
      recipe with `--config.dataset.name=voc`, or dataset=voc_torchvision) the number is
      another one. DeepLabHead (ASPP 12/24/36 at OS8, dropout 0.5, a 3x3 conv-BN-ReLU
      before the classifier), auxiliary FCN head; protocol: short side resized to 520 (PIL
      bilinear; labels nearest), whole image, no padding.
  mmseg_deeplabv3plus_r50_d8_cityscapes, mmseg_deeplabv3plus_r101_d8_cityscapes,
  mmseg_deeplabv3plus_r50_d8_ade20k, mmseg_deeplabv3plus_r101_d8_ade20k,
  mmseg_deeplabv3plus_r50_d8_voc, mmseg_deeplabv3plus_r101_d8_voc,
  mmseg_deeplabv3_r50_d8_cityscapes, mmseg_deeplabv3_r101_d8_cityscapes,
  mmseg_deeplabv3_r50_d8_ade20k, mmseg_deeplabv3_r101_d8_ade20k,
  mmseg_deeplabv3_r50_d8_voc, mmseg_deeplabv3_r101_d8_voc
      mmsegmentation's deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024 (80.09),
      r101 (80.97); _4xb4-160k_ade20k-512x512 (43.95, 45.47); _4xb4-40k_voc12aug-512x512
      (76.81, 78.62); deeplabv3_r50-d8 Cityscapes 80k (79.32, r101 80.20), ADE20K 160k
      (42.66, 45.00), VOC12aug 40k (77.68, 77.92). Files: CHECKPOINTS below (e.g.
      deeplabv3plus_r50-d8_512x1024_80k_cityscapes_20200606_114049-f9fb496d.pth), from
      download.openmmlab.com/mmsegmentation/v0.5/deeplabv3plus/<config>/ (deeplabv3/
      for v3). ResNetV1c (deep stem), mmseg's dilation (contract_dilation, no multi-grid),
      its ASPP (depthwise-separable in v3+) and decoder at 512 channels, auxiliary FCN head
      (loss weight 0.4); protocol: Resize(2048x1024 / 2048x512, keep_ratio) with cv2's
      bilinear, whole image, no padding, logits resized back to the label's size; ADE20K's
      labels with reduce_zero_label.
The mmsegmentation recipes train its way too (SGD 0.01, poly to 1e-4, weight decay 5e-4;
rescale to fit 2048 x 512, or 2048 x 1024 on Cityscapes, then ratio 0.5-2.0, crops with at
most 75% of one class, photometric distortion); mmseg decays every parameter, segjax only
kernels. torchvision's training draws the short side in 260-1040; segjax's rescales by
0.5-2.0 of the image. The papers' VOC runs start from ImageNet (v3+ from a
JFT/ImageNet-pretrained Xception in its best rows; the rows above are its ResNet-101 ones).
"""
from segjax import configs

RECIPES = {
    'v3_r101_os16_voc': 'variant=v3,backbone=resnet101,output_stride=16,dataset=voc',
    'v3plus_r101_os16_voc': 'variant=v3plus,backbone=resnet101,output_stride=16,dataset=voc',
}
# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
_TORCHVISION = 'variant=v3,head=torchvision,output_stride=8,aux_head=True,dataset=coco_voc'
_MMSEG_MODEL = 'head=mmseg,stem=deep,output_stride=8,aux_head=True'
CHECKPOINTS = {
    'torchvision_deeplabv3_resnet50': (f'{_TORCHVISION},backbone=resnet50',
                                       'deeplabv3_resnet50_coco-cd0a2569.pth', 66.4),
    'torchvision_deeplabv3_resnet101': (f'{_TORCHVISION},backbone=resnet101',
                                        'deeplabv3_resnet101_coco-586e9e4e.pth', 67.4),
}
_MMSEG_FILES = {  # (variant, depth, dataset) -> (file, mIoU): mmseg's metafile.yaml
    ('v3plus', 50, 'cityscapes'):
        ('deeplabv3plus_r50-d8_512x1024_80k_cityscapes_20200606_114049-f9fb496d.pth', 80.09),
    ('v3plus', 101, 'cityscapes'):
        ('deeplabv3plus_r101-d8_512x1024_80k_cityscapes_20200606_114143-068fcfe9.pth', 80.97),
    ('v3plus', 50, 'ade20k'):
        ('deeplabv3plus_r50-d8_512x512_160k_ade20k_20200615_124504-6135c7e0.pth', 43.95),
    ('v3plus', 101, 'ade20k'):
        ('deeplabv3plus_r101-d8_512x512_160k_ade20k_20200615_123232-38ed86bb.pth', 45.47),
    ('v3plus', 50, 'voc'):
        ('deeplabv3plus_r50-d8_512x512_40k_voc12aug_20200613_161759-e1b43aa9.pth', 76.81),
    ('v3plus', 101, 'voc'):
        ('deeplabv3plus_r101-d8_512x512_40k_voc12aug_20200613_205333-faf03387.pth', 78.62),
    ('v3', 50, 'cityscapes'):
        ('deeplabv3_r50-d8_512x1024_80k_cityscapes_20200606_113404-b92cfdd4.pth', 79.32),
    ('v3', 101, 'cityscapes'):
        ('deeplabv3_r101-d8_512x1024_80k_cityscapes_20200606_113503-9e428899.pth', 80.20),
    ('v3', 50, 'ade20k'):
        ('deeplabv3_r50-d8_512x512_160k_ade20k_20200615_123227-5d0ee427.pth', 42.66),
    ('v3', 101, 'ade20k'):
        ('deeplabv3_r101-d8_512x512_160k_ade20k_20200615_105816-b1f72b3b.pth', 45.00),
    ('v3', 50, 'voc'):
        ('deeplabv3_r50-d8_512x512_40k_voc12aug_20200613_161546-2ae96e7e.pth', 77.68),
    ('v3', 101, 'voc'):
        ('deeplabv3_r101-d8_512x512_40k_voc12aug_20200613_161432-0017d784.pth', 77.92),
}
_MMSEG_DATASET_RECIPES = {'cityscapes': 'cityscapes', 'ade20k': 'ade20k', 'voc': 'voc_mmseg'}
for (_variant, _depth, _data), (_file, _miou) in _MMSEG_FILES.items():
  _name = f'mmseg_deeplab{_variant}_r{_depth}_d8_{_data}'
  CHECKPOINTS[_name] = (f'variant={_variant},backbone=resnet{_depth},{_MMSEG_MODEL},'
                        f'dataset={_MMSEG_DATASET_RECIPES[_data]}', _file, _miou)
RECIPES.update({name: arg for name, (arg, _, _) in CHECKPOINTS.items()})

# Training recipe per dataset: crop, global batch, steps, base LR, weight decay, end LR, and
# the model and dataset fields that differ from the DeepLab papers'.
_PAPER_VOC = dict(name='voc', crop=513, batch=16, steps=30_000, lr=0.007, wd=1e-4, end_lr=0.0)
# mmsegmentation also rescales to fit 2048 x 512 (x 1024 for Cityscapes) before the random
# ratio, crops with at most 75% of one class and distorts colours.
_MMSEG_AUGMENT = dict(base_size=(2048, 512), cat_max_ratio=0.75, photometric=True)


def _mmseg_evaluation(scale):
  """mmseg's test pipeline: Resize(scale, keep_ratio=True), whole image, no padding, the
  logits resized back to the label's size."""
  return dict(resize='fit', resize_scale=scale, pad=False)


# torchvision's references/segmentation: batch 32 (8 GPUs x 4), 30 epochs of its COCO subset
# (~92k images: ~87k steps), lr 0.02, weight decay 1e-4, crop 480 after a random resize of
# the short side to 260-1040 (base 520), aux loss weight 0.5; evaluated with the short side
# resized to 520, whole images, unpadded.
_TORCHVISION_RECIPE = dict(
    crop=480, batch=32, steps=86_730, lr=0.02, wd=1e-4, end_lr=0.0, aux_weight=0.5,
    model=dict(multi_grid=(1, 1, 1), contract_dilation=True, dropout=0.5),
    evaluation=dict(resize='short_side', resize_scale=520, pad=False))
_MMSEG = dict(lr=0.01, wd=5e-4, end_lr=1e-4, data=_MMSEG_AUGMENT,
              model=dict(multi_grid=(1, 1, 1), contract_dilation=True, aspp_features=512,
                         decoder_features=512),
              evaluation=_mmseg_evaluation((2048, 512)))
DATASET_RECIPES = {
    # DeepLab papers: 513x513 crops, batch 16, poly(0.9) from 0.007, 30k steps on train_aug.
    'voc': _PAPER_VOC,
    # mmsegmentation: SGD momentum 0.9, poly(0.9) down to 1e-4.
    'voc_mmseg': dict(name='voc', crop=512, batch=16, steps=40_000, **_MMSEG),
    'cityscapes': dict(name='cityscapes', crop=(512, 1024), batch=8, steps=80_000,
                             **{**_MMSEG, 'data': {**_MMSEG_AUGMENT, 'base_size': (2048, 1024)},
                                'evaluation': _mmseg_evaluation((2048, 1024))}),
    'ade20k': dict(name='ade20k', crop=512, batch=16, steps=160_000, **_MMSEG),
    # torchvision's references/segmentation on its COCO subset, and the same on VOC 2012.
    'coco_voc': dict(name='coco_voc', **_TORCHVISION_RECIPE),
    'voc_torchvision': dict(name='voc', **_TORCHVISION_RECIPE),
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
  config.dataset.mean, config.dataset.std = configs.IMAGENET_MEAN, configs.IMAGENET_STD
  config.dataset.update(recipe.get('data', {}))
  config.evaluation.update(recipe.get('evaluation', {}))
  config.loss.aux_weight = recipe.get('aux_weight', config.loss.aux_weight)
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
                              width=0, head='paper', stem='torchvision', aux_head=False,
                              dataset='shapes', encoder='')
  on_shapes = variant.dataset == 'shapes'
  if not on_shapes and variant.dataset not in DATASET_RECIPES:
    raise configs.ConfigError(f'deeplab.py has no recipe for dataset {variant.dataset!r}; use '
                              f'shapes or one of {sorted(DATASET_RECIPES)}')
  config = configs.base_config()
  config.model.name = 'deeplab'
  config.model.variant = variant.variant
  config.model.backbone_depth = configs.resnet_depth(variant.backbone)
  config.model.output_stride = variant.output_stride
  config.model.head = variant.head
  config.model.backbone_stem = variant.stem
  config.model.aux_head = variant.aux_head
  config.model.backbone_width = variant.width or (16 if on_shapes else 64)
  config.model.encoder = variant.encoder
  if variant.encoder:  # a hierarchical backbone instead of the ResNet (stride 32)
    config.model.output_stride = 32
    config.dataset.mean, config.dataset.std = configs.IMAGENET_MEAN, configs.IMAGENET_STD
  if on_shapes:
    return _shapes_config(config)
  return _published_recipe(config, DATASET_RECIPES[variant.dataset])
