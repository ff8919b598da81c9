"""The distillation step and its parts: the losses at their layers, the teacher's outputs.

:func:`distill_step` is one step's forward computation, written out on one screen: the
student's single pass (logits, head feature and the encoder stages the losses read), the
task loss, each distillation term at its layer, and their weighted sum. It returns the
loss dict and never calls backward, an optimizer or a collective: the loop
(:class:`kdnb.train.Trainer`) does that, and notebooks/04_distillation_runs.ipynb writes
the same step by hand and checks it against this one.

* :class:`DistillLosses` holds one loss module per method, each with the layer it reads;
  :func:`build_distill_losses` builds it for a student/teacher pair from a methods dict
  (:mod:`kdnb.losses.spec`), each adapter sized for its layer's channels.
* :func:`teacher_maps` runs the frozen teacher; :class:`TeacherOutputs` computes its
  outputs once for a fixed training pool and can serve every student of a comparison.

Introduced in notebooks/04_distillation_runs.ipynb.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX
from .features import stage_channels
from .losses.spec import build_losses, resolve_methods, split_layers
from .runtime import autocast, unwrap

Maps = dict[str, torch.Tensor]


def task_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labels at image resolution (float32 under autocast)."""
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)


class DistillLosses(nn.ModuleDict):
    """The loss modules of a run, each reading the map of its own layer.

    Args:
        losses: method name -> module (from :func:`kdnb.losses.build_losses`), each with
            its ``loss_weight``.
        layers: method name -> the encoder stage it distils (``N`` for the output at
            stride ``2**N``), or None for the head feature.

    Calling it with the student's and the teacher's maps (``"feats"``, ``"logits"`` and
    ``"stageN"``) returns one term per loss; a loss of layer ``stageN`` finds that map
    under ``"feats"``, as the :mod:`kdnb.losses` contract reads it. The state dict is that
    of the modules (adapters, FAKD's class statistics), so a checkpoint resumes it.
    """

    def __init__(self, losses: Mapping[str, nn.Module], layers: Mapping[str, int | None]):
        super().__init__(losses)
        self.layers = dict(layers)
        #: encoder stages some loss reads: the student returns them, the cache keeps them
        self.stages = sorted({n for n in self.layers.values() if n is not None})

    def at_layer(self, name: str, maps: Maps) -> Maps:
        """The maps as loss ``name`` reads them: its layer's map under ``"feats"``."""
        stage = self.layers[name]
        return maps if stage is None else {**maps, "feats": maps[f"stage{stage}"]}

    def forward(self, student: Maps, teacher: Maps, masks: torch.Tensor) -> Maps:
        return {name: module(self.at_layer(name, student), self.at_layer(name, teacher), masks)
                for name, module in self.items()}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Advances the schedules of the losses that have one (FAKD's strength)."""
        for module in self.values():
            if hasattr(module, "set_progress"):
                module.set_progress(step, total_steps)


def build_distill_losses(methods: Mapping, *, student: nn.Module, teacher: nn.Module,
                         num_classes: int, seed: int | None = None) -> DistillLosses:
    """The loss modules of a methods dict for a student and a teacher.

    Args:
        methods: e.g. ``{"kd": 1.0, "nfd": {"weight": 32.0, "layer": "stage2"}}``
            (:mod:`kdnb.losses.spec`: FAKD folds into the loss it augments, each loss
            distils its ``layer``).
        student, teacher: :class:`kdnb.models.SegModel`; each loss is sized for the
            channels of its layer in each (an adapter where they differ).
        num_classes: ``K``.
        seed: the run's seed, for the losses that draw at random (CIRKD's memories and
            draws; :func:`kdnb.losses.build_losses`).

    Raises:
        ValueError: a spec that does not parse, or a loss that cannot apply to this
            student, said before training starts (FAKD on the logits needs a classifier
            linear on each position, a 1x1 conv).
    """
    spec, layers = split_layers(resolve_methods(methods))
    def channels(model: nn.Module, stage: int | None) -> int:
        return unwrap(model).classifier.in_channels if stage is None else stage_channels(model, stage)

    losses = {}
    for name, options in spec.items():
        options = dict(options)
        if name == "fakd" and options.get("on", "logits") == "logits":
            clf = unwrap(student).classifier
            if not isinstance(clf, nn.Conv2d) or clf.kernel_size != (1, 1):
                raise ValueError(f"FAKD needs a student classifier that is linear on each "
                                 f"position (a 1x1 convolution); "
                                 f"{getattr(unwrap(student), 'preset', 'this model')}'s is "
                                 f"{getattr(clf, 'kernel_size', type(clf).__name__)}: choose a "
                                 "preset with a 1x1 head")
            options["classifier"] = clf  # read by reference: its weight at every step
            if options.get("augment_teacher"):
                options["teacher_classifier"] = unwrap(teacher).classifier
        stage = layers[name]
        losses.update(build_losses({name: options}, student_channels=channels(student, stage),
                                   teacher_channels=channels(teacher, stage),
                                   num_classes=num_classes, seed=seed))
    return DistillLosses(losses, layers)


def teacher_maps(teacher: nn.Module, images: torch.Tensor, stages=(), *, amp: bool = False) -> Maps:
    """The frozen teacher's maps for ``images``, under ``torch.inference_mode``.

    Returns ``"feats"``, ``"logits"`` and ``"stageN"`` as ordinary tensors (inference
    tensors cannot be saved for the student's backward: one copy makes them normal).
    """
    with torch.inference_mode(), autocast(images.device, amp):
        _, maps = teacher(images, features=True, stages=stages)
    return {k: v.clone() for k, v in maps.items()}


def distill_step(student: nn.Module, teacher: nn.Module | Maps, losses: DistillLosses,
                 images: torch.Tensor, masks: torch.Tensor, *, task_weight: float = 1.0,
                 amp: bool = False) -> Maps:
    """One distillation step's losses; no backward, no optimizer.

    Args:
        student: the student (a :class:`kdnb.models.SegModel`, possibly DDP-wrapped).
        teacher: the frozen teacher, or its maps for these images (a cache's).
        losses: the distillation losses (:func:`build_distill_losses`).
        images: ``(B, 3, H, W)``. masks: ``(B, H, W)`` labels, 255 = ignore.
        task_weight: weight of the cross-entropy on the labels.
        amp: bf16 autocast for the forward passes (kdnb enables it on CUDA).

    Returns:
        ``{"loss": total, "task": cross-entropy, <method>: term, ...}``, 0-dim tensors;
        ``loss = task_weight * task + sum(weight * term)``.
    """
    if not isinstance(teacher, Mapping):
        teacher = teacher_maps(teacher, images, losses.stages, amp=amp)
    with autocast(images.device, amp):
        logits, student_maps = student(images, features=True, stages=losses.stages)
        task = task_loss(logits, masks)
    terms = losses(student_maps, teacher, masks)
    loss = task_weight * task
    for name, term in terms.items():
        loss = loss + losses[name].loss_weight * term
    return {"loss": loss, "task": task, **terms}


class TeacherOutputs:
    """The teacher's maps for every image of a fixed training pool, computed once.

    Valid only when the training transform is the identity (no flip, no random scale or
    crop): a cached output must belong to the image the student sees. One object can
    serve the students of a comparison (same teacher file and pool, as ``make demo`` and
    ``benchmarks/synth_distill.py`` train them): hand the same object to each
    :func:`kdnb.build.build_trainer`. It keeps the outputs of the last pool it computed
    (a pool's outputs can be large) and computes them again when the teacher file, the
    pool or the device changes, or when a student needs a map they lack (train the
    students that read encoder stages first: the others then reuse their outputs).
    """

    def __init__(self):
        self.key: tuple | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    @staticmethod
    def pool_key(teacher_file: str | Path, pool: dict, device: torch.device, amp: bool) -> tuple:
        """What the outputs depend on: the teacher file (path, size, modification time), the
        pool's settings and the device and precision they were computed with."""
        path = Path(teacher_file).resolve()
        stat = path.stat()
        return (str(path), stat.st_size, stat.st_mtime_ns, json.dumps(pool, sort_keys=True),
                str(device), amp)

    @torch.inference_mode()
    def get(self, teacher: nn.Module, dataset, stages, *, key: tuple, device: torch.device,
            amp: bool = False, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """``"feats"``, ``"logits"`` and ``"stageN"`` of ``teacher`` for every sample of
        ``dataset`` (float32, on the CPU, in dataset order)."""
        need = {"feats", "logits", *(f"stage{n}" for n in stages)}
        if self.key == key and need <= set(self.outputs):
            return {k: self.outputs[k] for k in sorted(need)}
        self.key, self.outputs = None, {}
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i][0]
                                  for i in range(start, min(start + batch_size, len(dataset)))])
            with autocast(device, amp):
                _, maps = teacher(images.to(device), features=True, stages=stages)
            for k, v in maps.items():
                parts.setdefault(k, []).append(v.float().cpu())
        self.key, self.outputs = key, {k: torch.cat(v) for k, v in parts.items()}
        return self.outputs
