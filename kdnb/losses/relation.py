"""Relation distillation: SKD pairwise similarities and IFVD intra-class feature variation.

Both compare relations *inside* each network's own feature space (position to position,
position to class centroid), so the student and the teacher may have different channel
counts and need no adapter; only the positions must agree, so the modules resize the
teacher map to the student's size.

Introduced in notebooks/04_distillation_runs.ipynb.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from kdnb.features import match_size, resize_labels
from kdnb.losses.feature import _check_features, _upcast, matched_feats

__all__ = ["skd_pairwise_loss", "ifvd_loss", "SKDLoss", "IFVDLoss"]


def _full_precision(device: torch.device):
    """Turns autocast off, which would run the matrix products below in half precision."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. "meta"


def labelled_feats(student: dict, teacher: dict, masks: torch.Tensor | None, who: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's head feature and the teacher's, detached and resized to the student's
    size, for a loss that also needs the masks (refused with ``who``'s name when None)."""
    if masks is None:
        raise ValueError(f"{who} needs the label masks (B, H, W): pass masks=")
    s = student["feats"]
    return s, match_size(teacher["feats"].detach(), s.shape[-2:])


def _pooled_pair(student_feats: torch.Tensor, teacher_feats: torch.Tensor, pool: int,
                 pool_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a student/teacher pair of maps, upcasts both, detaches the teacher, and pools
    both with ``pool_fn`` (window and stride ``pool``, ceil mode) when ``pool > 1``."""
    _check_features(student_feats, teacher_feats, same_channels=False)
    if not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be a positive int, got {pool!r}")
    s = _upcast(student_feats)
    t = _upcast(teacher_feats.detach())
    if pool > 1:
        s = pool_fn(s, pool, pool, ceil_mode=True)
        t = pool_fn(t, pool, pool, ceil_mode=True)
    return s, t


def _pairwise_similarity(f: torch.Tensor) -> torch.Tensor:
    # (B, C, h, w) -> (B, N, N) cosine similarity of every pair of positions, N = h*w
    f = F.normalize(f.flatten(2), dim=1)  # unit vector per position
    with _full_precision(f.device):
        return torch.bmm(f.transpose(1, 2), f)


class _SimilarityGap(torch.autograd.Function):
    """``mean((U_s^T U_s - S_t)^2)`` over ``(B, N, N)`` and its gradient in ``U_s``, at the
    cost of its matrix products: the difference ``D`` comes out of the student's product
    (``baddbmm``), the mean is a reduction of row norms, and the gradient,
    ``4 U_s D / (B N^2)`` (``D`` is symmetric), is one more product: no separate
    ``(B, N, N)`` tensors for ``S_s``, the square or their gradients."""

    @staticmethod
    def forward(ctx, units, teacher_similarity):
        gap = torch.baddbmm(teacher_similarity, units.transpose(1, 2), units, beta=-1)
        ctx.save_for_backward(units, gap)
        # row norms, then their squares summed: as accurate as summing D^2 (a float32 dot
        # over all B N^2 entries at once is not: 2e-5 off at N = 2048), without writing D^2
        return torch.linalg.vector_norm(gap, dim=2).square().sum() / gap.numel()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        units, gap = ctx.saved_tensors
        return torch.bmm(units, gap) * (4 * grad / gap.numel()), None


def skd_pairwise_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
                      pool: int = 2) -> torch.Tensor:
    """SKD pairwise distillation: match the position-to-position similarity graph.

    Max-pool with a ``pool x pool`` window and stride (ceil mode, so odd sizes keep their
    border), L2-normalize each position's feature vector over channels, ``S = F^T F``
    over the ``N`` pooled positions, and ``L = mean((S_s - S_t)^2)`` over ``B*N*N``
    entries (CIRKD's ``sum / N^2 / B``).

    Resolution: the mean over pairs is unchanged when positions are repeated, so for the
    pooled maps nearest-upsampling changes nothing (exactly, ``pool=1``). With pooling
    the loss sees a map ``pool`` times coarser than its input: nearest-upsampling the
    inputs by 2 and pooling by 2 gives the loss of the original maps with ``pool=1``.
    Cost: ``S`` has ``B*N^2`` entries (64x128 head features, pool 2: 2048^2 per image);
    one ``(B, N, N)`` tensor is kept for backward, and the work is three matrix products
    (the two graphs, one for the gradient) and a reduction.

    The window is a fixed ``pool x pool``, as in CIRKD's ``losses/skd.py`` (2x2 max-pool,
    ``F.normalize``, gradients through the norm): ``pool=2`` is CIRKD's loss. The SKD
    authors' code instead pools with a window of ``scale`` (0.5) times the map, which
    leaves a 2x2 grid of positions (use ``pool=h // 2`` for that), and detaches the L2
    norm; kdnb does not (docs/METHODS.md, section SKD).

    Args:
        student_feats: student features.
        teacher_feats: teacher features at the same ``B, h, w`` (detached inside).
        pool: max-pool window and stride; 1 means no pooling.

    Returns:
        A scalar tensor (each similarity is in ``[-1, 1]``, so the loss is at most 4).

    Shape:
        ``student_feats: (B, C_s, h, w)``, ``teacher_feats: (B, C_t, h, w)``.

    Reference:
        Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
        Segmentation", CVPR 2019, arXiv 1903.04197.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """
    s, t = _pooled_pair(student_feats, teacher_feats, pool, F.max_pool2d)
    units = F.normalize(s.flatten(2), dim=1)  # (B, C_s, N), a unit vector per position
    with _full_precision(units.device), torch.no_grad():
        teacher_similarity = _pairwise_similarity(t)  # (B, N, N)
    with _full_precision(units.device):
        return _SimilarityGap.apply(units, teacher_similarity)


def _centroid_similarity(f: torch.Tensor, labels: torch.Tensor, num_bins: int,
                         eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of each position to the centroid of its label in its image.

    ``f (B, C, h, w)``, ``labels (B, h*w)`` in ``[0, num_bins)`` -> ``(B, h*w)``.
    ``F.cosine_similarity``'s formula, ``x . c / (max(|x|, eps) max(|c|, eps))``, with the
    dot products as one matrix product against the ``num_bins`` centroids, read at each
    position's own, and every reduction over ``C`` on the contiguous ``(B, C, N)`` layout:
    nothing of size ``(B, N, C)`` is formed, no transposed copy.
    """
    feats = f.flatten(2)  # (B, C, N)
    # a comparison, not F.one_hot, which checks the label range with a device sync on CPU
    onehot = (labels[..., None] == torch.arange(num_bins, device=labels.device)).to(feats.dtype)
    with _full_precision(f.device):
        # a one-hot product rather than scatter_add: deterministic on GPUs
        sums = torch.bmm(feats, onehot)  # (B, C, K+1)
        centroids = sums / onehot.sum(1).clamp_min(1.0)[:, None, :]
        dots = torch.bmm(centroids.mT, feats)  # (B, K+1, N): every centroid . every position
    dot = dots.gather(1, labels[:, None, :])[:, 0]  # (B, N): with its own centroid
    # max(|x|, eps) = sqrt(max(|x|^2, eps^2)), whose gradient is 0 (not nan) at x = 0
    norm = feats.square().sum(1).clamp_min(eps * eps).sqrt()  # (B, N)
    centre_norm = centroids.square().sum(1).clamp_min(eps * eps).sqrt().gather(1, labels)
    return dot / (norm * centre_norm)


def ifvd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, masks: torch.Tensor, *,
              num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """IFVD: match how far each position is from its class centroid.

    The masks are nearest-resized to the feature size. For each image and class, the
    centroid is the mean feature of the positions of that class in that image (per image,
    as in CIRKD). Each valid position gets the cosine similarity of its feature to its
    class centroid, in each network's own feature space; ``L`` is the mean squared
    difference of the student's and the teacher's maps over the valid positions (ignored
    positions and labels outside ``[0, num_classes)`` are left out and not counted; CIRKD
    counts them as zero differences). With no valid position the loss is 0.

    Resolution: nearest-upsampling the features and the masks together leaves the
    centroids, and so the loss, unchanged.

    Args:
        student_feats: student features.
        teacher_feats: teacher features at the same ``B, h, w`` (detached inside).
        masks: label masks, at any resolution (usually the image's).
        num_classes: number of classes ``K``.
        ignore_index: label to skip.

    Returns:
        A scalar tensor (similarities are in ``[-1, 1]``, so the loss is at most 4).

    Shape:
        ``student_feats: (B, C_s, h, w)``, ``teacher_feats: (B, C_t, h, w)``,
        ``masks: (B, H, W)``.

    Reference:
        Wang, Zhou, Jiang, Bai, Xu, "Intra-class Feature Variation Distillation for
        Semantic Segmentation", ECCV 2020, doi 10.1007/978-3-030-58571-6_21 (no arXiv
        version); code github.com/YukangWang/IFVD.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """
    _check_features(student_feats, teacher_feats, same_channels=False)
    b, _, h, w = student_feats.shape
    if masks.ndim != 3 or masks.shape[0] != b:
        raise ValueError(f"masks must be (B, H, W) with B = {b} like the features, "
                         f"got {tuple(masks.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    m = resize_labels(masks, (h, w)).flatten(1)  # (B, h*w)
    valid = (m >= 0) & (m < num_classes) & (m != ignore_index)
    labels = torch.where(valid, m, torch.full_like(m, num_classes))  # invalid -> spare bin
    sim_s = _centroid_similarity(_upcast(student_feats), labels, num_classes + 1)
    sim_t = _centroid_similarity(_upcast(teacher_feats.detach()), labels, num_classes + 1)
    weight = valid.to(sim_s.dtype)
    return ((sim_s - sim_t).pow(2) * weight).sum() / weight.sum().clamp_min(1.0)


class SKDLoss(nn.Module):
    """SKD pairwise distillation on head features, with the :mod:`kdnb.losses` contract.

    Args:
        pool: max-pool window and stride before the similarities (1: none).

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)``,
        ``teacher["feats"] (B, C_t, h', w')`` resized to ``h, w``; masks are not used.
        Returns a scalar.

    Reference:
        Liu et al., "Structured Knowledge Distillation for Semantic Segmentation",
        arXiv 1903.04197.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, *, pool: int = 2):
        super().__init__()
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be a positive int, got {pool!r}")
        self.pool = pool

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        return skd_pairwise_loss(*matched_feats(student, teacher), pool=self.pool)

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


class IFVDLoss(nn.Module):
    """IFVD on head features, with the :mod:`kdnb.losses` calling contract.

    Args:
        num_classes: number of classes ``K``.
        ignore_index: label to skip.

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)``,
        ``teacher["feats"] (B, C_t, h', w')`` resized to ``h, w``, ``masks (B, H, W)``
        (required). Returns a scalar.

    Reference:
        Wang et al., "Intra-class Feature Variation Distillation for Semantic
        Segmentation", ECCV 2020, doi 10.1007/978-3-030-58571-6_21.

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, *, num_classes: int, ignore_index: int = 255):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s, t = labelled_feats(student, teacher, masks, "IFVDLoss")
        return ifvd_loss(s, t, masks, num_classes=self.num_classes,
                         ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"
