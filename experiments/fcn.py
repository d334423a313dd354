"""FCN (Long et al., 2015) on the embedded shapes dataset, and the published FCN recipes.

  python launch.py --config experiments/fcn.py
  python launch.py --config experiments/fcn.py:backbone=vgg16_bn,variant=16s,width=8
  python launch.py --config experiments/fcn.py:fcn8s_atonce_vgg16_voc \
      --config.init_from=~/.cache/torch/hub/checkpoints/vgg16-397923af.pth

Arguments after the colon: comma-separated key=value with the keys of `DEFAULTS`
(`image_size` as a side or HxW, e.g. 512x1024), or a recipe name from `RECIPES`, optionally
followed by overrides (`mmseg_fcn_r50_d8_cityscapes,total_steps=1000`).

Default (`dataset=shapes`), sized for a 2-core CPU: FCN-8s on a ResNet-18 of base width 16
(a quarter of the published), trained from scratch with Adam on 96x96 shapes (at 64x64 even
the true labels pooled to stride 8 and upsampled score only 0.83 mIoU; at 96x96, 0.92), the
paper's upsampling (learned 2x, fixed final), a narrow scale range (1.0-1.25) and a high
learning rate (0.01), which learned fastest in 800-step trials. It reached 0.849 validation
mIoU after 3000 steps of 16 images (about 85 ms each): 4.5 minutes for the whole command on
a 2-core CPU, about 7.5 when the CPU is shared; building the 96x96 dataset the first time
takes another 2-4 minutes.

Published recipes (`RECIPES`): published widths, ImageNet-initialised (pass the backbone's
torchvision weights with --config.init_from: vgg16-397923af.pth, resnet50-0676ba61.pth,
resnet101-63fe2227.pth), images normalised with ImageNet's mean and std:

  fcn32s_vgg16_voc, fcn8s_atonce_vgg16_voc: the reference Caffe implementation
    (github.com/shelhamer/fcn.berkeleyvision.org, voc-fcn32s and voc-fcn8s-atonce). Whole
    images (at most 500x500; the 512 crop pads them with the ignore label), no augmentation,
    batch 1, SGD momentum 0.99, fixed learning rate, weight decay 5e-4, 100k (32s) and 300k
    (8s at-once) iterations, fixed bilinear interpolation, skips scaled by 0.01 / 0.0001
    (at-once). Published: 63.6 (FCN-32s) and 65.4 (FCN-8s at-once) mIoU on seg11valid (the
    736 VOC2011 val images outside SBD train), not VOC2012 val; trained on SBD train (8,498
    images) where dataset 'voc' uses VOC2012 train + SBD ('train_aug'). Caffe's loss is summed
    over the pixels (base_lr 1e-10); ours is their mean, so the same updates need
    learning_rate = 1e-10 * N and weight_decay = 5e-4 / N, with N = 500 * 375 pixels, a
    typical VOC image (exact for images of that size only). Caffe's doubled learning rate for
    biases is not reproduced. The staged FCN-16s/8s (each initialised from the previous
    stride's trained net: 65.0 and 65.5) need a checkpoint of the previous stage and are
    not listed.

Published checkpoints (CHECKPOINTS: the architecture reproduced exactly, so the file loads
whole with `--config.init_from=FILE`, and the source's test protocol; evaluate with
  python launch.py --config experiments/fcn.py:NAME --config.init_from=/weights/FILE \
      --config.dataset.data_dir=/data --mode eval
and see docs/model_zoo.md for the parity measured against the reference code):
  torchvision_fcn_resnet50, torchvision_fcn_resnet101: torchvision's
    `fcn_resnet50/101(weights='COCO_WITH_VOC_LABELS_V1')`, files fcn_resnet50_coco-1167a1af.pth
    / fcn_resnet101_coco-7ecb50ca.pth (download.pytorch.org/models/): 60.5 / 63.7 mIoU on
    torchvision's COCO val2017 subset with VOC's classes. The recipes use that dataset
    (`dataset=coco_voc`, from COCO's own files; segjax/data/coco_voc.py), so `--mode eval`
    measures the published setting and training is on torchvision's COCO train2017
    subset; `torchvision_fcn_resnet50,dataset=voc` runs the same recipe on VOC 2012
    (another number). 8s_atrous, one-conv FCN head, auxiliary head; protocol: short
    side to 520 (PIL bilinear; labels nearest), whole, no padding. Training as
    torchvision's reference (batch 32, lr 0.02, weight decay 1e-4, crop 480, auxiliary loss
    weight 0.5).
  mmseg_fcn_r50_d8_cityscapes, mmseg_fcn_r101_d8_cityscapes: mmsegmentation's
    fcn_r50-d8 / fcn_r101-d8_4xb2-80k_cityscapes-512x1024 (73.61 / 75.13 mIoU), on
    ResNetV1c (stem=deep); files in CHECKPOINTS, from
    download.openmmlab.com/mmsegmentation/v0.5/fcn/<config>/. 8s_atrous, the mmseg head
    (2 convs, input concatenated), auxiliary head (loss weight 0.4), 512x1024 crops, batch
    8, 80k iterations, SGD lr 0.01 momentum 0.9 weight decay 5e-4, poly 0.9 down to 1e-4,
    scale 0.5-2.0, flip; protocol: Resize(2048x1024, keep_ratio) with cv2's bilinear,
    whole image, no padding, logits resized back to the label's size.
  mmseg_fcn_r50b_d8_cityscapes, mmseg_fcn_r101b_d8_cityscapes: the same on torchvision's
    ResNet (fcn_r50b-d8 / fcn_r101b-d8): 75.65 / 77.37.
  mmseg_fcn_r50_d8_ade20k, mmseg_fcn_r101_d8_ade20k: fcn_r*-d8_4xb4-80k_ade20k-512x512:
    crop 512, batch 16, 80k iterations, resize 2048x512, otherwise as above: 35.94 / 39.61.
  mmseg_fcn_r50_d8_voc, mmseg_fcn_r101_d8_voc: fcn_r*-d8_4xb4-20k_voc12aug-512x512: crop
    512, batch 16, 20k iterations: 67.08 / 71.16 (VOC2012 val).

The mmsegmentation recipes augment as it does: rescale to fit 2048x512 (2048x1024 for
Cityscapes) times a ratio in 0.5-2.0, crops with at most 75% of one class, photometric
distortion, flip; mmsegmentation decays every parameter, segjax only kernels. No published
FCN recipe exists for Oxford-IIIT Pets.
"""
import ml_collections

from segjax import configs

NORMALIZATION = {'shapes': ((0.5,) * 3, (0.25,) * 3),
                 'imagenet': (configs.IMAGENET_MEAN, configs.IMAGENET_STD)}

DEFAULTS = dict(
    # model
    backbone='resnet18', variant='8s', upsample='transposed', width=16, aux_head=False,
    skip_scale16=1.0, skip_scale8=1.0, head_convs=1, head_concat_input=False,
    stem='torchvision',
    # data
    dataset='shapes', min_scale=1.0, max_scale=1.25, flip=True, norm='shapes',
    base_size=ml_collections.FieldReference(0, field_type=object),  # 0 or 'LONGxSHORT'
    cat_max_ratio=1.0, photometric=False,
    image_size=ml_collections.FieldReference(96, field_type=object),  # a side or 'HxW'
    # optimisation
    batch_size=16, total_steps=3000, optimizer='adam', learning_rate=0.01, momentum=0.9,
    weight_decay=0.0, schedule='cosine', end_lr=0.0, warmup_steps=100,
    aux_weight=0.4,  # of the auxiliary head's loss
    # evaluation protocol: resize '' | 'fit' (mmseg) | 'short_side' (torchvision), its scale
    # ('LONGxSHORT' or a side), and pad=False to infer every image alone at its own size
    eval_resize='', eval_scale=ml_collections.FieldReference(0, field_type=object),
    eval_pad=True,
)


def _arg(**fields):
  return ','.join(f'{key}={value}' for key, value in fields.items())


_CAFFE_PIXELS = 500 * 375  # Caffe's loss sums over the pixels of an image; ours averages
_CAFFE_VOC = dict(
    width=64, upsample='bilinear', dataset='voc', image_size=512, min_scale=1.0,
    max_scale=1.0, flip=False, norm='imagenet', batch_size=1, optimizer='sgd',
    learning_rate=1e-10 * _CAFFE_PIXELS, momentum=0.99, weight_decay=5e-4 / _CAFFE_PIXELS,
    schedule='constant', warmup_steps=0)
_MMSEG = dict(
    width=64, variant='8s_atrous', upsample='bilinear', aux_head=True, head_convs=2,
    head_concat_input=True, stem='deep', image_size=512, min_scale=0.5, max_scale=2.0,
    flip=True, base_size='2048x512', cat_max_ratio=0.75, photometric=True, norm='imagenet',
    optimizer='sgd', learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule='poly',
    end_lr=1e-4, warmup_steps=0, eval_resize='fit', eval_scale='2048x512', eval_pad=False)
_CITYSCAPES = dict(image_size='512x1024', base_size='2048x1024', eval_scale='2048x1024',
                   dataset='cityscapes', batch_size=8, total_steps=80_000)
_TORCHVISION = dict(
    width=64, variant='8s_atrous', upsample='bilinear', aux_head=True, dataset='coco_voc',
    image_size=480, min_scale=0.5, max_scale=2.0, flip=True, norm='imagenet',
    batch_size=32, total_steps=86_730, optimizer='sgd', learning_rate=0.02, momentum=0.9,
    weight_decay=1e-4, schedule='poly', end_lr=0.0, warmup_steps=0, aux_weight=0.5,
    eval_resize='short_side', eval_scale=520, eval_pad=False)

RECIPES = {
    'fcn32s_vgg16_voc': _arg(**_CAFFE_VOC, backbone='vgg16', variant='32s',
                             total_steps=100_000),
    'fcn8s_atonce_vgg16_voc': _arg(**_CAFFE_VOC, backbone='vgg16', variant='8s',
                                   skip_scale16=0.01, skip_scale8=1e-4, total_steps=300_000),
}
# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
CHECKPOINTS = {
    'torchvision_fcn_resnet50': (_arg(**_TORCHVISION, backbone='resnet50'),
                                 'fcn_resnet50_coco-1167a1af.pth', 60.5),
    'torchvision_fcn_resnet101': (_arg(**_TORCHVISION, backbone='resnet101'),
                                  'fcn_resnet101_coco-7ecb50ca.pth', 63.7),
    'mmseg_fcn_r50_d8_cityscapes': (
        _arg(**{**_MMSEG, **_CITYSCAPES}, backbone='resnet50'),
        'fcn_r50-d8_512x1024_80k_cityscapes_20200606_113019-03aa804d.pth', 73.61),
    'mmseg_fcn_r101_d8_cityscapes': (
        _arg(**{**_MMSEG, **_CITYSCAPES}, backbone='resnet101'),
        'fcn_r101-d8_512x1024_80k_cityscapes_20200606_113038-3fb937eb.pth', 75.13),
    'mmseg_fcn_r50b_d8_cityscapes': (
        _arg(**{**_MMSEG, **_CITYSCAPES, 'stem': 'torchvision'}, backbone='resnet50'),
        'fcn_r50b-d8_512x1024_80k_cityscapes_20201225_094221-82957416.pth', 75.65),
    'mmseg_fcn_r101b_d8_cityscapes': (
        _arg(**{**_MMSEG, **_CITYSCAPES, 'stem': 'torchvision'}, backbone='resnet101'),
        'fcn_r101b-d8_512x1024_80k_cityscapes_20201226_160213-4543858f.pth', 77.37),
    'mmseg_fcn_r50_d8_ade20k': (
        _arg(**_MMSEG, backbone='resnet50', dataset='ade20k', batch_size=16,
             total_steps=80_000),
        'fcn_r50-d8_512x512_80k_ade20k_20200614_144016-f8ac5082.pth', 35.94),
    'mmseg_fcn_r101_d8_ade20k': (
        _arg(**_MMSEG, backbone='resnet101', dataset='ade20k', batch_size=16,
             total_steps=80_000),
        'fcn_r101-d8_512x512_80k_ade20k_20200615_014143-bc1809f7.pth', 39.61),
    'mmseg_fcn_r50_d8_voc': (
        _arg(**_MMSEG, backbone='resnet50', dataset='voc', batch_size=16, total_steps=20_000),
        'fcn_r50-d8_512x512_20k_voc12aug_20200617_010715-52dc5306.pth', 67.08),
    'mmseg_fcn_r101_d8_voc': (
        _arg(**_MMSEG, backbone='resnet101', dataset='voc', batch_size=16, total_steps=20_000),
        'fcn_r101-d8_512x512_20k_voc12aug_20200617_010842-0bb4e798.pth', 71.16),
}
RECIPES.update({name: arg for name, (arg, _, _) in CHECKPOINTS.items()})


def get_config(arg=None):
  variant = configs.parse_arg(configs.expand_recipe(arg, RECIPES), **DEFAULTS)
  if variant.norm not in NORMALIZATION:
    raise configs.ConfigError(f'unknown norm {variant.norm!r}; use one of '
                              f'{sorted(NORMALIZATION)}')
  config = configs.base_config()
  config.model.name = 'fcn'
  for field in ('backbone', 'variant', 'upsample', 'width', 'aux_head', 'head_convs',
                'head_concat_input'):
    config.model[field] = variant[field]
  config.model.backbone_stem = variant.stem
  config.evaluation.resize = variant.eval_resize
  config.evaluation.resize_scale = configs.size_value(variant.eval_scale)
  config.evaluation.pad = variant.eval_pad
  config.model.skip_scales = (float(variant.skip_scale16), float(variant.skip_scale8))

  config.dataset.name = variant.dataset
  config.dataset.image_size = configs.size_value(variant.image_size)
  config.dataset.min_scale = variant.min_scale
  config.dataset.max_scale = variant.max_scale
  config.dataset.flip = variant.flip
  config.dataset.base_size = configs.size_value(variant.base_size)
  config.dataset.cat_max_ratio = variant.cat_max_ratio
  config.dataset.photometric = variant.photometric
  config.dataset.mean, config.dataset.std = NORMALIZATION[variant.norm]

  config.batch_size = variant.batch_size
  if variant.dataset != 'shapes':
    config.eval_batch_size = 8  # whole validation images, up to 2048x1024
  config.total_steps = variant.total_steps
  config.eval_every = config.checkpoint_every = max(1, variant.total_steps // 4)
  config.optimizer.name = variant.optimizer
  config.optimizer.learning_rate = variant.learning_rate
  config.optimizer.momentum = variant.momentum
  config.weight_decay = variant.weight_decay
  config.schedule = variant.schedule
  config.end_learning_rate = variant.end_lr
  config.warmup_steps = variant.warmup_steps
  config.loss.aux_weight = variant.aux_weight
  return config
