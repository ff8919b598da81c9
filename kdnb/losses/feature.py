"""Feature distillation: FitNets-style MSE, attention transfer (AT) and NFD.

The functional forms take already-matched tensors: the student adapted to the teacher's
channels (when the loss needs it) and the teacher resized to the student's size. They
refuse anything else with a message that says which step is missing. The modules take raw
head features, own the :class:`~kdnb.features.ChannelAdapter` when the channels differ,
and resize the teacher with :func:`~kdnb.features.match_size`.

Introduced in notebooks/02_normalized_feature_distillation.ipynb.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdnb.features import ChannelAdapter, match_size

__all__ = ["NORMS", "feature_mse_loss", "at_loss", "normalize_features", "nfd_loss",
           "make_adapter", "FeatureMSELoss", "ATLoss", "NFDLoss"]

#: normalization of :func:`normalize_features` -> the axes its statistics are taken over.
NORMS: dict[str, tuple[int, ...]] = {
    "none": (),
    "channel": (2, 3),     # per sample and channel, over h, w (NFD)
    "spatial": (1,),       # per sample and pixel, over C
    "layer": (1, 2, 3),    # per sample, over C, h, w
    "batch": (0, 2, 3),    # per channel, over B, h, w
}
REDUCTIONS = ("mean", "paper", "frobenius")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # float16/bfloat16 under autocast -> float32; float64 stays (tests and gradcheck use it).
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_features(student: torch.Tensor, teacher: torch.Tensor, *, same_channels: bool) -> None:
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(f"features must be (B, C, h, w): got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    s, t = tuple(student.shape), tuple(teacher.shape)
    if s[0] != t[0]:
        raise ValueError(f"student features {s} and teacher features {t} differ in batch size")
    if s[2:] != t[2:]:
        raise ValueError(f"student features {s} and teacher features {t} differ: resize the "
                         "teacher to the student's size with kdnb.features.match_size first")
    if same_channels and s[1] != t[1]:
        raise ValueError(f"student features {s} and teacher features {t} differ: adapt the "
                         f"student with ChannelAdapter({s[1]}, {t[1]}) first")


def make_adapter(student_channels: int, teacher_channels: int, *, adapter: bool | None = None,
                 batchnorm: bool = False) -> ChannelAdapter | None:
    """The adapter a feature loss owns: None when it needs none.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        adapter: None builds one only when the channels differ, True always (FitNets'
            regressor), False never, which needs equal channels.
        batchnorm: append a BatchNorm to the 1x1 convolution.

    Returns:
        A :class:`~kdnb.features.ChannelAdapter` or None.
    """
    if adapter is None:
        adapter = student_channels != teacher_channels
    if not adapter:
        if student_channels != teacher_channels:
            raise ValueError(f"student_channels={student_channels} and teacher_channels="
                             f"{teacher_channels} differ but adapter=False: allow the adapter "
                             f"(adapter=None or True) to map {student_channels} -> "
                             f"{teacher_channels}")
        return None
    return ChannelAdapter(student_channels, teacher_channels, batchnorm=batchnorm)


def matched_feats(student: dict, teacher: dict, adapter: nn.Module | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's head feature through its adapter (if any) and the teacher's, detached
    and resized to the student's size: the pair every feature loss compares."""
    s = student["feats"] if adapter is None else adapter(student["feats"])
    return s, match_size(teacher["feats"].detach(), s.shape[-2:])


def feature_mse_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """FitNets-style feature regression: ``mean((A f_s - f_t)^2)``.

    The unnormalized baseline that NFD argues against: its scale, and its gradient, follow
    the magnitude of the teacher's features.

    Args:
        student_feats: adapted student features ``A f_s``.
        teacher_feats: teacher features of the same shape (detached inside).

    Returns:
        A scalar tensor, the mean over every element.

    Shape:
        ``student_feats, teacher_feats: (B, C_t, h, w)``.

    Reference:
        Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """
    _check_features(student_feats, teacher_feats, same_channels=True)
    return F.mse_loss(_upcast(student_feats), _upcast(teacher_feats.detach()))


def _attention(f: torch.Tensor) -> torch.Tensor:
    # (B, C, h, w) -> (B, h*w), unit L2 norm per sample
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """Attention transfer: match where the features are strong, not the features.

    ``a(f) = mean_c f^2`` flattened over positions and L2-normalized per sample;
    ``L = mean_b ||a_s - a_t||_2^2``. The squared norm (a sum over positions, not a mean)
    keeps it independent of resolution: nearest-upsampling by ``r`` repeats each entry
    ``r^2`` times and divides each normalized entry by ``r``. The paper's code takes a
    mean over positions instead, which is this loss divided by ``h*w``.

    The attention map has no channel axis, so the channels may differ: no adapter needed.

    Args:
        student_feats: student features.
        teacher_feats: teacher features at the same ``B, h, w`` (detached inside).

    Returns:
        A scalar tensor in ``[0, 2]`` (the maps are non-negative unit vectors).

    Shape:
        ``student_feats: (B, C_s, h, w)``, ``teacher_feats: (B, C_t, h, w)``.

    Reference:
        Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the
        Performance of Convolutional Neural Networks via Attention Transfer",
        arXiv 1612.03928.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """
    _check_features(student_feats, teacher_feats, same_channels=False)
    a_s = _attention(_upcast(student_feats))
    a_t = _attention(_upcast(teacher_feats.detach()))
    return (a_s - a_t).pow(2).sum(1).mean()


def normalize_features(f: torch.Tensor, norm: str = "channel", eps: float = 1e-5) -> torch.Tensor:
    """Standardizes ``f`` to zero mean and unit variance over the axes that ``norm`` names.

    ``N(f) = (f - mu) / sqrt(var + eps)``, ``mu`` and the biased ``var`` taken over:

    * ``"none"``: nothing, ``f`` is returned as is;
    * ``"channel"``: ``h, w`` for each sample and channel (NFD; instance norm);
    * ``"spatial"``: ``C`` for each sample and pixel;
    * ``"layer"``: ``C, h, w`` for each sample (layer norm);
    * ``"batch"``: ``B, h, w`` for each channel (batch norm with batch statistics, no
      running averages).

    No affine parameters: there is nothing to learn.

    Args:
        f: features.
        norm: one of ``none, channel, spatial, layer, batch``.
        eps: added to the variance.

    Returns:
        A tensor of the same shape.

    Shape:
        ``(B, C, h, w) -> (B, C, h, w)``.

    Reference:
        Liu, Yang, Chen, "Normalized Feature Distillation for Semantic Segmentation",
        arXiv 2207.05256.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    if f.ndim != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(f.shape)}")
    dims = NORMS[norm]
    if not dims:
        return f
    # PyTorch's fused normalizations compute exactly this (biased variance, eps inside the
    # root) with an analytic backward, about 7x faster on a CPU than autograd through
    # var_mean. "spatial" has none (over C per pixel), and they refuse a single value per
    # group (and batch norm eps = 0): those take the formula.
    if math.prod([f.shape[d] for d in dims]) > 1:  # (a list: torch.compile traces no generator)
        if norm == "channel":
            return F.group_norm(f, f.shape[1], eps=eps)  # a group per channel: over h, w
        if norm == "layer":
            return F.group_norm(f, 1, eps=eps)  # one group: over C, h, w
        if norm == "batch" and eps > 0:
            return F.batch_norm(f, None, None, training=True, eps=eps)  # no running stats
    var, mean = torch.var_mean(f, dim=dims, correction=0, keepdim=True)
    return (f - mean) * torch.rsqrt(var + eps)


def nfd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, norm: str = "channel",
             eps: float = 1e-5, reduction: str = "mean") -> torch.Tensor:
    """Normalized feature distillation: imitate the pattern of the features, not their size.

    ``L = mean((N(A f_s) - N(f_t))^2)`` with ``N`` from :func:`normalize_features`
    applied to both sides. With the default ``"channel"`` normalization,
    ``N(a * f_t + b) = N(f_t)`` for any per-channel ``a > 0`` and ``b`` (up to ``eps``),
    so the loss is zero when the adapted student is such a map of the teacher.

    Scales (``reduction``):

    * ``"mean"`` (default): the mean over all ``B*C*h*w`` elements.
    * ``"paper"``: the paper's "Frobenius norm of the difference divided by h*w", read
      as the *squared* Frobenius norm over ``C, h, w`` of one sample, divided by ``h*w``
      and averaged over the batch: ``(1/B) sum_b ||N(A f_s)_b - N(f_t)_b||_F^2 / (h*w)``.
      That is exactly ``C_t`` times the ``"mean"`` value, so a weight ``w`` under
      ``"paper"`` equals a weight ``w * C_t`` under ``"mean"`` (e.g. ``C_t = 256``: paper
      weight 1 == mean weight 256). **(ours)**: the squared reading is the one under which
      the loss does not depend on resolution and the two scales differ by a constant
      factor.
    * ``"frobenius"``: the formula as the paper writes it, the *unsquared* Frobenius norm:
      ``(1/B) sum_b ||N(A f_s)_b - N(f_t)_b||_F / (h*w)``. Its gradient,
      ``d_b / (B ||d_b||_F h w)`` for sample ``b``, has the same size whatever the
      error: a unit direction scaled by ``1/(B h w)``, where the squared loss's gradient
      shrinks with the error (``2 d_b / (B h w)`` for ``"paper"``). At ``d_b = 0`` the gradient is
      0. The value shrinks as ``1/sqrt(h*w)`` when the maps are upsampled (``||d||``
      grows as ``sqrt(h*w)``), so its weight depends on the layer's resolution.

    Args:
        student_feats: student features already adapted to the teacher's channels.
        teacher_feats: teacher features of the same shape (detached inside).
        norm: one of ``none, channel, spatial, layer, batch``.
        eps: added to the variance in ``N``.
        reduction: ``"mean"``, ``"paper"`` or ``"frobenius"`` (see above).

    Returns:
        A scalar tensor.

    Shape:
        ``student_feats, teacher_feats: (B, C_t, h, w)``.

    Reference:
        Liu, Yang, Chen, "Normalized Feature Distillation for Semantic Segmentation",
        arXiv 2207.05256.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    _check_features(student_feats, teacher_feats, same_channels=True)
    n_s = normalize_features(_upcast(student_feats), norm, eps)
    n_t = normalize_features(_upcast(teacher_feats.detach()), norm, eps)
    if reduction == "frobenius":  # per sample, then the batch mean
        h, w = n_s.shape[-2:]
        return torch.linalg.vector_norm((n_s - n_t).flatten(1), dim=1).mean() / (h * w)
    loss = F.mse_loss(n_s, n_t)  # mean((n_s - n_t)^2), fused
    return loss * student_feats.shape[1] if reduction == "paper" else loss


class FeatureMSELoss(nn.Module):
    """FitNets-style MSE on head features, with the :mod:`kdnb.losses` calling contract.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        adapter: None builds a :class:`~kdnb.features.ChannelAdapter` only when the
            channels differ, True always (FitNets' regressor), False never.
        batchnorm: give the adapter a BatchNorm.

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)``,
        ``teacher["feats"] (B, C_t, h', w')`` resized to ``h, w``; masks are not used.
        Returns a scalar.

    Reference:
        Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """

    def __init__(self, *, student_channels: int, teacher_channels: int,
                 adapter: bool | None = None, batchnorm: bool = False):
        super().__init__()
        self.adapter = make_adapter(student_channels, teacher_channels, adapter=adapter,
                                    batchnorm=batchnorm)

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s, t = matched_feats(student, teacher, self.adapter)
        return feature_mse_loss(s, t)


class ATLoss(nn.Module):
    """Attention transfer on head features; channels may differ, so no adapter.

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)``,
        ``teacher["feats"] (B, C_t, h', w')`` resized to ``h, w``; masks are not used.
        Returns a scalar.

    Reference:
        Zagoruyko, Komodakis, "Paying More Attention to Attention", arXiv 1612.03928.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        return at_loss(*matched_feats(student, teacher))


class NFDLoss(nn.Module):
    """Normalized feature distillation on head features, with its adapter.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        norm: one of ``none, channel, spatial, layer, batch`` (see
            :func:`normalize_features`); NFD is ``"channel"``.
        eps: added to the variance.
        reduction: ``"mean"``, ``"paper"`` (``C_t * mean``) or ``"frobenius"`` (the
            unsquared norm the paper writes; see :func:`nfd_loss`).
        adapter: None builds a :class:`~kdnb.features.ChannelAdapter` only when the
            channels differ, True always, False never.
        batchnorm: give the adapter a BatchNorm (redundant before ``"channel"`` or
            ``"batch"`` normalization, which remove any per-channel affine map).

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)``,
        ``teacher["feats"] (B, C_t, h', w')`` resized to ``h, w``; masks are not used.
        Returns a scalar.

    Reference:
        Liu, Yang, Chen, "Normalized Feature Distillation for Semantic Segmentation",
        arXiv 2207.05256.

    Introduced in notebooks/02_normalized_feature_distillation.ipynb.
    """

    def __init__(self, *, student_channels: int, teacher_channels: int, norm: str = "channel",
                 eps: float = 1e-5, reduction: str = "mean", adapter: bool | None = None,
                 batchnorm: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}: choose one of "
                             f"{', '.join(REDUCTIONS)}")
        self.norm, self.eps, self.reduction = norm, eps, reduction
        self.adapter = make_adapter(student_channels, teacher_channels, adapter=adapter,
                                    batchnorm=batchnorm)

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s, t = matched_feats(student, teacher, self.adapter)
        return nfd_loss(s, t, norm=self.norm, eps=self.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, eps={self.eps}, reduction={self.reduction!r}"
