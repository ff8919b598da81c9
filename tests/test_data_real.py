"""The real-dataset loaders on tiny trees written in each dataset's exact on-disk format.

Images are real JPEG/PNG files and labels real PNGs (VOC palette PNGs, "L" PNGs for the
others), so the code under test reads what it reads in the field. Downloads are served
from a local HTTP server on 127.0.0.1.
"""
import hashlib
import http.server
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdnb.data import (DatasetNotFoundError, ade20k, build_dataset, camvid, cityscapes,
                       dataset_info, dataset_module, validate_dataset, voc)

H, W = 12, 16  # native size of every test image


# ---------------------------------------------------------------- writing files

def write_image(path: Path, seed: int = 0, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # format from the suffix: .jpg or .png
    return path


def write_label(path: Path, values: np.ndarray, palette=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8))  # mode "L"
    if palette is not None:
        image.putpalette([c for rgb in palette for c in rgb])  # mode "P"
    image.save(path)
    return path


def random_label(seed: int, high: int, size=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size, dtype=np.uint8)


def make_voc(root: Path, train=("a1", "a2"), val=("b1",), aug=None) -> Path:
    """VOCdevkit/VOC2012 with palette PNGs: class indices inside, a 255 border."""
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train), ("val", val)):
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for seed, name in enumerate(sorted({*train, *val, *(aug or ())})):
        write_image(base / "JPEGImages" / f"{name}.jpg", seed)
        label = random_label(seed, 21)
        label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 255
        write_label(base / "SegmentationClass" / f"{name}.png", label, voc.color_map())
    if aug is not None:
        (sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in aug))
        for seed, name in enumerate(aug):
            write_label(base / "SegmentationClassAug" / f"{name}.png", random_label(seed, 21))
    return base


def make_cityscapes(root: Path, counts=None) -> Path:
    base = root / "cityscapes"
    counts = counts or {"train": 3, "val": 2, "test": 1}
    for split, n in counts.items():
        for k in range(n):
            city = ("aachen", "bremen")[k % 2]
            name = f"{city}_{k:06d}_000019"
            write_image(base / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", k)
            write_label(base / "gtFine" / split / city / f"{name}_gtFine_labelIds.png",
                        random_label(k, 34))
    return base


def make_ade(root: Path, counts=None) -> Path:
    base = root / "ADEChallengeData2016"
    counts = counts or {"training": 3, "validation": 2}
    for sub, n in counts.items():
        tag = "train" if sub == "training" else "val"
        for k in range(n):
            write_image(base / "images" / sub / f"ADE_{tag}_{k:08d}.jpg", k)
            write_label(base / "annotations" / sub / f"ADE_{tag}_{k:08d}.png",
                        random_label(k, 151))
    return base


def make_camvid(root: Path, counts=None) -> Path:
    base = root / "CamVid"
    counts = counts or {"train": 3, "val": 2, "test": 2}
    for split, n in counts.items():
        for k in range(n):
            write_image(base / split / f"0001TP_{k:06d}.png", k)
            write_label(base / f"{split}annot" / f"0001TP_{k:06d}.png", random_label(k, 12))
    return base


MAKERS = {"voc": make_voc, "cityscapes": make_cityscapes, "ade20k": make_ade,
          "camvid": make_camvid}


def first_label(name: str, base: Path) -> Path:
    pattern = {"voc": "SegmentationClass/*.png", "cityscapes": "gtFine/train/*/*.png",
               "ade20k": "annotations/training/*.png", "camvid": "trainannot/*.png"}[name]
    return sorted(base.glob(pattern))[0]


def first_image(name: str, base: Path) -> Path:
    pattern = {"voc": "JPEGImages/*.jpg", "cityscapes": "leftImg8bit/train/*/*.png",
               "ade20k": "images/training/*.jpg", "camvid": "train/*.png"}[name]
    return sorted(base.glob(pattern))[0]


def raw(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------- interface and metadata

@pytest.mark.parametrize("name", list(MAKERS))
def test_module_interface(name):
    mod = dataset_module(name)
    assert mod.NUM_CLASSES == len(mod.CLASSES) == len(mod.PALETTE)
    assert len(set(mod.CLASSES)) == mod.NUM_CLASSES
    assert len(set(mod.PALETTE)) == mod.NUM_CLASSES  # distinct colours
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in mod.PALETTE)
    assert set(mod.SPLITS) <= {"train", "val", "test"} and "train" in mod.SPLITS
    assert mod.FOLDER and mod.HOW_TO_GET
    assert dataset_info(name)["num_classes"] == mod.NUM_CLASSES


def test_class_counts_and_known_colours():
    assert (voc.NUM_CLASSES, cityscapes.NUM_CLASSES, ade20k.NUM_CLASSES, camvid.NUM_CLASSES) \
        == (21, 19, 150, 11)
    assert voc.PALETTE[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert voc.color_map()[255] == (224, 224, 192)
    assert ade20k.CLASSES[0] == "wall" and ade20k.CLASSES[-1] == "flag"
    assert cityscapes.PALETTE[0] == (128, 64, 128) and cityscapes.CLASSES[-1] == "bicycle"


# ---------------------------------------------------------------- samples and label mapping

@pytest.mark.parametrize("name", list(MAKERS))
def test_samples_are_float_images_and_int64_masks_at_native_size(name, tmp_path):
    MAKERS[name](tmp_path)
    dataset = build_dataset(name, root=tmp_path, split="train", train=False)
    image, mask = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    valid = mask[mask != 255]
    assert valid.min() >= 0 and valid.max() < dataset.num_classes
    assert dataset.classes == dataset_module(name).CLASSES


@pytest.mark.parametrize("name, counts", [
    ("voc", {"train": 2, "val": 1}),
    ("cityscapes", {"train": 3, "val": 2, "test": 1}),
    ("ade20k", {"train": 3, "val": 2}),
    ("camvid", {"train": 3, "val": 2, "test": 2}),
])
def test_number_of_samples_per_split(name, counts, tmp_path):
    MAKERS[name](tmp_path)
    assert {s: len(build_dataset(name, root=tmp_path, split=s)) for s in counts} == counts


def test_voc_keeps_palette_indices_and_border(tmp_path):
    base = make_voc(tmp_path)
    path = base / "SegmentationClass" / "a1.png"
    with Image.open(path) as label:
        assert label.mode == "P"
    _, mask = build_dataset("voc", root=tmp_path, split="train", aug=False)[0]
    assert torch.equal(mask, torch.from_numpy(raw(path)))
    assert (mask[0] == 255).all() and (mask[:, -1] == 255).all()
    assert set(mask[1:-1, 1:-1].unique().tolist()) <= set(range(21))


def test_voc_follows_the_split_file_order(tmp_path):
    base = make_voc(tmp_path, train=("c3", "a1", "b2"))
    dataset = build_dataset("voc", root=tmp_path, split="train")
    assert [p.stem for p, _ in dataset.pairs] == ["c3", "a1", "b2"]
    assert dataset.pairs[0][0] == base / "JPEGImages" / "c3.jpg"


def test_voc_prefers_the_sbd_augmented_set(tmp_path):
    base = make_voc(tmp_path, train=("a1", "a2"), val=("b1",), aug=("a1", "a2", "s1", "s2"))
    dataset = build_dataset("voc", root=tmp_path, split="train")
    assert len(dataset) == 4
    assert all(label.parent.name == "SegmentationClassAug" for _, label in dataset.pairs)
    _, mask = dataset[2]
    assert torch.equal(mask, torch.from_numpy(raw(base / "SegmentationClassAug" / "s1.png")))
    assert len(build_dataset("voc", root=tmp_path, split="train", aug=False)) == 2
    val = build_dataset("voc", root=tmp_path, split="val", aug=True)  # val stays official
    assert [label.parent.name for _, label in val.pairs] == ["SegmentationClass"]


def test_voc_train_aug_leaves_out_val_images(tmp_path):
    make_voc(tmp_path, train=("a1",), val=("b1",), aug=("a1", "b1", "s1"))
    with pytest.warns(UserWarning, match="1 val images"):
        dataset = build_dataset("voc", root=tmp_path, split="train")
    assert [p.stem for p, _ in dataset.pairs] == ["a1", "s1"]


def test_voc_aug_requested_but_absent(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="SegmentationClassAug"):
        build_dataset("voc", root=tmp_path, split="train", aug=True)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    base = tmp_path / "cityscapes"
    ids = np.concatenate([np.arange(34), [255], np.zeros(H * W - 35, dtype=int)]).reshape(H, W)
    write_image(base / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    write_label(base / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", ids)
    _, mask = build_dataset("cityscapes", root=tmp_path, split="val")[0]
    flat = mask.flatten().tolist()
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert flat[:34] == [official.get(i, 255) for i in range(34)]
    assert flat[34] == 255  # license plate (-1 in 8 bits)
    assert set(flat[35:]) == {255}  # unlabeled
    assert sorted(official.values()) == list(range(19))


def test_ade20k_maps_other_to_ignore_and_shifts_classes(tmp_path):
    base = make_ade(tmp_path)
    label = base / "annotations" / "training" / "ADE_train_00000000.png"
    values = np.arange(H * W).reshape(H, W) % 151  # 0..150, zeros included
    write_label(label, values)
    _, mask = build_dataset("ade20k", root=tmp_path, split="train")[0]
    expected = np.where(values == 0, 255, values - 1)
    assert torch.equal(mask, torch.from_numpy(expected))
    assert mask.max() == 255 and mask[mask != 255].max() == 149


def test_camvid_maps_unlabelled_to_ignore(tmp_path):
    base = make_camvid(tmp_path)
    label = first_label("camvid", base)
    values = np.arange(H * W).reshape(H, W) % 12  # 0..11
    write_label(label, values)
    _, mask = build_dataset("camvid", root=tmp_path, split="train")[0]
    assert torch.equal(mask, torch.from_numpy(np.where(values == 11, 255, values)))


# ---------------------------------------------------------------- Pillow modes

GRAY = np.arange(H * W, dtype=np.uint8).reshape(H, W) * 2 % 251  # 0..250
RGB = np.stack([GRAY, 250 - GRAY, GRAY // 2], axis=-1)
PALETTE_COLOURS = [(0, 0, 0), (255, 0, 0), (0, 128, 255), (40, 80, 120)]


def gray3(values: np.ndarray, full: float) -> np.ndarray:
    return np.repeat((values.astype(np.float64) / full)[..., None], 3, axis=2)


def palette_image() -> Image.Image:
    image = Image.fromarray(GRAY % 4).convert("P")
    image.putpalette([c for rgb in PALETTE_COLOURS for c in rgb])
    return image


#: mode -> (the file: an image and the format it is saved in, the RGB floats it must read as)
IMAGE_MODES = {
    "1": (lambda: Image.fromarray(GRAY > 100), "PNG", lambda: gray3(GRAY > 100, 1)),
    "L": (lambda: Image.fromarray(GRAY), "PNG", lambda: gray3(GRAY, 255)),
    "LA": (lambda: Image.fromarray(np.stack([GRAY, 255 - GRAY], -1), "LA"), "PNG",
           lambda: gray3(GRAY, 255)),  # the alpha is dropped
    "P": (palette_image, "PNG", lambda: np.array(PALETTE_COLOURS)[GRAY % 4] / 255),
    "RGB": (lambda: Image.fromarray(RGB), "PNG", lambda: RGB / 255),
    "RGBA": (lambda: Image.fromarray(np.concatenate([RGB, RGB[..., :1]], -1), "RGBA"), "PNG",
             lambda: RGB / 255),
    # the bug: 16-bit PNGs read as 8 bits clip to 1.0; they are scaled by 65535
    "I;16": (lambda: Image.fromarray(GRAY.astype(np.uint16) * 261), "PNG",
             lambda: gray3(GRAY.astype(np.uint16) * 261, 65535)),
    "CMYK": (lambda: Image.fromarray(RGB).convert("CMYK"), "JPEG", None),  # Pillow's RGB of it
    "I": (lambda: Image.fromarray(GRAY.astype(np.int32) * 261), "TIFF",
          lambda: gray3(GRAY.astype(np.int32) * 261, 65535)),
    "F": (lambda: Image.fromarray(GRAY.astype(np.float32) / 250), "TIFF",
          lambda: gray3(GRAY.astype(np.float32) / 250, 1)),
}


def camvid_with(tmp_path, image=None, label=None, fmt="PNG", label_fmt="PNG"):
    """A CamVid tree whose first train image and/or label is replaced (the name stays
    ``.png``: Pillow reads any format by its content)."""
    base = make_camvid(tmp_path)
    if image is not None:
        image.save(first_image("camvid", base), format=fmt)
    if label is not None:
        label.save(first_label("camvid", base), format=label_fmt)
    return base


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_every_image_mode_reads_by_the_range_of_its_type(mode, tmp_path):
    make, fmt, expected = IMAGE_MODES[mode]
    base = camvid_with(tmp_path, make(), fmt=fmt)
    with Image.open(first_image("camvid", base)) as written:
        assert written.mode == mode
        want = expected() if expected else np.asarray(written.convert("RGB")) / 255
    dataset = build_dataset("camvid", root=tmp_path, split="train")
    validate_dataset(dataset)
    image, _ = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image, torch.from_numpy(want).permute(2, 0, 1).float(), atol=1e-6)
    if mode == "I;16":  # the bug read 99.7 % of a 16-bit image's pixels as 1.0
        assert image.max() < 1.0 and image.mean() > 0.3


def test_a_16_bit_image_holding_8_bit_values_warns_that_it_reads_dark(tmp_path):
    """8-bit data saved as a 16-bit PNG reads 257x darker (it is scaled by 65535): a
    warning names the folder, the mode and the fix, once for a folder of such images; real
    16-bit data does not warn."""
    import warnings

    base = camvid_with(tmp_path, Image.fromarray(GRAY.astype(np.uint16)))
    second = sorted(first_image("camvid", base).parent.glob("*.png"))[1]
    Image.fromarray(GRAY.astype(np.uint16) // 2 + 1).save(second)
    dataset = build_dataset("camvid", root=tmp_path, split="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own rule: once per message and place
        images = [dataset[i][0] for i in range(len(dataset))]
    dark = [str(w.message) for w in caught if "257x darker" in str(w.message)]
    assert len(dark) == 1, dark  # two such files in one folder: one warning
    assert str(first_image("camvid", base).parent) in dark[0] and "'I;16'" in dark[0]
    assert "Save them as 8-bit PNGs" in dark[0] and images[0].max() <= 255 / 65535 + 1e-6
    camvid_with(tmp_path / "real", Image.fromarray(GRAY.astype(np.uint16) * 261))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("camvid", root=tmp_path / "real", split="train")[0]


@pytest.mark.parametrize("mode, make, words", [
    ("I", lambda: Image.fromarray(GRAY.astype(np.int32) * 1000), "outside 0..65535"),
    ("F", lambda: Image.fromarray(GRAY.astype(np.float32)), "outside 0..1"),
    ("LAB", lambda: Image.new("LAB", (W, H)), "which kdnb does not read as an image"),
])
def test_images_of_unknown_range_or_mode_are_refused(mode, make, words, tmp_path):
    base = camvid_with(tmp_path, make(), fmt="TIFF")
    dataset = build_dataset("camvid", root=tmp_path, split="train")
    with pytest.raises(ValueError) as err:
        validate_dataset(dataset)
    message = str(err.value)
    assert str(first_image("camvid", base)) in message and f"mode {mode!r}" in message
    assert words in message and "save it as an 8-bit RGB PNG" in message


LABEL_IDS = np.arange(H * W).reshape(H, W) % 12  # CamVid's raw ids 0..11


@pytest.mark.parametrize("mode, make", [
    ("L", lambda: Image.fromarray(LABEL_IDS.astype(np.uint8))),
    ("P", lambda: write_label_palette(LABEL_IDS)),
    ("I;16", lambda: Image.fromarray(LABEL_IDS.astype(np.uint16))),
    ("I", lambda: Image.fromarray(LABEL_IDS.astype(np.int32))),
    ("1", lambda: Image.fromarray(LABEL_IDS % 2 == 1)),
])
def test_label_modes_that_hold_class_ids(mode, make, tmp_path):
    base = camvid_with(tmp_path, label=make(), label_fmt="TIFF" if mode == "I" else "PNG")
    with Image.open(first_label("camvid", base)) as written:
        assert written.mode == mode
    ids = LABEL_IDS % 2 if mode == "1" else LABEL_IDS
    dataset = build_dataset("camvid", root=tmp_path, split="train")
    validate_dataset(dataset)
    assert torch.equal(dataset[0][1], torch.from_numpy(np.where(ids == 11, 255, ids)))


def write_label_palette(ids: np.ndarray) -> Image.Image:
    image = Image.fromarray(ids.astype(np.uint8)).convert("P")
    image.putpalette([c for rgb in camvid.PALETTE for c in rgb])
    return image


@pytest.mark.parametrize("mode, make, fmt, words", [
    ("RGB", lambda: Image.fromarray(RGB), "PNG", "a colour image: a colour-coded label?"),
    ("RGBA", lambda: Image.fromarray(np.concatenate([RGB, RGB[..., :1]], -1), "RGBA"), "PNG",
     "it has an alpha channel"),
    ("LA", lambda: Image.fromarray(np.stack([GRAY, GRAY], -1), "LA"), "PNG",
     "it has an alpha channel"),
    ("F", lambda: Image.fromarray(LABEL_IDS.astype(np.float32)), "TIFF", "it holds floats"),
    ("L", lambda: Image.fromarray(LABEL_IDS.astype(np.uint8)), "JPEG", "is a JPEG: lossy"),
])
def test_labels_that_are_no_label_map_are_refused_before_training(mode, make, fmt, words,
                                                                 tmp_path):
    base = camvid_with(tmp_path, label=make(), label_fmt=fmt)
    dataset = build_dataset("camvid", root=tmp_path, split="train")
    with pytest.raises(ValueError) as err:
        validate_dataset(dataset)  # the header tells: no pixel of it is read
    message = str(err.value)
    assert str(first_label("camvid", base)) in message and words in message
    assert "single-channel (L or 16-bit) or palette (P) PNGs of class ids" in message


@pytest.mark.parametrize("name", list(MAKERS))
def test_train_transform_crops_and_pads_with_ignore(name, tmp_path):
    MAKERS[name](tmp_path)
    dataset = build_dataset(name, root=tmp_path, split="train", train=True,
                            crop_size=(20, 24), scale_range=(1.0, 1.0), seed=3)
    image, mask = dataset[0]
    assert image.shape == (3, 20, 24) and mask.shape == (20, 24)
    assert mask.dtype == torch.int64
    assert (mask[H:] == 255).all() and (image[:, H:] == 0).all()  # padded rows
    assert (mask == 255).sum() >= 20 * 24 - H * W
    again = build_dataset(name, root=tmp_path, split="train", train=True,
                          crop_size=(20, 24), scale_range=(1.0, 1.0), seed=3)[0]
    assert torch.equal(again[1], mask)  # reproducible per (seed, epoch, index)


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("name", list(MAKERS))
def test_missing_root_says_where_and_how(name, tmp_path):
    mod = dataset_module(name)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=tmp_path, split="train")
    message = str(err.value)
    assert str(tmp_path / mod.FOLDER) in message
    assert mod.HOW_TO_GET in message
    assert "KDNB_DATA" in message and "data/README.md" in message


def test_root_one_level_too_deep_gets_a_hint(tmp_path):
    base = make_camvid(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="pass its parent"):
        build_dataset("camvid", root=base, split="train")


@pytest.mark.parametrize("name, remove, named", [
    ("voc", "SegmentationClass", "SegmentationClass"),
    ("voc", "ImageSets/Segmentation/val.txt", "val.txt"),
    ("cityscapes", "gtFine", "gtFine"),
    ("ade20k", "annotations/validation", "annotations/validation"),
    ("camvid", "testannot", "testannot"),
])
def test_incomplete_root_names_what_is_missing(name, remove, named, tmp_path):
    import shutil

    base = MAKERS[name](tmp_path)
    target = base / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert named in dataset_module(name).check(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=named):
        build_dataset(name, root=tmp_path, split="train")


@pytest.mark.parametrize("name", ["voc", "cityscapes", "ade20k", "camvid"])
def test_a_missing_label_file_is_named(name, tmp_path):
    base = MAKERS[name](tmp_path)
    label = first_label(name, base)
    label.unlink()
    with pytest.raises(DatasetNotFoundError, match=label.name):
        build_dataset(name, root=tmp_path, split="train")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'coco'") as err:
        build_dataset("coco")
    for name in ("synth", "voc", "cityscapes", "ade20k", "camvid"):
        assert name in str(err.value)


@pytest.mark.parametrize("name, split", [("voc", "test"), ("ade20k", "test"),
                                         ("camvid", "training"), ("cityscapes", "trainval")])
def test_unknown_split_lists_the_splits(name, split, tmp_path):
    MAKERS[name](tmp_path)
    with pytest.raises(ValueError, match=f"no split '{split}'.*'train'"):
        build_dataset(name, root=tmp_path, split=split)
    with pytest.raises(ValueError, match="no split"):
        dataset_module(name).build(tmp_path, split)


@pytest.mark.parametrize("name, bad", [("voc", 21), ("cityscapes", 40), ("ade20k", 151),
                                       ("camvid", 12)])
def test_label_values_outside_the_classes_name_the_file(name, bad, tmp_path):
    base = MAKERS[name](tmp_path)
    label = first_label(name, base)
    values = raw(label)
    values[2, 3] = bad
    write_label(label, values, voc.color_map() if name == "voc" else None)
    dataset = build_dataset(name, root=tmp_path, split="train")
    index = [str(m) for _, m in dataset.pairs].index(str(label))
    with pytest.raises(ValueError, match=rf"{label.name}.*\[{bad}\]"):
        dataset[index]


@pytest.mark.parametrize("name", list(MAKERS))
def test_image_label_size_mismatch_names_both_files(name, tmp_path):
    base = MAKERS[name](tmp_path)
    image = first_image(name, base)
    write_image(image, size=(H, W + 2))
    dataset = build_dataset(name, root=tmp_path, split="train")
    index = [str(i) for i, _ in dataset.pairs].index(str(image))
    with pytest.raises(ValueError, match="does not match") as err:
        dataset[index]
    assert str(image) in str(err.value) and str(dataset.pairs[index][1]) in str(err.value)


@pytest.mark.parametrize("name", ["voc", "ade20k"])
def test_truncated_jpeg_names_the_file(name, tmp_path):
    base = MAKERS[name](tmp_path)
    image = first_image(name, base)
    write_image(image, size=(64, 64))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # a download cut off halfway
    dataset = build_dataset(name, root=tmp_path, split="train")
    index = [str(i) for i, _ in dataset.pairs].index(str(image))
    with pytest.raises(OSError, match="cannot read image") as err:
        dataset[index]
    assert str(image) in str(err.value)


@pytest.mark.parametrize("name", list(MAKERS))
def test_validate_passes_a_whole_tree_and_names_a_truncated_file(name, tmp_path):
    base = MAKERS[name](tmp_path)
    validate_dataset(build_dataset(name, root=tmp_path, split="train", train=True,
                                   crop_size=(16, 16)))
    image = first_image(name, base)
    write_image(image, size=(64, 64))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{image.name} is truncated") as err:
        validate_dataset(build_dataset(name, root=tmp_path, split="train"))
    assert str(image) in str(err.value) and "Download or extract" in str(err.value)


@pytest.mark.parametrize("name", ["cityscapes", "camvid"])
def test_download_without_a_public_url_says_how_to_get(name, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no public download") as err:
        build_dataset(name, root=tmp_path, download=True)
    assert dataset_module(name).HOW_TO_GET in str(err.value)


# ---------------------------------------------------------------- downloads (loopback only)

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path, monkeypatch):
    """Serves ``tmp_path/served`` on 127.0.0.1; yields ``(folder, base_url)``."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_voc_download(file_server, tmp_path, monkeypatch):
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    served, url = file_server
    make_voc(tmp_path / "tree", train=("a1", "a2", "a3"), val=("b1",))
    archive = served / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "tree" / "VOCdevkit", arcname="VOCdevkit")
    monkeypatch.setitem(DATASET_YEAR_DICT["2012"], "url", f"{url}/{archive.name}")
    monkeypatch.setitem(DATASET_YEAR_DICT["2012"], "md5", md5(archive))
    root = tmp_path / "data"
    dataset = build_dataset("voc", root=root, split="train", download=True)
    assert len(dataset) == 3 and dataset[0][1].shape == (H, W)
    assert voc.check(root) is None
    assert not (root / archive.name).exists()  # the downloaded archive is cleaned up


def test_ade20k_download(file_server, tmp_path, monkeypatch):
    served, url = file_server
    make_ade(tmp_path / "tree", {"training": 2, "validation": 1})
    archive = served / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "tree").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "tree").as_posix())
    monkeypatch.setattr(ade20k, "URL", f"{url}/{archive.name}")
    monkeypatch.setattr(ade20k, "MD5", md5(archive))
    root = tmp_path / "data"
    dataset = build_dataset("ade20k", root=root, split="val", download=True)
    assert len(dataset) == 1 and dataset[0][1].shape == (H, W)
    assert ade20k.check(root) is None
    assert not (root / archive.name).exists()


def test_ade20k_download_rejects_a_corrupt_archive(file_server, tmp_path, monkeypatch):
    served, url = file_server
    (served / "ADEChallengeData2016.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(ade20k, "URL", f"{url}/ADEChallengeData2016.zip")
    monkeypatch.setattr(ade20k, "MD5", "0" * 32)
    with pytest.raises(RuntimeError, match="corrupted|MD5|md5"):
        build_dataset("ade20k", root=tmp_path / "data", download=True)
