"""Plots the CLI and the notebooks share. Matplotlib only; widgets live in the notebooks.

Every function returns a matplotlib Figure, so a figure renders without a widget front end
and can be saved to PNG; none of them switches the backend or touches a random generator.
:class:`LiveCurves` is the trainer callback that draws training curves while runs train.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
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
                    class_names: Sequence[str] | None = None, max_rows: int = 6, figure=None):
    """A grid: one row per image; columns image, ground truth, then one per model.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1]. masks: ``(B, H, W)``.
        predictions: model name -> predicted labels ``(B, H, W)``.
        palette: RGB per class. class_names: for a legend.
        max_rows: at most this many images.
        figure: an empty ``matplotlib.figure.Figure`` to draw on (resized to fit);
            default a new pyplot figure, which a notebook shows inline.
    """
    from matplotlib.patches import Patch

    rows = min(max_rows, images.shape[0])
    cols = 2 + len(predictions)
    size = (2.2 * cols, 2.2 * rows + 0.6)
    if figure is None:
        import matplotlib.pyplot as plt
        figure = plt.figure(figsize=size)
    else:
        figure.set_size_inches(*size)
    fig = figure
    axes = fig.subplots(rows, cols, squeeze=False)
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


#: record keys that are no distillation term (see :class:`LiveCurves`)
NOT_TERMS = frozenset({"kind", "step", "loss", "task", "lr", "s_per_step", "skipped", "split",
                       "miou", "iou", "acc", "macc", "images"})


def method_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour per name, in order (tab10, then tab20's light shades: up to 20)."""
    from matplotlib import colormaps

    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    if len(names) > len(palette):
        raise ValueError(f"{len(names)} names but {len(palette)} distinct colours")
    return {name: palette[i] for i, name in enumerate(names)}


def _plain(value: float, _pos=None) -> str:
    """A log-axis tick as a plain number (0.02, 5, 100), not in 10^x notation."""
    return f"{value:g}"


def _plain_2_5(value: float, _pos=None) -> str:
    """Minor log-axis ticks: only 2 and 5 times a power of ten are labelled."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return _plain(value) if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


class LiveCurves:
    """A trainer callback that redraws, in place, the curves of every run it has seen.

    Three panels: the task cross-entropy (the total loss for a run without a task term),
    every distillation term (log scale), and the val mIoU of each evaluation. Runs of the
    same method share a colour, and no two methods do; the run being trained is drawn
    boldest.

    Args:
        total_runs: how many runs will be drawn, for the title (None: no count).
        min_interval: seconds between two redraws while a run trains (the drawing costs
            more than a step on a CPU); :meth:`draw` always redraws.
        figsize: the figure's size in inches.
        show: display the figure through an IPython display handle (False: draw only,
            for tests and scripts; the figure is ``self.fig``).

    Use::

        live = LiveCurves(total_runs=4)
        live.start("kd", seed=0)
        trainer = build_trainer(cfg, run_dir, callbacks=[live])

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """

    def __init__(self, *, total_runs: int | None = None, min_interval: float = 0.0,
                 figsize: tuple[float, float] = (11.0, 3.4), show: bool = True):
        from matplotlib.figure import Figure

        self.records: dict[tuple[str, int], list[dict]] = {}
        self.current: tuple[str, int] | None = None
        self.total, self.min_interval, self.last_draw = total_runs, min_interval, 0.0
        self.fig = Figure(figsize=figsize)
        self.axes = self.fig.subplots(1, 3)
        self.handle = None
        if show:
            from IPython.display import display
            self.handle = display(self.fig, display_id=True)

    def start(self, name: str, seed: int = 0) -> None:
        """The records that follow belong to run ``(name, seed)``."""
        self.current = (name, seed)
        self.records[self.current] = []

    def __call__(self, record: dict) -> None:
        if self.current is None:
            raise RuntimeError("LiveCurves got a record before start(name, seed) named its run")
        self.records[self.current].append(record)
        if time.perf_counter() - self.last_draw >= self.min_interval:
            self.draw()

    def replay(self, log: str | Path) -> bool:
        """Adds a finished run's records from its ``metrics.jsonl`` (a run directory or the
        file itself), for a model loaded from a cache; returns False if there is none."""
        log = Path(log)
        if log.is_dir():
            log = log / "metrics.jsonl"
        if not log.is_file():
            return False
        self.records[self.current] = [json.loads(line) for line in log.read_text().splitlines()
                                      if line.strip()]
        self.draw()
        return True

    def draw(self) -> None:
        from matplotlib.ticker import FuncFormatter

        names = list(dict.fromkeys(name for name, _ in self.records))
        colors = method_colors(names)
        for ax in self.axes:
            ax.clear()
        labelled = set()
        for (name, seed), records in self.records.items():
            train = [r for r in records if r["kind"] == "train"]
            evals = [r for r in records if r["kind"] == "eval"]
            now = (name, seed) == self.current
            style = dict(color=colors[name], lw=1.4 if now else 0.8, alpha=1.0 if now else 0.55,
                         label=None if name in labelled else name)
            labelled.add(name)
            steps = [r["step"] for r in train]
            self.axes[0].plot(steps, [r.get("task", r["loss"]) for r in train], **style)
            for term in sorted({k for r in train for k in r} - NOT_TERMS):
                self.axes[1].plot(steps, [r.get(term, float("nan")) for r in train],
                                  **{**style, "label": None})
            self.axes[2].plot([r["step"] for r in evals], [100 * r["miou"] for r in evals],
                              marker="o", ms=3, **style)
        titles = ("task cross-entropy (train)", "distillation terms (train, log)",
                  "val mIoU (%)")
        for ax, title in zip(self.axes, titles):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
        if self.axes[1].lines:
            self.axes[1].set_yscale("log")
            self.axes[1].yaxis.set_major_formatter(FuncFormatter(_plain))
            self.axes[1].yaxis.set_minor_formatter(FuncFormatter(_plain_2_5))
        if self.axes[2].lines:  # beside the panels, where it hides no curve
            self.axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                borderaxespad=0.0)
        if self.current is not None:
            name, seed = self.current
            count = f"run {len(self.records)}/{self.total}: " if self.total else ""
            self.fig.suptitle(f"{count}{name}, seed {seed}", fontsize=10)
        self.fig.tight_layout()
        if self.handle is not None:
            self.handle.update(self.fig)
        self.last_draw = time.perf_counter()
