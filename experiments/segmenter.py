"""Segmenter (ViT encoder + mask transformer or linear decoder) on shapes; the paper's recipes.

  python launch.py --config experiments/segmenter.py
  python launch.py --config experiments/segmenter.py:decoder=mask,depth=6
  python launch.py --config experiments/segmenter.py:seg_b16_mask_ade20k \
      --config.dataset.data_dir=/data

Variants (after the colon): a name from RECIPES, or key=value pairs over the keys of
DEFAULTS: the model (size, patch_size, stem = 'patch' or 'conv', stem_convs_per_stage,
decoder, decoder_layers, depth, drop_path_rate, dropout, decoder_dropout,
pretrained_image_size), the data (dataset, image_size = training crop side, min_scale,
max_scale, normalization: 'vit' for timm's augreg checkpoints' mean = std = (0.5, 0.5,
0.5), '' to keep the dataset default) and the optimisation (optimizer, schedule,
learning_rate, end_learning_rate, weight_decay, warmup_steps, batch_size,
eval_batch_size, total_steps).

The default trains a 4-block ViT-Ti/8 with a convolutional stem and the linear decoder
from scratch on 64 x 64 shapes (an 8 x 8 token grid; the 64-pixel dataset takes about 70 s
to build once): 3000 steps of 8 images, AdamW 1e-3 with cosine decay. A step costs 1.5x
the patch-embedding model's (10.0 vs 6.1 GFLOP): measured on an idle 2-core CPU, the whole
run took 6 min 31 s with the dataset already built. The stem (`stem=conv`;
Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021) replaces the
8 x 8 patch embedding by three stride-2 stages of 3x3 conv-BatchNorm-ReLU (48, 96, 192
channels), here with a second, stride-1 3x3 conv in each stage (`stem_convs_per_stage=2`,
as the paper's larger stems interleave stride-1 convs), and a 1x1 conv to the 192-wide
tokens. It reached 73.3% validation mIoU (background 96.2, disc 79.8, ring 59.5, square
71.0, triangle 73.0, cross 59.9; 60.8 at step 1500; one seed). With timm's patch
embedding the same model hardly learns the shape classes from scratch (23.9% after 5000
steps: background and disc only); at learning rate 3e-4, one conv per stage gave 20.8% at
step 1000 (the patch embedding's curve), two per stage 33.9% (45.5% at 1e-3). At 64 px a
stride-8 token grid caps mIoU near 83% (the true labels averaged over each token and
upsampled back score 82.8, ring 68.5); 4000 steps reach 76.3% but take about 8.5 minutes.
The RECIPES use the patch embedding of the published ViTs (`stem=patch`).

RECIPES reproduce the training recipes of Strudel et al., "Segmenter: Transformer for
Semantic Segmentation" (ICCV 2021, arXiv 2105.05633; its implementation details and the
official code's segm/config.yml and segm/train.py): SGD with momentum 0.9, no weight
decay, poly decay (power 0.9, down to 1e-5) without warmup from base LR 0.001 (ADE20K) or
0.01 (Cityscapes), global batch 8, 160k iterations on ADE20K (64 epochs) and 80k on
Cityscapes (216 epochs), random rescaling 0.5-2.0, crop 512 (ADE20K; 640 for ViT-L) or 768
(Cityscapes), encoder drop path 0.1 and no dropout, mask transformer dropout 0.1, images
normalised with mean = std = 0.5. The position embeddings are stored at the crop's grid,
as the official model does (`pretrained_image_size` = crop side; the checkpoint's 384 grid
is resampled on loading).
Published single-scale / multi-scale mIoU (source: the official model zoo in
github.com/rstrudel/segmenter's README, the models of the paper's comparisons with the
state of the art on ADE20K val and Cityscapes val) and the checkpoint to start from (timm on
the Hugging Face hub, model.safetensors):

  seg_t16_mask_ade20k      Seg-T-Mask/16, ADE20K, crop 512       38.1 / 38.8
                           timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k
  seg_s16_mask_ade20k      Seg-S-Mask/16, ADE20K, crop 512       45.3 / 46.9
                           timm/vit_small_patch16_384.augreg_in21k_ft_in1k
  seg_b16_mask_ade20k      Seg-B-Mask/16, ADE20K, crop 512       48.5 / 50.0
                           timm/vit_base_patch16_384.augreg_in21k_ft_in1k
  seg_b8_linear_ade20k     Seg-B/8 (linear), ADE20K, crop 512    49.5 / 50.5
                           timm/vit_base_patch8_224.augreg_in21k_ft_in1k (*)
  seg_l16_mask_ade20k      Seg-L-Mask/16, ADE20K, crop 640       51.8 / 53.6
                           timm/vit_large_patch16_384.augreg_in21k_ft_in1k
  seg_l16_mask_cityscapes  Seg-L-Mask/16, Cityscapes, crop 768   79.1 / 81.3
                           timm/vit_large_patch16_384.augreg_in21k_ft_in1k

(*) The paper's ViT-B/8 was an augreg checkpoint fine-tuned at 384 that timm does not
publish; the 224 one is the nearest. The paper evaluates with a sliding window of the crop
size (stride 512 on ADE20K's 512-short-side images, 512 on Cityscapes' 1024 x 2048), where
segjax evaluates whole (padded) images. The paper has no Pascal VOC or
Oxford-IIIT Pet results, so there are no recipes for 'voc' and 'pets'.

Published checkpoints (CHECKPOINTS: mmsegmentation's Segmenter reproduced exactly, so its
file loads whole with `--config.init_from=FILE`, with its test protocol; evaluate with
  python launch.py --config experiments/segmenter.py:mmseg_segmenter_vit_b_mask_ade20k \
      --config.init_from=/weights/segmenter_vit-b_mask_8x1_512x512_160k_ade20k_20220105_151706-bc533b08.pth \
      --config.dataset.data_dir=/data --mode eval
and see docs/model_zoo.md for the parity measured against mmseg's code):

  mmseg_segmenter_vit_t_mask_ade20k   segmenter_vit-t_mask_8xb1-160k_ade20k-512x512   39.99
  mmseg_segmenter_vit_s_mask_ade20k   segmenter_vit-s_mask_8xb1-160k_ade20k-512x512   46.19
  mmseg_segmenter_vit_b_mask_ade20k   segmenter_vit-b_mask_8xb1-160k_ade20k-512x512   49.60
  mmseg_segmenter_vit_l_mask_ade20k   segmenter_vit-l_mask_8xb1-160k_ade20k-512x512   52.16
                                      (crop 640)

(mmseg's config names, published single-scale mIoU on ADE20K val; the files, in CHECKPOINTS,
are under download.openmmlab.com/mmsegmentation/v0.5/segmenter/<config>/.) The encoder
follows mmseg's ViT (`encoder_style='mmseg'`: no patch-embedding bias, PyTorch-bicubic
position-embedding resize, inputs padded to the patch size); protocol: Resize(2048x512,
keep_ratio; 2560x640 for ViT-L) with cv2's bilinear, sliding 512 windows at stride 480 (640
/ 608), no padding, logits resized back to the labels, reduce_zero_label. Training as mmseg:
SGD 0.001 momentum 0.9, no weight decay, poly(0.9) down to 1e-4, batch 8, 160k iterations,
its ADE20K augmentation (rescale to fit 2048x512 times 0.5-2.0, crops with at most 75% of
one class, photometric distortion, flip), drop path 0.1, no decoder dropout; mmseg starts
from its own conversions of the augreg ViTs (pretrain/segmenter/vit_*_p16_384_*.pth, loaded
with `segjax.weights.mmseg`).
"""
from segjax import configs

DEFAULTS = dict(
    size='tiny', patch_size=8, stem='conv', stem_convs_per_stage=2, decoder='linear',
    decoder_layers=2, depth=4,
    drop_path_rate=0.0, dropout=0.0, decoder_dropout=0.0, pretrained_image_size=64,
    dataset='shapes', image_size=64, min_scale=0.75, max_scale=1.5, normalization='',
    optimizer='adamw', schedule='cosine', learning_rate=1e-3, weight_decay=0.05,
    end_learning_rate=0.0, warmup_steps=100, batch_size=8, eval_batch_size=50,
    total_steps=3000, encoder_style='timm',
    # mmseg's augmentation (rescale to fit base_size first, crops with at most cat_max_ratio
    # of one class, photometric distortion) and evaluation protocol (evaluation.* fields)
    base_size='', cat_max_ratio=1.0, photometric=False, eval_mode='whole', eval_window=0,
    eval_stride=0, eval_resize='', eval_scale='', eval_pad=True,  # sizes as 'LONGxSHORT'
)

_PAPER = ('stem=patch,stem_convs_per_stage=1,'
          'optimizer=sgd,schedule=poly,end_learning_rate=1e-05,warmup_steps=0,'
          'weight_decay=0.0,batch_size=8,eval_batch_size=8,drop_path_rate=0.1,dropout=0.0,'
          'decoder_dropout=0.1,decoder_layers=2,depth=0,min_scale=0.5,max_scale=2.0,'
          'normalization=vit')
_ADE20K = 'dataset=ade20k,learning_rate=0.001,total_steps=160000'
_CITYSCAPES = 'dataset=cityscapes,learning_rate=0.01,total_steps=80000'


def _recipe(model, data, crop):
  return f'{model},{data},image_size={crop},pretrained_image_size={crop},{_PAPER}'


RECIPES = {
    'seg_t16_mask_ade20k': _recipe('size=tiny,patch_size=16,decoder=mask', _ADE20K, 512),
    'seg_s16_mask_ade20k': _recipe('size=small,patch_size=16,decoder=mask', _ADE20K, 512),
    'seg_b16_mask_ade20k': _recipe('size=base,patch_size=16,decoder=mask', _ADE20K, 512),
    'seg_b8_linear_ade20k': _recipe('size=base,patch_size=8,decoder=linear', _ADE20K, 512),
    'seg_l16_mask_ade20k': _recipe('size=large,patch_size=16,decoder=mask', _ADE20K, 640),
    'seg_l16_mask_cityscapes': _recipe('size=large,patch_size=16,decoder=mask', _CITYSCAPES,
                                       768),
}

# mmsegmentation's Segmenter configs (segmenter_vit-{t,s,b,l}_mask_8xb1-160k_ade20k): its
# ViT conventions, SGD 0.001 poly(0.9) down to 1e-4, batch 8, 160k iterations, ADE20K
# augmentation; evaluated by 512 windows at stride 480 (640 / 608 for ViT-L) after
# Resize(2048x512, keep_ratio) (2560x640), no padding, reduce_zero_label.
_MMSEG = ('stem=patch,stem_convs_per_stage=1,encoder_style=mmseg,decoder=mask,'
          'decoder_layers=2,depth=0,optimizer=sgd,schedule=poly,learning_rate=0.001,'
          'end_learning_rate=0.0001,warmup_steps=0,weight_decay=0.0,batch_size=8,'
          'eval_batch_size=8,drop_path_rate=0.1,dropout=0.0,decoder_dropout=0.0,'
          'min_scale=0.5,max_scale=2.0,normalization=vit,dataset=ade20k,total_steps=160000,'
          'cat_max_ratio=0.75,photometric=True,eval_mode=slide,eval_resize=fit,eval_pad=False')


def _mmseg_recipe(size, crop):
  return (f'size={size},patch_size=16,{_MMSEG},image_size={crop},pretrained_image_size={crop},'
          f'base_size={4 * crop}x{crop},eval_scale={4 * crop}x{crop},eval_window={crop},'
          f'eval_stride={crop - 32}')


# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
CHECKPOINTS = {
    'mmseg_segmenter_vit_t_mask_ade20k': (
        _mmseg_recipe('tiny', 512),
        'segmenter_vit-t_mask_8x1_512x512_160k_ade20k_20220105_151706-ffcf7509.pth', 39.99),
    'mmseg_segmenter_vit_s_mask_ade20k': (
        _mmseg_recipe('small', 512),
        'segmenter_vit-s_mask_8x1_512x512_160k_ade20k_20220105_151706-511bb103.pth', 46.19),
    'mmseg_segmenter_vit_b_mask_ade20k': (
        _mmseg_recipe('base', 512),
        'segmenter_vit-b_mask_8x1_512x512_160k_ade20k_20220105_151706-bc533b08.pth', 49.60),
    'mmseg_segmenter_vit_l_mask_ade20k': (
        _mmseg_recipe('large', 640),
        'segmenter_vit-l_mask_8x1_512x512_160k_ade20k_20220105_162750-7ef345be.pth', 52.16),
}
RECIPES.update({name: arg for name, (arg, _, _) in CHECKPOINTS.items()})

NORMALIZATIONS = {'vit': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # timm's augreg ViTs


def get_config(arg=None):
  variant = configs.parse_arg(RECIPES.get(arg, arg), **DEFAULTS)
  config = configs.base_config()
  config.model.name = 'segmenter'
  for field in ('size', 'patch_size', 'stem', 'stem_convs_per_stage', 'decoder',
                'decoder_layers', 'depth', 'drop_path_rate', 'dropout', 'decoder_dropout',
                'pretrained_image_size', 'encoder_style'):
    config.model[field] = variant[field]
  config.dataset.base_size = configs.size_value(variant.base_size)
  config.dataset.cat_max_ratio = variant.cat_max_ratio
  config.dataset.photometric = variant.photometric
  config.evaluation.update(mode=variant.eval_mode, window=variant.eval_window,
                           stride=variant.eval_stride, resize=variant.eval_resize,
                           resize_scale=configs.size_value(variant.eval_scale), pad=variant.eval_pad)
  config.dataset.name = variant.dataset
  config.dataset.image_size = variant.image_size
  config.dataset.min_scale = variant.min_scale
  config.dataset.max_scale = variant.max_scale
  if variant.normalization:
    if variant.normalization not in NORMALIZATIONS:
      raise configs.ConfigError(f'unknown normalization {variant.normalization!r}; valid: '
                                f"'' (the dataset default) or {sorted(NORMALIZATIONS)}")
    config.dataset.mean, config.dataset.std = NORMALIZATIONS[variant.normalization]
  config.optimizer.name = variant.optimizer
  config.optimizer.learning_rate = variant.learning_rate
  config.schedule = variant.schedule
  config.end_learning_rate = variant.end_learning_rate
  config.weight_decay = variant.weight_decay
  config.warmup_steps = variant.warmup_steps
  config.batch_size = variant.batch_size
  config.eval_batch_size = variant.eval_batch_size
  config.total_steps = variant.total_steps
  config.eval_every = config.checkpoint_every = max(1, variant.total_steps // 4)
  config.log_every = min(config.log_every, config.eval_every)
  return config
