"""What every on-disk dataset shares: where datasets live, reading pairs, clear errors.

A real dataset is a list of ``(image_path, mask_path)`` pairs plus a lookup table that maps
raw label values to training ids (255 = ignore). :class:`SegmentationFolder` reads a pair
with Pillow and returns ``(image (3, H, W) float in [0, 1], mask (H, W) int64)`` at native
size; :meth:`SegmentationFolder.scan` checks every file cheaply before training starts.
"""
from __future__ import annotations

import os
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


def read_image(path: Path) -> torch.Tensor:
    """Reads an RGB image as ``(3, H, W)`` float32 in [0, 1]; names the file if unreadable."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}. The file is missing, truncated or "
                      "not an image: download or extract it again.") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_label(path: Path) -> np.ndarray:
    """Reads a label PNG as its raw integer values (palette indices for palette PNGs)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"label image mode is {im.mode!r}; expected a single-channel "
                                 "or palette PNG")
            return np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read label {path}: {err}. Labels must be single-channel or "
                      "palette PNGs of the dataset's official release.") from err


#: How many bytes at the end of a file :func:`inspect_file` reads to find its end marker.
TAIL_BYTES = 4096
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk every PNG ends with
_JPEG_END = b"\xff\xd9"       # the end-of-image marker (some cameras append a few bytes)


def inspect_file(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """An image or label file's ``(height, width)`` and what is wrong with it, cheaply.

    Reads the header and the last :data:`TAIL_BYTES` bytes, never the pixels: a missing,
    empty or unidentifiable file, or a PNG or JPEG cut off before its end marker (a
    download or copy that stopped halfway), is reported. Returns ``(size, None)`` for a
    file that looks whole, ``(size or None, problem)`` otherwise.
    """
    try:
        nbytes = path.stat().st_size
    except OSError:
        return None, "does not exist"
    if nbytes == 0:
        return None, "is empty (0 bytes)"
    try:
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
        with open(path, "rb") as fh:
            fh.seek(max(0, nbytes - TAIL_BYTES))
            tail = fh.read()
    except (OSError, ValueError) as err:
        return None, f"is not an image Pillow can read ({err})"
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

    def scan(self, *, limit: int = 5) -> None:
        """Checks every pair without decoding pixels (:func:`inspect_file`).

        Files that are missing, empty, unreadable or truncated, and images whose label has
        another size, are named (the first ``limit`` of them, with the total count).

        Raises:
            ValueError: at least one pair is damaged; the message says how to fix it.
        """
        problems = []
        for image_path, mask_path in self.pairs:
            image_size, image_problem = inspect_file(image_path)
            mask_size, mask_problem = inspect_file(mask_path)
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
