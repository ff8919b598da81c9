"""SynthScenes: a procedural segmentation dataset that needs no files and no network.

Every sample is drawn from its own random stream, keyed by ``(seed, split, index)``, so a
sample is the same on every machine and in every worker, and the train, val and test
splits never share a sample.

A scene is a weakly coloured, cluttered background with a few overlapping objects. An
object's class is a conjunction of its outline, its surface texture and its hue family:

    =====  ==================  ==========================  =====================
    class  shape, texture      hue family (shared by two)  what tells the two apart
    =====  ==================  ==========================  =====================
    1, 2   disk, stripes/check red                         texture
    3, 4   square, stripes/ch. yellow-green                texture
    5, 6   disk/square, dots   cyan                        shape
    7, 8   disk/square, plain  violet                      shape
    =====  ==================  ==========================  =====================

Colour narrows a class down to two, never to one, as in real scenes (sky and water are
both bluish): a model must also read the texture, or the outline, which at the centre
of a large object lies far outside a small receptive field, so the label of a pixel
depends on its context. Triangles of any texture and any family's hue are *distractors*
and belong to the background. Scale (a factor of three), rotation, occlusion, lighting
gradients and sensor noise vary per scene. ``hue_jitter=0.5`` removes the colour cue
altogether (a much slower task to learn from scratch).

The training annotation can be made imperfect the way real annotation is: ``unlabelled``
leaves whole objects unannotated (ignore, as in coarse annotations; the kdnb recipes use
0.5), ``label_noise`` gives objects the other class of their hue pair. Val and test masks
are always complete and exact.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("stripes", "checker", "dots", "plain")
#: object classes as (shape, texture); class i + 1 is CLASS_SPECS[i], 0 is background.
#: Consecutive pairs share a hue family: the first two pairs differ in texture only, the
#: last two in shape only, so colour narrows a class down to two and texture or shape
#: must decide.
CLASS_SPECS = (
    ("disk", "stripes"), ("disk", "checker"),
    ("square", "stripes"), ("square", "checker"),
    ("disk", "dots"), ("square", "dots"),
    ("disk", "plain"), ("square", "plain"),
)
HUE_FAMILIES = (0.0, 0.25, 0.5, 0.75)  # hue centre of class pair k (fraction of the circle)
#: objects that belong to the background: every triangle, whatever its texture.
DISTRACTOR_SPECS = tuple(("triangle", t) for t in TEXTURES)
CLASSES = ("background",) + tuple(f"{s}-{t}" for s, t in CLASS_SPECS)
PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)
SPLITS = {"train": 0, "val": 1, "test": 2}
#: Held-out splits are large because scoring is cheap and small ones are noisy: on 500 test
#: images the mIoU difference of two students varies by about 0.85 points from one draw of
#: the images to the next (bootstrap), on 4000 by about 0.3 (benchmarks/RESULTS.md).
DEFAULT_LENGTHS = {"train": 4000, "val": 2000, "test": 4000}


class SynthScenes(Dataset):
    """Procedural scenes of textured shapes, generated on the fly.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: height and width of every image, in pixels.
        length: number of samples; default 4000 / 2000 / 4000 for train / val / test.
        seed: dataset seed; two seeds give two unrelated datasets.
        objects: inclusive range of the number of objects per scene.
        distractor_prob: probability that an object is a (background) distractor.
        scale: object radius range as a fraction of ``size``.
        hue_jitter: half-width of an object's hue range around its family's centre, as a
            fraction of the hue circle; 0.5 makes colour carry no information at all.
        label_noise: annotation noise of the *train* split: the probability that an
            object's mask carries the other class of its hue pair (an annotator confusing
            stripes with checks, or a disk with a square). The image is unchanged; val and
            test masks are always exact, so models are scored against the true classes.
        unlabelled: partial annotation of the *train* split: the probability that an
            object (a distractor included) is left unannotated, its visible pixels marked
            ``ignore_index`` (255), as in coarse annotations where annotators skip objects.
            Cross-entropy learns nothing there; a loss against the teacher still does.
            The image is unchanged; val and test masks are always complete.

    Shape:
        A sample is ``(image, mask)``: image ``(3, size, size)`` float32 in [0, 1],
        mask ``(size, size)`` int64 in ``[0, 8]``, or 255 on unannotated objects.
    """

    classes = CLASSES
    palette = PALETTE
    num_classes = len(CLASSES)
    ignore_index = 255

    def __init__(self, split: str = "train", *, size: int = 96, length: int | None = None,
                 seed: int = 0, objects: tuple[int, int] = (2, 5),
                 distractor_prob: float = 0.2, scale: tuple[float, float] = (0.10, 0.30),
                 hue_jitter: float = 0.08, label_noise: float = 0.0, unlabelled: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: SynthScenes has {sorted(SPLITS)}")
        if size < 32:
            raise ValueError(f"size={size} is too small to draw a scene: use 32 or more")
        if not 0 < scale[0] <= scale[1] < 0.5:
            raise ValueError(f"scale={scale} must satisfy 0 < min <= max < 0.5 (radius / size)")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length={self.length}: a split needs at least one sample")
        self.objects, self.distractor_prob, self.scale = objects, distractor_prob, scale
        self.hue_jitter = float(hue_jitter)
        if not 0.0 <= label_noise < 0.5:
            raise ValueError(f"label_noise={label_noise} must be in [0, 0.5): at 0.5 the two "
                             "classes of a pair can no longer be told apart from the labels")
        self.label_noise = float(label_noise)
        if not 0.0 <= unlabelled < 1.0:
            raise ValueError(f"unlabelled={unlabelled} must be in [0, 1): at 1 no object of the "
                             "train split would carry a label")
        self.unlabelled = float(unlabelled)
        coords = np.arange(self.size, dtype=np.float32)
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")  # (S, S) each

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"SynthScenes(split={self.split!r}, size={self.size}, length={self.length}, "
                f"seed={self.seed})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self!r}")
        image, mask = self.render(index)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Draws sample ``index`` as numpy arrays: image ``(S, S, 3)`` float32, mask ``(S, S)`` int64."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        # Annotation noise has its own stream: the image is the same at any noise level.
        noisy = self.label_noise > 0 and self.split == "train"
        noise = np.random.default_rng([self.seed, SPLITS[self.split], index, 1]) if noisy else None
        # So has partial annotation: the same objects stay unannotated at any noise level.
        partial = self.unlabelled > 0 and self.split == "train"
        skip = np.random.default_rng([self.seed, SPLITS[self.split], index, 2]) if partial else None
        s = self.size
        image = self._background(rng)
        mask = np.zeros((s, s), dtype=np.int64)
        for _ in range(rng.integers(self.objects[0], self.objects[1] + 1)):
            swap = noisy and noise.uniform() < self.label_noise
            unannotated = partial and skip.uniform() < self.unlabelled
            self._draw_object(rng, image, mask, swap_label=swap, unannotated=unannotated)
        # Lighting: a smooth gain across the scene, then a global offset and sensor noise.
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * self._xx + math.sin(angle) * self._yy) / s - 0.5
        gain = rng.uniform(0.7, 1.1) + rng.uniform(0.0, 0.5) * ramp
        image = image * gain[..., None] + rng.uniform(-0.1, 0.1)
        image += rng.normal(0.0, rng.uniform(0.01, 0.06), size=image.shape).astype(np.float32)
        return np.clip(image, 0.0, 1.0).astype(np.float32), mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Low-frequency colour clutter: two colours mixed by a sum of random waves."""
        s = self.size
        field = np.zeros((s, s), dtype=np.float32)
        for _ in range(3):
            fx, fy = rng.uniform(-3, 3, size=2) * 2 * math.pi / s
            field += np.sin(fx * self._xx + fy * self._yy + rng.uniform(0, 2 * math.pi))
        weight = (field / 6 + 0.5)[..., None]  # (S, S, 1) in [0, 1]
        # Background colours are weakly saturated, of any hue.
        c1, c2 = (_hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.95))
                  for _ in range(2))
        return weight * c1 + (1 - weight) * c2

    def _draw_object(self, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                     swap_label: bool = False, unannotated: bool = False) -> None:
        s = self.size
        radius = rng.uniform(*self.scale) * s
        cy, cx = rng.uniform(0, s, size=2)
        if rng.uniform() < self.distractor_prob:
            shape, texture = DISTRACTOR_SPECS[int(rng.integers(len(DISTRACTOR_SPECS)))]
            label, family = 0, int(rng.integers(len(HUE_FAMILIES)))  # any family's colour
        else:
            label = 1 + int(rng.integers(len(CLASS_SPECS)))
            shape, texture = CLASS_SPECS[label - 1]
            family = (label - 1) // 2
        # Work inside the object's bounding box only: this keeps generation fast.
        half = int(math.ceil(radius * 1.45)) + 1
        y0, y1 = max(0, int(cy) - half), min(s, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(s, int(cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            return
        yy, xx = self._yy[y0:y1, x0:x1] - cy, self._xx[y0:y1, x0:x1] - cx
        theta = rng.uniform(0, 2 * math.pi)
        u = math.cos(theta) * xx + math.sin(theta) * yy
        v = -math.sin(theta) * xx + math.cos(theta) * yy
        inside = _shape_mask(shape, u, v, radius)
        # The texture is anchored to the image grid with its own angle and period.
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 9.0)
        a = (math.cos(phi) * xx + math.sin(phi) * yy) * (2 * math.pi / period)
        b = (-math.sin(phi) * xx + math.cos(phi) * yy) * (2 * math.pi / period)
        on = _texture_mask(texture, a, b)
        # Saturated colours of the family's hue; the texture's two phases differ in
        # brightness, so the pattern stays visible whatever the hue.
        hue = HUE_FAMILIES[family] + rng.uniform(-self.hue_jitter, self.hue_jitter)
        sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
        c1 = _hsv_to_rgb(hue, sat, val)
        c2 = _hsv_to_rgb(hue, sat, val - rng.uniform(0.35, 0.5))
        patch = np.where(on[..., None], c1, c2)
        region = image[y0:y1, x0:x1]
        region[inside] = patch[inside]
        if swap_label and label:
            label = label + 1 if label % 2 else label - 1  # the other class of the pair
        mask[y0:y1, x0:x1][inside] = self.ignore_index if unannotated else label


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (hue as a fraction of the circle) to RGB float32."""
    h = (h % 1.0) * 6.0
    i, f = int(h), h - int(h)
    v = max(0.0, min(1.0, v))
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i % 6]
    return np.asarray(rgb, dtype=np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape of about ``radius`` in the rotated frame ``(u, v)``."""
    if shape == "disk":
        return u * u + v * v <= radius * radius
    if shape == "square":
        half = radius * 0.88  # about the disk's area
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        inradius = radius * 0.68
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            ang = math.pi / 2 + 2 * math.pi * k / 3
            inside &= math.cos(ang) * u + math.sin(ang) * v <= inradius
        return inside
    if shape == "cross":
        arm, length = radius * 0.38, radius * 1.15
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= length)) | ((av <= arm) & (au <= length))
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean pattern from phase coordinates ``a, b`` (radians)."""
    if texture == "stripes":
        return np.sin(a) > 0
    if texture == "checker":
        return np.sin(a) * np.sin(b) > 0
    if texture == "dots":
        return np.cos(a) + np.cos(b) > 1.0
    if texture == "plain":
        return np.ones(a.shape, dtype=bool)
    raise ValueError(f"unknown texture {texture!r}")
