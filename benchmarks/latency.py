"""Inference speed of every model family: batch-1 latency and batched throughput.

  python benchmarks/latency.py [--size 512 --batch_size 8 --steps 20]
  python benchmarks/latency.py --config experiments/segformer.py:size=b2 --size 1024
  python benchmarks/latency.py --attention [--size 512]

The real-time question is how long one image takes, so each model's jitted inference
(`segjax.speed`: logits at the input size, as predict and evaluation run it) is timed on
random images: latency = median (and min) milliseconds of `--steps` calls at batch 1 after
a warm-up one; images/s = `--batch_size` / the median batched call. Also
the forward GFLOP per image (XLA's cost analysis) and the compile seconds of the batch-1
function. `--half_precision` computes in bfloat16 (parameters float32), as the trainer's
switch. Input pipeline and host transfers are not timed.

--attention times the attention formulations of the transformer models side by side
(`segjax.models.attention.implementation`: the einsum form and jax.nn.dot_product_attention,
which picks a fused kernel where the backend has one).
"""
from segjax import host

if __name__ == '__main__':
  host.preload_tcmalloc()  # as launch.py: before the slow imports below

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from segjax import speed
from segjax import sweep
from segjax.models import attention
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS

# (label, experiment config and its argument): the published architectures of each family
# (150 classes as ADE20K where the recipe is an ADE20K one) and the CPU defaults.
SUITE = (
    ('cnn (CPU default)', 'experiments/cnn.py'),
    ('U-Net (CPU default)', 'experiments/unet.py'),
    ('FCN-8s VGG16', 'experiments/fcn.py:backbone=vgg16,width=64'),
    ('FCN R50-D8 (mmseg)', 'experiments/fcn.py:mmseg_fcn_r50_d8_ade20k'),
    ('DeepLab v3 R50-D8 (torchvision)', 'experiments/deeplab.py:torchvision_deeplabv3_resnet50'),
    ('DeepLab v3+ R50-D8 (mmseg)', 'experiments/deeplab.py:mmseg_deeplabv3plus_r50_d8_ade20k'),
    ('DeepLab v3+ R101-D8 (mmseg)',
     'experiments/deeplab.py:mmseg_deeplabv3plus_r101_d8_ade20k'),
    ('Segmenter ViT-T/16 mask (mmseg)',
     'experiments/segmenter.py:mmseg_segmenter_vit_t_mask_ade20k'),
    ('Segmenter ViT-B/16 mask (mmseg)',
     'experiments/segmenter.py:mmseg_segmenter_vit_b_mask_ade20k'),
    ('SegFormer-B0, 64-channel decoder (CPU default)', 'experiments/segformer.py'),
    ('SegFormer-B0', 'experiments/segformer.py:hf_segformer_b0_ade'),
    ('SegFormer-B2', 'experiments/segformer.py:hf_segformer_b2_ade'),
    ('SegFormer-B5', 'experiments/segformer.py:hf_segformer_b5_ade'),
    ('UPerNet reduced ConvNeXt (CPU default)', 'experiments/upernet.py'),
    ('UPerNet ConvNeXt-T (mmseg)', 'experiments/upernet.py:mmseg_upernet_convnext_tiny_ade'),
    ('UPerNet Swin-T (mmseg)', 'experiments/upernet.py:mmseg_upernet_swin_tiny_ade'),
    ('LR-ASPP MobileNetV3-Small (CPU default)', 'experiments/lraspp.py'),
    ('LR-ASPP MobileNetV3-Large (torchvision)',
     'experiments/lraspp.py:torchvision_lraspp_mobilenet_v3_large'),
)
ATTENTION_SUITE = (
    ('Segmenter ViT-T/16 mask', 'experiments/segmenter.py:mmseg_segmenter_vit_t_mask_ade20k'),
    ('Segmenter ViT-B/16 mask', 'experiments/segmenter.py:mmseg_segmenter_vit_b_mask_ade20k'),
    ('SegFormer-B0', 'experiments/segformer.py:hf_segformer_b0_ade'),
    ('SegFormer-B2', 'experiments/segformer.py:hf_segformer_b2_ade'),
    ('UPerNet Swin-T', 'experiments/upernet.py:mmseg_upernet_swin_tiny_ade'),
)


def row(label, size, figures):
  return (f'| {label} | {size}x{size} | {figures["params"] / 1e6:.1f} M | '
          f'{figures["gflops_per_image"]:.1f} | {figures["compile_s"]:.0f} s | '
          f'{figures["latency_ms"]:.1f} ({figures["latency_min_ms"]:.1f}) | '
          f'{figures["images_per_s"]:.1f} |')


def header():
  device = jax.devices()[0]
  return (f'{jax.device_count()} x {device.platform} ({device.device_kind}), jax '
          f'{jax.__version__}, {"bfloat16" if FLAGS.half_precision else "float32"}, '
          f'throughput at batch {FLAGS.batch_size}\n\n'
          '| model | input | params | GFLOP/image | compile | batch-1 latency ms median (min) '
          '| images/s |\n|---|---|---|---|---|---|---|')


def main(argv):
  del argv
  if FLAGS.attention:
    print(header().replace('| model |', '| model, attention |'))
    for label, path_and_arg in ATTENTION_SUITE:
      for name in ('einsum', 'jax'):
        with attention.implementation(name):
          figures = speed.measure(sweep.load_config(path_and_arg), FLAGS.size,
                                  FLAGS.batch_size, FLAGS.steps, FLAGS.half_precision)
        print(row(f'{label}, {name}', FLAGS.size, figures), flush=True)
    return
  entries = [('--config', FLAGS.config)] if FLAGS.config else [
      (label, sweep.load_config(path_and_arg)) for label, path_and_arg in SUITE]
  print(header())
  for label, config in entries:
    figures = speed.measure(config, FLAGS.size, FLAGS.batch_size, FLAGS.steps,
                            FLAGS.half_precision)
    print(row(label, FLAGS.size, figures), flush=True)


def define_flags():
  """The command line's flags (defined when run as a script only: train_step.py, which the
  tests import beside this module, defines flags of the same names)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  lock_config=False)
  flags.DEFINE_integer('size', 512, 'Square input side, pixels.')
  flags.DEFINE_integer('batch_size', 8, 'Batch of the throughput measurement.')
  flags.DEFINE_integer('steps', 10, 'Timed calls after the warm-up one.')
  flags.DEFINE_bool('half_precision', False, 'bfloat16 compute.')
  flags.DEFINE_bool('attention', False, 'Time the attention formulations of ATTENTION_SUITE.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
