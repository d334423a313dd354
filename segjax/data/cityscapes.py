"""Cityscapes, fine annotations: the 19 evaluation classes (trainIds).

Splits: train, 2,975 images; validation, the official val, 500 images (test has no public
labels). Images are the 8-bit left images (leftImg8bit, 1024x2048 PNG). Labels: the
`*_gtFine_labelIds.png` files hold the 34 labelIds (0-33; -1 'license plate' stored as 255);
`LABEL_MAP` maps the 19 evaluated ones to trainIds 0-18 and every other id to 255 (ignore),
as cityscapesScripts' labels.py defines.
"""
import os

from segjax.data import prepare

# trainId -> (name, labelId), from cityscapesScripts' labels.py.
_CLASSES = (
    ('road', 7), ('sidewalk', 8), ('building', 11), ('wall', 12), ('fence', 13),
    ('pole', 17), ('traffic light', 19), ('traffic sign', 20), ('vegetation', 21),
    ('terrain', 22), ('sky', 23), ('person', 24), ('rider', 25), ('car', 26), ('truck', 27),
    ('bus', 28), ('train', 31), ('motorcycle', 32), ('bicycle', 33))
CLASS_NAMES = tuple(name for name, _ in _CLASSES)
IGNORE_LABEL = 255
_TRAIN_IDS = {label_id: train_id for train_id, (_, label_id) in enumerate(_CLASSES)}
# Raw labelId (index) -> trainId or IGNORE_LABEL.
LABEL_MAP = tuple(_TRAIN_IDS.get(raw, IGNORE_LABEL) for raw in range(256))

LAYOUT = """\
Cityscapes is read from {source} in this layout (the zip files extracted there):
  leftImg8bit/{{train,val}}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{{train,val}}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
Get leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from the Cityscapes
website (www.cityscapes-dataset.com, Downloads, free registration)."""
_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'


class CityscapesFine(prepare.FilesBuilder, skip_registration=True):
  """Cityscapes with fine annotations (labelIds), prepared from the original files."""

  name = 'cityscapes_fine'
  HOMEPAGE = 'https://www.cityscapes-dataset.com/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset(range(34)) | {255}

  def find_examples(self, source):
    layout = LAYOUT.format(source=source)
    roots = [os.path.join(source, top, split)
             for top in ('leftImg8bit', 'gtFine') for split in ('train', 'val')]
    missing = [root for root in roots if not os.path.isdir(root)]
    if missing:
      raise prepare.missing_files_error('Cityscapes', missing, layout)
    splits, missing = {}, []
    for split, folder in (('train', 'train'), ('validation', 'val')):
      image_root = os.path.join(source, 'leftImg8bit', folder)
      pairs = []
      for city in sorted(os.listdir(image_root)):
        if not os.path.isdir(os.path.join(image_root, city)):
          continue
        images = prepare.files_by_stem(os.path.join(image_root, city), _IMAGE_SUFFIX)
        for stem, image in images.items():
          label = os.path.join(source, 'gtFine', folder, city, stem + _LABEL_SUFFIX)
          if not os.path.exists(label):
            missing.append(label)
          pairs.append((image, label))
      if not pairs:
        missing.append(os.path.join(image_root, '<city>', '<name>' + _IMAGE_SUFFIX))
      splits[split] = pairs
    if missing:
      raise prepare.missing_files_error('Cityscapes', missing, layout)
    return splits


def load(dataset_config, data_dir):
  builder = CityscapesFine(data_dir=data_dir)
  return prepare.load(builder, prepare.source_dir(dataset_config, data_dir))
