"""FAKD: distillation under infinitely many semantic-direction feature augmentations.

FAKD perturbs the student's head feature at a position of class ``y`` along that class's
directions of variation, ``f~ = f + eps`` with ``eps ~ N(0, lambda * Sigma_y)``, and
minimizes a closed-form expression of the *expected* distillation loss instead of sampling
augmentations. Three pieces live here:

* :class:`ClassCovariance`: running per-class mean and covariance of the student's head
  features, kept as count-weighted sufficient statistics (float64 buffers, so a checkpoint
  resumes exactly and DDP can all-reduce sums and counts);
* the closed forms: :func:`fakd_logit_bound` (pixel-wise KD, an upper bound),
  :func:`fakd_feature_bound` (feature MSE through a linear adapter, exact) and
  :func:`fakd_nfd_bound` (NFD, an approximation);
* :func:`semantic_shift`: ISDA's surrogate logits, for augmenting the teacher's side too;
* :class:`FAKDLoss`: the module a trainer adds, with the ISDA schedule
  ``lambda = lambda_0 * step / total_steps`` (or MKD's cosine one).

Each closed form *contains* the loss it augments (at ``lambda = 0`` it is that loss), so a
trainer running "kd + fakd" uses the FAKD term *in place of* the plain KD term.

The paper's code was not available: this is the ISDA construction (Wang et al. 2019) with
the teacher's soft targets in place of one-hot labels (ours), as docs/METHODS.md, section FAKD,
states it.

Reference:
    Yuan et al., "FAKD: Feature Augmented Knowledge Distillation for Semantic
    Segmentation", WACV 2024, arXiv 2208.14143.
    Wang et al., "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019,
    arXiv 1909.12220.

Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, NamedTuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kdnb.features import match_size, resize_labels
from kdnb.losses.feature import make_adapter, normalize_features

__all__ = [
    "ClassCovariance",
    "fakd_logit_bound",
    "fakd_feature_bound",
    "fakd_nfd_bound",
    "semantic_shift",
    "SCHEDULES",
    "FAKDLoss",
]


# --------------------------------------------------------------------------- helpers

def _no_autocast(device: torch.device):
    """A context that switches autocast off: FAKD computes in float32 (sums in float64)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()  # e.g. "meta", where the tests look for host syncs
    return torch.autocast(device_type=device.type, enabled=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float16/bfloat16 under autocast -> float32; float64 stays (tests use it).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _labels_at(masks: torch.Tensor, size: tuple[int, int], batch: int, what: str) -> torch.Tensor:
    """Checks ``masks (B, H, W)`` and nearest-resizes them to ``size``; returns long labels."""
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"{what}: masks must be (B, H, W) label maps, got {shape}")
    if masks.shape[0] != batch:
        raise ValueError(f"{what}: masks must be (B, H, W) with B = {batch} (the batch of the "
                         f"maps they label), got {tuple(masks.shape)}")
    if masks.is_floating_point():
        raise ValueError(f"{what}: masks must hold integer labels, got dtype {masks.dtype}")
    return resize_labels(masks, size)


def _bad_labels_error(labels: torch.Tensor, num_classes: int, ignore_index: int,
                      what: str) -> ValueError:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    found = torch.unique(labels[bad])[:8].tolist()
    return ValueError(f"{what}: labels must be in [0, {num_classes}) or {ignore_index} (ignore), "
                      f"got {found} at {int(bad.sum())} positions")


def _check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    """Raises on labels outside ``[0, num_classes)`` that are not ``ignore_index``.

    One host sync on a GPU (a boolean read); the trainer path skips it because
    :meth:`ClassCovariance.update` has already checked the same masks
    (:func:`_assert_labels`, without a sync).
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise _bad_labels_error(labels, num_classes, ignore_index, what)


def _assert_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    """Checks the label range without a host sync: on a CPU it raises the ``ValueError`` of
    :func:`_check_labels` (reading a CPU tensor costs no sync); on a GPU it queues an
    assertion on the device (``torch._assert_async``), which fails the next synchronizing
    call with a device-side assert instead of waiting for the device now."""
    if labels.device.type == "cpu":
        _check_labels(labels, num_classes, ignore_index, what)
    elif labels.device.type != "meta":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        torch._assert_async(~bad.any(), f"{what}: labels must be in [0, {num_classes}) or "
                                        f"{ignore_index} (ignore)")


def _linear_weight(weight: torch.Tensor | nn.Module, what: str, role: str) -> torch.Tensor:
    """Returns a per-position linear map as a ``(out, in)`` matrix.

    Accepts a ``(out, in)`` matrix, a ``(out, in, 1, 1)`` convolution weight, an
    ``nn.Linear``/``nn.Conv2d`` (or a :class:`kdnb.features.ChannelAdapter` without
    BatchNorm), and refuses anything that mixes positions.
    """
    if isinstance(weight, nn.Module):
        bn = getattr(weight, "bn", None)
        if bn is not None and not isinstance(bn, nn.Identity):
            raise ValueError(f"{what}: FAKD's closed form needs a linear {role}; this one ends "
                             f"in {type(bn).__name__}: use an adapter without BatchNorm")
        conv = getattr(weight, "conv", weight)
        if not hasattr(conv, "weight"):
            raise TypeError(f"{what}: expected a tensor, nn.Linear or nn.Conv2d, "
                            f"got {type(weight).__name__}")
        if isinstance(conv, nn.Conv2d) and conv.groups != 1:
            raise ValueError(f"{what}: a grouped convolution (groups={conv.groups}) is not "
                             "supported; use a dense 1x1 convolution")
        weight = conv.weight
    if weight.ndim == 4:
        kh, kw = weight.shape[-2:]
        if (kh, kw) != (1, 1):
            raise ValueError(f"{what}: FAKD needs a {role} that is linear on each position "
                             f"(1x1 conv); this one is {kh}x{kw}: give the student a 1x1 head")
        weight = weight[:, :, 0, 0]
    if weight.ndim != 2:
        raise ValueError(f"{what}: expected a (out, in) or (out, in, 1, 1) weight, "
                         f"got {tuple(weight.shape)}")
    return weight


def _covariance_tensor(class_cov: "torch.Tensor | ClassCovariance", what: str
                       ) -> tuple[torch.Tensor, bool]:
    """Returns ``(cov, diagonal)`` from a tensor or a :class:`ClassCovariance`."""
    if isinstance(class_cov, ClassCovariance):
        return class_cov.cov, class_cov.diagonal
    if not isinstance(class_cov, torch.Tensor) or class_cov.ndim not in (2, 3):
        shape = (tuple(class_cov.shape) if isinstance(class_cov, torch.Tensor)
                 else type(class_cov).__name__)
        raise ValueError(f"{what}: class_cov must be (K, C, C) full, (K, C) diagonal or a "
                         f"ClassCovariance, got {shape}")
    if class_cov.ndim == 3 and class_cov.shape[1] != class_cov.shape[2]:
        raise ValueError(f"{what}: a full class_cov must be (K, C, C), "
                         f"got {tuple(class_cov.shape)}")
    return class_cov.detach(), class_cov.ndim == 2


def _check_4d(x: torch.Tensor, name: str, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: {name} must be (B, C, h, w), got {shape}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B*h*w, C)``, positions first."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


#: float64 elements of one span of class blocks (FAKD's statistics and logit bound): 2 MB,
#: which a core's cache holds while the span is converted, multiplied and summed
_SPAN_ELEMENTS = 2 ** 18


class _ClassBlocks(NamedTuple):
    """Positions laid out in blocks of ``rows`` rows, each block holding one class only, so
    that per-class products become batched matrix products (see :func:`_class_blocks`)."""

    source: torch.Tensor  # (G * rows,) the position in each padded row; N if it is empty
    dest: torch.Tensor  # (N,) the padded row of each position (any row if skipped)
    block_class: torch.Tensor  # (G,) the class of each block (empty blocks: any class)
    rows: int  # positions per block
    blocks: int  # G, an upper bound on the blocks needed, known without reading the labels

    def gather(self, x: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Blocks ``first:last`` (default: all) of ``x`` in the block layout,
        ``((last - first) * rows, D)``. ``x (N + 1, D)``: its last row fills the empty rows
        (zeros, or anything where they are multiplied by zero later); ``x (N, D)``: the
        empty rows hold copies of some position's row."""
        index = self.source[first * self.rows:None if last is None else last * self.rows]
        if x.shape[0] == self.dest.shape[0]:  # no filler row
            index = index.clamp(max=max(x.shape[0] - 1, 0))
        return x.index_select(0, index)

    def spans(self, blocks_per_span: int) -> list[tuple[int, int]]:
        """``(first, last)`` block ranges of at most ``blocks_per_span`` blocks each."""
        step = max(1, int(blocks_per_span))
        return [(i, min(i + step, self.blocks)) for i in range(0, self.blocks, step)]

    def span(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks ``first:last`` of ``x (G * rows, D)`` (the block layout) as
        ``(last - first, rows, D)``, a view."""
        return x[first * self.rows:last * self.rows].view(last - first, self.rows, x.shape[1])


def _class_blocks(classes: torch.Tensor, num_classes: int, rows: int) -> _ClassBlocks:
    """Groups positions by class into blocks of ``rows`` positions, without a host sync.

    ``classes (N,)`` holds labels in ``[0, num_classes]``, ``num_classes`` meaning "skip".
    Class ``k`` gets ``ceil(n_k / rows)`` consecutive blocks; its positions keep their order
    (a stable sort), so sums over a class round the same way on every run. The number of
    blocks is at most ``N // rows + num_classes`` whatever the labels, so every shape here
    is known on the host: nothing waits for the device to count the classes.
    """
    device, n = classes.device, classes.numel()
    rows = max(1, int(rows))
    blocks = n // rows + num_classes
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
    counts.index_add_(0, classes, torch.ones_like(classes))  # (K + 1,), skipped last
    # grouped by class, skipped last (int32 keys sort faster)
    order = torch.sort(classes.to(torch.int32), stable=True).indices
    first = torch.cumsum(counts, 0) - counts  # first sorted index of each class
    per_class = (counts[:num_classes] + rows - 1) // rows  # blocks of each class
    ends = torch.cumsum(per_class, 0)
    first_block = ends - per_class
    block_class = torch.searchsorted(ends, torch.arange(blocks, device=device), right=True)
    block_class = block_class.clamp_(max=num_classes - 1)  # (blocks past the last used: any)
    # block b of class k starts at the (b - first_block[k]) * rows -th position of class k
    start = first[block_class] + (torch.arange(blocks, device=device)
                                  - first_block[block_class]) * rows  # sorted index, (G,)
    end = (first + counts)[block_class]  # where class k ends in the sorted order
    index = start[:, None] + torch.arange(rows, device=device)  # (G, rows)
    held = index < end[:, None]  # (blocks past the last used one fail it too)
    source = torch.where(held, order[index.clamp_(max=max(n - 1, 0))], n).view(-1)
    # position i: its rank in its class from its place in the sorted order
    place = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
    c = classes.clamp(max=num_classes - 1)
    dest = (first_block * rows - first[:num_classes])[c] + place
    return _ClassBlocks(source, dest, block_class, rows, blocks)


# --------------------------------------------------------------------------- statistics

class ClassCovariance(nn.Module):
    """Running per-class mean and covariance of features, from sufficient statistics.

    Keeps, per class ``k``, the count ``n_k``, the sum ``s_k`` and the sum of outer
    products ``S_k = sum x x^T`` (or of squares, when ``diagonal``), all float64 buffers:
    the running result equals ``torch.cov`` over every feature ever seen (ISDA's
    ``EstimatorCV`` keeps the same running statistics in float32 and divides by ``n``,
    not ``n - 1``), ``state_dict`` resumes it exactly, two
    estimators merge by adding, and DDP all-reduces sums and counts (never covariances).

    Args:
        num_classes: ``K``.
        dim: feature channels ``C``.
        diagonal: keep only per-channel variances (``K x C`` instead of ``K x C x C``;
            at K = 150, C = 512 the full buffers take 315 MB).
        ignore_index: label of pixels to skip.

    Shape:
        ``update(feats (B, C, h, w), masks (B, H, W))``; ``mean (K, C)``;
        ``cov (K, C, C)`` or ``(K, C)`` when diagonal; ``count (K,)``.

    Reference:
        Wang et al., "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019,
        arXiv 1909.12220 (class-conditional covariance of the features).

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """

    def __init__(self, num_classes: int, dim: int, *, diagonal: bool = False,
                 ignore_index: int = 255):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassCovariance needs num_classes >= 1 and dim >= 1, "
                             f"got {num_classes} and {dim}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.diagonal, self.ignore_index = bool(diagonal), int(ignore_index)
        second = (num_classes, dim) if diagonal else (num_classes, dim, dim)
        f64 = torch.float64
        # Counts in float64 too: exact below 2^53 and one dtype for all_reduce.
        self.register_buffer("n_seen", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("feat_sum", torch.zeros(num_classes, dim, dtype=f64))
        self.register_buffer("feat_sq_sum", torch.zeros(second, dtype=f64))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, diagonal={self.diagonal}, "
                f"ignore_index={self.ignore_index}")

    # -- accumulation
    @torch.no_grad()
    def update(self, feats: torch.Tensor, masks: torch.Tensor, *, sync: bool = False
               ) -> "ClassCovariance":
        """Adds the features of one batch, grouped by the label at each position.

        Args:
            feats: ``(B, C, h, w)``; detached here, any float dtype.
            masks: ``(B, H, W)`` labels at any size, nearest-resized to ``(h, w)``;
                ``ignore_index`` positions are skipped, other labels outside ``[0, K)``
                raise (on a GPU: a device-side assertion, see below).
            sync: under ``torch.distributed``, all-reduce this batch's statistics before
                adding them, so every rank holds the global running statistics (every rank
                must then call ``update``). A no-op when no process group is initialized.

        Returns:
            ``self``.

        No host sync: the positions are grouped by class on the device into blocks of one
        class each (:func:`_class_blocks`), and the outer products of all blocks are one
        batched matrix product, a few blocks at a time, which keeps memory at
        ``O(B h w C)`` whatever ``K``. The labels are checked on a CPU (``ValueError``); on
        a GPU a bad label trips a device-side assertion at the next synchronizing call
        (batches from ``Trainer.loader`` never get that far:
        :class:`kdnb.data.sampler.CheckedCollate` refuses them, with the value, where they
        are made; batches handed to ``train_step`` directly are not checked there).
        """
        what = "ClassCovariance.update"
        _check_4d(feats, "feats", what)
        if feats.shape[1] != self.dim:
            raise ValueError(f"{what}: expected feats with C = {self.dim} channels (the "
                             f"estimator's dim), got {tuple(feats.shape)}")
        labels = _labels_at(masks.to(feats.device), feats.shape[-2:], feats.shape[0], what)
        K, C = self.num_classes, self.dim
        with _no_autocast(feats.device):
            y = labels.reshape(-1)  # (N,)
            _assert_labels(y, K, self.ignore_index, what)
            keep = (y >= 0) & (y < K)
            code = torch.where(keep, y, K)  # K: skipped (ignored)
            distributed = sync and dist.is_available() and dist.is_initialized()
            if distributed:
                n, s, ss = (torch.zeros_like(b)
                            for b in (self.n_seen, self.feat_sum, self.feat_sq_sum))
            else:
                n, s, ss = self.n_seen, self.feat_sum, self.feat_sq_sum
            f64 = torch.float64
            counts = torch.zeros(K + 1, dtype=f64, device=feats.device)
            counts.index_add_(0, code, torch.ones_like(code, dtype=f64))  # exact below 2^53
            n.add_(counts[:K])
            if self.diagonal:
                x = _flat(feats.detach())  # (N, C)
                safe = torch.where(keep, code, 0)
                x = x.to(f64) * keep.to(f64)[:, None]
                s.index_add_(0, safe, x)
                ss.index_add_(0, safe, x.square())
            else:
                self._add_outer_products(feats.detach(), code, s, ss)
            if distributed:
                for t in (n, s, ss):
                    dist.all_reduce(t)
                self.n_seen.add_(n)
                self.feat_sum.add_(s)
                self.feat_sq_sum.add_(ss)
        return self

    def _add_outer_products(self, feats: torch.Tensor, code: torch.Tensor, s: torch.Tensor,
                            ss: torch.Tensor) -> None:
        """Adds ``sum x`` to ``s`` and ``sum x x^T`` to ``ss`` per class ``code (N,)`` (``K``:
        skipped), one batched float64 product over blocks of one class each."""
        B, C, h, w = feats.shape
        K, N = self.num_classes, code.numel()
        # positions as rows, and a last row of zeros for the layout's empty rows
        x = feats.new_empty(N + 1, C, dtype=_compute_dtype(feats))
        x[N] = 0
        x[:N].view(B, h, w, C).copy_(feats.permute(0, 2, 3, 1))
        # Blocks of an eighth of the mean class size: the padding (at most one block per
        # class) then adds at most an eighth to the positions.
        rows = max(1, min(1024, N // (8 * K)))
        layout = _class_blocks(code, K, rows)
        for first, last in layout.spans(_SPAN_ELEMENTS // (C * (C + rows))):
            block = layout.gather(x, first, last).to(torch.float64).view(-1, rows, C)
            classes = layout.block_class[first:last]
            s.index_add_(0, classes, block.sum(1))
            ss.index_add_(0, classes, torch.bmm(block.mT, block))  # (n_blocks, C, C)

    def _check_compatible(self, other: "ClassCovariance") -> None:
        if not isinstance(other, ClassCovariance):
            raise TypeError(f"can only merge a ClassCovariance, got {type(other).__name__}")
        mine = (self.num_classes, self.dim, self.diagonal)
        theirs = (other.num_classes, other.dim, other.diagonal)
        if mine != theirs:
            raise ValueError(f"cannot merge ClassCovariance (num_classes, dim, diagonal) = "
                             f"{theirs} into {mine}")

    @torch.no_grad()
    def merge(self, other: "ClassCovariance") -> "ClassCovariance":
        """Adds another estimator's statistics (fed other data) into this one; returns self."""
        self._check_compatible(other)
        self.n_seen.add_(other.n_seen.to(self.n_seen.device))
        self.feat_sum.add_(other.feat_sum.to(self.feat_sum.device))
        self.feat_sq_sum.add_(other.feat_sq_sum.to(self.feat_sq_sum.device))
        return self

    @torch.no_grad()
    def all_reduce(self) -> "ClassCovariance":
        """Sums the statistics over all ranks (sums and counts, never covariances).

        A no-op when ``torch.distributed`` is not initialized. Call it on statistics that
        each rank gathered alone: all-reducing a running estimator every step would count
        the earlier steps ``world_size`` times. ``update(..., sync=True)`` does the right
        thing for the per-step case.
        """
        if dist.is_available() and dist.is_initialized():
            for t in (self.n_seen, self.feat_sum, self.feat_sq_sum):
                dist.all_reduce(t)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Forgets everything seen."""
        for t in (self.n_seen, self.feat_sum, self.feat_sq_sum):
            t.zero_()

    # -- results (float64)
    @property
    def count(self) -> torch.Tensor:
        """Positions seen per class, ``(K,)`` long."""
        return self.n_seen.long()

    @property
    def mean(self) -> torch.Tensor:
        """Per-class mean, ``(K, C)`` float64; zero for unseen classes."""
        return self.feat_sum / self.n_seen.clamp_min(1)[:, None]

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased per-class covariance (``correction=1``, like ``torch.cov``), float64.

        ``(K, C, C)``, or the variances ``(K, C)`` when diagonal; classes seen fewer than
        twice get zeros.
        """
        n = self.n_seen
        mean = self.mean
        denom = (n - 1).clamp_min(1)
        enough = n >= 2
        if self.diagonal:
            var = (self.feat_sq_sum - n[:, None] * mean.square()) / denom[:, None]
            return torch.where(enough[:, None], var.clamp_min(0), 0.0)
        # S - n mu mu^T in one allocation.
        cov = torch.baddbmm(self.feat_sq_sum, mean.unsqueeze(2),
                            (mean * n[:, None]).unsqueeze(1), alpha=-1)
        cov.div_(denom[:, None, None])
        return cov.mul_(enough[:, None, None])


# --------------------------------------------------------------------------- closed forms

def _pairwise_quadratic(weight: torch.Tensor, cov: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """``Q[y, j, k] = (w_j - w_k)^T Sigma_y (w_j - w_k)``, ``(Kc, K, K)``.

    Through ``B_y = W Sigma_y W^T``: ``Q = b_j + b_k - 2 B_y[j, k]`` with ``b = diag B_y``,
    symmetrized so that ``Q`` is exactly symmetric with an exactly zero diagonal.
    """
    if diagonal:
        ws = weight.unsqueeze(0) * cov.unsqueeze(1)  # (Kc, K, C): W diag(Sigma_y)
    else:
        ws = torch.matmul(weight.unsqueeze(0), cov)  # (Kc, K, C): W Sigma_y
    b = torch.matmul(ws, weight.T)  # (Kc, K, K)
    d = torch.diagonal(b, dim1=1, dim2=2)  # (Kc, K)
    q = d.unsqueeze(2) + d.unsqueeze(1) - (b + b.transpose(1, 2))
    return q.clamp_min(0)


class _LogitBoundSum(torch.autograd.Function):
    """``sum_n sum_k pw[n, k] * lse_j(z[n, j] - z[n, k] + a[y_n, j, k])`` and its gradient,
    without any ``(N, K, K)`` tensor.

    With ``e = exp(z - max_j z)`` per position and ``m_y = exp(a_y - max_j a_y)`` per class
    and column, the sum inside the log-sum-exp factors, ``sum_j exp(z_j + a_y[j, k]) =
    exp(max z + max_j a_y[:, k]) * (e @ m_y)[k]``: one small matrix product per block of
    positions of one class (:func:`_class_blocks`), in float64, whose range (``1e-308``)
    holds the product of the two shifted factors for any logits within about 700 of each
    other. The gradient is analytic: with ``s = e @ m_y`` and ``r = pw / s``,
    ``dz = e * (r @ m_y^T) - pw`` and ``da_y = m_y * (e^T r)`` summed over the positions
    of class ``y``. Both run span by span of blocks (a span's tensors stay in cache); only
    ``dz`` goes back to the positions. ``pw`` has ``N + 1`` rows, the last one zero (the
    empty rows of the layout). Returns a float64 sum.
    """

    @staticmethod
    def forward(ctx, z, a, pw, layout: _ClassBlocks, per_span: int):
        f64 = torch.float64
        rows, K = layout.rows, z.shape[1]
        a_max = a.amax(1)  # (Kb, K): over j, per class and column k
        m = torch.exp((a - a_max.unsqueeze(1)).to(f64))  # (Kb, K, K), in (0, 1]
        a_max = a_max.to(f64)
        z64, pw = z.to(f64), pw.to(f64)
        e = z64.new_empty(layout.blocks * rows, K)  # in the block layout, kept for backward
        s, pw_blocks = torch.empty_like(e), torch.empty_like(e)
        total = z64.new_zeros(())
        for first, last in layout.spans(per_span):
            classes = layout.block_class[first:last]
            zb = layout.gather(z64, first, last)  # (n * rows, K); empty rows: any logits
            pwb = torch.index_select(pw, 0, layout.source[first * rows:last * rows],
                                     out=layout.span(pw_blocks, first, last).view(-1, K))
            z_max = zb.amax(1, keepdim=True)
            eb = torch.sub(zb, z_max, out=layout.span(e, first, last).view(-1, K)).exp_()
            sb = torch.bmm(eb.view(-1, rows, K), m[classes],
                           out=layout.span(s, first, last))  # (n, rows, K)
            # sum pw * (log s + max z - z_k + max_j a_y[:, k]), term by term
            flat = pwb.view(-1)
            total += (torch.dot(flat, torch.log(sb).view(-1)) - torch.dot(flat, zb.view(-1))
                      + torch.dot(pwb.sum(1), z_max.view(-1))
                      + (pwb.view(-1, rows, K).sum(1) * a_max[classes]).sum())
        ctx.save_for_backward(e, s, m, pw_blocks)
        ctx.layout, ctx.per_span, ctx.dtype = layout, per_span, z.dtype
        return total  # float64

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        e, s, m, pw_blocks = ctx.saved_tensors
        layout, per_span = ctx.layout, ctx.per_span
        grad = grad.to(torch.float64)
        need_z, need_a = ctx.needs_input_grad[:2]
        dz = torch.empty_like(e) if need_z else None  # in the block layout
        outer = torch.zeros_like(m) if need_a else None  # (Kb, K, K): sum of e^T r per class
        for first, last in layout.spans(per_span):
            classes = layout.block_class[first:last]
            pwb = layout.span(pw_blocks, first, last)
            eb = layout.span(e, first, last)
            r = torch.div(pwb, layout.span(s, first, last)).mul_(grad)  # (n, rows, K)
            if need_z:
                dzb = torch.bmm(r, m[classes].mT, out=layout.span(dz, first, last))
                dzb.mul_(eb).addcmul_(pwb, -grad)
            if need_a:
                outer.index_add_(0, classes, torch.bmm(eb.mT, r))
        grad_z = dz.index_select(0, layout.dest).to(ctx.dtype) if need_z else None
        grad_a = outer.mul_(m).to(ctx.dtype) if need_a else None
        return grad_z, grad_a, None, None, None


def semantic_shift(logits: torch.Tensor, classifier_weight: torch.Tensor | nn.Module,
                   class_cov: "torch.Tensor | ClassCovariance", masks: torch.Tensor, *,
                   lam: float | torch.Tensor, ignore_index: int = 255,
                   validate: bool = True) -> torch.Tensor:
    """Logits moved by the expected effect of the augmentation: ISDA's surrogate.

    At a position of class ``y``, ``z~_j = z_j + lam / 2 * Q_y[j, y]`` with
    ``Q_y[j, y] = (w_j - w_y)^T Sigma_y (w_j - w_y)`` (see :func:`fakd_logit_bound`):
    the logits whose cross-entropy with label ``y`` is ISDA's upper bound of the expected
    cross-entropy. Positions without a class are left as they are. The FAKD author's MKD
    code applies this to the teacher's logits, with the teacher's classifier (detached)
    and the teacher's class variances; :class:`FAKDLoss` does so with
    ``augment_teacher=True``. No gradient flows through it (the teacher is frozen).

    Args:
        logits: ``(B, K, h, w)``, the classifier's output at the head's resolution.
        classifier_weight: the classifier that produced them, ``(K, C)`` or 1x1.
        class_cov: over its input channels ``C``, full, diagonal or a
            :class:`ClassCovariance`.
        masks: labels, nearest-resized to ``(h, w)``.
        lam: augmentation strength.
        ignore_index: label of positions without a class.
        validate: check the label range (one host sync on a GPU).

    Returns:
        The shifted logits, same shape, float32 (float64 for float64 logits).

    Reference:
        Wang et al., "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019,
        arXiv 1909.12220; the teacher side after jianlong-yuan/semi-mmseg (MKD),
        ``mmseg/models/semi/losses/exp_semi3.py``.

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """
    what = "semantic_shift"
    _check_4d(logits, "logits", what)
    B, K, h, w = logits.shape
    weight = _linear_weight(classifier_weight, what, "classifier").detach()
    cov, diagonal = _covariance_tensor(class_cov, what)
    if weight.shape[0] != K or cov.shape[1] != weight.shape[1]:
        raise ValueError(f"{what}: classifier_weight {tuple(weight.shape)} must map the "
                         f"covariance's C = {cov.shape[1]} channels to the logits' K = {K}")
    labels = _labels_at(masks.to(logits.device), (h, w), B, what)
    if validate:
        _check_labels(labels, cov.shape[0], ignore_index, what)
    device, dtype = logits.device, _compute_dtype(logits)
    with _no_autocast(device), torch.no_grad():
        q = _pairwise_quadratic(weight.to(dtype), cov.to(device, dtype), diagonal)  # (Kc, K, K)
        y = labels.reshape(-1)
        valid = y != ignore_index
        y = torch.where(valid, y, 0)
        shift = q[y, :, y] * valid.to(dtype)[:, None]  # (N, K): Q_y[j, y]
        shift = shift.reshape(B, h, w, K).permute(0, 3, 1, 2)
        return logits.detach().to(dtype) + (lam / 2.0) * shift


def fakd_logit_bound(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     classifier_weight: torch.Tensor | nn.Module,
                     class_cov: "torch.Tensor | ClassCovariance", masks: torch.Tensor, *,
                     lam: float | torch.Tensor, temperature: float = 1.0,
                     chunk_size: int | None = None, ignore_index: int = 255,
                     keep_ignored: bool = False, detach_classifier: bool = False,
                     validate: bool = True) -> torch.Tensor:
    r"""Upper bound of pixel-wise KD averaged over infinitely many feature augmentations.

    At a position of class ``y`` with student logits ``z = W f + b`` (rows ``w_j``) and
    teacher probabilities ``p = softmax(z_t / T)``, augment ``f~ = f + eps`` with
    ``eps ~ N(0, lam * Sigma_y)``, so ``z~ = z + W eps``. With
    ``Delta_jk = w_j - w_k`` and ``Q_y[j, k] = Delta_jk^T Sigma_y Delta_jk``::

        E KL(p || softmax(z~/T))
          = sum_k p_k [ log p_k + E log sum_j exp((z~_j - z~_k)/T) ]
         <= sum_k p_k [ log p_k + log sum_j E exp((z_j - z_k)/T + Delta_jk^T eps / T) ]
          = sum_k p_k [ log p_k + logsumexp_j((z_j - z_k)/T + lam/(2 T^2) Q_y[j, k]) ]

    The inequality is Jensen's (``log`` is concave, so ``E log X <= log E X``); the last
    step is the Gaussian moment-generating function, ``E exp(a^T eps) =
    exp(lam/2 a^T Sigma_y a)`` with ``a = Delta_jk / T``. The result is multiplied by
    ``T^2`` (like pixel KD) and averaged over the labelled positions (ignored positions
    have no class, hence no ``Sigma_y``: they are left out, or with ``keep_ignored`` kept
    with plain KD, unaugmented).

    Properties (tested): ``lam = 0`` gives pixel-wise KD exactly (``pixel_kd_loss`` with
    ``mask = labels != ignore_index``; with ``keep_ignored``, without mask); the bound is
    never below the Monte-Carlo mean of augmented KD losses and the gap is ``O(lam)``; with
    one-hot ``p`` it is the ISDA surrogate ``CE(z + lam/2 * Q_y[:, y], y)``.

    Gradients flow to ``student_logits`` and, as in ISDA's code, through ``Q`` to
    ``classifier_weight`` (``detach_classifier=True`` stops the latter, as the FAKD author's
    MKD code does); never to the teacher or the covariance.

    Args:
        student_logits: head logits (before upsampling).
        teacher_logits: the teacher's logits; bilinearly resized to the student's size.
        classifier_weight: the student's classifier as ``(K, C)``, a ``(K, C, 1, 1)``
            convolution weight, or the ``nn.Conv2d``/``nn.Linear`` itself. Kernels larger
            than 1x1 are refused (they mix the noise of several positions).
        class_cov: ``(Kc, C, C)``, diagonal ``(Kc, C)``, or a :class:`ClassCovariance`.
        masks: labels at any size, nearest-resized to ``(h, w)``; they pick ``Sigma_y``.
        lam: augmentation strength ``lambda`` (a float or a 0-dim tensor).
        temperature: ``T``.
        chunk_size: positions per chunk. Nothing of size ``(N, K, K)`` is formed: the
            log-sum-exp over ``j`` factors into ``exp(z - max z) @ exp(c Q_y - max_j c Q_y)``,
            a ``(K, K)`` product per class (positions grouped by class in blocks of at most
            256, on the device, without a host sync), summed in float64, with an analytic
            backward; what is kept for backward is ``O(N K)``. A chunk of blocks is
            processed at a time, which bounds the per-class matrices gathered for it
            (``(blocks, K, K)``) and keeps its tensors in cache. Default: chunks of about
            ``2^18`` float64 elements (2 MB).
        ignore_index: label of positions without a class.
        keep_ignored: count ignored positions in the mean with their plain, unaugmented KD
            (as :class:`kdnb.losses.PixelKDLoss` does by default, after CIRKD) instead of
            leaving them out.
        detach_classifier: no gradient through ``Q`` to the classifier weight.
        validate: check the label range (one host sync on a GPU); :class:`FAKDLoss`
            turns it off because :meth:`ClassCovariance.update` checked the same masks.

    Returns:
        A 0-dim float32 tensor (float64 for float64 logits).

    Shape:
        ``student_logits (B, K, h, w)``, ``teacher_logits (B, K, h', w')``,
        ``masks (B, H, W)``.

    Reference:
        Yuan et al., "FAKD: Feature Augmented Knowledge Distillation for Semantic
        Segmentation", WACV 2024, arXiv 2208.14143 (soft targets: ours);
        Wang et al., "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019,
        arXiv 1909.12220 (the bound with one-hot targets).

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """
    what = "fakd_logit_bound"
    _check_4d(student_logits, "student_logits", what)
    _check_4d(teacher_logits, "teacher_logits", what)
    B, K, h, w = student_logits.shape
    if teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"{what}: teacher_logits must be (B, K, ., .) = ({B}, {K}, ., .) like "
                         f"the student's, got {tuple(teacher_logits.shape)}")
    weight = _linear_weight(classifier_weight, what, "classifier")
    if detach_classifier:
        weight = weight.detach()
    cov, diagonal = _covariance_tensor(class_cov, what)
    if weight.shape[0] != K:
        raise ValueError(f"{what}: classifier_weight must have K = {K} rows (the logits' "
                         f"classes), got {tuple(weight.shape)}")
    if cov.shape[1] != weight.shape[1]:
        raise ValueError(f"{what}: class_cov is over C = {cov.shape[1]} channels but the "
                         f"classifier takes C = {weight.shape[1]} (weight {tuple(weight.shape)})")
    if temperature <= 0 or (isinstance(lam, (int, float)) and lam < 0):
        raise ValueError(f"{what}: needs temperature > 0 and lam >= 0, got {temperature} "
                         f"and {lam}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{what}: chunk_size must be >= 1, got {chunk_size}")
    num_cov_classes = cov.shape[0]
    labels = _labels_at(masks.to(student_logits.device), (h, w), B, what)
    if validate:
        _check_labels(labels, num_cov_classes, ignore_index, what)

    device, dtype = student_logits.device, _compute_dtype(student_logits)
    with _no_autocast(device):
        q = _pairwise_quadratic(weight.to(dtype), cov.to(device, dtype), diagonal)  # (Kc, K, K)
        # one more class, of no noise (Q = 0), for the positions without a label
        q = torch.cat([q, q.new_zeros(1, K, K)])  # (Kc + 1, K, K)
        z = _flat(student_logits.to(dtype)) / temperature  # (N, K)
        teacher = match_size(teacher_logits.detach().to(dtype), (h, w))
        logp = F.log_softmax(_flat(teacher) / temperature, dim=1)  # (N, K)
        p = logp.exp()
        y = labels.reshape(-1)
        labelled = y != ignore_index
        classes = torch.where(labelled, y, num_cov_classes)  # (N,) in [0, Kc]
        pos_weight = torch.ones_like(p[:, 0]) if keep_ignored else labelled.to(dtype)
        n = z.shape[0]
        # (N + 1, K) in float64, like the sums: the last row fills the layout's empty rows
        pw = p.new_zeros(n + 1, K, dtype=torch.float64)
        torch.mul(p, pos_weight[:, None], out=pw[:n])
        # a quarter of a class's positions per block: the padding adds at most a quarter
        rows = max(1, min(256, n // (4 * (num_cov_classes + 1))))
        if chunk_size is None:
            per_span = _SPAN_ELEMENTS // (K * K + 4 * rows * K)
        else:
            rows = min(rows, chunk_size)
            per_span = chunk_size // rows
        layout = _class_blocks(classes, num_cov_classes + 1, rows)
        a = q * (lam / (2.0 * temperature ** 2))  # c * Q_y[j, k]
        total = _LogitBoundSum.apply(z, a, pw, layout, per_span)  # float64
        total = total + (pw[:n] * logp).sum()  # + sum_k p_k log p_k
        return (temperature ** 2 * total / pos_weight.sum().clamp_min(1)).to(dtype)


def _adapter_noise(weight: torch.Tensor, cov: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """``diag(A Sigma_y A^T)`` per class: the variance the augmentation adds to each
    adapted channel, ``(Kc, C_t)``."""
    if diagonal:
        return torch.matmul(cov, weight.square().T)  # sum_c Sigma_yc A_tc^2
    return (torch.matmul(weight.unsqueeze(0), cov) * weight.unsqueeze(0)).sum(2)


def _prepare_feature_bound(adapted: torch.Tensor, teacher: torch.Tensor,
                           adapter_weight, class_cov, masks, ignore_index: int,
                           validate: bool, what: str):
    _check_4d(adapted, "adapted_student_feats", what)
    _check_4d(teacher, "teacher_feats", what)
    B, C_t, h, w = adapted.shape
    weight = _linear_weight(adapter_weight, what, "adapter")
    cov, diagonal = _covariance_tensor(class_cov, what)
    if weight.shape[0] != C_t:
        raise ValueError(f"{what}: adapter_weight must map to C_t = {C_t} channels (those of "
                         f"adapted_student_feats), got {tuple(weight.shape)}")
    if teacher.shape[:2] != (B, C_t):
        raise ValueError(f"{what}: teacher_feats must be ({B}, {C_t}, ., .) like the adapted "
                         f"student features, got {tuple(teacher.shape)}")
    if cov.shape[1] != weight.shape[1]:
        raise ValueError(f"{what}: class_cov is over C = {cov.shape[1]} channels but the "
                         f"adapter takes C_s = {weight.shape[1]} (weight {tuple(weight.shape)})")
    labels = _labels_at(masks.to(adapted.device), (h, w), B, what)
    if validate:
        _check_labels(labels, cov.shape[0], ignore_index, what)
    dtype = _compute_dtype(adapted)
    noise = _adapter_noise(weight.to(dtype), cov.to(adapted.device, dtype), diagonal)
    # Both bounds need the variance added to each channel only as its mean over the
    # positions of each image, D_bar = sum_k n_bk noise_k / (h w) (zero where no class is
    # known): per-image class counts times the per-class noise, no (B, C_t, h, w) map.
    num_cov_classes = cov.shape[0]
    code = torch.where(labels != ignore_index, labels, num_cov_classes).flatten(1)  # (B, hw)
    counts = noise.new_zeros(B, num_cov_classes + 1).scatter_add_(
        1, code, noise.new_ones(code.shape))  # (B, Kc + 1), unlabelled last
    added_mean = counts[:, :num_cov_classes] @ noise / (h * w)  # (B, C_t)
    return match_size(teacher.detach().to(dtype), (h, w)), added_mean[:, :, None, None]


def fakd_feature_bound(adapted_student_feats: torch.Tensor, teacher_feats: torch.Tensor,
                       adapter_weight: torch.Tensor | nn.Module,
                       class_cov: "torch.Tensor | ClassCovariance", masks: torch.Tensor, *,
                       lam: float | torch.Tensor, ignore_index: int = 255,
                       validate: bool = True) -> torch.Tensor:
    """Feature MSE averaged over infinitely many augmentations: exact for a linear adapter.

    With ``u = A f + b`` and ``eps ~ N(0, lam * Sigma_y)``::

        E ||A (f + eps) + b - t||^2 = ||A f + b - t||^2 + lam * tr(A Sigma_y A^T)

    (the cross term has zero mean). Averaged like the feature MSE loss,
    ``mean((A f - t)^2)`` over all positions and channels, so the trace term is divided by
    ``C_t`` and summed over labelled positions only: ignored positions are not augmented
    and still count in the mean (ours). ``lam = 0`` gives the feature MSE loss exactly.
    Gradients reach the adapted features and, through the trace, the adapter weight.

    Args:
        adapted_student_feats: ``A f_s + b``, the adapter's output.
        teacher_feats: bilinearly resized to the student's size; detached.
        adapter_weight: ``(C_t, C_s)``, ``(C_t, C_s, 1, 1)``, or the 1x1 ``nn.Conv2d`` /
            ``ChannelAdapter`` (without BatchNorm) itself.
        class_cov: over the *student* channels: ``(Kc, C_s, C_s)``, ``(Kc, C_s)`` or a
            :class:`ClassCovariance`.
        masks: labels, nearest-resized to ``(h, w)``.
        lam: augmentation strength.
        ignore_index: label of positions without augmentation.
        validate: check the label range (one host sync on a GPU).

    Returns:
        A 0-dim float32 tensor (float64 for float64 features).

    Shape:
        ``adapted_student_feats (B, C_t, h, w)``, ``teacher_feats (B, C_t, h', w')``,
        ``masks (B, H, W)``.

    Reference:
        Yuan et al., "FAKD: Feature Augmented Knowledge Distillation for Semantic
        Segmentation", WACV 2024, arXiv 2208.14143.

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """
    what = "fakd_feature_bound"
    with _no_autocast(adapted_student_feats.device):
        teacher, added_mean = _prepare_feature_bound(adapted_student_feats, teacher_feats,
                                                     adapter_weight, class_cov, masks,
                                                     ignore_index, validate, what)
        mse = F.mse_loss(adapted_student_feats.to(teacher.dtype), teacher)
        return mse + lam * added_mean.mean()  # the trace term, averaged like the MSE


def _standardize(x: torch.Tensor, eps: float, added_var: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean) / s`` per sample and channel over ``h, w``, with ``s^2 = var + added_var
    + eps`` (biased variance); returns ``(standardized, s^2)``. Without ``added_var`` this
    is NFD's channel normalization (:func:`kdnb.losses.normalize_features`, to rounding);
    the bound below uses it, with the noise's expected variance added, for the student's
    map."""
    centered = x - x.mean((2, 3), keepdim=True)
    var = centered.square().mean((2, 3), keepdim=True)  # two passes; cheap for autograd
    scale2 = (var if added_var is None else var + added_var) + eps
    return centered * torch.rsqrt(scale2), scale2


def fakd_nfd_bound(adapted_student_feats: torch.Tensor, teacher_feats: torch.Tensor,
                   adapter_weight: torch.Tensor | nn.Module,
                   class_cov: "torch.Tensor | ClassCovariance", masks: torch.Tensor, *,
                   lam: float | torch.Tensor, eps: float = 1e-5, ignore_index: int = 255,
                   validate: bool = True) -> torch.Tensor:
    """NFD loss averaged over infinitely many augmentations: an approximation (ours).

    NFD normalizes each sample and channel over its ``n = h w`` positions,
    ``N(u)_i = (u_i - mean(u)) / sqrt(var(u) + eps)`` (biased variance), which is not
    linear in the noise, so there is no closed form. The approximation holds the *scale*
    fixed at its expected value: with ``u_i = a_i + e_i`` (``a = A f + b`` the clean map,
    ``e_i = A eps_i`` of variance ``lam * D_i``, ``D_i = (A Sigma_y A^T)_cc`` at the
    position's class, 0 where ignored, ``D_bar`` its mean over positions)::

        s^2 = var(a) + lam * (1 - 1/n) * D_bar + eps         # = E var(u) + eps, exactly
        E (N~(u)_i - N(t)_i)^2 = ((a_i - mean(a)) / s - N(t)_i)^2
                                 + lam * ((1 - 2/n) D_i + D_bar / n) / s^2

    The second line is exact for a fixed ``s`` (the centering by the noisy mean is kept:
    ``E (e_i - mean(e))^2 = (1 - 2/n) D_i + D_bar / n``). What it leaves out is the
    fluctuation of the sample variance under the noise (``E 1/s~`` against ``1/E s~``,
    and its correlation with the numerator), a relative error of order ``1/n``. Measured
    against Monte Carlo (tests/test_augment.py): the approximation sits above it, by
    about 1 % of the loss at 8 x 8 positions and 6 % at 4 x 4; head maps have thousands
    of positions. ``lam = 0`` gives the NFD loss with channel normalization exactly.

    Args:
        adapted_student_feats: ``A f_s + b``, the adapter's output.
        teacher_feats: bilinearly resized to the student's size; detached.
        adapter_weight: ``(C_t, C_s)``, ``(C_t, C_s, 1, 1)``, or the 1x1 module itself.
        class_cov: over the student channels, full, diagonal or a :class:`ClassCovariance`.
        masks: labels, nearest-resized to ``(h, w)``.
        lam: augmentation strength.
        eps: NFD's variance floor.
        ignore_index: label of positions without augmentation.
        validate: check the label range (one host sync on a GPU).

    Returns:
        A 0-dim float32 tensor (float64 for float64 features).

    Shape:
        ``adapted_student_feats (B, C_t, h, w)``, ``teacher_feats (B, C_t, h', w')``,
        ``masks (B, H, W)``.

    Reference:
        Yuan et al., "FAKD: Feature Augmented Knowledge Distillation for Semantic
        Segmentation", WACV 2024, arXiv 2208.14143; Liu, Yang, Chen, "Normalized Feature
        Distillation for Semantic Segmentation", arXiv 2207.05256.

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """
    what = "fakd_nfd_bound"
    with _no_autocast(adapted_student_feats.device):
        teacher, added_mean = _prepare_feature_bound(adapted_student_feats, teacher_feats,
                                                     adapter_weight, class_cov, masks,
                                                     ignore_index, validate, what)
        u = adapted_student_feats.to(teacher.dtype)
        n = u.shape[2] * u.shape[3]
        expected_var = lam * (1 - 1 / n) * added_mean  # E var(e) per sample and channel
        normalized, scale2 = _standardize(u, eps, expected_var)
        target = normalize_features(teacher, "channel", eps)  # no gradient: fused kernel
        # The noise term lam ((1 - 2/n) D_i + D_bar/n) / s^2 averages over the positions
        # to lam (1 - 1/n) D_bar / s^2: the mean over (b, c, i) needs only D_bar.
        return F.mse_loss(normalized, target) + (expected_var / scale2).mean()


# --------------------------------------------------------------------------- module

WeightSource = Union[nn.Module, Callable[[], torch.Tensor]]
#: how FAKD's strength grows to ``lambda_0`` over training (see :meth:`FAKDLoss.set_progress`)
SCHEDULES = ("linear", "cosine")


class FAKDLoss(nn.Module):
    """FAKD for a trainer: keeps the class covariance, follows the schedule, returns the bound.

    Contract of ``forward(student, teacher, masks)`` (the :mod:`kdnb.losses` one):

    * ``student["feats"]``: the student's head feature ``(B, C_s, h, w)``, the input of its
      1x1 classifier. In training mode it first updates the covariance (detached, under
      no_grad, all-reduced under DDP, so every rank must call ``forward``; no host sync);
      in eval mode the statistics are left alone.
    * ``on="logits"``: ``student["logits"]`` are the classifier's output at the head
      resolution ``(B, K, h, w)`` (before any upsampling) and ``teacher["logits"]`` the
      teacher's; returns :func:`fakd_logit_bound`. The classifier is the one given to the
      constructor, else ``student["classifier_weight"]`` (``(K, C_s)`` or
      ``(K, C_s, 1, 1)``).
    * ``on="feats"`` / ``"nfd"``: ``teacher["feats"] (B, C_t, h', w')``; the student
      feature goes through the adapter here; returns :func:`fakd_feature_bound` or
      :func:`fakd_nfd_bound` (channel normalization).
    * ``masks (B, H, W)`` at any size, ``ignore_index`` skipped; required.

    The bound *contains* the loss it augments: at ``lam = 0`` it is pixel KD (over
    labelled pixels, or all with ``keep_ignored``), feature MSE or NFD. So "kd + fakd"
    means this module *in place of* :class:`~kdnb.losses.PixelKDLoss`, not beside it.

    A classifier or adapter given to the constructor is held by reference, not as a
    submodule: its parameters stay the student's (or the NFD loss's), its current weight
    is read at every call, and this module's ``state_dict`` does not hold it. Without an
    ``adapter`` (``on="feats"``/``"nfd"``) the module owns one when the channels differ,
    like the other feature losses: give its parameters to the optimizer. The covariance
    statistics are buffers, so ``state_dict`` resumes them exactly (315 MB in float64 at
    K = 150, C_s = 512 when full). ``lam`` is not saved: call :meth:`set_progress` every
    step (it starts at 0).

    Args:
        num_classes: ``K``.
        student_channels: ``C_s`` of the head feature.
        teacher_channels: ``C_t`` (``on="feats"``/``"nfd"`` without an ``adapter``).
        classifier: the student's 1x1 classifier (``nn.Conv2d``/``nn.Linear``) or a
            callable returning its weight (``on="logits"``); refused at once if not 1x1.
        adapter: a 1x1 student-to-teacher module to share (``nn.Conv2d`` or a
            :class:`~kdnb.features.ChannelAdapter` without BatchNorm).
        on: which loss to augment: ``"logits"``, ``"feats"`` or ``"nfd"``.
        lambda_0: final augmentation strength; ISDA uses 7.5 for ResNets.
        temperature: KD temperature ``T`` (``on="logits"``).
        diagonal: keep per-channel variances only.
        ignore_index: label to skip.
        keep_ignored: ``on="logits"``: count ignored pixels with plain KD (see
            :func:`fakd_logit_bound`).
        chunk_size: positions per chunk of the logit bound (default: automatic, see
            :func:`fakd_logit_bound`).
        nfd_eps: NFD's variance floor (``on="nfd"``).
        schedule: how ``lam`` grows to ``lambda_0`` over training (:data:`SCHEDULES`):
            ``"linear"``, ISDA's ``lambda_0 * t`` (default), or ``"cosine"``,
            ``lambda_0 * (1 - cos(pi t)) / 2``, the FAKD author's MKD default (``t`` =
            step / total steps).
        detach_classifier: ``on="logits"``: no gradient through the bound's ``Q`` to the
            student's classifier (MKD detaches it; ISDA does not).
        augment_teacher: ``on="logits"``: move the teacher's logits too, by ISDA's
            surrogate with the teacher's classifier and the class covariance of the
            teacher's head features (:func:`semantic_shift`), as MKD does; needs
            ``teacher_classifier`` and ``teacher["feats"]``.
        teacher_classifier: the teacher's 1x1 classifier (held by reference), for
            ``augment_teacher``.

    The FAKD author's MKD code (jianlong-yuan/semi-mmseg) makes these choices: diagonal
    variances, ``detach_classifier``, ``schedule="cosine"`` to ``lambda_0`` 1.5-2.0, and
    ``augment_teacher``; kdnb's defaults are ISDA's (docs/METHODS.md, section FAKD).

    Shape:
        see the contract above; returns a 0-dim tensor.

    Reference:
        Yuan et al., "FAKD: Feature Augmented Knowledge Distillation for Semantic
        Segmentation", WACV 2024, arXiv 2208.14143; Wang et al., "Implicit Semantic Data
        Augmentation for Deep Networks", NeurIPS 2019, arXiv 1909.12220 (schedule).

    Introduced in notebooks/03_semantic_direction_augmentation.ipynb.
    """

    def __init__(self, num_classes: int, student_channels: int, *,
                 teacher_channels: int | None = None, classifier: WeightSource | None = None,
                 adapter: nn.Module | None = None, on: str = "logits", lambda_0: float = 7.5,
                 temperature: float = 1.0, diagonal: bool = False, ignore_index: int = 255,
                 keep_ignored: bool = False, chunk_size: int | None = None,
                 nfd_eps: float = 1e-5, schedule: str = "linear",
                 detach_classifier: bool = False, augment_teacher: bool = False,
                 teacher_classifier: WeightSource | None = None):
        super().__init__()
        if on not in ("logits", "feats", "nfd"):
            raise ValueError(f"FAKDLoss: on must be 'logits', 'feats' or 'nfd', got {on!r}")
        if lambda_0 < 0 or temperature <= 0:
            raise ValueError(f"FAKDLoss needs lambda_0 >= 0 and temperature > 0, got "
                             f"{lambda_0} and {temperature}")
        if schedule not in SCHEDULES:
            raise ValueError(f"FAKDLoss: unknown schedule {schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        if (detach_classifier or augment_teacher) and on != "logits":
            raise ValueError("FAKDLoss: detach_classifier and augment_teacher apply to the "
                             f"logit bound (on='logits'), not to on={on!r}")
        if augment_teacher:
            if teacher_classifier is None or teacher_channels is None:
                raise ValueError("FAKDLoss(augment_teacher=True) needs teacher_classifier and "
                                 "teacher_channels (the teacher's head feature channels)")
            if isinstance(teacher_classifier, nn.Module):
                _linear_weight(teacher_classifier, "FAKDLoss", "teacher classifier")
        if isinstance(classifier, nn.Module):
            _linear_weight(classifier, "FAKDLoss", "classifier")  # refuse a 3x3 head now
        self.owned_adapter: nn.Module | None = None
        if adapter is not None:
            _linear_weight(adapter, "FAKDLoss", "adapter")
        elif on != "logits":
            if teacher_channels is None:
                raise ValueError(f"FAKDLoss(on={on!r}) needs teacher_channels or an adapter")
            self.owned_adapter = make_adapter(student_channels, teacher_channels)
        self.on, self.lambda_0, self.temperature = on, float(lambda_0), float(temperature)
        self.ignore_index, self.keep_ignored = ignore_index, keep_ignored
        self.chunk_size, self.nfd_eps = chunk_size, nfd_eps
        # Tuples keep nn.Module from registering them as submodules (see the docstring).
        self._classifier = (classifier,)
        self._adapter = (adapter,)
        self._teacher_classifier = (teacher_classifier,)
        self.schedule, self.detach_classifier = schedule, detach_classifier
        self.augment_teacher = augment_teacher
        self.covariance = ClassCovariance(num_classes, student_channels, diagonal=diagonal,
                                          ignore_index=ignore_index)
        # the teacher's own class statistics, for its shifted logits (buffers: resumed)
        self.teacher_covariance = (ClassCovariance(num_classes, teacher_channels,
                                                   diagonal=diagonal, ignore_index=ignore_index)
                                   if augment_teacher else None)
        self.lam = 0.0

    def extra_repr(self) -> str:
        return (f"on={self.on!r}, lambda_0={self.lambda_0}, lam={self.lam:.4g}, "
                f"temperature={self.temperature}, schedule={self.schedule!r}")

    def set_progress(self, step: int, total_steps: int) -> float:
        """Sets ``lam`` for ``step`` of ``total_steps`` by the schedule; returns it.

        ``"linear"`` (ISDA): ``lambda_0 * t``; ``"cosine"`` (MKD):
        ``lambda_0 * (1 - cos(pi * t)) / 2``, with ``t = step / total_steps``.
        """
        if total_steps <= 0 or step < 0:
            raise ValueError(f"set_progress needs 0 <= step and total_steps > 0, got "
                             f"step={step}, total_steps={total_steps}")
        t = step / total_steps
        if self.schedule == "cosine":
            self.lam = self.lambda_0 * (1 - math.cos(math.pi * t)) / 2
        else:
            self.lam = self.lambda_0 * t
        return self.lam

    def _classifier_weight(self, student: Mapping[str, torch.Tensor]) -> torch.Tensor:
        source = self._classifier[0]
        if source is None:
            if "classifier_weight" not in student:
                raise KeyError("FAKDLoss(on='logits') needs the student's classifier: pass "
                               "classifier= to the constructor or student['classifier_weight']")
            source = student["classifier_weight"]
        elif not isinstance(source, nn.Module):
            source = source()
        return _linear_weight(source, "FAKDLoss", "classifier")

    def _adapter_and_weight(self, feats: torch.Tensor):
        adapter = self._adapter[0] if self._adapter[0] is not None else self.owned_adapter
        if adapter is None:  # equal channels and no adapter: the identity
            eye = torch.eye(feats.shape[1], device=feats.device, dtype=_compute_dtype(feats))
            return feats, eye
        return adapter(feats), adapter

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                masks: torch.Tensor) -> torch.Tensor:
        need_s = ("feats", "logits") if self.on == "logits" else ("feats",)
        need_t = ("logits",) if self.on == "logits" else ("feats",)
        for side, need, got in (("student", need_s, student), ("teacher", need_t, teacher)):
            missing = [k for k in need if k not in got]
            if missing:
                raise KeyError(f"FAKDLoss(on={self.on!r}) needs {side}[{missing[0]!r}]; "
                               f"got keys {sorted(got)}")
        if masks is None:
            raise ValueError("FAKDLoss needs masks (B, H, W): they pick each position's class")
        if self.augment_teacher and "feats" not in teacher:
            raise KeyError("FAKDLoss(augment_teacher=True) needs teacher['feats'] (the "
                           f"teacher's head feature); got keys {sorted(teacher)}")
        feats = student["feats"]
        if self.training:
            self.covariance.update(feats, masks, sync=True)
            if self.augment_teacher:
                self.teacher_covariance.update(teacher["feats"], masks, sync=True)
        validate = not self.training  # update() has already checked these labels
        if self.on == "logits":
            teacher_logits = teacher["logits"]
            if self.augment_teacher:
                source = self._teacher_classifier[0]
                teacher_logits = semantic_shift(
                    teacher_logits, source if isinstance(source, nn.Module) else source(),
                    self.teacher_covariance, masks, lam=self.lam,
                    ignore_index=self.ignore_index, validate=validate)
            return fakd_logit_bound(student["logits"], teacher_logits,
                                    self._classifier_weight(student), self.covariance, masks,
                                    lam=self.lam, temperature=self.temperature,
                                    chunk_size=self.chunk_size, ignore_index=self.ignore_index,
                                    keep_ignored=self.keep_ignored,
                                    detach_classifier=self.detach_classifier, validate=validate)
        adapted, weight = self._adapter_and_weight(feats)
        if self.on == "feats":
            return fakd_feature_bound(adapted, teacher["feats"], weight, self.covariance, masks,
                                      lam=self.lam, ignore_index=self.ignore_index,
                                      validate=validate)
        return fakd_nfd_bound(adapted, teacher["feats"], weight, self.covariance, masks,
                              lam=self.lam, eps=self.nfd_eps, ignore_index=self.ignore_index,
                              validate=validate)
