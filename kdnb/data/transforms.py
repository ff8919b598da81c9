"""Joint image/mask transforms with explicit random generators.

Every random choice is drawn from a ``torch.Generator`` passed in by the caller, never
from the global RNG. :class:`Augmented` seeds that generator from
``(seed, epoch, index)``, so a sample's augmentation does not depend on worker count,
worker order or where a run was resumed: this is what makes resume exact.

Images are floats in [0, 1]; normalization is the model's first layer
(:class:`kdnb.models.SegModel`), so plots and datasets never deal with it.
Masks are resized with nearest neighbour and padded with ``ignore_index``
(torchvision's ``tv_tensors.Mask`` selects nearest interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


@dataclass
class TrainTransform:
    """Random scale, crop with ignore padding, horizontal flip.

    Args:
        crop_size: ``(h, w)`` of the output, or None to keep the scaled size (no crop).
        scale_range: random rescale factor range (docs/METHODS.md, "Training recipe": 0.5-2.0).
        flip: random horizontal flip with probability 0.5.
        ignore_index: label of padded pixels.
    """

    crop_size: tuple[int, int] | None = (512, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    ignore_index: int = 255

    def __post_init__(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range={self.scale_range} must satisfy 0 < min <= max")
        if self.crop_size is not None:
            self.crop_size = tuple(int(c) for c in self.crop_size)
            if min(self.crop_size) <= 0:
                raise ValueError(f"crop_size={self.crop_size} must be positive")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tv_tensors.Mask(mask)
        h, w = image.shape[-2:]
        scale = _uniform(g, *self.scale_range)
        if scale != 1.0:
            size = [max(1, round(h * scale)), max(1, round(w * scale))]
            image = TF.resize(image, size, antialias=True)
            mask = TF.resize(mask, size)  # nearest for tv_tensors.Mask
        if self.crop_size is not None:
            ch, cw = self.crop_size
            h, w = image.shape[-2:]
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            if ph or pw:  # pad right/bottom: image with 0, mask with ignore
                image = TF.pad(image, [0, 0, pw, ph], fill=0.0)
                mask = TF.pad(mask, [0, 0, pw, ph], fill=self.ignore_index)
                h, w = image.shape[-2:]
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            image = TF.crop(image, top, left, ch, cw)
            mask = TF.crop(mask, top, left, ch, cw)
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        return image.clamp(0.0, 1.0), mask.as_subclass(torch.Tensor)


class Augmented(Dataset):
    """Applies a joint transform with a generator seeded by ``(seed, epoch, index)``.

    Args:
        dataset: yields ``(image, mask)``.
        transform: a callable ``(image, mask, generator) -> (image, mask)``.
        seed: run seed.

    Items are fetched by ``index`` (epoch 0) or by ``(index, epoch)`` keys, which the
    training loop's sampler produces so that each epoch sees fresh augmentations.
    """

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, palette, num_classes... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, epoch = (key, 0) if isinstance(key, int) else key
        image, mask = self.dataset[index]
        g = torch.Generator().manual_seed(hash((self.seed, int(epoch), int(index))) & (2**62 - 1))
        return self.transform(image, mask, g)
