"""The optimizer and the learning-rate schedule (poly decay after an optional warm-up)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import TrainConfig


def poly_lambda(steps: int, power: float, warmup: int = 0) -> Callable[[int], float]:
    """The factor of the peak learning rate at each step: linear warm-up, then
    ``(1 - step / steps) ** power``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - step / steps) ** power
    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over every parameter of ``model`` that requires grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The poly schedule of ``cfg`` (``cfg.steps``, ``cfg.poly_power``, ``cfg.warmup_steps``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lambda(cfg.steps, cfg.poly_power, cfg.warmup_steps))
