"""ADE20K SceneParsing (ADEChallengeData2016): indoor and outdoor scenes, 150 classes.

Labels are single-channel PNGs with values 0..150: 0 is "other" (everything outside the
150 classes) and becomes 255 = ignore; value ``v`` in 1..150 becomes class ``v - 1``, the
order of the challenge's ``objectInfo150.txt``.

Splits: ``train`` (``training``, 20,210 images) and ``val`` (``validation``, 2,000).

Layout under the data root::

    ADEChallengeData2016/
        images/{training,validation}/ADE_<split>_<n>.jpg
        annotations/{training,validation}/ADE_<split>_<n>.png
"""
from __future__ import annotations

from pathlib import Path

from .base import (SegmentationFolder, lookup_table, missing_error, missing_folder,
                   paired_labels)

CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val")
FOLDER = "ADEChallengeData2016"
URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
# The release publishes no checksum and we have not verified one, so none is checked.
MD5: str | None = None
HOW_TO_GET = (f"Download {URL} (923 MB, or pass download=True) and unzip it into the data "
              f"root, which then holds {FOLDER}/.")

_SPLIT_DIRS = {"train": "training", "val": "validation"}


def _palette(n: int) -> tuple[tuple[int, int, int], ...]:
    # The R3 low-discrepancy sequence (Roberts 2018) in RGB: fixed and evenly spread, no
    # two of the 150 colours closer than 28 levels; channels stay in 40..255 (no black).
    g = 1.22074408460575947536  # the root of x**4 = x + 1
    steps = (1 / g, 1 / g**2, 1 / g**3)
    return tuple(tuple(round(40 + 215 * ((0.5 + a * (i + 1)) % 1.0)) for a in steps)
                 for i in range(n))


PALETTE = _palette(NUM_CLASSES)



def check(root: Path) -> str | None:
    """None when ADE20K is under ``root/ADEChallengeData2016``, else what is missing."""
    base = Path(root) / FOLDER
    if not base.is_dir():
        return missing_folder(root, FOLDER)
    for kind in ("images", "annotations"):
        for sub in _SPLIT_DIRS.values():
            if not (base / kind / sub).is_dir():
                return f"missing {FOLDER}/{kind}/{sub}/"
    return None


def label_table():
    """The 256-entry raw -> train id table: 0 -> 255, v -> v - 1 for v in 1..150.

    Values 151..254 are not ADE20K labels and pass through unchanged, so the label check
    of :class:`SegmentationFolder` rejects them by their raw value.
    """
    mapping = {v: v for v in range(NUM_CLASSES + 1, 256)}
    mapping.update({v: v - 1 for v in range(1, NUM_CLASSES + 1)})
    mapping[0] = 255
    return lookup_table(mapping)


def build(root: Path, split: str = "train", **kw) -> SegmentationFolder:
    """Builds an ADE20K split.

    Args:
        root: the data root (the folder that contains ``ADEChallengeData2016/``).
        split: ``"train"`` or ``"val"``.
        **kw: passed to :class:`SegmentationFolder` (``check_labels``).

    Returns:
        A :class:`SegmentationFolder` of ``(image, mask)`` pairs sorted by name.
    """
    if split not in SPLITS:
        raise ValueError(f"ade20k has no split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root) / FOLDER
    image_dir = base / "images" / _SPLIT_DIRS[split]
    label_dir = base / "annotations" / _SPLIT_DIRS[split]
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise missing_error("ade20k", image_dir, "*.jpg images", HOW_TO_GET)
    pairs = paired_labels("ade20k", images, lambda image: label_dir / f"{image.stem}.png",
                          HOW_TO_GET)
    return SegmentationFolder(pairs, num_classes=NUM_CLASSES, table=label_table(),
                              classes=CLASSES, palette=PALETTE, **kw)


def download(root: Path) -> None:
    """Downloads and extracts ADEChallengeData2016.zip into ``root``.

    The archive is deleted after extraction unless it was already in ``root``.
    """
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root)
    filename = URL.rsplit("/", 1)[-1]
    existed = (root / filename).exists()
    download_and_extract_archive(URL, str(root), filename=filename, md5=MD5,
                                 remove_finished=not existed)
