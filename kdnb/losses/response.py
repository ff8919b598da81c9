"""Response (logit) distillation: pixel-wise KD, channel-wise distillation (CWD) and DIST.

Each loss is a pure function on already-matched tensors plus a thin module that follows
the common contract of :mod:`kdnb.losses` (``forward(student, teacher, masks)`` on dicts
with ``"logits"`` and ``"feats"``). The teacher is always detached inside, and every loss
is computed in at least float32 (half inputs are upcast, float64 is kept), so the values
are the same under autocast.

Introduced in notebooks/04_distillation_runs.ipynb.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdnb.features import match_size, resize_labels
from kdnb.losses.feature import _upcast, make_adapter

__all__ = ["pixel_kd_loss", "cwd_loss", "dist_loss", "PixelKDLoss", "CWDLoss", "DISTLoss"]


def _check_maps(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(f"{what} must be (B, K, h, w): got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    if student.shape != teacher.shape:
        hint = ("resize the teacher to the student's size with kdnb.features.match_size first"
                if student.shape[:2] == teacher.shape[:2] else "they must have the same shape")
        raise ValueError(f"student {what} {tuple(student.shape)} and teacher {what} "
                         f"{tuple(teacher.shape)} differ: {hint}")


def pixel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                  temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise knowledge distillation: every pixel is a sample.

    ``L = T^2 * mean_pixels KL(softmax(z_t / T) || softmax(z_s / T))``, the KL taken over
    the K classes of each pixel and averaged over all ``B*h*w`` pixels (or over the valid
    ones when ``mask`` is given). Unlike ``F.kl_div(..., reduction="batchmean")`` on
    ``(B, K, h, w)``, which divides by B only, the value does not grow with resolution.

    Args:
        student_logits: student logits ``z_s``.
        teacher_logits: teacher logits ``z_t`` at the same size (detached inside).
        temperature: softening temperature ``T > 0``; the loss is multiplied by ``T^2`` so
            its gradient scale does not shrink as ``T`` grows.
        mask: optional bool tensor of valid pixels; invalid pixels contribute nothing and
            are not counted. With no valid pixel at all the loss is 0.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Shape:
        ``student_logits, teacher_logits: (B, K, h, w)``; ``mask: (B, h, w)``.

    Reference:
        Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
        arXiv 1503.02531; used pixel-wise for segmentation by Liu et al., "Structured
        Knowledge Distillation for Semantic Segmentation", arXiv 1903.04197.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """
    _check_maps(student_logits, teacher_logits, "logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    expected = (student_logits.shape[0], *student_logits.shape[2:])
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != expected):
        raise ValueError(f"mask must be a bool tensor of valid pixels {expected}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)  # (B, h, w)
    if mask is None:
        return temperature ** 2 * kl.mean()
    valid = mask.to(kl.dtype)
    # clamp instead of branching on the count: no host-device sync, and 0 (not nan) when empty
    return temperature ** 2 * (kl * valid).sum() / valid.sum().clamp_min(1.0)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, *, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation: each channel is a distribution over its positions.

    ``L = tau^2 / (B*C) * sum_{b,c} KL(softmax(t[b,c] / tau) || softmax(s[b,c] / tau))``,
    the softmax and the KL over the ``h*w`` positions of one channel of one sample.

    Resolution: nearest-upsampling both maps by any integer factor leaves the loss
    unchanged (each distribution is split evenly over the copies, and KL is invariant to
    that), so it does not grow with resolution although it sums over positions.

    Args:
        student: student logits (or adapted features), ``C`` channels.
        teacher: teacher map of the same shape (detached inside).
        tau: temperature; CIRKD uses 4.

    Returns:
        A scalar tensor.

    Shape:
        ``student, teacher: (B, C, h, w)``.

    Reference:
        Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense
        Prediction", ICCV 2021, arXiv 2011.13256.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """
    _check_maps(student, teacher, "maps")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    b, c = student.shape[:2]
    log_p_s = F.log_softmax(_upcast(student).flatten(2) / tau, dim=2)  # (B, C, h*w)
    log_p_t = F.log_softmax(_upcast(teacher.detach()).flatten(2) / tau, dim=2)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return tau ** 2 * kl / (b * c)


def _pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of ``x, y (N, D)``; ``eps`` as in the DIST code."""
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """DIST: match the relations of predictions rather than the predictions themselves.

    With ``p = softmax(z / T)`` over the classes of each pixel:

    * inter-class term ``1 - mean_pixels pearson(p_s[pixel, :], p_t[pixel, :])``, the
      correlation over the K classes of one pixel;
    * intra-class term ``1 - mean_classes pearson(p_s[:, k], p_t[:, k])``, the correlation
      of one class's probabilities over pixels.

    ``L = T^2 * (beta * inter + gamma * intra)``.

    Pooling (as in the authors' segmentation code, ``segmentation/losses/dist_kd.py`` of
    hunto/DIST_KD): every pixel of every image of the batch is one row, so the intra-class
    correlation runs over all ``B*h*w`` pixels of the batch together, not image by image.
    Both terms are means of correlations, and a correlation is unchanged when every sample
    is repeated, so nearest-upsampling the logits leaves the loss unchanged. The ``T^2``
    factor follows the authors' classification code (their segmentation code uses T = 1).
    The minimum, at ``z_s = z_t``, is 0 up to the ``eps = 1e-8`` of the correlation.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits of the same shape (detached inside).
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: softmax temperature ``T``.

    Returns:
        A scalar tensor in ``[0, 2 * T^2 * (beta + gamma)]``.

    Shape:
        ``student_logits, teacher_logits: (B, K, h, w)``.

    Reference:
        Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
        NeurIPS 2022, arXiv 2205.10536.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """
    _check_maps(student_logits, teacher_logits, "logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = student_logits.shape[1]
    # (B, K, h, w) -> (B*h*w, K): one row per pixel of the batch
    p_s = F.softmax(_upcast(student_logits) / temperature, dim=1)
    p_t = F.softmax(_upcast(teacher_logits.detach()) / temperature, dim=1)
    p_s, p_t = p_s.movedim(1, -1).reshape(-1, k), p_t.movedim(1, -1).reshape(-1, k)
    inter = 1 - _pearson(p_s, p_t).mean()
    intra = 1 - _pearson(p_s.T, p_t.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


class PixelKDLoss(nn.Module):
    """Pixel-wise KD on the logits, with the :mod:`kdnb.losses` calling contract.

    Args:
        temperature: softening temperature ``T``.
        ignore_index: when given, pixels whose label (masks nearest-resized to the logits'
            size) equals it are left out. The default None keeps every pixel, as CIRKD
            does: the teacher's prediction on an unlabelled pixel is still a target.

    Shape:
        ``forward(student, teacher, masks)``: ``student["logits"] (B, K, h, w)``,
        ``teacher["logits"] (B, K, h', w')`` (resized to ``h, w``), ``masks (B, H, W)``
        (only read when ``ignore_index`` is set). Returns a scalar.

    Reference:
        Hinton, Vinyals, Dean, arXiv 1503.02531 (see :func:`pixel_kd_loss`).

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.ignore_index = temperature, ignore_index

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s = student["logits"]
        t = match_size(teacher["logits"].detach(), s.shape[-2:])
        mask = None
        if self.ignore_index is not None:
            if masks is None:
                raise ValueError("PixelKDLoss(ignore_index=...) needs masks (B, H, W)")
            if masks.ndim != 3 or masks.shape[0] != s.shape[0]:
                raise ValueError(f"masks must be (B, H, W) with B = {s.shape[0]}, "
                                 f"got {tuple(masks.shape)}")
            mask = resize_labels(masks, s.shape[-2:]) != self.ignore_index
        return pixel_kd_loss(s, t, temperature=self.temperature, mask=mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"


class CWDLoss(nn.Module):
    """Channel-wise distillation, on the logits (default) or on adapted head features.

    Args:
        tau: temperature (CIRKD: 4).
        on: ``"logits"`` (CIRKD weight 3) or ``"feats"`` (CIRKD weight 50), in which case
            the student features go through a :class:`~kdnb.features.ChannelAdapter`.
        student_channels: ``C_s``; needed when ``on="feats"``.
        teacher_channels: ``C_t``; needed when ``on="feats"``.
        adapter: None builds an adapter only when the channels differ, True always,
            False never (then the channels must agree).
        batchnorm: give the adapter a BatchNorm (CIRKD's CWD connector has none).

    Shape:
        ``forward(student, teacher, masks)`` reads ``"logits"`` or ``"feats"``
        ``(B, C, h, w)`` from both dicts; the teacher map is resized to the student's
        size; masks are not used. Returns a scalar.

    Reference:
        Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
        arXiv 2011.13256.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, *, tau: float = 4.0, on: str = "logits", student_channels: int | None = None,
                 teacher_channels: int | None = None, adapter: bool | None = None,
                 batchnorm: bool = False):
        super().__init__()
        if on not in ("logits", "feats"):
            raise ValueError(f"on must be 'logits' or 'feats', got {on!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau, self.on = tau, on
        self.adapter = None
        if on == "feats":
            if student_channels is None or teacher_channels is None:
                raise ValueError("CWDLoss(on='feats') needs student_channels and teacher_channels")
            self.adapter = make_adapter(student_channels, teacher_channels, adapter=adapter,
                                        batchnorm=batchnorm)

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s = student[self.on]
        if self.adapter is not None:
            s = self.adapter(s)
        t = match_size(teacher[self.on].detach(), s.shape[-2:])
        return cwd_loss(s, t, tau=self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, on={self.on!r}"


class DISTLoss(nn.Module):
    """DIST on the logits, with the :mod:`kdnb.losses` calling contract.

    Args:
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: softmax temperature.

    Shape:
        ``forward(student, teacher, masks)``: ``"logits" (B, K, h, w)`` from both dicts
        (teacher resized to the student's size); masks are not used. Returns a scalar.

    Reference:
        Huang et al., "Knowledge Distillation from A Stronger Teacher", arXiv 2205.10536.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s = student["logits"]
        t = match_size(teacher["logits"].detach(), s.shape[-2:])
        return dist_loss(s, t, beta=self.beta, gamma=self.gamma, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
