"""Backbones the segmentation families share: ResNet (atrous, torchvision's layout; the
ResNetV1c deep stem), VGG16 (fully convolutional), ViT (timm's layout), MobileNetV3
(torchvision's), SegFormer's MiT, ConvNeXt and Swin. Each returns its features for a
family's decoder; their published weights are read by `segjax.weights`."""
