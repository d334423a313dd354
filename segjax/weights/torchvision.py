"""torchvision's names: ResNet, VGG16(-BN) and MobileNetV3-Large/-Small ImageNet backbones, and
the segmentation models `fcn_resnet50/101`, `deeplabv3_resnet50/101` and
`lraspp_mobilenet_v3_large` whole (backbone, head, auxiliary head).

  torchvision key                         segjax flax path
  conv1 / bn1                             backbone/conv1, backbone/bn1
  layer2.0.conv1, layer2.0.downsample.0   backbone/layer2_0/conv1, .../downsample_conv
  features.{i} (VGG)                      backbone/features_{i}
  classifier.0/3 (VGG fc6/fc7, Linear)    backbone/classifier_0/3 (7x7 / 1x1 convolutions)
  classifier.0.convs.0.{0,1}              aspp/conv1x1/{Conv_0,BatchNorm_0}
  classifier.0.convs.{1,2,3}.{0,1}        aspp/atrous{0,1,2}/...
  classifier.0.convs.4.{1,2}              aspp/pool/...
  classifier.0.project.{0,1}              aspp/project/...
  classifier.{1,2} (DeepLabHead)          head_conv/{Conv_0,BatchNorm_0}
  classifier.4                            classifier (DeepLab), head/classifier (FCN)
  classifier.{0,1} (FCNHead)              head/conv0/{Conv_0,BatchNorm_0}
  aux_classifier.{0,1,4}                  aux_head/conv0/..., aux_head/classifier
  features.0.{0,1} (MobileNetV3)          backbone/stem/{conv,bn}
  features.{i}.block.{j}.{0,1}            backbone/block{i}/{expand,depthwise,project}/...
                                          (j counts the block's layers: no expand where
                                          the expansion keeps the width)
  features.{i}.block.{j}.fc1/fc2          backbone/block{i}/squeeze_excite/fc1, fc2
  features.{N+1}.{0,1} (the last 1x1)     backbone/last/{conv,bn}
  classifier.cbr.{0,1} (LRASPPHead)       project/{Conv_0,BatchNorm_0}
  classifier.scale.1                      gate
  classifier.low/high_classifier          low_classifier, high_classifier

In a segmentation checkpoint the backbone's keys carry 'backbone.' (IntermediateLayerGetter
keeps the ResNet's names; of MobileNetV3 it keeps `features`' children, so its keys lose
'features.': 'backbone.4.block.2.fc1.weight').
"""
from segjax.models.backbones import mobilenetv3
from segjax.weights import layout

_RESNET_RENAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1',
                   **{f'stem_conv{i}': f'stem.{3 * i}' for i in range(3)},
                   **{f'stem_bn{i}': f'stem.{3 * i + 1}' for i in range(3)}}
_FC_KEYS = ('classifier.0.weight', 'classifier.3.weight')  # VGG's fc6 / fc7 Linear weights
CONV_BN = {'Conv_0': '0', 'BatchNorm_0': '1'}  # a ConvBNReLU as nn.Sequential(conv, bn, relu)
_MOBILENET_CONV_BN = {'conv': '0', 'bn': '1'}  # mobilenetv3.ConvBN as Conv2dNormActivation


def resnet_key(collection, path):
  """The key of a ResNet leaf: ('layer2_0', 'downsample_conv', 'kernel') ->
  'layer2.0.downsample.0.weight'; the deep stem ('stem_conv1') -> 'stem.3' (ResNetV1c)."""
  return layout.module_keys(lambda modules: layout.dotted(modules, _RESNET_RENAMES))(
      collection, path)


def resnet():
  """torchvision's `resnet{18,34,50,101}` ImageNet state dict (classifier `fc` unused)."""
  return layout.Table('torchvision ResNet', resnet_key, part='backbone', unused=('fc.',),
                      input_key='conv1.weight')


def _vgg_to_torch(key, array):
  return array.reshape(array.shape[0], -1) if key in _FC_KEYS else array


def _vgg_from_torch(key, array, shape):
  if key in _FC_KEYS:  # Linear (O, I*kh*kw) over (C, H, W)-flattened inputs
    kh, kw, channels, outputs = shape
    return array.reshape(outputs, channels, kh, kw)
  return array


def vgg():
  """torchvision's `vgg16` / `vgg16_bn` state dict (fc8, `classifier.6`, unused); fc6 and
  fc7 are Linear layers there and convolutions here."""
  return layout.Table('torchvision VGG16',
                      layout.module_keys(layout.dotted),
                      part='backbone', unused=('classifier.6.',), input_key='features.0.weight',
                      to_torch=_vgg_to_torch, from_torch=_vgg_from_torch)


def _fcn_head(flax_name, source_name):
  """Names of an FCNHead with one conv (torchvision's FCNHead Sequential)."""
  return {**layout.submodules(f'{flax_name}/conv0', source_name, CONV_BN),
          f'{flax_name}/classifier': f'{source_name}.4'}


def _whole(description, model, head_names):
  unused = () if model.aux_head else ('aux_classifier.',)
  return layout.on_backbone(description, resnet_key, head_names, unused, 'conv1.weight')


def deeplab(model):
  """torchvision's `deeplabv3_resnet50/101` (DeepLabHead, ASPP 12/24/36; `head='torchvision'`)."""
  rates = len(model.aspp_rates) or 3
  after_pool = {'Conv_0': '1', 'BatchNorm_0': '2'}  # a Sequential behind a pooling or conv
  names = {**layout.submodules('aspp/conv1x1', 'classifier.0.convs.0', CONV_BN),
           **layout.submodules('aspp/pool', f'classifier.0.convs.{rates + 1}', after_pool),
           **layout.submodules('aspp/project', 'classifier.0.project', CONV_BN),
           **layout.submodules('head_conv', 'classifier', after_pool),
           'classifier': 'classifier.4', **_fcn_head('aux_head', 'aux_classifier')}
  for i in range(rates):
    names.update(layout.submodules(f'aspp/atrous{i}', f'classifier.0.convs.{i + 1}', CONV_BN))
  return _whole(f'torchvision deeplabv3_resnet{model.backbone_depth}', model, names)


def fcn(model):
  """torchvision's `fcn_resnet50/101` (FCN '8s_atrous', one-conv FCN head)."""
  names = {**_fcn_head('head', 'classifier'), **_fcn_head('aux_head', 'aux_classifier')}
  return _whole(f'torchvision fcn_resnet{model.depth}', model, names)


def _mobilenet_v3_names(arch):
  """{flax module path under the backbone: torchvision module name under `features`} of
  MobileNetV3 `arch`: 'stem/conv' -> '0.0', 'block4/squeeze_excite/fc1' ->
  '4.block.2.fc1', 'last/bn' -> '16.1' (Large)."""
  names = layout.submodules('stem', '0', _MOBILENET_CONV_BN)
  for i, (channels, block) in enumerate(mobilenetv3.blocks(arch), 1):
    parts = ((('expand',) if block.expanded != channels else ()) + ('depthwise',)
             + (('squeeze_excite',) if block.squeeze_excite else ()) + ('project',))
    for j, part in enumerate(parts):
      inner = {'fc1': 'fc1', 'fc2': 'fc2'} if part == 'squeeze_excite' else _MOBILENET_CONV_BN
      names.update(layout.submodules(f'block{i}/{part}', f'{i}.block.{j}', inner))
  names.update(layout.submodules('last', str(len(mobilenetv3.ARCHS[arch]) + 1),
                                  _MOBILENET_CONV_BN))
  return names


def mobilenet_v3(arch):
  """torchvision's `mobilenet_v3_large` / `mobilenet_v3_small` ImageNet state dict
  (`classifier` unused)."""
  names = {path: f'features.{name}' for path, name in _mobilenet_v3_names(arch).items()}
  return layout.Table(f'torchvision {arch}', layout.named_modules(names), part='backbone',
                      unused=('classifier.',), input_key='features.0.0.weight')


def segmentation_mobilenet_v3(arch):
  """The MobileNetV3 backbone of a torchvision segmentation model (keys without
  'features.'; under the 'backbone.' prefix in the whole file)."""
  return layout.Table(f'torchvision {arch} (segmentation backbone)',
                      layout.named_modules(_mobilenet_v3_names(arch)), part='backbone',
                      input_key='0.0.weight')


def lraspp(model):
  """torchvision's `lraspp_mobilenet_v3_large` (and its LRASPP on mobilenet_v3_small, which
  torchvision builds but publishes no weights for)."""
  names = {**layout.submodules('project', 'classifier.cbr', CONV_BN),
           'gate': 'classifier.scale.1', 'low_classifier': 'classifier.low_classifier',
           'high_classifier': 'classifier.high_classifier'}
  return layout.on_backbone(f'torchvision lraspp_{model.backbone}',
                            layout.named_modules(_mobilenet_v3_names(model.backbone)), names,
                            input_key='0.0.weight')


def tables(model):
  """The tables of `model` this source has: (whole-model tables, backbone tables)."""
  kind = type(model).__module__.rsplit('.', 1)[-1]
  if kind == 'deeplab':
    if model.encoder or model.backbone_width != 64 or model.backbone_stem != 'torchvision':
      return [], []
    whole = [deeplab(model)] if model.head == 'torchvision' else []
    return whole, [resnet()]
  if kind == 'fcn':
    if model.width != 64 or model.backbone_stem != 'torchvision':
      return [], []
    if model.backbone.startswith('vgg'):
      return [], [vgg()]
    torchvision_form = (model.variant == '8s_atrous' and model.head_convs == 1
                        and not model.head_concat_input)
    return ([fcn(model)] if torchvision_form else []), [resnet()]
  if kind == 'lraspp':
    return [lraspp(model)], [mobilenet_v3(model.backbone),
                             segmentation_mobilenet_v3(model.backbone)]
  return [], []

