"""The distillation losses of docs/METHODS.md, one small file per family.

* :mod:`~kdnb.losses.response`: pixel-wise KD, CWD, DIST (on logits);
* :mod:`~kdnb.losses.feature`: feature MSE (FitNets-style), AT, NFD (on head features);
* :mod:`~kdnb.losses.relation`: SKD pairwise, IFVD (on head features);
* :mod:`~kdnb.losses.dense_contrast`: Af-DCD, masked feature mimicking plus a dense
  contrast over channel groups and positions (on head features, with a trainable
  generator);
* :mod:`~kdnb.losses.contrast`: CIRKD, cross-image relations in the batch and in
  per-class memories (on head features; its memories are buffers);
* :mod:`~kdnb.losses.augment`: FAKD, the semantic-direction augmentation add-on;
* :mod:`~kdnb.losses.spec`: the method-spec language (a ``methods`` dict -> modules).

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
  ``"feats"`` instead of the head feature: :class:`kdnb.distill.DistillLosses` does so for
  a loss given the option ``layer="stageN"`` (stride ``2**N``), and
  :func:`kdnb.distill.build_distill_losses` sizes its adapter for that stage; a loss may
  read further keys it documents, and ignores the others. The teacher's maps may have
  another ``h, w``: every module resizes them to the student's size (bilinear,
  :func:`kdnb.features.match_size`). Teacher tensors are detached inside every loss, so
  no gradient ever reaches the teacher.
* ``masks``: ``(B, H, W)`` long labels at image resolution, ``255`` = ignore, or None for
  losses that do not read them (IFVD needs them; each loss nearest-resizes them itself).
* The result is a scalar, computed in float32 even under autocast, with no host-device
  synchronization, so a trainer can call every loss the same way on any device.

Modules whose loss compares features channel by channel (MSE, NFD, CWD on features,
Af-DCD) own a
:class:`~kdnb.features.ChannelAdapter` when ``student_channels != teacher_channels``; it
is part of their parameters (as is Af-DCD's generator), so give them to the optimizer with
the student's. CIRKD always owns one, its projection head (conv-BN-ReLU-conv,
``C_s -> C_t``), and keeps its memories as buffers, so a module's ``state_dict`` resumes it
exactly.

:func:`build_losses` builds the modules from a plain dict; ``module.loss_weight`` holds
the weight::

    losses = build_losses({"kd": 1.0, "nfd": {"weight": 2.0, "norm": "spatial"}},
                          student_channels=128, teacher_channels=256, num_classes=19)
    total = sum(m.loss_weight * m(student, teacher, masks) for m in losses.values())
"""
from __future__ import annotations

from kdnb.losses.feature import (NORMS, ATLoss, FeatureMSELoss, NFDLoss, at_loss,
                                 feature_mse_loss, nfd_loss, normalize_features)
from kdnb.losses.relation import IFVDLoss, SKDLoss, ifvd_loss, skd_pairwise_loss
from kdnb.losses.dense_contrast import (AfDCDLoss, afdcd_loss, feature_keep_mask,
                                        omni_contrast_loss)
from kdnb.losses.contrast import (CIRKDDraws, CIRKDLoss, CIRKDTerms, cirkd_loss,
                                  cross_image_pair_loss, memory_contrast_loss)
from kdnb.losses.response import (CWDLoss, DISTLoss, PixelKDLoss, cwd_loss, dist_loss,
                                  pixel_kd_loss)
# augment last, so it may build on the families above
from kdnb.losses.augment import (SCHEDULES, ClassCovariance, FAKDLoss, fakd_feature_bound,
                                 fakd_logit_bound, fakd_nfd_bound, semantic_shift)
from kdnb.losses.spec import (METHODS, MethodInfo, build_losses, method_label, parse_methods,
                              resolve_methods, split_layers)

__all__ = [
    "pixel_kd_loss", "cwd_loss", "dist_loss", "PixelKDLoss", "CWDLoss", "DISTLoss",
    "feature_mse_loss", "at_loss", "normalize_features", "nfd_loss", "NORMS",
    "FeatureMSELoss", "ATLoss", "NFDLoss",
    "skd_pairwise_loss", "ifvd_loss", "SKDLoss", "IFVDLoss",
    "feature_keep_mask", "omni_contrast_loss", "afdcd_loss", "AfDCDLoss",
    "cross_image_pair_loss", "memory_contrast_loss", "cirkd_loss", "CIRKDTerms", "CIRKDDraws",
    "CIRKDLoss",
    "ClassCovariance", "fakd_logit_bound", "fakd_feature_bound", "fakd_nfd_bound", "FAKDLoss",
    "semantic_shift", "SCHEDULES",
    "MethodInfo", "METHODS", "build_losses", "method_label", "parse_methods",
    "resolve_methods", "split_layers",
]
