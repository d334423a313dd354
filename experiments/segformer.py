"""SegFormer (MiT encoder + all-MLP decoder) on shapes; the published recipes and checkpoints.

  python launch.py --config experiments/segformer.py
  python launch.py --config experiments/segformer.py:size=b1,image_size=96
  python launch.py --config experiments/segformer.py:hf_segformer_b0_ade \
      --config.init_from=/weights/segformer-b0-finetuned-ade-512-512/model.safetensors \
      --config.dataset.data_dir=/data --mode eval

Variants (after the colon): a name from RECIPES, or key=value pairs over the keys of
DEFAULTS: the model (size b0-b5, style = 'hf' or 'mmseg' (segjax/models/segformer.py),
channels = the decoder's width (0: the published one), drop_path_rate, dropout), the data
(dataset, image_size = training crop side, min_scale, max_scale, base_size, cat_max_ratio,
photometric), the evaluation (eval_mode, eval_window, eval_stride, eval_resize, eval_scale,
eval_pad) and the optimisation (optimizer, schedule, poly_power, learning_rate,
end_learning_rate, weight_decay, warmup_steps, batch_size, eval_batch_size, total_steps,
param_groups = 'none' or the published 'segformer' groups).

The default trains SegFormer-B0's encoder with a 64-channel decoder (3.4 M parameters; the
published B0 decoder is 256 wide) from scratch on 64 x 64 shapes: AdamW 2e-3 (weight decay
0.01 on kernels) with cosine decay after 200 warmup steps, batch 16, 4000 steps, no drop
path or dropout. On the idle 2-core CPU (JAX 0.10.2, tcmalloc, dataset built) the whole
command took 9 min 17 s (training 8 min 59 s, 7.4 steps/s) and reached 82.0% validation
mIoU (background 98.3, disc 85.1, ring 72.6, square 79.1, triangle 80.2, cross 76.7; 49.7 /
73.6 / 80.2 at steps 1000 / 2000 / 3000). The decoder's fusing 1x1 convolution over the
four concatenated maps at stride 4 is the costliest op of the step (benchmarks/train_step.py
--profile): a 256-wide decoder took 13 min 0 s for 80.8% (5.1 steps/s), a 128-wide one
with 3000 steps 7 min 13 s for 78.3%. Trials: the paper's drop path 0.1 and dropout 0.1
with AdamW 1e-3 at batch 8 reached 38.3% after 1500 steps; 3e-3 at batch 8, 17% after 1000.

Published recipes (Xie et al., NeurIPS 2021, and mmsegmentation's segformer configs, which
reproduce them): AdamW 6e-5, betas (0.9, 0.999), weight decay 0.01 on every parameter
except the encoder's LayerNorms, the decoder at 10x the learning rate; linear warmup over
1500 iterations, then poly decay (power 1.0) to 0 at 160k iterations; drop path 0.1,
decoder dropout 0.1; ImageNet normalisation. ADE20K: batch 16, crops 512 (640 for the B5
640 model) after rescaling to fit 2048 x 512 (2048 x 640) times 0.5-2.0, crops with at most
75% of one class, flip, photometric distortion; tested whole after Resize(2048 x 512,
keep ratio), no padding. Cityscapes: batch 8, crops 1024 from rescaling to fit 2048 x 1024
times 0.5-2.0; tested by 1024 windows at stride 768.

Published checkpoints (CHECKPOINTS: the architecture is reproduced exactly, so the file
loads whole with `--config.init_from=FILE`; docs/model_zoo.md gives the parity measured
against the reference code). Hugging Face: the official NVlabs models, nvidia/segformer-*
on the hub (model.safetensors), single-scale mIoU of the paper's Table 1; mmsegmentation:
its segformer_mit-* configs' files under download.openmmlab.com/mmsegmentation/v0.5/
segformer/, its single-scale mIoU. mmseg's decoder is 256 wide at every size (the paper's
768 for b2-b5 in the Hugging Face models).

  recipe                            source                                        mIoU
  hf_segformer_b0_ade               nvidia/segformer-b0-finetuned-ade-512-512     37.4
  hf_segformer_b1_ade               nvidia/segformer-b1-finetuned-ade-512-512     42.2
  hf_segformer_b2_ade               nvidia/segformer-b2-finetuned-ade-512-512     46.5
  hf_segformer_b3_ade               nvidia/segformer-b3-finetuned-ade-512-512     49.4
  hf_segformer_b4_ade               nvidia/segformer-b4-finetuned-ade-512-512     50.3
  hf_segformer_b5_ade               nvidia/segformer-b5-finetuned-ade-640-640     51.0
  hf_segformer_b0_cityscapes        nvidia/segformer-b0-finetuned-cityscapes-1024-1024 76.2
  hf_segformer_b1_cityscapes        ...-b1-finetuned-cityscapes-1024-1024         78.5
  hf_segformer_b2_cityscapes        ...-b2-finetuned-cityscapes-1024-1024         81.0
  hf_segformer_b3_cityscapes        ...-b3-finetuned-cityscapes-1024-1024         81.7
  hf_segformer_b4_cityscapes        ...-b4-finetuned-cityscapes-1024-1024         82.3
  hf_segformer_b5_cityscapes        ...-b5-finetuned-cityscapes-1024-1024         82.4
  mmseg_segformer_b0_ade            segformer_mit-b0_8xb2-160k_ade20k-512x512     37.41
  mmseg_segformer_b1_ade            segformer_mit-b1_8xb2-160k_ade20k-512x512     40.97
  mmseg_segformer_b2_ade            segformer_mit-b2_8xb2-160k_ade20k-512x512     45.58
  mmseg_segformer_b3_ade            segformer_mit-b3_8xb2-160k_ade20k-512x512     47.82
  mmseg_segformer_b4_ade            segformer_mit-b4_8xb2-160k_ade20k-512x512     48.46
  mmseg_segformer_b5_ade            segformer_mit-b5_8xb2-160k_ade20k-512x512     49.13
  mmseg_segformer_b5_ade_640        segformer_mit-b5_8xb2-160k_ade20k-640x640     49.62
  mmseg_segformer_b0_cityscapes     segformer_mit-b0_8xb1-160k_cityscapes-1024x1024  76.54
  mmseg_segformer_b1_cityscapes     segformer_mit-b1_8xb1-160k_cityscapes-1024x1024  78.56
  mmseg_segformer_b2_cityscapes     segformer_mit-b2_8xb1-160k_cityscapes-1024x1024  81.08
  mmseg_segformer_b3_cityscapes     segformer_mit-b3_8xb1-160k_cityscapes-1024x1024  81.94
  mmseg_segformer_b4_cityscapes     segformer_mit-b4_8xb1-160k_cityscapes-1024x1024  81.89
  mmseg_segformer_b5_cityscapes     segformer_mit-b5_8xb1-160k_cityscapes-1024x1024  82.25

To train a recipe, start from the ImageNet encoder with `--config.init_from`: Hugging Face
nvidia/mit-b{0..5} model.safetensors ('hf') or mmseg's pretrain/segformer/
mit_b{0..5}_20220624-*.pth ('mmseg').
"""
from segjax import configs

DEFAULTS = dict(
    size='b0', style='hf', channels=64, drop_path_rate=0.0, dropout=0.0,
    dataset='shapes', image_size=64, min_scale=0.75, max_scale=1.5, base_size='',
    cat_max_ratio=1.0, photometric=False, normalization='',
    eval_mode='whole', eval_window=0, eval_stride=0, eval_resize='', eval_scale='',
    eval_pad=True,  # sizes as 'LONGxSHORT'
    optimizer='adamw', schedule='cosine', poly_power=0.9, learning_rate=2e-3,
    end_learning_rate=0.0, weight_decay=0.01, warmup_steps=200, batch_size=16,
    eval_batch_size=50, total_steps=4000, param_groups='none',
)

# The published optimisation: mmengine's paramwise_cfg custom_keys {'pos_block':
# decay_mult 0, 'norm': decay_mult 0, 'head': lr_mult 10} over the source's parameter names.
# 'norm' matches the blocks' norm1 / norm2, the patch embeddings' and the key/value
# reductions' LayerNorms in both codes, and the stage-final LayerNorms only in NVlabs' (named
# normN there, 'layers.N.2' in mmseg's); MiT has no pos_block.
PARAM_GROUPS = {
    'none': {'hf': (), 'mmseg': ()},
    'segformer': {
        'hf': ((r'^backbone/.*(norm1|norm2|sr_norm|patch_norm_\d+|norm_\d+)/', 1.0, 0.0),
               (r'^decode_head/', 10.0, 1.0)),
        'mmseg': ((r'^backbone/.*(norm1|norm2|sr_norm|patch_norm_\d+)/', 1.0, 0.0),
                  (r'^decode_head/', 10.0, 1.0)),
    },
}
NORMALIZATIONS = {'imagenet': (configs.IMAGENET_MEAN, configs.IMAGENET_STD)}

_PUBLISHED = ('drop_path_rate=0.1,dropout=0.1,optimizer=adamw,learning_rate=6e-05,'
              'weight_decay=0.01,schedule=poly,poly_power=1.0,end_learning_rate=0.0,'
              'warmup_steps=1500,total_steps=160000,param_groups=segformer,'
              'normalization=imagenet,min_scale=0.5,max_scale=2.0,cat_max_ratio=0.75,'
              'photometric=True,eval_pad=False,eval_batch_size=1')
_ADE20K = 'dataset=ade20k,batch_size=16,eval_resize=fit,eval_mode=whole'
_CITYSCAPES = ('dataset=cityscapes,batch_size=8,image_size=1024,base_size=2048x1024,'
               'eval_resize=fit,eval_scale=2048x1024,eval_mode=slide,eval_window=1024,'
               'eval_stride=768')


def _ade20k(crop):
  return f'{_ADE20K},image_size={crop},base_size=2048x{crop},eval_scale=2048x{crop}'


def _recipe(size, style, data):
  channels = 256 if style == 'mmseg' else 0  # mmseg's SegformerHead: 256 at every size
  return f'size={size},style={style},channels={channels},{_PUBLISHED},{data}'


SIZES = ('b0', 'b1', 'b2', 'b3', 'b4', 'b5')
_HF_ADE = (37.4, 42.2, 46.5, 49.4, 50.3, 51.0)  # the paper's Table 1 (NVlabs' models)
_HF_CITYSCAPES = (76.2, 78.5, 81.0, 81.7, 82.3, 82.4)
_MMSEG_ADE = {  # size -> (file, single-scale mIoU)
    'b0': ('segformer_mit-b0_512x512_160k_ade20k_20210726_101530-8ffa8fda.pth', 37.41),
    'b1': ('segformer_mit-b1_512x512_160k_ade20k_20210726_112106-d70e859d.pth', 40.97),
    'b2': ('segformer_mit-b2_512x512_160k_ade20k_20210726_112103-cbd414ac.pth', 45.58),
    'b3': ('segformer_mit-b3_512x512_160k_ade20k_20210726_081410-962b98d2.pth', 47.82),
    'b4': ('segformer_mit-b4_512x512_160k_ade20k_20210728_183055-7f509d7d.pth', 48.46),
    'b5': ('segformer_mit-b5_512x512_160k_ade20k_20210726_145235-94cedf59.pth', 49.13),
}
_MMSEG_CITYSCAPES = {
    'b0': ('segformer_mit-b0_8x1_1024x1024_160k_cityscapes_20211208_101857-e7f88502.pth', 76.54),
    'b1': ('segformer_mit-b1_8x1_1024x1024_160k_cityscapes_20211208_064213-655c7b3f.pth', 78.56),
    'b2': ('segformer_mit-b2_8x1_1024x1024_160k_cityscapes_20211207_134205-6096669a.pth', 81.08),
    'b3': ('segformer_mit-b3_8x1_1024x1024_160k_cityscapes_20211206_224823-a8f8a177.pth', 81.94),
    'b4': ('segformer_mit-b4_8x1_1024x1024_160k_cityscapes_20211207_080709-07f6c333.pth', 81.89),
    'b5': ('segformer_mit-b5_8x1_1024x1024_160k_cityscapes_20211206_072934-87a052ec.pth', 82.25),
}

# Published checkpoints: recipe name -> (variant, checkpoint file, single-scale mIoU).
CHECKPOINTS = {}
for _i, _size in enumerate(SIZES):
  _crop = 640 if _size == 'b5' else 512
  _resolution = f'{_crop}-{_crop}'
  CHECKPOINTS[f'hf_segformer_{_size}_ade'] = (
      _recipe(_size, 'hf', _ade20k(_crop)),
      f'nvidia/segformer-{_size}-finetuned-ade-{_resolution}/model.safetensors', _HF_ADE[_i])
  CHECKPOINTS[f'hf_segformer_{_size}_cityscapes'] = (
      _recipe(_size, 'hf', _CITYSCAPES),
      f'nvidia/segformer-{_size}-finetuned-cityscapes-1024-1024/model.safetensors',
      _HF_CITYSCAPES[_i])
  CHECKPOINTS[f'mmseg_segformer_{_size}_ade'] = (_recipe(_size, 'mmseg', _ade20k(512)),
                                                 *_MMSEG_ADE[_size])
  CHECKPOINTS[f'mmseg_segformer_{_size}_cityscapes'] = (_recipe(_size, 'mmseg', _CITYSCAPES),
                                                        *_MMSEG_CITYSCAPES[_size])
CHECKPOINTS['mmseg_segformer_b5_ade_640'] = (
    _recipe('b5', 'mmseg', _ade20k(640)),
    'segformer_mit-b5_640x640_160k_ade20k_20210801_121243-41d2845b.pth', 49.62)
RECIPES = {name: arg for name, (arg, _, _) in CHECKPOINTS.items()}


def get_config(arg=None):
  variant = configs.parse_arg(RECIPES.get(arg, arg), **DEFAULTS)
  if variant.param_groups not in PARAM_GROUPS:
    raise configs.ConfigError(f'unknown param_groups {variant.param_groups!r}; valid: '
                              f'{sorted(PARAM_GROUPS)}')
  if variant.normalization and variant.normalization not in NORMALIZATIONS:
    raise configs.ConfigError(f'unknown normalization {variant.normalization!r}; valid: '
                              f"'' (the dataset default) or {sorted(NORMALIZATIONS)}")
  config = configs.base_config()
  config.model.name = 'segformer'
  for field in ('size', 'style', 'channels', 'drop_path_rate', 'dropout'):
    config.model[field] = variant[field]
  config.dataset.update(name=variant.dataset, image_size=variant.image_size,
                        min_scale=variant.min_scale, max_scale=variant.max_scale,
                        base_size=configs.size_value(variant.base_size),
                        cat_max_ratio=variant.cat_max_ratio, photometric=variant.photometric)
  if variant.normalization:
    config.dataset.mean, config.dataset.std = NORMALIZATIONS[variant.normalization]
  config.evaluation.update(mode=variant.eval_mode, window=variant.eval_window,
                           stride=variant.eval_stride, resize=variant.eval_resize,
                           resize_scale=configs.size_value(variant.eval_scale), pad=variant.eval_pad)
  config.optimizer.update(name=variant.optimizer, learning_rate=variant.learning_rate,
                          param_groups=PARAM_GROUPS[variant.param_groups][variant.style],
                          decay='all' if variant.param_groups == 'segformer' else 'kernels')
  config.update(schedule=variant.schedule, poly_power=variant.poly_power,
                end_learning_rate=variant.end_learning_rate,
                weight_decay=variant.weight_decay, warmup_steps=variant.warmup_steps,
                batch_size=variant.batch_size, eval_batch_size=variant.eval_batch_size,
                total_steps=variant.total_steps)
  config.eval_every = config.checkpoint_every = max(1, variant.total_steps // 4)
  config.log_every = min(config.log_every, config.eval_every)
  return config
