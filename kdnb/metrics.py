"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

The confusion matrix is an integer tensor on the metric's device, so updates cost no
host-device synchronization, and summing it across DDP ranks gives exactly the metric of
the whole evaluation set. :func:`evaluate` scores a model on a dataset.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from .data import IGNORE_INDEX
from .data.sampler import collate
from .runtime import autocast


class SegMetric:
    """Accumulates a ``(K, K)`` confusion matrix (rows: target, columns: prediction).

    Args:
        num_classes: number of classes ``K``.
        ignore_index: target value that is skipped.
        device: where the matrix lives; defaults to the device of the first update.

    Shape:
        ``update(preds, targets)``: ``preds (B, H, W)`` class indices, or logits
        ``(B, K, H, W)`` (argmax is taken); ``targets (B, H, W)``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: need at least 2")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        k = self.num_classes
        if preds.ndim == targets.ndim + 1:
            if preds.shape[1] != k:
                raise ValueError(f"logits have {preds.shape[1]} channels but the metric has "
                                 f"{k} classes")
            preds = preds.argmax(1)
        if preds.shape != targets.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and targets "
                             f"{tuple(targets.shape)} differ in shape")
        if self.confusion.device != preds.device:
            self.confusion = self.confusion.to(preds.device)
        targets = targets.long()
        valid = targets != self.ignore_index
        # Out-of-range targets would silently land in another class's cell: refuse them.
        # (Only checked on CPU, where it costs no device sync.)
        if targets.device.type == "cpu":
            bad = valid & ((targets < 0) | (targets >= k))
            if bad.any():
                values = sorted(set(targets[bad].unique().tolist()))[:10]
                raise ValueError(f"target values {values} are outside the {k} classes and not "
                                 f"ignore_index={self.ignore_index}: check the label mapping")
        index = targets[valid] * k + preds[valid].long()
        self.confusion += torch.bincount(index, minlength=k * k).view(k, k)

    def all_reduce(self) -> None:
        """Sums the confusion matrix over DDP ranks (a no-op outside DDP)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """Returns ``{"miou", "iou" (list), "acc", "macc"}``; mIoU over classes that occur.

        A class absent from both targets and predictions has no IoU (NaN in ``iou``) and
        does not count in ``miou``, as in the Cityscapes and VOC evaluation scripts.
        """
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        per_class_total = cm.sum(1)
        class_acc = torch.where(per_class_total > 0, tp / per_class_total.clamp(min=1),
                                torch.full_like(tp, float("nan")))
        total = cm.sum()
        return {
            "miou": float(torch.nanmean(iou)) if (union > 0).any() else float("nan"),
            "iou": iou.tolist(),
            "acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "macc": float(torch.nanmean(class_acc)) if (per_class_total > 0).any() else float("nan"),
        }


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 16,
             device: torch.device | str = "cpu", amp: bool = True, progress: bool = False,
             rank: int = 0, world: int = 1) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``dataset``.

    The model is scored in eval mode (and left in the mode it was in), with bf16 autocast
    on CUDA when ``amp``. Under DDP each rank evaluates a strided shard and the confusion
    matrices are summed.

    Returns:
        :meth:`SegMetric.compute`'s dict with ``"images"``, the number scored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    metric = SegMetric(num_classes, IGNORE_INDEX, device=device)
    indices = list(range(rank, len(dataset), world))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="eval", leave=False)
    for batch in batches:
        images, masks = collate([dataset[i] for i in batch])
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with autocast(device, amp and device.type == "cuda"):
            logits = model(images)
        metric.update(logits.argmax(1), masks)
    metric.all_reduce()
    model.train(was_training)
    return {**metric.compute(), "images": len(dataset)}
