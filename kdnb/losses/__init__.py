"""The distillation losses of METHODS.md, one small file per family.

* :mod:`~kdnb.losses.response`: pixel-wise KD, CWD, DIST (on logits);
* :mod:`~kdnb.losses.feature`: feature MSE (FitNets-style), AT, NFD (on head features);
* :mod:`~kdnb.losses.relation`: SKD pairwise, IFVD (on head features);
* :mod:`~kdnb.losses.augment`: FAKD, the semantic-direction augmentation add-on.

Each loss is a pure function on already-matched tensors plus a thin ``nn.Module``.

The calling contract of every module::

    loss = module(student, teacher, masks)

* ``student`` and ``teacher`` are dicts with

  - ``"logits"``: ``(B, K, h, w)`` logits at the head's resolution (the output of the
    final 1x1 classifier, before any upsampling to the image size);
  - ``"feats"``: ``(B, C, h, w)`` head features (the classifier's input, ``C_s`` for the
    student, ``C_t`` for the teacher).

  Response losses read ``"logits"`` (CWD reads ``"feats"`` with ``on="feats"``), feature
  and relation losses read ``"feats"``. A trainer may put an encoder stage's map under
  ``"feats"`` instead of the head feature: :class:`kdnb.train.DistillTrainer` does so for
  a loss given the option ``layer="stageN"`` (stride ``2**N``), and sizes its adapter for
  that stage; a loss may read further keys it documents, and
  ignores the others. The teacher's maps may have another ``h, w``: every module resizes
  them to the student's size (bilinear, :func:`kdnb.features.match_size`). Teacher tensors
  are detached inside every loss, so no gradient ever reaches the teacher.
* ``masks``: ``(B, H, W)`` long labels at image resolution, ``255`` = ignore, or None for
  losses that do not read them (IFVD needs them; each loss nearest-resizes them itself).
* The result is a scalar, computed in float32 even under autocast, with no host-device
  synchronization, so a trainer can call every loss the same way on any device.

Modules whose loss compares features channel by channel (MSE, NFD, CWD on features) own a
:class:`~kdnb.features.ChannelAdapter` when ``student_channels != teacher_channels``; it
is part of their parameters, so give them to the optimizer with the student's.

:func:`build_losses` builds the modules from a plain dict; ``module.loss_weight`` holds
the weight::

    losses = build_losses({"kd": 1.0, "nfd": {"weight": 2.0, "norm": "spatial"}},
                          student_channels=128, teacher_channels=256, num_classes=19)
    total = sum(m.loss_weight * m(student, teacher, masks) for m in losses.values())
"""
from __future__ import annotations

import inspect
import math
from typing import Mapping, NamedTuple

from torch import nn

from kdnb.losses.feature import (NORMS, ATLoss, FeatureMSELoss, NFDLoss, at_loss,
                                 feature_mse_loss, nfd_loss, normalize_features)
from kdnb.losses.relation import IFVDLoss, SKDLoss, ifvd_loss, skd_pairwise_loss
from kdnb.losses.response import (CWDLoss, DISTLoss, PixelKDLoss, cwd_loss, dist_loss,
                                  pixel_kd_loss)
# augment last, so it may build on the families above
from kdnb.losses.augment import (ClassCovariance, FAKDLoss, fakd_feature_bound,
                                 fakd_logit_bound, fakd_nfd_bound)

__all__ = [
    "pixel_kd_loss", "cwd_loss", "dist_loss", "PixelKDLoss", "CWDLoss", "DISTLoss",
    "feature_mse_loss", "at_loss", "normalize_features", "nfd_loss", "NORMS",
    "FeatureMSELoss", "ATLoss", "NFDLoss",
    "skd_pairwise_loss", "ifvd_loss", "SKDLoss", "IFVDLoss",
    "ClassCovariance", "fakd_logit_bound", "fakd_feature_bound", "fakd_nfd_bound", "FAKDLoss",
    "MethodInfo", "METHODS", "build_losses",
]


class MethodInfo(NamedTuple):
    """One registered method: its module class, default weight and family."""

    loss: type[nn.Module]
    weight: float  # default weight in the total loss
    kind: str      # "response", "feature", "relation" or "augment"


#: method name -> (module class, default weight, kind). Default weights from METHODS.md
#: (CIRKD's scripts); the others are 1 until the workbook tunes them.
METHODS: dict[str, MethodInfo] = {
    "kd": MethodInfo(PixelKDLoss, 1.0, "response"),
    "cwd": MethodInfo(CWDLoss, 3.0, "response"),  # on logits; CIRKD uses 50 with on="feats"
    "dist": MethodInfo(DISTLoss, 1.0, "response"),
    "mse": MethodInfo(FeatureMSELoss, 1.0, "feature"),
    "at": MethodInfo(ATLoss, 1.0, "feature"),
    "nfd": MethodInfo(NFDLoss, 1.0, "feature"),
    "skd": MethodInfo(SKDLoss, 10.0, "relation"),
    "ifvd": MethodInfo(IFVDLoss, 20.0, "relation"),
    "fakd": MethodInfo(FAKDLoss, 1.0, "augment"),
}

# Filled by build_losses from its own arguments, never from the spec.
_CONTEXT = ("student_channels", "teacher_channels", "num_classes")


def _options(cls: type[nn.Module]) -> tuple[set[str], list[str]]:
    """(context arguments the class takes, options a spec may set) from its signature."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    context = {p.name for p in params if p.name in _CONTEXT}
    return context, [p.name for p in params if p.name not in _CONTEXT]


def build_losses(spec: Mapping[str, float | Mapping | None], *, student_channels: int,
                 teacher_channels: int, num_classes: int) -> nn.ModuleDict:
    """Builds loss modules by name from a plain dict.

    Args:
        spec: method name -> a weight (``"kd": 1.0``), a dict of options with an optional
            ``"weight"`` (``"nfd": {"weight": 2.0, "norm": "spatial"}``), or None for the
            defaults. Names are the keys of :data:`METHODS`; options are the keyword
            arguments of the method's module, except the three below, which come from
            this function's arguments.
        student_channels: ``C_s`` of the student's head features.
        teacher_channels: ``C_t`` of the teacher's head features.
        num_classes: number of classes ``K``.

    Returns:
        An ``nn.ModuleDict`` in the order of ``spec``; each module has a float
        ``loss_weight`` attribute (>= 0; 0 keeps the loss for logging only).

    Raises:
        ValueError: an unknown method name (the message lists the choices), an unknown
            option (named, with the accepted ones), or a weight that is not a finite
            number >= 0.
    """
    context = {"student_channels": student_channels, "teacher_channels": teacher_channels,
               "num_classes": num_classes}
    losses = nn.ModuleDict()
    for name, value in spec.items():
        if name not in METHODS:
            raise ValueError(f"unknown distillation method {name!r}: choose from "
                             f"{', '.join(METHODS)}")
        info = METHODS[name]
        if value is None:
            options = {}
        elif isinstance(value, Mapping):
            options = dict(value)
        else:
            options = {"weight": value}
        weight = options.pop("weight", info.weight)
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(f"{name}: the weight must be a finite number >= 0, got {weight!r}")
        needs, accepted = _options(info.loss)
        for key in options:
            if key in _CONTEXT:
                raise ValueError(f"{name}: {key!r} comes from build_losses' own argument, "
                                 "not from the spec")
            if key not in accepted:
                raise ValueError(f"{name}: unknown option {key!r} for {info.loss.__name__}; "
                                 f"accepted: weight{''.join(', ' + a for a in accepted)}")
        module = info.loss(**{k: context[k] for k in needs}, **options)
        module.loss_weight = float(weight)
        losses[name] = module
    return losses
