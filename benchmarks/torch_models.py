"""PyTorch twins of segjax's U-Net, DeepLab v3/v3+ (ResNet) and Segmenter (ViT), for benchmarks.

`from_flax(model, in_channels)` builds the `torch.nn.Module` with the same architecture as
a segjax flax `Model` instance, read from its fields: the same layers, widths, kernels,
strides, dilations, biases, normalisations (BatchNorm eps 1e-5 momentum 0.1, LayerNorm eps
1e-6 in the ViT and 1e-5 in the mask decoder), dropout and drop path, and the same number
of trainable parameters (BatchNorm running statistics are buffers here and 'batch_stats'
there). Layouts follow PyTorch: images [B, C, H, W] -> logits [B, K, H, W]. Only the
architecture is mirrored, not the initialisation (PyTorch's defaults here).

Departures that keep the maths: attention runs through `F.scaled_dot_product_attention`
(as timm does) where segjax writes the einsums out; the ResNet is built from segjax's own
stage and rate rules (`segjax.models.backbones.resnet`). Not mirrored (ValueError): the ViT's conv
stem and frozen BatchNorm. The flax `dtype` field is not read: the twin computes in
float32, or in bfloat16 under `torch.autocast`.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from segjax.models import attention
from segjax.models import deeplab
from segjax.models.backbones import resnet
from segjax.models import segmenter
from segjax.models import unet
from segjax.models.backbones import vit


def conv_bn_relu(in_channels, out_channels, kernel=3, stride=1, dilation=1):
  """Bias-free conv ('same' padding at stride 1), BatchNorm, ReLU: segjax's ConvBNReLU."""
  return nn.Sequential(
      nn.Conv2d(in_channels, out_channels, kernel, stride, padding=dilation * (kernel - 1) // 2,
                dilation=dilation, bias=False),
      nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize_to(x, height, width):
  """Bilinear resize of [B, C, h, w] to [B, C, height, width] (half-pixel centres)."""
  return F.interpolate(x, size=(height, width), mode='bilinear', align_corners=False)


# ---------------------------------------------------------------------------- U-Net

class UNet(nn.Module):
  """segjax.models.unet.Model: `depth` DoubleConv levels, 2x2 max pooling, bottleneck,
  2x2 stride-2 transposed convolutions (with bias), skip concatenation [skip, up], 1x1 head."""

  def __init__(self, in_channels, num_classes, features, depth):
    super().__init__()
    double = lambda c_in, c_out: nn.Sequential(conv_bn_relu(c_in, c_out),
                                               conv_bn_relu(c_out, c_out))
    widths = [features * 2 ** level for level in range(depth + 1)]
    self.down = nn.ModuleList(double(c_in, c_out)
                              for c_in, c_out in zip([in_channels] + widths[:-2], widths[:-1]))
    self.bottleneck = double(widths[-2], widths[-1])
    self.up = nn.ModuleList(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
                            for level in reversed(range(depth)))
    self.up_convs = nn.ModuleList(double(2 * widths[level], widths[level])
                                  for level in reversed(range(depth)))
    self.head = nn.Conv2d(features, num_classes, 1)

  def forward(self, x):
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for up, block, skip in zip(self.up, self.up_convs, reversed(skips)):
      x = block(torch.cat([skip, up(x)], dim=1))
    return self.head(x)


# ---------------------------------------------------------------------------- ResNet, DeepLab

class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck (stride on the 3x3), as segjax.models.backbones.resnet.Bottleneck."""

  def __init__(self, in_channels, width, stride, rate):
    super().__init__()
    out_channels = width * resnet.EXPANSION['bottleneck']
    self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, padding=rate, dilation=rate, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_channels)
    self.downsample = None
    if stride != 1 or in_channels != out_channels:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers plus shortcut, as segjax.models.backbones.resnet.BasicBlock."""

  def __init__(self, in_channels, width, stride, rate):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, stride, padding=rate, dilation=rate, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, padding=rate, dilation=rate, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or in_channels != width:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride, bias=False),
                                      nn.BatchNorm2d(width))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """Atrous ResNet returning (stage-1 features, stage-4 features), torchvision's names."""

  def __init__(self, in_channels, depth, output_stride, width, multi_grid, contract_dilation):
    super().__init__()
    kind, blocks_per_stage = resnet.DEPTHS[depth]
    block = {'basic': BasicBlock, 'bottleneck': Bottleneck}[kind]
    self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    channels = width
    stages = resnet.stage_strides_and_rates(output_stride)
    for stage, (stage_width, num_blocks, (stride, rate)) in enumerate(
        zip(resnet.stage_widths(width), blocks_per_stage, stages)):
      grid = tuple(multi_grid) if stage == 3 else (1,)
      blocks = []
      for i, block_rate in enumerate(resnet.block_rates(rate, num_blocks, grid,
                                                        contract_dilation)):
        blocks.append(block(channels, stage_width, stride if i == 0 else 1, block_rate))
        channels = stage_width * resnet.EXPANSION[kind]
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, padding=1)
    stage1 = self.layer1(x)
    return stage1, self.layer4(self.layer3(self.layer2(stage1)))


class ASPP(nn.Module):
  """segjax.models.deeplab.ASPP: 1x1, one dilated 3x3 per rate, image pooling; projection."""

  def __init__(self, in_channels, rates, features, dropout):
    super().__init__()
    self.conv1x1 = conv_bn_relu(in_channels, features, kernel=1)
    self.atrous = nn.ModuleList(conv_bn_relu(in_channels, features, dilation=r) for r in rates)
    self.pool = conv_bn_relu(in_channels, features, kernel=1)
    self.project = conv_bn_relu((len(rates) + 2) * features, features, kernel=1)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    height, width = x.shape[-2:]
    pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
    branches = [self.conv1x1(x)] + [conv(x) for conv in self.atrous]
    branches.append(resize_to(pooled, height, width))
    return self.dropout(self.project(torch.cat(branches, dim=1)))


class DeepLab(nn.Module):
  """segjax.models.deeplab.Model (v3 or v3+) with its ResNet backbone."""

  def __init__(self, in_channels, model):
    super().__init__()
    self.backbone = ResNet(in_channels, model.backbone_depth, model.output_stride,
                           model.backbone_width, model.multi_grid, model.contract_dilation)
    channels = resnet.stage_channels(model.backbone_depth, model.backbone_width)
    rates = deeplab.aspp_rates_for(model.output_stride, model.aspp_rates,
                                   model.allow_custom_rates)
    self.aspp = ASPP(channels['stage4'], rates, model.aspp_features, model.dropout)
    self.decoder = None
    head_channels = model.aspp_features
    if model.variant == 'v3plus':
      self.decoder = nn.ModuleDict({
          'low_level_project': conv_bn_relu(channels['stage1'], model.low_level_features, 1),
          'conv1': conv_bn_relu(model.aspp_features + model.low_level_features,
                                model.decoder_features),
          'conv2': conv_bn_relu(model.decoder_features, model.decoder_features)})
      head_channels = model.decoder_features
    self.classifier = nn.Conv2d(head_channels, model.num_classes, 1)

  def forward(self, images):
    low_level, x = self.backbone(images)
    x = self.aspp(x)
    if self.decoder is not None:
      low_level = self.decoder['low_level_project'](low_level)
      x = torch.cat([resize_to(x, *low_level.shape[-2:]), low_level], dim=1)
      x = self.decoder['conv2'](self.decoder['conv1'](x))
    return resize_to(self.classifier(x), *images.shape[-2:])


# ---------------------------------------------------------------------------- ViT, Segmenter

class DropPath(nn.Module):
  """Zeroes a residual branch [B, ...] per example with probability `rate` when training."""

  def __init__(self, rate):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
    return torch.where(mask, x / keep, torch.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block (timm's): fused qkv attention and a GELU MLP. [B, N, D]."""

  def __init__(self, dim, heads, dropout=0.0, drop_path=0.0, eps=vit.EPSILON):
    super().__init__()
    self.heads, self.dropout = heads, dropout
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.fc1 = nn.Linear(dim, attention.MLP_RATIO * dim)
    self.fc2 = nn.Linear(attention.MLP_RATIO * dim, dim)
    self.drop = nn.Dropout(dropout)
    self.drop_path = DropPath(drop_path)

  def attention(self, x):
    batch, length, dim = x.shape
    q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v,
                                         dropout_p=self.dropout if self.training else 0.0)
    return self.drop(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))

  def mlp(self, x):
    return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))

  def forward(self, x):
    x = x + self.drop_path(self.attention(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
  """segjax.models.backbones.vit.ViT with the patch embedding: patch tokens [B, D, H/p, W/p]."""

  def __init__(self, in_channels, size, patch_size, pretrained_image_size, depth,
               drop_path_rate, dropout):
    super().__init__()
    dim, default_depth, heads = vit.SIZES[size]
    self.patch_size = patch_size
    self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
    side = pretrained_image_size // patch_size
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + side * side, dim) * 0.02)
    self.drop = nn.Dropout(dropout)
    self.blocks = nn.Sequential(*(
        Block(dim, heads, dropout, rate)
        for rate in attention.drop_path_rates(drop_path_rate, depth or default_depth)))
    self.norm = nn.LayerNorm(dim, eps=vit.EPSILON)

  def resampled_pos_embed(self, height, width):
    """Position embeddings for an h x w grid: the stored grid resized bicubically with
    antialiasing (as segjax's `vit.resample_pos_embed`) when it differs."""
    side = math.isqrt(self.pos_embed.shape[1] - 1)
    if (height, width) == (side, side):
      return self.pos_embed
    grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode='bicubic', antialias=True,
                         align_corners=False)
    return torch.cat([self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

  def forward(self, images):
    x = self.patch_embed(images)
    batch, dim, height, width = x.shape
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = self.norm(self.blocks(self.drop(x + self.resampled_pos_embed(height, width))))
    return x[:, 1:].transpose(1, 2).reshape(batch, dim, height, width)


class MaskTransformer(nn.Module):
  """segjax.models.segmenter.MaskTransformer: patch tokens [B, D, h, w] -> scores [B, K, h, w]."""

  def __init__(self, num_classes, dim, num_layers, dropout):
    super().__init__()
    self.proj_dec = nn.Linear(dim, dim)
    self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
    self.blocks = nn.Sequential(*(
        Block(dim, dim // segmenter.HEAD_DIM, dropout, eps=segmenter.DECODER_EPSILON)
        for _ in range(num_layers)))
    self.decoder_norm = nn.LayerNorm(dim, eps=segmenter.DECODER_EPSILON)
    self.proj_patch = nn.Linear(dim, dim, bias=False)
    self.proj_classes = nn.Linear(dim, dim, bias=False)
    self.mask_norm = nn.LayerNorm(num_classes, eps=segmenter.DECODER_EPSILON)

  def forward(self, tokens):
    batch, _, height, width = tokens.shape
    k = self.cls_emb.shape[1]
    x = self.proj_dec(tokens.flatten(2).transpose(1, 2))
    x = torch.cat([x, self.cls_emb.expand(batch, -1, -1)], dim=1)
    x = self.decoder_norm(self.blocks(x))
    patches = F.normalize(self.proj_patch(x[:, :-k]).float(), dim=-1, eps=1e-12)
    classes = F.normalize(self.proj_classes(x[:, -k:]).float(), dim=-1, eps=1e-12)
    masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, N, K]
    return masks.transpose(1, 2).reshape(batch, k, height, width)


class Segmenter(nn.Module):
  """segjax.models.segmenter.Model: ViT encoder, linear or mask decoder, bilinear upsampling."""

  def __init__(self, in_channels, model):
    super().__init__()
    dim = vit.SIZES[model.size][0]
    self.backbone = ViT(in_channels, model.size, model.patch_size, model.pretrained_image_size,
                        model.depth, model.drop_path_rate, model.dropout)
    if model.decoder == 'linear':
      self.head = nn.Conv2d(dim, model.num_classes, 1)  # a Dense per patch
    else:
      self.head = MaskTransformer(model.num_classes, dim, model.decoder_layers,
                                  model.decoder_dropout)

  def forward(self, images):
    return resize_to(self.head(self.backbone(images)).float(), *images.shape[-2:])


# ---------------------------------------------------------------------------- dispatch

def from_flax(model, in_channels=3):
  """The torch twin of a segjax flax `Model` instance (U-Net, DeepLab, Segmenter).

  Raises ValueError for a model or a field value that has no twin here.
  """
  if isinstance(model, unet.Model):
    return UNet(in_channels, model.num_classes, model.features, model.depth)
  if isinstance(model, deeplab.Model):
    if model.frozen_bn:
      raise ValueError('torch twin of DeepLab: frozen_bn is not mirrored')
    return DeepLab(in_channels, model)
  if isinstance(model, segmenter.Model):
    if model.stem != 'patch':
      raise ValueError(f'torch twin of Segmenter: stem {model.stem!r} is not mirrored')
    return Segmenter(in_channels, model)
  raise ValueError(f'no torch twin for {type(model).__module__}.{type(model).__name__}')


def num_params(module):
  """Trainable parameters of a torch module."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)
