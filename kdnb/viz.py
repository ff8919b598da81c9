"""Plots the CLI and the notebooks share. Matplotlib only; widgets live in the notebooks.

Every function returns a matplotlib Figure, so a figure renders without a widget front end
and can be saved to PNG.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[tuple[int, int, int]],
             ignore_index: int = 255) -> np.ndarray:
    """Maps a label map ``(H, W)`` to an RGB image ``(H, W, 3)`` in [0, 1]; ignore is white."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    table = np.ones((256, 3), dtype=np.float32)  # ignore and unknown values: white
    table[:len(palette)] = np.asarray(palette, dtype=np.float32) / 255.0
    return table[np.where(mask == ignore_index, 255, mask).clip(0, 255)]


def to_image(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` for imshow."""
    return image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def prediction_grid(images: torch.Tensor, masks: torch.Tensor,
                    predictions: dict[str, torch.Tensor], palette, *,
                    class_names: Sequence[str] | None = None, max_rows: int = 6):
    """A grid: one row per image; columns image, ground truth, then one per model.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1]. masks: ``(B, H, W)``.
        predictions: model name -> predicted labels ``(B, H, W)``.
        palette: RGB per class. class_names: for a legend.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = min(max_rows, images.shape[0])
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    titles = ["image", "ground truth", *predictions]
    for r in range(rows):
        panels = [to_image(images[r]), colorize(masks[r], palette)]
        panels += [colorize(p[r], palette) for p in predictions.values()]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
    if class_names:
        handles = [Patch(color=np.asarray(palette[i]) / 255.0, label=n)
                   for i, n in enumerate(class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06 if class_names else 0, 1, 1))
    return fig


def loss_curves(records: Sequence[dict], keys: Sequence[str] = ("loss",), *, ax=None,
                label: str = ""):
    """Plots train-loss records (``{"kind": "train", "step", key...}``) against step."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    train = [r for r in records if r.get("kind") == "train"]
    for key in keys:
        xs = [r["step"] for r in train if key in r]
        ys = [r[key] for r in train if key in r]
        if xs:
            ax.plot(xs, ys, label=f"{label} {key}".strip())
    ax.set_xlabel("step"), ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return ax.figure
