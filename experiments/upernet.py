"""UPerNet on ConvNeXt or Swin: a CPU-sized default on shapes and mmseg's published recipes.

  python launch.py --config experiments/upernet.py
  python launch.py --config experiments/upernet.py:backbone=swin_tiny,width=32
  python launch.py --config experiments/upernet.py:mmseg_upernet_convnext_tiny_ade \
      --config.dataset.data_dir=/data

Variants (after the colon): a name from RECIPES, or key=value pairs over the keys of
DEFAULTS: the model (backbone = convnext_tiny | convnext_small | convnext_base | swin_tiny |
swin_small | swin_base, width: 0 for the published widths, else the first stage's channels,
depths: '' for the published blocks per stage, else 4 counts as '1x1x2x1', window_size,
drop_path_rate, layer_scale_init (ConvNeXt), dropout, channels, aux_channels), the data (dataset, image_size = training crop side,
min_scale, max_scale, imagenet_normalization) and the optimisation (learning_rate,
weight_decay, decay = 'kernels' | 'all', layer_decay, layer_decay_layers, param_groups = ''
| 'mmseg_swin' (PARAM_GROUPS), warmup_steps, schedule, poly_power, batch_size,
eval_batch_size, total_steps), and mmseg's augmentation and test protocol (base_size,
cat_max_ratio, photometric, eval_mode, eval_window, eval_stride, eval_resize, eval_scale,
eval_pad; sizes as 'LONGxSHORT').

The default trains a reduced ConvNeXt UPerNet from scratch on 64 x 64 shapes: stage widths
32-64-128-256 with 1-1-6-1 blocks (the published ConvNeXt-T: 96-192-384-768, 3-3-9-3), layer
scales starting at 1.0 (mmseg's value), a 64-channel head and a 32-channel auxiliary head
(published: 512 and 256), no dropout or drop path; AdamW 2e-3 (weight decay 0.05) with
cosine decay, batch 16, 2000 steps (the 64-pixel dataset takes about 70 s to build once).
Measured on the shared 2-core CPU with two other jobs running (contended): 2000 steps in 11
min 40 s (0.2-0.35 s a step), 44.9% validation mIoU (background 97.6, disc 52.2, ring 52.0,
square 17.5, triangle 43.9, cross 6.2); with dropout 0.1 then, which the default drops to
save the random draws (12 ms a step). It learns about as fast per step as
experiments/deeplab.py's DeepLab v3+ (35.5% after ~1400 steps in docs/ablations) but a step
costs 4-7x more, so the 80% DeepLab reaches in 6000 steps is out of a 10-minute budget here.
Trials of 500-2000 steps changed little: 1-1-2-1 blocks 41.4% at 2000 steps, width 64 with
1-1-3-1 blocks 42.6%, layer scale 1e-6 vs 1.0, a convolutional stem and learning rate 3e-3
within 2-3 points at 300-600 steps.

RECIPES are mmsegmentation's UPerNet configs, whose checkpoints (CHECKPOINTS) reproduce the
ConvNeXt paper's (Liu et al., "A ConvNet for the 2020s", CVPR 2022, Table 3: ADE20K val,
single scale, ImageNet-1K pre-training: T 46.0, S 48.7, B 49.1) and the Swin paper's (Liu et
al., ICCV 2021, Table 3: T 44.5, S 47.6, B 48.1) rows. Training as mmseg: ADE20K, crops of
512, global batch 16, 160k iterations, AdamW (betas 0.9, 0.999), linear warmup over 1500
iterations then poly decay (power 1.0) to 0; its ADE20K augmentation (rescale to fit
2048x512 times 0.5-2.0, crops with at most 75% of one class, photometric distortion, flip);
ImageNet normalisation; auxiliary FCN head with loss weight 0.4. ConvNeXt: lr 1e-4, weight
decay 0.05 on kernels only, stage-wise learning-rate decay 0.9 (`upernet.layer_id`: 6
layers for -T, 12 for -S and -B, as the configs say), drop path 0.4 / 0.3 / 0.4 (T / S /
B); mmseg trains it in fp16 (AMP), segjax in float32 (`half_precision` is bfloat16).
Swin: lr 6e-5, weight decay 0.01 on every parameter but the relative position bias tables
and the LayerNorms (`optimizer.param_groups`), drop path 0.3. Start them from ImageNet
backbones with `--config.init_from` (mmseg loads mmpretrain's convnext-*_3rdparty_32xb128-
noema_in1k and its converted swin_*_patch4_window7_224 files).

Published checkpoints (CHECKPOINTS: the architecture reproduced exactly, so the file loads
whole with `--config.init_from=FILE`, and mmseg's ADE20K test protocol: Resize(2048x512,
keep_ratio) with cv2's bilinear, no padding, logits resized back to the labels,
reduce_zero_label; ConvNeXt with 512 sliding windows at stride 341, Swin whole images, as
the configs' test_cfg say); evaluate with
  python launch.py --config experiments/upernet.py:mmseg_upernet_swin_tiny_ade \
      --config.init_from=/weights/upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth \
      --config.dataset.data_dir=/data --mode eval
and see docs/model_zoo.md for the parity measured against the reference code. Published
single-scale mIoU on ADE20K val (mmseg's metafile.yaml; files under
download.openmmlab.com/mmsegmentation/v0.5/{convnext,swin}/<config>/):

  mmseg_upernet_convnext_tiny_ade    upernet_convnext_tiny_fp16_512x512_160k_ade20k   46.11
  mmseg_upernet_convnext_small_ade   upernet_convnext_small_fp16_512x512_160k_ade20k  48.56
  mmseg_upernet_convnext_base_ade    upernet_convnext_base_fp16_512x512_160k_ade20k   48.71
  mmseg_upernet_swin_tiny_ade        upernet_swin_tiny_patch4_window7_512x512_160k_
                                     ade20k_pretrain_224x224_1K                       44.41
  mmseg_upernet_swin_small_ade       upernet_swin_small_patch4_window7_..._224x224_1K  47.72
  mmseg_upernet_swin_base_ade        upernet_swin_base_patch4_window7_..._224x224_1K   47.99
  mmseg_upernet_swin_base_w12_in22k_ade
                                     upernet_swin_base_patch4_window12_512x512_160k_
                                     ade20k_pretrain_384x384_22K (window 12)           50.76

Hugging Face's `UperNetForSemanticSegmentation` files (the hub's openmmlab/upernet-* repos,
model.safetensors: mmseg's checkpoints above converted by transformers'
convert_{convnext,swin}_upernet_to_pytorch.py, so the same numbers under the same protocol):

  hf_upernet_convnext_tiny_ade    openmmlab/upernet-convnext-tiny    46.11
  hf_upernet_convnext_small_ade   openmmlab/upernet-convnext-small   48.56
  hf_upernet_convnext_base_ade    openmmlab/upernet-convnext-base    48.71
  hf_upernet_swin_tiny_ade        openmmlab/upernet-swin-tiny        44.41
  hf_upernet_swin_small_ade       openmmlab/upernet-swin-small       47.72
  hf_upernet_swin_base_ade        openmmlab/upernet-swin-base        50.76
                                  (window 12, ImageNet-22K at 384)
"""
from segjax import configs

DEFAULTS = dict(
    backbone='convnext_tiny', width=32, depths='1x1x6x1', window_size=0,
    drop_path_rate=0.0, layer_scale_init=1.0, dropout=0.0, channels=64, aux_channels=32,
    dataset='shapes', image_size=64, min_scale=0.75, max_scale=1.5,
    imagenet_normalization=False,
    learning_rate=2e-3, weight_decay=0.05, decay='kernels', layer_decay=0.0,
    layer_decay_layers=12, param_groups='', warmup_steps=100, schedule='cosine',
    poly_power=0.9, batch_size=16, eval_batch_size=50, total_steps=2000,
    base_size='', cat_max_ratio=1.0, photometric=False, eval_mode='whole', eval_window=0,
    eval_stride=0, eval_resize='', eval_scale='', eval_pad=True,
)

_MMSEG = ('width=0,depths=,channels=512,aux_channels=256,dropout=0.1,dataset=ade20k,image_size=512,'
          'min_scale=0.5,max_scale=2.0,imagenet_normalization=True,warmup_steps=1500,'
          'schedule=poly,poly_power=1.0,batch_size=16,eval_batch_size=1,total_steps=160000,'
          'base_size=2048x512,cat_max_ratio=0.75,photometric=True,eval_resize=fit,'
          'eval_scale=2048x512,eval_pad=False')
# mmseg's upernet_convnext configs: AdamW 1e-4, weight decay 0.05 (not on 1-D parameters),
# stage-wise learning-rate decay 0.9, sliding 512 windows at stride 341.
_CONVNEXT = ('learning_rate=0.0001,weight_decay=0.05,decay=kernels,layer_decay=0.9,'
             'eval_mode=slide,eval_window=512,eval_stride=341')
_CONVNEXT_SIZES = {'tiny': (6, 0.4), 'small': (12, 0.3), 'base': (12, 0.4)}  # layers, drop path
# mmseg's upernet_swin configs: AdamW 6e-5, weight decay 0.01 on all parameters but the
# position embeddings and norms (custom_keys decay_mult=0), drop path 0.3, whole images.
_SWIN = ('learning_rate=6e-05,weight_decay=0.01,decay=all,param_groups=mmseg_swin,'
         'drop_path_rate=0.3,eval_mode=whole')
# Named optimizer.param_groups ((regex on the flax path, lr_mult, decay_mult), ...).
PARAM_GROUPS = {
    '': (),
    # mmseg's upernet_swin custom_keys: no decay on these (as substrings of the names).
    'mmseg_swin': (('absolute_pos_embed', 1.0, 0.0), ('relative_position_bias_table', 1.0, 0.0),
                   ('norm', 1.0, 0.0)),
}


def _convnext(size):
  layers, drop_path = _CONVNEXT_SIZES[size]
  return (f'backbone=convnext_{size},{_MMSEG},{_CONVNEXT},layer_decay_layers={layers},'
          f'drop_path_rate={drop_path},layer_scale_init=1.0')


def _swin(size, window=0):
  return f'backbone=swin_{size},window_size={window},{_MMSEG},{_SWIN}'


_HUB = 'openmmlab/upernet-{}/model.safetensors'
# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
CHECKPOINTS = {
    'mmseg_upernet_convnext_tiny_ade': (
        _convnext('tiny'),
        'upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth', 46.11),
    'mmseg_upernet_convnext_small_ade': (
        _convnext('small'),
        'upernet_convnext_small_fp16_512x512_160k_ade20k_20220227_131208-1b1e394f.pth', 48.56),
    'mmseg_upernet_convnext_base_ade': (
        _convnext('base'),
        'upernet_convnext_base_fp16_512x512_160k_ade20k_20220227_181227-02a24fc6.pth', 48.71),
    'mmseg_upernet_swin_tiny_ade': (
        _swin('tiny'), 'upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224'
        '_1K_20210531_112542-e380ad3e.pth', 44.41),
    'mmseg_upernet_swin_small_ade': (
        _swin('small'), 'upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_'
        '224x224_1K_20210526_192015-ee2fff1c.pth', 47.72),
    'mmseg_upernet_swin_base_ade': (
        _swin('base'), 'upernet_swin_base_patch4_window7_512x512_160k_ade20k_pretrain_224x224'
        '_1K_20210526_192340-593b0e13.pth', 47.99),
    'mmseg_upernet_swin_base_w12_in22k_ade': (
        _swin('base', 12), 'upernet_swin_base_patch4_window12_512x512_160k_ade20k_pretrain_'
        '384x384_22K_20210531_125459-429057bf.pth', 50.76),
    'hf_upernet_convnext_tiny_ade': (_convnext('tiny'), _HUB.format('convnext-tiny'), 46.11),
    'hf_upernet_convnext_small_ade': (_convnext('small'), _HUB.format('convnext-small'), 48.56),
    'hf_upernet_convnext_base_ade': (_convnext('base'), _HUB.format('convnext-base'), 48.71),
    'hf_upernet_swin_tiny_ade': (_swin('tiny'), _HUB.format('swin-tiny'), 44.41),
    'hf_upernet_swin_small_ade': (_swin('small'), _HUB.format('swin-small'), 47.72),
    'hf_upernet_swin_base_ade': (_swin('base', 12), _HUB.format('swin-base'), 50.76),
}
RECIPES = {name: arg for name, (arg, _, _) in CHECKPOINTS.items()}


def _counts(text):
  """'1x1x2x1' -> (1, 1, 2, 1), '' -> (); one count parses as an int."""
  return (text,) if isinstance(text, int) else tuple(int(n) for n in text.split('x') if n)


def get_config(arg=None):
  variant = configs.parse_arg(RECIPES.get(arg, arg), **DEFAULTS)
  config = configs.base_config()
  config.model.name = 'upernet'
  for field in ('backbone', 'width', 'window_size', 'drop_path_rate', 'dropout', 'channels',
                'aux_channels'):
    config.model[field] = variant[field]
  if variant.backbone.startswith('convnext'):  # Swin has no layer scale
    config.model.layer_scale_init = variant.layer_scale_init
  config.model.depths = _counts(variant.depths)
  config.dataset.name = variant.dataset
  config.dataset.image_size = variant.image_size
  config.dataset.min_scale = variant.min_scale
  config.dataset.max_scale = variant.max_scale
  if variant.imagenet_normalization:
    config.dataset.mean, config.dataset.std = configs.IMAGENET_MEAN, configs.IMAGENET_STD
  config.dataset.base_size = configs.size_value(variant.base_size)
  config.dataset.cat_max_ratio = variant.cat_max_ratio
  config.dataset.photometric = variant.photometric
  config.evaluation.update(mode=variant.eval_mode, window=variant.eval_window,
                           stride=variant.eval_stride, resize=variant.eval_resize,
                           resize_scale=configs.size_value(variant.eval_scale), pad=variant.eval_pad)
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = variant.learning_rate
  config.optimizer.decay = variant.decay
  config.optimizer.layer_decay = variant.layer_decay
  config.optimizer.layer_decay_layers = variant.layer_decay_layers
  if variant.param_groups not in PARAM_GROUPS:
    raise configs.ConfigError(f'unknown param_groups {variant.param_groups!r}; valid: '
                              f'{sorted(PARAM_GROUPS)}')
  config.optimizer.param_groups = PARAM_GROUPS[variant.param_groups]
  config.weight_decay = variant.weight_decay
  config.schedule = variant.schedule
  config.poly_power = variant.poly_power
  config.end_learning_rate = 0.0
  config.warmup_steps = variant.warmup_steps
  config.batch_size = variant.batch_size
  config.eval_batch_size = variant.eval_batch_size
  config.total_steps = variant.total_steps
  config.eval_every = config.checkpoint_every = max(1, variant.total_steps // 4)
  config.log_every = min(config.log_every, config.eval_every)
  return config
