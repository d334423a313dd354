"""ADE20K as the MIT Scene Parsing benchmark release ADEChallengeData2016 (150 classes).

Splits: train ('training'), 20,210 images; validation ('validation'), 2,000 images. Labels:
the annotation PNGs hold 0 for "other / unlabelled" and 1-150 for the classes of
objectInfo150.csv; `LABEL_MAP` sends 0 to 255 (ignore) and k to k - 1 (mmsegmentation's
`reduce_zero_label`), so class indices are 0-149 in the order of `CLASS_NAMES` (the
csv's first name of each row).

Not the same data as TFDS's `scene_parse150`: that builder reads the 2017 challenge's
`annotations_instance` (instance masks) and calls the validation images 'test'; numbers
on it are not comparable with published ADE20K results.
"""
import os

from segjax.data import prepare

CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea',
    'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river',
    'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier',
    'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track',
    'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer',
    'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave',
    'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate',
    'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')
IGNORE_LABEL = 255
# Raw annotation value (index) -> class index or IGNORE_LABEL.
LABEL_MAP = (IGNORE_LABEL,) + tuple(range(len(CLASS_NAMES))) + (IGNORE_LABEL,) * (
    256 - 1 - len(CLASS_NAMES))

LAYOUT = """\
ADE20K (ADEChallengeData2016) is read from {source} in this layout (the zip extracted there;
the contents of ADEChallengeData2016/ directly in {source} are accepted too):
  ADEChallengeData2016/images/training/ADE_train_<n>.jpg
  ADEChallengeData2016/images/validation/ADE_val_<n>.jpg
  ADEChallengeData2016/annotations/training/ADE_train_<n>.png
  ADEChallengeData2016/annotations/validation/ADE_val_<n>.png
Get ADEChallengeData2016.zip from the MIT Scene Parsing Benchmark site
(sceneparsing.csail.mit.edu, "Data")."""


class AdeChallenge2016(prepare.FilesBuilder, skip_registration=True):
  """ADE20K scene parsing (ADEChallengeData2016), prepared from the original files."""

  name = 'ade_challenge2016'
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  RAW_LABELS = frozenset(range(len(CLASS_NAMES) + 1))

  def find_examples(self, source):
    layout = LAYOUT.format(source=source)
    root = prepare.first_dir([os.path.join(source, 'ADEChallengeData2016'), source])
    folders = {'train': 'training', 'validation': 'validation'}
    needed = [os.path.join(root, kind, folder)
              for kind in ('images', 'annotations') for folder in folders.values()]
    missing = [path for path in needed if not os.path.isdir(path)]
    if missing:
      raise prepare.missing_files_error('ADE20K', missing, layout)
    splits, missing = {}, []
    for split, folder in folders.items():
      images = prepare.files_by_stem(os.path.join(root, 'images', folder), '.jpg')
      labels = prepare.files_by_stem(os.path.join(root, 'annotations', folder), '.png')
      missing += [os.path.join(root, 'annotations', folder, f'{name}.png')
                  for name in images if name not in labels]
      if not images:
        missing.append(os.path.join(root, 'images', folder, '<name>.jpg'))
      splits[split] = [(image, labels.get(name)) for name, image in images.items()]
    if missing:
      raise prepare.missing_files_error('ADE20K', missing, layout)
    return splits


def load(dataset_config, data_dir):
  builder = AdeChallenge2016(data_dir=data_dir)
  return prepare.load(builder, prepare.source_dir(dataset_config, data_dir))
