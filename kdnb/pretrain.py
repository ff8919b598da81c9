"""Pretrained encoders without a download: a pretext classification task, trained once.

The papers' students and teachers start from ImageNet weights; kdnb's SynthScenes
benchmark can start from encoders trained on :class:`kdnb.data.pretext.PretextShapes`
instead (the "pretrained" regime), which no SynthScenes label ever saw. An encoder is
trained with global average pooling of its last stage and a linear classifier over the 16
pretext classes; only the encoder is kept, as a kdnb checkpoint in the checkpoint cache
(``<data root>/checkpoints/pretext-<encoder>-<key>.pt``), and a run loads it with
``TrainConfig(encoder_init=PATH)``.

Pretraining takes minutes on a CPU and is not resumable: a killed one starts over (the
file appears only when it is complete, atomically).

Introduced in notebooks/02_normalized_feature_distillation.ipynb.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import atomic_save, load_checkpoint
from .config import settings_key
from .data import data_root
from .data.pretext import PretextShapes
from .data.sampler import StepSampler, collate
from .models import SegModel, build_model, get_preset
from .runtime import seed_everything


@dataclass
class PretrainConfig:
    """One pretext run: which preset's encoder, and the budget."""

    preset: str = "synth-student"  # whose encoder (kdnb.models.PRESETS)
    steps: int = 1500             # optimizer steps (val accuracy 99.6 % for MobileNetV2)
    batch_size: int = 64
    lr: float = 2e-3              # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    size: int = 64                # image side, as the SynthScenes recipes
    length: int = 20000           # training pool of PretextShapes
    seed: int = 0

    def __post_init__(self):
        get_preset(self.preset)
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"pretraining needs steps >= 1, batch_size >= 2 and lr > 0, got "
                             f"{self.steps}, {self.batch_size}, {self.lr}")


def encoder_name(preset: str) -> str:
    return get_preset(preset).encoder


def pretext_path(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """Where the encoder ``cfg`` trains is cached: one file per encoder and settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "preset"}
    key = settings_key({"encoder": encoder_name(cfg.preset), **settings})
    return data_root(root) / "checkpoints" / f"pretext-{encoder_name(cfg.preset)}-{key}.pt"


class PretextClassifier(nn.Module):
    """A SegModel's encoder, global average pooling of its last stage, a linear layer."""

    def __init__(self, model: SegModel, num_classes: int):
        super().__init__()
        self.model = model  # for its input normalization and padding; only the encoder trains
        self.head = nn.Linear(model.net.encoder.out_channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.model.mean) / self.model.std
        last = self.model.net.encoder(x)[-1]  # (B, C, H / 32, W / 32)
        return self.head(last.mean((2, 3)))


@torch.no_grad()
def accuracy(net: PretextClassifier, dataset, batch: int = 256) -> float:
    net.eval()
    right = 0
    for start in range(0, len(dataset), batch):
        images, labels = collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        right += int((net(images).argmax(1) == labels).sum())
    net.train()
    return right / len(dataset)


def pretrain_encoder(cfg: PretrainConfig, path: str | Path, *, progress: bool = True) -> dict:
    """Trains ``cfg.preset``'s encoder on PretextShapes and writes it to ``path``.

    Returns:
        The checkpoint written: ``"model"`` (the encoder's state dict), ``"preset"``,
        ``"encoder"``, ``"num_classes"`` (16, the pretext's), ``"val_accuracy"``,
        ``"config"``, ``"kdnb_version"``, ``"kind": "pretext-encoder"``.
    """
    seed_everything(cfg.seed)
    model = build_model(cfg.preset, 2)
    net = PretextClassifier(model, PretextShapes.num_classes)
    train = PretextShapes("train", size=cfg.size, length=cfg.length, seed=cfg.seed)
    val = PretextShapes("val", size=cfg.size, length=1000, seed=cfg.seed)
    params = [*model.net.encoder.parameters(), *net.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    sampler = StepSampler(len(train), cfg.batch_size, cfg.steps, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc=f"pretext {encoder_name(cfg.preset)}", dynamic_ncols=True)
    start = time.perf_counter()
    net.train()
    for images, labels in loader:
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    record = {"model": model.net.encoder.state_dict(), "preset": cfg.preset,
              "encoder": encoder_name(cfg.preset), "num_classes": PretextShapes.num_classes,
              "val_accuracy": accuracy(net, val), "config": dataclasses.asdict(cfg),
              "seconds": time.perf_counter() - start, "kdnb_version": __version__,
              "kind": "pretext-encoder"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, Path(path))
    return record


def pretrain_or_load(cfg: PretrainConfig, root: str | Path | None = None, *,
                     progress: bool = True) -> Path:
    """The cached encoder of ``cfg`` (trained first if the cache lacks it)."""
    path = pretext_path(cfg, root)
    if not path.is_file():
        pretrain_encoder(cfg, path, progress=progress)
    return path


def load_encoder(model: SegModel, path: str | Path) -> None:
    """Loads a pretext encoder (:func:`pretrain_encoder`) into ``model``'s encoder.

    Raises:
        ValueError: the file is no pretext encoder, or one of another encoder.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "pretext-encoder":
        raise ValueError(f"{path} is not a pretext encoder (kdnb.pretrain): encoder_init takes "
                         "the file pretrain_encoder writes, not a model.pt")
    wanted = encoder_name(model.preset)
    if ckpt["encoder"] != wanted:
        raise ValueError(f"{path} holds a {ckpt['encoder']} encoder but {model.preset} has a "
                         f"{wanted} one: pretrain {model.preset}'s encoder (kdnb.pretrain)")
    model.net.encoder.load_state_dict(ckpt["model"])
