"""What every on-disk dataset shares: where datasets live, reading pairs, clear errors.

A real dataset is a list of ``(image_path, mask_path)`` pairs plus a lookup table that maps
raw label values to training ids (255 = ignore). :class:`SegmentationFolder` reads a pair
with Pillow and returns ``(image (3, H, W) float in [0, 1], mask (H, W) int64)`` at native
size; :meth:`SegmentationFolder.scan` checks every file cheaply before training starts.

Every loader reads files by one rule, :func:`image_array` and :func:`label_array`: what
each Pillow mode means as an image (:data:`IMAGE_MODES`: a 16-bit PNG is divided by
65535, not clipped to 8 bits) and which modes are label maps (:data:`LABEL_MODES`); other
modes, and images over Pillow's decompression-bomb limit, are refused with the file named.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

ENV_ROOT = "KDNB_DATA"
IGNORE_INDEX = 255


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds datasets and cached checkpoints.

    Order: the ``root`` argument, then the ``KDNB_DATA`` environment variable, then
    ``data/`` at the top of the kdnb repository (an editable install), then ``./data``.
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data"
    return Path.cwd() / "data"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message says where and how to fix."""


def missing_error(name: str, looked: Path, what: str, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: looked for {what} in {looked}. {how} "
        f"Point kdnb elsewhere with root=... / --root DIR or the {ENV_ROOT} environment variable; "
        "data/README.md explains each dataset's layout.")


def paired_labels(name: str, images: list[Path], label_of: Callable[[Path], Path], how: str
                  ) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs, ``label_of(image)`` giving each image's label file; the first
    image without one raises :func:`missing_error`, naming both."""
    pairs = []
    for image in images:
        label = label_of(image)
        if not label.is_file():
            raise missing_error(name, label.parent, f"{label.name}, the label of {image}", how)
        pairs.append((image, label))
    return pairs


def missing_folder(root: str | os.PathLike, folder: str) -> str:
    """What :func:`check` reports when ``root/folder`` is absent, with the common slip
    of passing the dataset folder itself as the root."""
    if Path(root).name == folder and Path(root).is_dir():
        return f"{folder}/ does not exist (root is {folder}/ itself: pass its parent)"
    return f"{folder}/ does not exist"


#: What each Pillow mode means as an image: how its values become RGB floats in [0, 1].
#: Each channel is scaled by the range of its type, never by the image's own values, so
#: one file reads the same alone and in a batch. Other modes are refused.
IMAGE_MODES = {
    "1": "bilevel: 0 and 1 become black and white",
    "L": "8-bit gray, / 255, the same on the three channels",
    "P": "palette: each index becomes its palette colour",
    "RGB": "8-bit colour, / 255",
    "LA": "8-bit gray with alpha: the alpha is dropped",
    "PA": "palette with alpha: the alpha is dropped",
    "RGBA": "8-bit colour with alpha: the alpha is dropped",
    "RGBX": "8-bit colour with padding: the padding is dropped",
    "CMYK": "8-bit CMYK (some JPEGs): converted to RGB",
    "YCbCr": "8-bit YCbCr: converted to RGB",
    "I;16": "16-bit gray (16-bit PNGs), / 65535, the same on the three channels",
    "I;16B": "16-bit gray (big-endian), / 65535",
    "I;16L": "16-bit gray (little-endian), / 65535",
    "I": "32-bit integer gray: values must lie in 0..65535 (16-bit data), / 65535",
    "F": "32-bit float gray: values must lie in [0, 1], taken as they are",
}
#: What each Pillow mode means as a label map: its values are the raw label ids that the
#: dataset's lookup table maps to training ids. Modes with colour or alpha are refused.
LABEL_MODES = {
    "L": "8-bit ids",
    "P": "palette indices (the palette only colours them)",
    "1": "ids 0 and 1",
    "I;16": "16-bit ids", "I;16B": "16-bit ids", "I;16L": "16-bit ids",
    "I": "32-bit integer ids (negative values refused)",
}
_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def _too_large(path: Path, role: str, err: Exception) -> ValueError:
    return ValueError(f"{role} {path} is too large to decode safely ({err}). Downscale it to "
                      "the dataset's usual resolution, or, if you trust the file, raise "
                      "PIL.Image.MAX_IMAGE_PIXELS before training")


def open_image(path: Path, role: str = "image") -> Image.Image:
    """``Image.open`` with errors that name the file: an unreadable file, and an image
    larger than Pillow's decompression-bomb limit (:data:`PIL.Image.MAX_IMAGE_PIXELS`).

    Raises:
        OSError: missing, empty, truncated or not an image.
        ValueError: too many pixels; the message gives the size, the limit and the fix.
    """
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise _too_large(path, role, err) from None
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read {role} {path}: {err}. The file is missing, truncated or not "
                      "an image: download or extract it again.") from err


def _decode(im: Image.Image, path: Path, role: str) -> None:
    """Decodes an opened image's pixels; a file that fails to decode is named."""
    try:
        im.load()
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read {role} {path}: {err}. The file is truncated or damaged: "
                      "download or extract it again.") from err


def image_array(im: Image.Image, path: Path) -> np.ndarray:
    """An opened image as ``(H, W, 3)`` float32 RGB in [0, 1], by :data:`IMAGE_MODES`: the
    rule every loader reads images by.

    Raises:
        ValueError: a mode kdnb does not read, or values outside the range of the mode.
    """
    check_mode(im.mode, im.format, path, "image")
    _decode(im, path, "image")
    if im.mode not in _FULL_SCALE:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    full = _FULL_SCALE[im.mode]
    gray = np.asarray(im).astype(np.float64)
    low, high = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= full):
        raise ValueError(f"image {path} (Pillow mode {im.mode!r}) holds values from {low:g} to "
                         f"{high:g}, outside 0..{full:g}, so its brightness range is unknown: "
                         "save it as an 8-bit RGB PNG or a 16-bit grayscale PNG")
    if full == 65535.0 and 0 < high <= 255:
        # The message names the folder, not the file: Python shows a warning once per
        # message and place, so a dataset saved this way warns once per folder.
        warnings.warn(f"images of Pillow mode {im.mode!r} in {path.parent} hold values within "
                      f"0..255 only: probably 8-bit data saved in a 16-bit file, which reads "
                      f"{full / 255:.0f}x darker than meant (kdnb divides this mode by "
                      f"{full:g}). Save them as 8-bit PNGs, or scale them to 0..{full:g}.",
                      UserWarning, stacklevel=2)
    return np.repeat((gray / full).astype(np.float32)[..., None], 3, axis=2)


def label_array(im: Image.Image, path: Path) -> np.ndarray:
    """An opened label map as ``(H, W)`` int64 raw ids, by :data:`LABEL_MODES`: the rule
    every loader reads labels by.

    Raises:
        ValueError: colour, alpha or float labels, a JPEG (lossy: ids change at edges), or
            negative ids; the message says how to save the label instead.
    """
    check_mode(im.mode, im.format, path, "label")
    _decode(im, path, "label")
    ids = np.asarray(im).astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"label {path} holds negative ids (down to {ids.min()}): {_LABEL_FIX}")
    return ids


_LABEL_FIX = "save labels as single-channel (L or 16-bit) or palette (P) PNGs of class ids"


def check_mode(mode: str, fmt: str | None, path: Path, role: str) -> None:
    """Refuses an image whose Pillow ``mode`` (or, for a label, format ``fmt``) kdnb does not
    read in that ``role`` (:data:`IMAGE_MODES`, :data:`LABEL_MODES`): the header tells.

    Raises:
        ValueError: naming the file, its mode and how to save it instead.
    """
    if role == "image":
        if mode not in IMAGE_MODES:
            raise ValueError(f"image {path} has Pillow mode {mode!r}, which kdnb does not "
                             f"read as an image (it reads {', '.join(IMAGE_MODES)}): save it as "
                             "an 8-bit RGB PNG or JPEG")
        return
    if fmt == "JPEG":
        raise ValueError(f"label {path} is a JPEG: lossy compression changes class ids near "
                         f"edges; use the dataset's PNG labels ({_LABEL_FIX})")
    if mode not in LABEL_MODES:
        kind = ("it has an alpha channel" if mode.endswith("A") or mode in ("La", "RGBa")
                else "it holds floats" if mode == "F"
                else "a colour image: a colour-coded label? map its colours to class ids"
                if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")
                else "not a label map")
        raise ValueError(f"label {path} has Pillow mode {mode!r} ({kind}); kdnb reads labels "
                         f"in modes {', '.join(LABEL_MODES)}: {_LABEL_FIX}")


def read_image(path: Path) -> torch.Tensor:
    """Reads an image as ``(3, H, W)`` float32 in [0, 1] (:func:`image_array`); names the
    file if it is unreadable or of a mode kdnb does not read."""
    with open_image(path, "image") as im:
        array = image_array(im, path)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def read_label(path: Path) -> np.ndarray:
    """Reads a label PNG as its raw integer ids (:func:`label_array`; palette indices for
    palette PNGs); names the file if it is unreadable or not a label map."""
    with open_image(path, "label") as im:
        return label_array(im, path)


#: How many bytes at the end of a file :func:`inspect_file` reads to find its end marker.
TAIL_BYTES = 4096
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk every PNG ends with
_JPEG_END = b"\xff\xd9"       # the end-of-image marker (some cameras append a few bytes)


def inspect_file(path: Path, role: str = "image") -> tuple[tuple[int, int] | None, str | None]:
    """An image or label file's ``(height, width)`` and what is wrong with it, cheaply.

    Reads the header and the last :data:`TAIL_BYTES` bytes, never the pixels: a missing,
    empty or unidentifiable file, or a PNG or JPEG cut off before its end marker (a
    download or copy that stopped halfway), is reported. Returns ``(size, None)`` for a
    file that looks whole, ``(size or None, problem)`` otherwise.

    Raises:
        ValueError: the image is over Pillow's decompression-bomb limit, or of a mode kdnb
            does not read as ``role`` (``"image"`` or ``"label"``, :func:`check_mode`); the
            message has its own fix.
    """
    try:
        nbytes = path.stat().st_size
    except OSError:
        return None, "does not exist"
    if nbytes == 0:
        return None, "is empty (0 bytes)"
    try:
        with Image.open(path) as im:
            fmt, mode, (width, height) = im.format, im.mode, im.size
        with open(path, "rb") as fh:
            fh.seek(max(0, nbytes - TAIL_BYTES))
            tail = fh.read()
    except Image.DecompressionBombError as err:
        raise _too_large(path, role, err) from None
    except (OSError, ValueError) as err:
        return None, f"is not an image Pillow can read ({err})"
    check_mode(mode, fmt, path, role)
    size = (height, width)
    if fmt == "PNG" and not tail.endswith(_PNG_END):
        return size, f"is truncated ({nbytes} bytes, no PNG end chunk)"
    if fmt == "JPEG" and _JPEG_END not in tail:
        return size, f"is truncated ({nbytes} bytes, no JPEG end marker)"
    return size, None


def lookup_table(mapping: dict[int, int], size: int = 256, default: int = IGNORE_INDEX) -> np.ndarray:
    """A dense raw-value -> train-id table (values not in ``mapping`` go to ``default``)."""
    table = np.full(size, default, dtype=np.int64)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


class SegmentationFolder(Dataset):
    """Image/label pairs on disk with a raw-to-train-id lookup table.

    Args:
        pairs: ``(image_path, mask_path)`` per sample.
        num_classes: number of training classes.
        table: raw label value -> train id (``IGNORE_INDEX`` for ignored); None = identity.
        classes: class names. palette: RGB per class.
        check_labels: raise if a mapped label lies outside ``[0, num_classes)`` and 255.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, pairs: Sequence[tuple[Path, Path]], *, num_classes: int,
                 table: np.ndarray | None, classes: Sequence[str],
                 palette: Sequence[tuple[int, int, int]], check_labels: bool = True):
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.num_classes, self.table = num_classes, table
        self.classes, self.palette = tuple(classes), tuple(palette)
        self.check_labels = check_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label(mask_path)
        if self.table is not None:
            if raw.max(initial=0) >= len(self.table) or raw.min(initial=0) < 0:
                raise ValueError(f"{mask_path}: label values up to {raw.max()} exceed the "
                                 f"dataset's table of {len(self.table)} entries: use the "
                                 "dataset's official 8-bit label PNGs (data/README.md)")
            raw = self.table[raw]
        if self.check_labels:
            bad = (raw >= self.num_classes) & (raw != IGNORE_INDEX)
            if bad.any():
                raise ValueError(f"{mask_path}: mask values {sorted(set(raw[bad].tolist()))[:8]} "
                                 f"are outside the {self.num_classes} classes (and not 255 = "
                                 "ignore): use the dataset's official label files (data/README.md "
                                 "names them), or fix or remove this one")
        if raw.shape != tuple(image.shape[-2:]):
            raise ValueError(f"{image_path} is {tuple(image.shape[-2:])} but its label "
                             f"{mask_path} is {raw.shape}: the pair does not match; extract "
                             "both files again from the official release, or remove the pair")
        return image, torch.from_numpy(raw)

    def scan(self, *, limit: int = 5) -> list[tuple[int, int]]:
        """Checks every pair without decoding pixels (:func:`inspect_file`); returns the
        ``(H, W)`` of every image, in order.

        Files that are missing, empty, unreadable or truncated, and images whose label has
        another size, are named (the first ``limit`` of them, with the total count).

        Raises:
            ValueError: at least one pair is damaged, or a file is of a mode kdnb does not
                read in its role; the message says how to fix it.
        """
        problems, sizes = [], []
        for image_path, mask_path in self.pairs:
            image_size, image_problem = inspect_file(image_path)
            mask_size, mask_problem = inspect_file(mask_path, "label")
            sizes.append(image_size)
            if image_problem:
                problems.append(f"image {image_path} {image_problem}")
            if mask_problem:
                problems.append(f"label {mask_path} {mask_problem}")
            if image_size and mask_size and image_size != mask_size:
                problems.append(f"image {image_path} is {image_size} but its label {mask_path} "
                                f"is {mask_size}")
        if problems:
            shown = "; ".join(problems[:limit])
            more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
            raise ValueError(f"{len(problems)} problem(s) in the {len(self.pairs)} image/label "
                             f"pairs of this split: {shown}{more}. Download or extract those "
                             "files again from the official release, or remove their entries")
        return sizes
