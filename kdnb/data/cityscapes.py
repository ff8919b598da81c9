"""Cityscapes, fine annotations: street scenes of 50 cities at 1024x2048, 19 classes.

Labels are the official ``*_gtFine_labelIds.png`` files (single channel, ids 0..33). They
are mapped to the 19 training ids exactly as cityscapesScripts' ``labels.py`` does (road
7->0, sidewalk 8->1, ..., bicycle 33->18); every other id (unlabeled, ego vehicle, ground,
parking, guard rail, bridge, tunnel, polegroup, caravan, trailer, and the license plate's
-1, which an 8-bit file stores as 255) becomes 255 = ignore.

Splits: ``train`` (2,975 images), ``val`` (500) and ``test`` (1,525, whose public labels
are withheld, so every pixel is ignore).

Layout under the data root::

    cityscapes/
        leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
        gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png
"""
from __future__ import annotations

from pathlib import Path

from .base import (SegmentationFolder, lookup_table, missing_error, missing_folder,
                   paired_labels)

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val", "test")
FOLDER = "cityscapes"
HOW_TO_GET = ("Cityscapes needs a login: register at https://www.cityscapes-dataset.com, "
              "download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip and unzip "
              "both into <data root>/cityscapes/.")

#: labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py).
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"



def check(root: Path) -> str | None:
    """None when Cityscapes is under ``root/cityscapes``, else what is missing."""
    base = Path(root) / FOLDER
    if not base.is_dir():
        return missing_folder(root, FOLDER)
    for sub in ("leftImg8bit", "gtFine"):
        if not (base / sub).is_dir():
            return f"missing {FOLDER}/{sub}/ (from {sub}_trainvaltest.zip)"
    return None


def label_table():
    """The 256-entry labelId -> trainId table.

    Ids 0..33 outside the 19 classes and 255 (the license plate's -1) map to 255; values
    34..254 are not Cityscapes ids and pass through unchanged, so the label check of
    :class:`SegmentationFolder` rejects them by their raw value.
    """
    mapping = {v: v for v in range(NUM_LABEL_IDS, 255)}
    mapping.update({v: LABEL_TO_TRAIN.get(v, 255) for v in range(NUM_LABEL_IDS)})
    return lookup_table(mapping)


def build(root: Path, split: str = "train", **kw) -> SegmentationFolder:
    """Builds a Cityscapes split from the fine annotations.

    Args:
        root: the data root (the folder that contains ``cityscapes/``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        **kw: passed to :class:`SegmentationFolder` (``check_labels``).

    Returns:
        A :class:`SegmentationFolder` of ``(image, mask)`` pairs, sorted by city and name.
    """
    if split not in SPLITS:
        raise ValueError(f"cityscapes has no split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root) / FOLDER
    image_dir, label_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise missing_error("cityscapes", image_dir, f"<city>/*{_IMAGE_SUFFIX}", HOW_TO_GET)
    pairs = paired_labels("cityscapes", images, lambda image: (
        label_dir / image.parent.name / f"{image.name[:-len(_IMAGE_SUFFIX)]}{_LABEL_SUFFIX}"),
        HOW_TO_GET)
    return SegmentationFolder(pairs, num_classes=NUM_CLASSES, table=label_table(),
                              classes=CLASSES, palette=PALETTE, **kw)
