"""U-Net on the embedded shapes dataset (trains in a few minutes on a 2-core CPU).

  python launch.py --config experiments/unet.py
  python launch.py --config experiments/unet.py:depth=4,features=32 --workdir runs/unet_wide
  python launch.py --config experiments/unet.py:encoder=mit_b0,features=32 \
      --config.init_from=/weights/mit-b0/model.safetensors
  python launch.py --config experiments/unet.py:encoder=convnext_tiny,features=32 \
      --config.init_from=/weights/timm/convnext_tiny.fb_in1k/model.safetensors

Variants (after the colon): depth (poolings), features (first-level width; with a published
encoder, the decoder's width unit: 32 gives smp's 256-16 blocks), encoder ('' for the
paper's; 'mit_b0'..'mit_b5': SegFormer's MiT; 'convnext_tiny' / 'small' / 'base';
'swin_tiny' / 'small' / 'base'). A published encoder's ImageNet weights load with
--config.init_from (Hugging Face nvidia/mit-b*, facebook/convnext-*-224,
microsoft/swin-*-patch4-window7-224; timm's convnext_* and swin_*; mmseg's mit_b*.pth and
pretrain/swin_*.pth; mmpretrain's ConvNeXt); ImageNet normalisation is then set.
"""
from segjax import configs


def get_config(arg=None):
  variant = configs.parse_arg(arg, depth=3, features=16, encoder='')
  config = configs.base_config()
  config.model.name = 'unet'
  config.model.depth = variant.depth
  config.model.features = variant.features
  config.model.encoder = variant.encoder
  if variant.encoder:
    config.dataset.mean, config.dataset.std = configs.IMAGENET_MEAN, configs.IMAGENET_STD
  return config
