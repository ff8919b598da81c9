"""Datasets: the embedded SynthScenes and loaders for Pascal VOC, Cityscapes, ADE20K, CamVid.

One entry point, :func:`build_dataset`. With ``train=False`` and no resizing, a sample is
``(image FloatTensor (3, H, W) in [0, 1], mask LongTensor (H, W))`` at native size, with
255 = ignore. With ``train=True`` the joint training transform (random scale, crop with
ignore padding, flip) is applied, reproducibly per ``(seed, epoch, index)``.

Each real dataset lives in its own module with the same interface: ``CLASSES``,
``PALETTE``, ``NUM_CLASSES``, ``SPLITS``, ``FOLDER`` (its folder name under the data root),
``build(root, split, **kw) -> SegmentationFolder``, ``check(root) -> str | None`` (None when
present, else what is missing), ``HOW_TO_GET`` (a sentence), and ``download(root)`` where a
public URL exists.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from ..options import check_options, keyword_parameters
from .base import (IGNORE_INDEX, DatasetNotFoundError, SegmentationFolder, data_root,
                   read_image, read_label)
from .synth import SynthScenes
from .sampler import CheckedCollate, Indexed, StepSampler, collate
from .transforms import Augmented, TrainTransform

#: dataset name -> module under kdnb.data (SynthScenes is built in).
REAL_DATASETS = {"voc": "voc", "cityscapes": "cityscapes", "ade20k": "ade20k", "camvid": "camvid"}

#: default training crop per dataset (docs/METHODS.md, "Training recipe and model pairs"); SynthScenes keeps its size.
DEFAULT_CROP = {"voc": (512, 512), "cityscapes": (512, 1024), "ade20k": (512, 512),
                "camvid": (360, 480)}


def available_datasets() -> list[str]:
    return ["synth", *REAL_DATASETS]


def dataset_module(name: str):
    """The module implementing a real dataset (``voc``, ``cityscapes``...)."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: "
                         f"{', '.join(available_datasets())}")
    return importlib.import_module(f"{__name__}.{REAL_DATASETS[name]}")


def dataset_info(name: str) -> dict:
    """Classes, palette, class count and ignore index of a dataset, without reading it."""
    if name == "synth":
        return {"classes": SynthScenes.classes, "palette": SynthScenes.palette,
                "num_classes": SynthScenes.num_classes, "ignore_index": IGNORE_INDEX}
    mod = dataset_module(name)
    return {"classes": mod.CLASSES, "palette": mod.PALETTE, "num_classes": mod.NUM_CLASSES,
            "ignore_index": IGNORE_INDEX}


#: build_dataset's own keywords, which a dataset option may not repeat (who sets each).
_SET_BY_BUILD = {"seed": "the run's seed, --seed", "crop_size": "--crop",
                 "scale_range": "the config's scale_range", "flip": "--no-flip"}


def check_dataset_options(name: str, options: dict) -> None:
    """Refuses dataset options (``--data-arg``, ``data_kwargs``) that the dataset does not
    take, or of the wrong type (``size=abc``), listing the valid names; cheap (nothing is
    read)."""
    if name == "synth":
        accepted = keyword_parameters(SynthScenes.__init__, skip=("split", *_SET_BY_BUILD))
    else:
        build = dataset_module(name).build
        params = inspect.signature(build).parameters.values()
        forwards = any(p.kind == p.VAR_KEYWORD for p in params)  # **kw to SegmentationFolder
        accepted = keyword_parameters(build, *([SegmentationFolder.__init__] if forwards else []),
                                      skip=("root", "split", *_SET_BY_BUILD))
    check_options(options, accepted, what=f"dataset {name}", flag="--data-arg",
                  fixed=_SET_BY_BUILD)


def build_dataset(name: str, root: str | Path | None = None, split: str = "train",
                  train: bool = False, *, crop_size=None, scale_range=None, flip: bool = True,
                  seed: int = 0, download: bool = False, **kw):
    """Builds a dataset by name.

    Args:
        name: ``"synth"``, ``"voc"``, ``"cityscapes"``, ``"ade20k"`` or ``"camvid"``.
        root: the data root (default: :func:`kdnb.data.base.data_root`); each dataset
            looks in its own folder below it.
        split: ``"train"``, ``"val"`` or ``"test"`` (what the dataset has).
        train: apply the random training transform.
        crop_size: training crop ``(h, w)``; default per dataset (SynthScenes: no crop).
        scale_range: training rescale range; default (0.5, 2.0), SynthScenes (1.0, 1.0).
        flip: random horizontal flip in training.
        seed: seed of the training augmentation.
        download: fetch the dataset first if it is missing and a public URL exists.
        **kw: passed to the dataset (``size``, ``length``... for SynthScenes).

    Returns:
        A ``Dataset`` of ``(image, mask)`` pairs with ``classes``, ``palette`` and
        ``num_classes`` attributes.
    """
    if name == "synth":
        dataset = SynthScenes(split, **kw)
        default_crop, default_scale = None, (1.0, 1.0)
    else:
        mod = dataset_module(name)
        base = data_root(root)
        if split not in mod.SPLITS:
            raise ValueError(f"{name} has no split {split!r}; choose one of {list(mod.SPLITS)}")
        problem = mod.check(base)
        if problem and download:
            if not hasattr(mod, "download"):
                raise DatasetNotFoundError(f"{name} has no public download: {mod.HOW_TO_GET}")
            mod.download(base)
            problem = mod.check(base)
        if problem:
            raise DatasetNotFoundError(
                f"{name} not found or incomplete under {base / mod.FOLDER}: {problem}. "
                f"{mod.HOW_TO_GET} Point kdnb elsewhere with root=... / --root DIR or the "
                "KDNB_DATA environment variable; data/README.md shows the expected layout.")
        dataset = mod.build(base, split, **kw)
        default_crop, default_scale = DEFAULT_CROP[name], (0.5, 2.0)
    if not train:
        return dataset
    transform = TrainTransform(crop_size=crop_size or default_crop,
                               scale_range=scale_range or default_scale, flip=flip,
                               ignore_index=IGNORE_INDEX)
    return Augmented(dataset, transform, seed=seed)


def validate_dataset(dataset, *, samples: int = 3) -> dict[tuple[int, int], str]:
    """Checks a dataset before long work starts; an error names the file and the fix.

    Every file of an on-disk dataset is checked cheaply (headers, modes and end markers,
    see :meth:`SegmentationFolder.scan`); ``samples`` samples spread over the dataset are
    read in full, which checks pixel data, label values against the classes and
    image/label sizes. For a training set (:class:`Augmented` with a crop) the crop is
    checked against the size of those samples: a crop that padding would mostly fill is
    refused.

    Returns:
        The image sizes seen, ``(H, W)`` -> one file of that size (or ``"sample <i>"``):
        every file of an on-disk dataset, the samples read of another.

    Raises:
        ValueError or OSError: what is wrong, naming the file, and what to do.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no samples: check the split list and the data root "
                         "(`kdnb datasets` shows where kdnb looks)")
    base = getattr(dataset, "dataset", dataset)  # Augmented wraps the dataset it transforms
    seen = {}
    if isinstance(base, SegmentationFolder):
        for size, (image, _) in zip(base.scan(), base.pairs):
            seen.setdefault(size, str(image))
    picks = sorted({round(k * (n - 1) / max(samples - 1, 1)) for k in range(min(samples, n))})
    sizes = [tuple(base[i][0].shape[-2:]) for i in picks]
    for i, size in zip(picks, sizes):
        seen.setdefault(size, f"sample {i}")
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, TrainTransform) and transform.crop_size is not None:
        check_crop(transform.crop_size, transform.scale_range, sizes)
    return seen


#: Below this share of image pixels in a crop (at the largest scale) the crop is refused.
MIN_CROP_COVER = 0.25


def check_crop(crop_size, scale_range, sizes) -> None:
    """Refuses a training crop that padding (ignored pixels) would mostly fill.

    The crop is compared with the largest of ``sizes`` (``(H, W)`` of sampled images)
    scaled by the largest factor of ``scale_range``: under :data:`MIN_CROP_COVER` of the
    crop would be image there, so every crop would be mostly padding.
    """
    ch, cw = crop_size
    top = scale_range[1]
    h, w = max(sizes, key=lambda hw: hw[0] * hw[1])
    cover = min(1.0, top * h / ch) * min(1.0, top * w / cw)
    if cover < MIN_CROP_COVER:
        fit_h, fit_w = max(1, int(top * h)), max(1, int(top * w))
        raise ValueError(f"crop {ch}x{cw} is too large for images of {h}x{w} (the largest "
                         f"sampled) even at the largest scale {top:g}: padding would fill "
                         f"{100 * (1 - cover):.0f}% of every crop. Lower the crop to at most "
                         f"{fit_h} {fit_w} (--crop H W / crop_size), or raise the scale range")


__all__ = [
    "Augmented", "DatasetNotFoundError", "IGNORE_INDEX", "Indexed", "SegmentationFolder",
    "StepSampler", "SynthScenes", "TrainTransform", "available_datasets", "build_dataset",
    "CheckedCollate", "check_crop", "check_dataset_options", "collate",
    "data_root", "dataset_info", "dataset_module", "read_image", "read_label",
    "validate_dataset",
]
