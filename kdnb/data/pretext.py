"""PretextShapes: image classification on other procedural images, the part ImageNet plays.

Every paper on distillation for segmentation starts teacher and student encoders from
ImageNet weights, and this machine cannot download them. PretextShapes stands in: each
image holds one large object on a cluttered background, and its label is the object's
(shape, texture) pair, 4 x 4 = 16 classes, whatever its colour (the hue is uniform, so
colour carries nothing). The labels are not SynthScenes' classes (those are scene
segments whose class also depends on a hue family; triangles and crosses are not even
classes there), but the features that solve it, edges, outlines and periodic textures, are
the ones segmentation reuses, as ImageNet features are for Cityscapes.

Samples are drawn from their own random stream, keyed by ``(seed, split, index, epoch)``
(a training sampler's ``(index, epoch)`` keys give new images every epoch). A training pool of a few thousand images and a few thousand steps are enough
for an encoder to reach high accuracy on a CPU (``kdnb.pretrain``).

Introduced in notebooks/02_normalized_feature_distillation.ipynb.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .synth import SHAPES, TEXTURES, _hsv_to_rgb, _shape_mask, _texture_mask

#: class ``k`` is ``PRETEXT_CLASSES[k]``, a (shape, texture) pair
PRETEXT_CLASSES = tuple((s, t) for s in SHAPES for t in TEXTURES)
SPLITS = {"train": 10, "val": 11}  # stream keys apart from SynthScenes' 0, 1, 2


class PretextShapes(Dataset):
    """One object per image; the label is its (shape, texture) pair (16 classes).

    Args:
        split: ``"train"`` or ``"val"``.
        size: height and width of the images.
        length: number of samples.
        seed: dataset seed.

    Shape:
        A sample is ``(image, label)``: image ``(3, size, size)`` float32 in [0, 1],
        label a 0-dim int64 tensor in ``[0, 16)``.
    """

    classes = tuple(f"{s}-{t}" for s, t in PRETEXT_CLASSES)
    num_classes = len(PRETEXT_CLASSES)

    def __init__(self, split: str = "train", *, size: int = 64, length: int = 4000, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: PretextShapes has {sorted(SPLITS)}")
        if size < 32 or length < 1:
            raise ValueError(f"size={size}, length={length}: use a size of 32 or more and at "
                             "least one sample")
        self.split, self.size, self.length, self.seed = split, int(size), int(length), int(seed)
        coords = np.arange(self.size, dtype=np.float32)
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        # (index, epoch) keys from kdnb.data.StepSampler draw a new image every epoch
        index, epoch = (key, 0) if isinstance(key, int) else key
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, epoch])
        label = int(rng.integers(self.num_classes))
        image = self._draw(rng, *PRETEXT_CLASSES[label])
        return torch.from_numpy(image).permute(2, 0, 1), torch.tensor(label)

    def _draw(self, rng: np.random.Generator, shape: str, texture: str) -> np.ndarray:
        s, xx, yy = self.size, self._xx, self._yy
        field = np.zeros((s, s), dtype=np.float32)  # low-frequency clutter, as SynthScenes'
        for _ in range(3):
            fx, fy = rng.uniform(-3, 3, size=2) * 2 * math.pi / s
            field += np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * math.pi))
        weight = (field / 6 + 0.5)[..., None]
        c1, c2 = (_hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.95))
                  for _ in range(2))
        image = weight * c1 + (1 - weight) * c2
        radius = rng.uniform(0.22, 0.4) * s
        cy, cx = rng.uniform(0.35, 0.65, size=2) * s
        theta, phi = rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
        u = math.cos(theta) * (xx - cx) + math.sin(theta) * (yy - cy)
        v = -math.sin(theta) * (xx - cx) + math.cos(theta) * (yy - cy)
        period = rng.uniform(5.0, 9.0)
        a = (math.cos(phi) * xx + math.sin(phi) * yy) * (2 * math.pi / period)
        b = (-math.sin(phi) * xx + math.cos(phi) * yy) * (2 * math.pi / period)
        inside, on = _shape_mask(shape, u, v, radius), _texture_mask(texture, a, b)
        hue, sat, val = rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
        bright, dark = _hsv_to_rgb(hue, sat, val), _hsv_to_rgb(hue, sat, val - rng.uniform(0.35, 0.5))
        image = np.where(inside[..., None], np.where(on[..., None], bright, dark), image)
        image = image * rng.uniform(0.8, 1.1) + rng.normal(0.0, 0.03, size=image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32)
