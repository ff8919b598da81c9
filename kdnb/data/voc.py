"""Pascal VOC 2012 segmentation: 20 object classes plus background.

Labels are palette PNGs whose pixel values are the class indices 0..20; 255 marks the
object borders and hard pixels and is ignored. The raw values are already training ids.

Splits: ``train`` (1,464 images) and ``val`` (1,449). With the SBD augmented set in
place (``VOC2012/SegmentationClassAug/*.png``, values 0..20 and 255, and
``ImageSets/Segmentation/train_aug.txt``) the train split becomes the 10,582 images of
``train_aug`` that most papers train on. ``build(..., aug=None)`` uses it when present;
``aug=True`` requires it, ``aug=False`` keeps the official 1,464. Val is always the
official 1,449 images with their ``SegmentationClass`` labels.

Layout under the data root::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png
        ImageSets/Segmentation/{train,val}.txt
        SegmentationClassAug/<id>.png             (optional, SBD)
        ImageSets/Segmentation/train_aug.txt      (optional, SBD)
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .base import SegmentationFolder, missing_error, missing_folder

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val")
FOLDER = "VOCdevkit"
HOW_TO_GET = ("Download VOCtrainval_11-May-2012.tar from "
              "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (or pass download=True) and "
              "extract it into the data root, which then holds VOCdevkit/VOC2012/.")
HOW_TO_GET_AUG = ("The SBD augmented labels come as SegmentationClassAug.zip (PNG labels, "
                  "used by DeepLab) with the list train_aug.txt: unzip the PNGs into "
                  "VOCdevkit/VOC2012/SegmentationClassAug/ and put train_aug.txt in "
                  "VOCdevkit/VOC2012/ImageSets/Segmentation/.")

_BASE = Path("VOC2012")
_REQUIRED = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
             "ImageSets/Segmentation/val.txt")
_AUG = ("SegmentationClassAug", "ImageSets/Segmentation/train_aug.txt")


def color_map(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the index interleaved into R, G and B.

    Entry 255 is the (224, 224, 192) of the borders; pass the flattened map to
    ``PIL.Image.putpalette`` to write VOC-style label PNGs.
    """
    colors = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colors.append((r, g, b))
    return colors


PALETTE = tuple(color_map(NUM_CLASSES))


def _first_missing(base: Path, names) -> str | None:
    return next((name for name in names if not (base / name).exists()), None)



def check(root: Path) -> str | None:
    """None when VOC 2012 is under ``root/VOCdevkit``, else what is missing."""
    if not (Path(root) / FOLDER).is_dir():
        return missing_folder(root, FOLDER)
    missing = _first_missing(Path(root) / FOLDER / _BASE, _REQUIRED)
    return f"missing {FOLDER}/{_BASE}/{missing}" if missing else None


def has_aug(root: Path) -> bool:
    """Whether the SBD augmented labels and ``train_aug.txt`` are in place."""
    return _first_missing(Path(root) / FOLDER / _BASE, _AUG) is None


def _read_ids(path: Path) -> list[str]:
    # Lines are "<id>", or "<image path> <label path>" in some train_aug.txt copies.
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def build(root: Path, split: str = "train", *, aug: bool | None = None,
          **kw) -> SegmentationFolder:
    """Builds a VOC 2012 split.

    Args:
        root: the data root (the folder that contains ``VOCdevkit/``).
        split: ``"train"`` or ``"val"``.
        aug: train on the SBD augmented set (``train_aug``): None = when present.
            Ignored for ``val``.
        **kw: passed to :class:`SegmentationFolder` (``check_labels``).

    Returns:
        A :class:`SegmentationFolder` of ``(image, mask)`` pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"voc has no split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root) / FOLDER / _BASE
    sets = base / "ImageSets" / "Segmentation"
    use_aug = split == "train" and (has_aug(root) if aug is None else aug)
    if use_aug:
        missing = _first_missing(base, _AUG)
        if missing:
            raise missing_error("voc (SBD augmented set)", base, missing, HOW_TO_GET_AUG)
        list_file, label_dir = sets / "train_aug.txt", base / "SegmentationClassAug"
        ids = _read_ids(list_file)
        if (sets / "val.txt").is_file():
            val = set(_read_ids(sets / "val.txt"))
            leaked = [i for i in ids if i in val]
            if leaked:  # some copies of the list hold SBD train+val, which covers VOC val
                warnings.warn(f"{list_file} lists {len(leaked)} val images "
                              f"(e.g. {leaked[0]}); they are left out of training.",
                              stacklevel=2)
                ids = [i for i in ids if i not in val]
    else:
        list_file = sets / f"{split}.txt"
        if not list_file.is_file():
            raise missing_error("voc", sets, list_file.name, HOW_TO_GET)
        ids, label_dir = _read_ids(list_file), base / "SegmentationClass"
    pairs = [(base / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        what = f"{missing[0].name}, listed in {list_file.name} ({len(missing)} missing in all)"
        raise missing_error("voc", missing[0].parent, what,
                            HOW_TO_GET_AUG if use_aug else HOW_TO_GET)
    # Raw values are already train ids (table=None): the label check rejects 21..254.
    return SegmentationFolder(pairs, num_classes=NUM_CLASSES, table=None, classes=CLASSES,
                              palette=PALETTE, **kw)


def download(root: Path) -> None:
    """Downloads and extracts VOC 2012 trainval (2 GB) into ``root`` via torchvision.

    The archive is deleted after extraction unless it was already in ``root``.
    """
    from torchvision.datasets import VOCSegmentation
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    root = Path(root)
    archive = root / DATASET_YEAR_DICT["2012"]["filename"]
    existed = archive.exists()
    VOCSegmentation(root=str(root), year="2012", image_set="train", download=True)
    if not existed:
        archive.unlink(missing_ok=True)
