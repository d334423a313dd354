"""Backbones the segmentation families share: ResNet (atrous, torchvision's layout; the
ResNetV1c deep stem), VGG16 (fully convolutional) and ViT (timm's layout). Each returns its
features for a family's decoder; their published weights are read by `segjax.weights`."""
