"""Cross-image relational distillation (CIRKD): pixel relations across images and memories.

SKD and IFVD compare relations *inside* one image. CIRKD (Yang et al.) also transfers
how a pixel relates to pixels and regions of *other* images, in three terms:

* :func:`cross_image_pair_loss`, in-batch pixel-to-pixel: for every pair of images
  ``(i, j)`` of the batch, each position of ``i`` gets a softmax over its cosine
  similarities to the positions of ``j``, in each network's own feature space; the
  student's distributions imitate the teacher's (KL).
* :func:`memory_contrast_loss` on a pixel memory, memory pixel-to-pixel: each labelled
  position's similarities to teacher pixel embeddings kept from earlier batches.
* :func:`memory_contrast_loss` on a region memory, memory pixel-to-region: the same
  against class-mean teacher embeddings (one per class and image) of earlier batches.

The memories are per-class FIFO queues of unit teacher embeddings that
:class:`CIRKDLoss` owns as buffers (``state_dict`` checkpoints and resumes them, with the
module's random-draw counter) and fills with the batch's teacher embeddings, gathered from
every rank under ``torch.distributed`` so that every rank holds the same memories. For the
memory terms the student's head feature goes through a trainable projection head to the
teacher's channels; the in-batch term needs none.

:func:`cirkd_loss` computes the three terms from given memory keys; :class:`CIRKDLoss` is
the module a trainer adds (``build_losses({"cirkd": 1.0}, ...)``). CIRKD's recipe also
adds pixel KD on the logits (weight 1), which kdnb keeps a separate method (``"kd"``).

Reference:
    Yang, Zhou, Xu, Yuan, Wang, Zhang, An, Wang, "Cross-Image Relational Knowledge
    Distillation for Semantic Segmentation", CVPR 2022, arXiv 2204.06986; code
    github.com/winycg/CIRKD (docs/METHODS.md, section CIRKD, says what kdnb follows).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kdnb.features import resize_labels
from kdnb.losses.feature import _check_features, _upcast
from kdnb.losses.relation import _full_precision, _pooled_pair, labelled_feats

__all__ = ["similarity_kl", "cross_image_pair_loss", "memory_contrast_loss", "cirkd_loss",
           "CIRKDTerms", "CIRKDDraws", "CIRKDLoss"]


#: Logits computed at a time, per device type: on a CPU a (rows, keys) block of a few MB
#: stays in cache; on a GPU blocks are larger, so that kernel launches do not dominate.
_BLOCK_VALUES = 1 << 20
_BLOCK_VALUES_CUDA = 1 << 26


def _similarity_kl_rows(s_rows, s_keys, t_rows, t_keys, scale, weights, grads=None):
    """``sum_r weights[r] * KL(softmax(scale t_r . T^T) || softmax(scale s_r . S^T))``,
    a block of rows at a time; fills ``grads = [d/ds_rows, d/ds_keys]`` when given (an
    entry None: that gradient is not needed)."""
    total = s_rows.new_zeros(())
    block = _BLOCK_VALUES_CUDA if s_rows.device.type == "cuda" else _BLOCK_VALUES
    step = max(1, block // max(1, s_keys.shape[0]))
    for start in range(0, s_rows.shape[0], step):
        rows = slice(start, start + step)
        log_p_s = F.log_softmax((s_rows[rows] * scale) @ s_keys.T, dim=1)  # (r, M)
        log_p_t = F.log_softmax((t_rows[rows] * scale) @ t_keys.T, dim=1)
        p_t = log_p_t.exp()
        w = weights[rows]
        kl = (p_t * (log_p_t - log_p_s)).sum(1)  # (r,)
        # where, not a product: a row of weight 0 may hold anything, NaN included
        total = total + torch.where(w != 0, w * kl, 0.0).sum()
        if grads is not None:
            # d KL / d logits_s = p_s - p_t; the logits are scale * s_rows . s_keys^T
            g = torch.where(w[:, None] != 0, (log_p_s.exp() - p_t) * (w * scale)[:, None], 0.0)
            if grads[0] is not None:
                grads[0][rows] = g @ s_keys
            if grads[1] is not None:  # (a left-out row's values too: 0 * NaN is NaN)
                grads[1] += g.T @ torch.where(w[:, None] != 0, s_rows[rows], 0.0)
    return total


class _SimilarityKL(torch.autograd.Function):
    """:func:`_similarity_kl_rows` with its gradient computed in the same pass over the
    blocks: no ``(rows, keys)`` tensor is kept for the backward."""

    @staticmethod
    def forward(ctx, s_rows, s_keys, t_rows, t_keys, scale, weights):
        need_rows, need_keys = ctx.needs_input_grad[:2]
        grads = [torch.empty_like(s_rows) if need_rows else None,
                 torch.zeros_like(s_keys) if need_keys else None]
        total = _similarity_kl_rows(s_rows, s_keys, t_rows, t_keys, scale, weights, grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total

    @staticmethod
    @once_differentiable  # the gradient was computed in the forward pass: no double backward
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        return tuple(next(saved) * grad_total if need else None
                     for need in ctx.needs_input_grad[:2]) + (None,) * 4


def similarity_kl(s_rows: torch.Tensor, s_keys: torch.Tensor, t_rows: torch.Tensor,
                  t_keys: torch.Tensor, *, scale: float, weights: torch.Tensor) -> torch.Tensor:
    """The distillation of a similarity distribution, CIRKD's building block, fused.

    Row ``r`` of each network gets a softmax over its similarities to that network's keys,
    ``softmax(scale * rows[r] . keys^T)``; the result is ``sum_r weights[r] * KL(teacher's
    || student's)``, rows of weight 0 left out (they may hold anything). It equals the
    plain autograd expression, but runs over blocks of rows and computes the gradient
    with respect to ``s_rows`` and ``s_keys`` in the same pass (``d KL / d logits = p_s -
    p_t``), so memory stays at one block instead of several ``(rows, keys)`` tensors:
    at a 64x128 map the in-batch term's are 8192 x 8192 per image pair. The teacher's
    rows and keys get no gradient. No double backward.

    Shape:
        ``s_rows (R, C_s)``, ``s_keys (M, C_s)``, ``t_rows (R, C_t)``, ``t_keys (M, C_t)``,
        ``weights (R,)``; returns a 0-dim tensor.
    """
    t_rows, t_keys, weights = t_rows.detach(), t_keys.detach(), weights.detach()
    with _full_precision(s_rows.device):
        if torch.is_grad_enabled() and (s_rows.requires_grad or s_keys.requires_grad):
            return _SimilarityKL.apply(s_rows, s_keys, t_rows, t_keys, scale, weights)
        return _similarity_kl_rows(s_rows, s_keys, t_rows, t_keys, scale, weights)


def cross_image_pair_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
                          temperature: float = 0.1, pool: int = 1) -> torch.Tensor:
    """CIRKD's in-batch pixel-to-pixel distillation, over every ordered pair of images.

    Each position's feature is L2-normalized over channels. For images ``i`` and ``j``
    (``i = j`` included) and position ``p`` of ``i``, ``q_ij(p) = softmax_r(u_i(p) .
    u_j(r) / temperature)`` over the ``N = h*w`` positions ``r`` of ``j``;
    ``L = 1 / (B^2 N) * sum_{i,j,p} KL(q^T_ij(p) || q^S_ij(p))``: the mean KL over the
    ``B^2 N`` rows, as CIRKD's ``CriterionMiniBatchCrossImagePair`` (``batchmean`` per
    pair, averaged over the ``B^2`` pairs). No ``T^2`` factor, as theirs.

    Resolution: nearest-upsampling both maps repeats rows (the mean is unchanged) and
    splits each distribution evenly over copies (each KL is unchanged). Cost: ``B^2``
    pairs of ``N x N`` similarities per network (64x128 map: 8192^2 per pair), computed in
    blocks by :func:`similarity_kl`; ``pool`` averages ``pool x pool`` windows first,
    ``N / pool^2`` positions (the authors' later code pools 4x4 on maps of at least
    256x256).

    Args:
        student_feats: student features.
        teacher_feats: teacher features at the same ``B, h, w`` (detached inside).
        temperature: of the similarity softmax (CIRKD's ``--contrast-temperature``).
        pool: average-pool window and stride (ceil mode) before the similarities; 1
            (CIRKD's default, ``pooling=False``) means none, 2 is their ``pooling=True``.

    Returns:
        A scalar tensor, >= 0.

    Shape:
        ``student_feats: (B, C_s, h, w)``, ``teacher_feats: (B, C_t, h, w)``.

    Reference:
        Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
        Segmentation", CVPR 2022, arXiv 2204.06986, Eq. 4 (``losses/cirkd_mini_batch.py``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = _pooled_pair(student_feats, teacher_feats, pool, F.avg_pool2d)
    s = F.normalize(s.flatten(2), dim=1)  # (B, C_s, N), unit vector per position
    t = F.normalize(t.flatten(2), dim=1)
    b, _, n = s.shape
    s, t = s.transpose(1, 2), t.transpose(1, 2)  # (B, N, C): a row per position
    weights = s.new_full((n,), 1.0 / (b * b * n))
    total = s.new_zeros(())
    for i in range(b):  # positions of i against positions of j, one pair at a time
        for j in range(b):
            total = total + similarity_kl(s[i], s[j], t[i], t[j], scale=1 / temperature,
                                          weights=weights)
    return total


def memory_contrast_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
                         keys: torch.Tensor, valid: torch.Tensor | None = None, *,
                         temperature: float = 0.1, kd_temperature: float = 1.0
                         ) -> torch.Tensor:
    """CIRKD's memory-based distillation: anchors' similarities to memory keys, matched.

    Anchors are L2-normalized (over channels); ``keys`` are the memory's unit teacher
    embeddings. Per anchor ``a``, ``z(a) = a . keys^T / temperature`` in each network;
    ``L = T^2 / N_valid * sum_valid KL(softmax(z_t / T) || softmax(z_s / T))`` with
    ``T = kd_temperature``: CIRKD's ``contrast_sim_kd`` (``batchmean`` over the anchors,
    which are the labelled positions). Invalid rows are left out and not counted; with no
    valid row the loss is 0 (CIRKD returns NaN there, a mean over no anchor).

    Args:
        student_embed: the student's anchors, projected to the teacher's channels.
        teacher_embed: the teacher's anchors (detached inside).
        keys: memory keys, unit rows (pixel or region memory, all classes).
        valid: which rows are anchors; None for all.
        temperature: divides the similarities (CIRKD's ``--contrast-temperature``).
        kd_temperature: of the KL (CIRKD's ``--contrast-kd-temperature``).

    Returns:
        A scalar tensor, >= 0.

    Shape:
        ``student_embed, teacher_embed: (P, C_t)``, ``keys: (M, C_t)``, ``valid: (P,)``
        bool.

    Reference:
        Yang et al., CVPR 2022, arXiv 2204.06986, Eq. 7 and 9 (``losses/cirkd_memory.py``).
    """
    if student_embed.ndim != 2 or student_embed.shape != teacher_embed.shape:
        raise ValueError(f"student and teacher anchors must be (P, C) alike, got "
                         f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}")
    if keys.ndim != 2 or keys.shape[1] != student_embed.shape[1]:
        raise ValueError(f"keys must be (M, {student_embed.shape[1]}), got {tuple(keys.shape)}")
    if temperature <= 0 or kd_temperature <= 0:
        raise ValueError(f"temperature and kd_temperature must be > 0, got {temperature} "
                         f"and {kd_temperature}")
    s = F.normalize(_upcast(student_embed), dim=1)
    t = F.normalize(_upcast(teacher_embed.detach()), dim=1)
    k = keys.detach().to(s.dtype)
    if valid is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    count = valid.sum().clamp_min(1).to(s.dtype)
    weights = torch.where(valid, kd_temperature ** 2 / count, 0.0)  # (P,)
    return similarity_kl(s, k, t, k, scale=1 / (temperature * kd_temperature), weights=weights)


class CIRKDTerms(NamedTuple):
    """CIRKD's three terms, unweighted (each a scalar tensor)."""

    minibatch: torch.Tensor  # in-batch pixel-to-pixel, cross_image_pair_loss
    pixel: torch.Tensor      # memory pixel-to-pixel
    region: torch.Tensor     # memory pixel-to-region


def _valid_labels(masks: torch.Tensor, size, num_classes: int, ignore_index: int,
                  batch: int) -> torch.Tensor:
    """Nearest-resized labels ``(B, h*w)``, -1 where no class is known (ignored or out of
    ``[0, num_classes)``)."""
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3 or masks.shape[0] != batch:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"CIRKD needs masks (B, H, W) with B = {batch} like the features, "
                         f"got {shape}")
    labels = resize_labels(masks, size).flatten(1)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    return torch.where(valid, labels, -1)


def cirkd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor,
               student_embed: torch.Tensor, masks: torch.Tensor, pixel_keys: torch.Tensor,
               region_keys: torch.Tensor, *, num_classes: int, ignore_index: int = 255,
               temperature: float = 0.1, kd_temperature: float = 1.0, pool: int = 1
               ) -> CIRKDTerms:
    """CIRKD's three terms for one batch, given the memory keys drawn for it.

    The anchors of the memory terms are the positions whose nearest-resized label is a
    class in ``[0, num_classes)``, not ``ignore_index``. The student side of the memory
    terms is ``student_embed`` (the projection head's output), the teacher side the
    teacher's feature itself; the in-batch term compares the raw features.

    Args:
        student_feats: the student's head feature.
        teacher_feats: the teacher's, at the student's ``h, w`` (detached inside).
        student_embed: ``student_feats`` through CIRKD's projection head.
        masks: labels at any resolution, nearest-resized to ``h, w``.
        pixel_keys: the pixel-memory keys drawn for this batch.
        region_keys: the region-memory keys drawn for this batch.
        num_classes: ``K``.
        ignore_index: label of unlabelled pixels.
        temperature: of the similarities, in all three terms.
        kd_temperature: of the memory terms' KL.
        pool: average-pool window of the in-batch term.

    Returns:
        :class:`CIRKDTerms`, unweighted.

    Shape:
        ``student_feats: (B, C_s, h, w)``, ``teacher_feats, student_embed: (B, C_t, h, w)``,
        ``masks: (B, H, W)``, ``pixel_keys: (M_p, C_t)``, ``region_keys: (M_r, C_t)``.
    """
    _check_features(student_embed, teacher_feats, same_channels=True)
    b, c, h, w = student_embed.shape
    labels = _valid_labels(masks.to(student_embed.device), (h, w), num_classes, ignore_index, b)
    valid = (labels >= 0).reshape(-1)
    s = student_embed.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C_t), anchors
    t = teacher_feats.detach().permute(0, 2, 3, 1).reshape(-1, c)
    memory = dict(temperature=temperature, kd_temperature=kd_temperature)
    return CIRKDTerms(
        minibatch=cross_image_pair_loss(student_feats, teacher_feats, temperature=temperature,
                                        pool=pool),
        pixel=memory_contrast_loss(s, t, pixel_keys, valid, **memory),
        region=memory_contrast_loss(s, t, region_keys, valid, **memory))


class CIRKDDraws(NamedTuple):
    """The random choices of one :class:`CIRKDLoss` call."""

    pixel_scores: torch.Tensor  # (B, h*w) uniform: each class enqueues its lowest-scored pixels
    pixel_index: torch.Tensor   # (n_p,) pixel-memory slots read, the same for every class
    region_index: torch.Tensor  # (n_r,) region-memory slots read, the same for every class


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenates ``x`` from every rank along dim 0, in rank order (no gradient)."""
    if world < 2:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class CIRKDLoss(nn.Module):
    """CIRKD for a trainer: owns the projection head and the memories, returns the loss.

    ``L = minibatch_weight * L_minibatch + pixel_weight * L_pixel + region_weight *
    L_region`` (:func:`cirkd_loss`); the unweighted terms of the last call are in
    ``self.terms`` (detached). Contract of ``forward(student, teacher, masks)`` (the
    :mod:`kdnb.losses` one): ``student["feats"] (B, C_s, h, w)``, ``teacher["feats"]
    (B, C_t, h', w')`` resized to ``h, w``, ``masks (B, H, W)`` (required).

    In training mode each call first enqueues the batch's teacher embeddings, as CIRKD does
    before it reads the memories: per image and class present, the unit mean of the
    class's unit teacher features goes into that class's region queue, and
    ``enqueue_pixels`` of its pixels, chosen at random, into its pixel queue (FIFO; a
    pixel write that would pass the end fills the queue's last slots and restarts at 0,
    as CIRKD's). Then ``n_p = pixel_contrast_size // K + 1`` slots of the pixel queue and
    ``n_r = region_contrast_size // K + 1`` of the region queue are drawn, the same slots
    for every class, giving ``K * n_p`` and ``K * n_r`` keys. In eval mode the memories
    are read, not written.

    Differences from CIRKD's ``losses/cirkd_memory.py`` (docs/METHODS.md, section CIRKD):
    the pixels enqueued for a class are drawn among that class's pixels (CIRKD draws
    position indices below the class's pixel count among all the image's positions, so
    in an image of several classes a class's pixel queue also receives other classes'
    pixels); labels outside ``[0, K)`` are skipped like ``ignore_index`` (CIRKD would
    index out of range); a batch without a labelled pixel gives 0 (CIRKD's gives NaN);
    the projection head's BatchNorm is per process (CIRKD's is SyncBatchNorm: convert it
    with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU runs).

    Under ``torch.distributed`` each rank computes its images' entries and all-gathers
    them (rank order, then image order) before writing, so every rank writes the same
    entries in the same order and the memories stay identical on every rank: CIRKD
    all-gathers the teacher maps and labels (``concat_all_gather``) and writes the same
    entries; kdnb gathers only the entries, ``K * (enqueue_pixels + 1)`` vectors per image
    instead of the maps. Every rank must call ``forward`` in training mode.

    No host-device synchronization: the writes are masked (an absent class writes back its
    slots' own values), the slots come from the pointer buffers on the device, and the
    Python loop runs over the gathered images (a count known on the host). Randomness
    comes from the module's own generator, seeded from ``seed``, the count of training
    calls so far and the rank; that count is saved in ``state_dict`` (extra state), so a
    resumed run draws what the uninterrupted one would have. The memories start as random
    unit vectors drawn from ``seed`` alone, the same on every rank; the trainer passes the
    run's seed (:func:`kdnb.losses.build_losses`).

    Memory: ``K * (pixel_memory_size + region_memory_size) * C_t`` values in the buffers'
    dtype (float32: 428 MB at K = 19, C_t = 256 with CIRKD's sizes).

    Args:
        num_classes: ``K``.
        student_channels: ``C_s`` of the student's feature.
        teacher_channels: ``C_t`` of the teacher's, the memories' width.
        pixel_memory_size: pixel-queue length per class (CIRKD: 20000).
        region_memory_size: region-queue length per class (CIRKD: 2000).
        pixel_contrast_size: pixel keys read per call, over all classes (CIRKD: 4096).
        region_contrast_size: region keys read per call, over all classes (CIRKD: 1024).
        enqueue_pixels: pixels enqueued per class and image (CIRKD's ``pixel_update_freq``,
            16); at most ``pixel_memory_size``.
        temperature: of the similarities in all three terms (CIRKD: 0.1).
        kd_temperature: of the memory terms' KL (CIRKD: 1).
        minibatch_weight: in-batch term (CIRKD's ``--lambda-minibatch-pixel``: 1).
        pixel_weight: memory pixel-to-pixel term (``--lambda-memory-pixel``: 0.1).
        region_weight: memory pixel-to-region term (``--lambda-memory-region``: 0.1).
        pool: average-pool window of the in-batch term (CIRKD: 1, none).
        ignore_index: label of unlabelled pixels.
        seed: seeds the initial memories and the random draws.

    The defaults are CIRKD's, from ``train_cirkd.py`` (its argparse defaults; the
    Cityscapes scripts ``train_scripts/train_cirkd/citys/*.sh`` keep them, the VOC ones
    set both memory weights to 0.01) and ``losses/cirkd_memory.py``
    (``pixel_update_freq = 16``, the projection head) of github.com/winycg/CIRKD at
    commit 2d8ad0f703676da698abdf077cc5a67181d1c635, the last with ``train_cirkd.py``
    (later commits rename it ``train_cirkdv2.py`` for the journal version).

    Shape:
        ``forward(student, teacher, masks)`` as above; returns a 0-dim tensor.
        Buffers: ``pixel_queue (K, pixel_memory_size, C_t)``, ``pixel_ptr (K,)``,
        ``region_queue (K, region_memory_size, C_t)``, ``region_ptr (K,)``.

    Reference:
        Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
        Segmentation", CVPR 2022, arXiv 2204.06986.
    """

    def __init__(self, *, num_classes: int, student_channels: int, teacher_channels: int,
                 pixel_memory_size: int = 20000, region_memory_size: int = 2000,
                 pixel_contrast_size: int = 4096, region_contrast_size: int = 1024,
                 enqueue_pixels: int = 16, temperature: float = 0.1,
                 kd_temperature: float = 1.0, minibatch_weight: float = 1.0,
                 pixel_weight: float = 0.1, region_weight: float = 0.1, pool: int = 1,
                 ignore_index: int = 255, seed: int = 0):
        super().__init__()
        sizes = dict(num_classes=num_classes, student_channels=student_channels,
                     teacher_channels=teacher_channels, pixel_memory_size=pixel_memory_size,
                     region_memory_size=region_memory_size,
                     pixel_contrast_size=pixel_contrast_size,
                     region_contrast_size=region_contrast_size, enqueue_pixels=enqueue_pixels,
                     pool=pool)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"CIRKDLoss: {', '.join(bad)} must be positive ints")
        if enqueue_pixels > pixel_memory_size:
            raise ValueError(f"CIRKDLoss: enqueue_pixels={enqueue_pixels} must be at most "
                             f"pixel_memory_size={pixel_memory_size}")
        if temperature <= 0 or kd_temperature <= 0:
            raise ValueError(f"CIRKDLoss: temperature and kd_temperature must be > 0, got "
                             f"{temperature} and {kd_temperature}")
        weights = dict(minibatch_weight=minibatch_weight, pixel_weight=pixel_weight,
                       region_weight=region_weight)
        bad = [f"{k}={v!r}" for k, v in weights.items() if not v >= 0]
        if bad:
            raise ValueError(f"CIRKDLoss: {', '.join(bad)} must be >= 0")
        self.num_classes, self.ignore_index, self.seed = num_classes, ignore_index, int(seed)
        self.enqueue_pixels, self.pool = enqueue_pixels, pool
        self.temperature, self.kd_temperature = float(temperature), float(kd_temperature)
        self.minibatch_weight, self.pixel_weight = float(minibatch_weight), float(pixel_weight)
        self.region_weight = float(region_weight)
        # per class, as train_cirkd.py passes them: size // K + 1, at most the queue
        self.pixel_keys_per_class = min(pixel_contrast_size // num_classes + 1, pixel_memory_size)
        self.region_keys_per_class = min(region_contrast_size // num_classes + 1,
                                         region_memory_size)
        # CIRKD's project_head: conv-BN-ReLU-conv, 1x1, bias-free
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels), nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False))
        g = torch.Generator().manual_seed(self.seed)  # the same memories on every rank
        start = (torch.randn(num_classes, pixel_memory_size, teacher_channels, generator=g),
                 torch.randn(num_classes, region_memory_size, teacher_channels, generator=g))
        self.register_buffer("pixel_queue", F.normalize(start[0], dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(start[1], dim=2))
        self.register_buffer("region_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.draws = 0  # training calls so far: with seed and rank, seeds each call's draws
        self.terms: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        k, m_p, c = self.pixel_queue.shape
        return (f"num_classes={k}, pixel_memory_size={m_p}, "
                f"region_memory_size={self.region_queue.shape[1]}, dim={c}, "
                f"keys_per_class=({self.pixel_keys_per_class}, {self.region_keys_per_class}), "
                f"temperature={self.temperature}, kd_temperature={self.kd_temperature}, "
                f"weights=({self.minibatch_weight}, {self.pixel_weight}, {self.region_weight})")

    def get_extra_state(self) -> torch.Tensor:
        # a tensor, so every value of a state_dict is one (torch.equal, weights_only loads):
        # the draw count, and the seed the draws and memories come from
        return torch.tensor([self.draws, self.seed], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.ndim == 0:  # written before the seed was saved: the draw count alone
            self.draws = int(state)
            return
        draws, seed = (int(v) for v in state)
        if seed != self.seed:
            raise ValueError(f"CIRKDLoss: the saved memories and draws come from seed {seed}, "
                             f"this loss has seed {self.seed}: load them into a loss built "
                             f"with seed={seed} (the run's seed), or start a new run")
        self.draws = draws

    def sample(self, batch: int, positions: int, device: torch.device) -> CIRKDDraws:
        """This call's random choices, from the module's generator (see the class docstring).

        Tests wrap it to replay the same choices in a reference implementation.
        """
        rank, _ = _world()
        try:
            g = torch.Generator(device=device)
            g.manual_seed(((self.seed * 1_000_003 + self.draws) * 1_009 + rank) % 2 ** 63)
        except RuntimeError:  # a device without generators ("meta"): the global stream
            g = None
        m_p, m_r = self.pixel_queue.shape[1], self.region_queue.shape[1]
        return CIRKDDraws(
            pixel_scores=torch.rand(batch, positions, generator=g, device=device),
            pixel_index=torch.randperm(m_p, generator=g, device=device)[
                :self.pixel_keys_per_class],
            region_index=torch.randperm(m_r, generator=g, device=device)[
                :self.region_keys_per_class])

    @torch.no_grad()
    def enqueue(self, teacher_feats: torch.Tensor, labels: torch.Tensor,
                pixel_scores: torch.Tensor) -> None:
        """Writes one batch's teacher embeddings into the memories (gathered under DDP).

        Args:
            teacher_feats: the teacher's feature at the labels' size (normalized here).
            labels: ``(B, h*w)`` classes, -1 where none is known.
            pixel_scores: ``(B, h*w)`` distinct random numbers: each class of an image
                enqueues its ``enqueue_pixels`` lowest-scored pixels (all, if fewer).
        """
        k_all = self.num_classes
        b, c = teacher_feats.shape[:2]
        with _full_precision(teacher_feats.device):
            t = F.normalize(_upcast(teacher_feats).flatten(2), dim=1).transpose(1, 2)  # (B, N, C)
            member = labels[:, :, None] == torch.arange(k_all, device=labels.device)  # (B, N, K)
            counts = member.sum(1)  # (B, K)
            means = torch.bmm(member.transpose(1, 2).to(t.dtype), t)  # (B, K, C) sums
            means = F.normalize(means / counts.clamp_min(1)[..., None].to(t.dtype), dim=2)
            m = min(self.enqueue_pixels, t.shape[1])
            scores = torch.where(member.transpose(1, 2), pixel_scores[:, None, :].to(t.dtype),
                                 torch.inf)  # (B, K, N): other classes' pixels last
            chosen = scores.topk(m, dim=2, largest=False).indices  # (B, K, m), in score order
            pixels = t.gather(1, chosen.reshape(b, -1, 1).expand(-1, -1, c)).reshape(b, k_all, m, c)
            pixels = F.normalize(pixels, dim=3)
        _, world = _world()
        counts, means, pixels = (_gather(x, world) for x in (counts, means, pixels))
        self._write(counts, means, pixels)

    def _write(self, counts: torch.Tensor, means: torch.Tensor, pixels: torch.Tensor) -> None:
        """Writes gathered entries image by image, as CIRKD's loop does (no host sync)."""
        k_all, m_p, _ = self.pixel_queue.shape
        m_r = self.region_queue.shape[1]
        m = pixels.shape[2]
        rows = torch.arange(k_all, device=counts.device)
        offsets = torch.arange(m, device=counts.device)
        for b in range(counts.shape[0]):
            present = counts[b] > 0  # (K,)
            # region: one entry per class present, at its pointer
            slot = self.region_ptr.clone()
            old = self.region_queue[rows, slot]  # (K, C)
            new = torch.where(present[:, None], means[b].to(old.dtype), old)
            self.region_queue[rows, slot] = new
            self.region_ptr.copy_(torch.where(present, (slot + 1) % m_r, slot))
            # pixels: min(count, m) entries per class present; a write that would reach
            # the end goes to the last slots and the pointer restarts (CIRKD's rule)
            size = counts[b].clamp(max=m)
            ptr = self.pixel_ptr.clone()
            wrap = present & (ptr + size >= m_p)
            start = torch.where(wrap, m_p - size, ptr)
            # m <= m_p consecutive slots mod m_p are distinct: the unused ones write back
            slots = (start[:, None] + offsets) % m_p  # (K, m)
            keep = present[:, None] & (offsets < size[:, None])
            grid = rows[:, None].expand(-1, m)
            old = self.pixel_queue[grid, slots]  # (K, m, C)
            self.pixel_queue[grid, slots] = torch.where(keep[..., None],
                                                         pixels[b].to(old.dtype), old)
            self.pixel_ptr.copy_(torch.where(wrap, 0, torch.where(present, ptr + size, ptr)))

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s, t = labelled_feats(student, teacher, masks, "CIRKDLoss")
        b, _, h, w = s.shape
        labels = _valid_labels(masks.to(s.device), (h, w), self.num_classes,
                               self.ignore_index, b)
        draws = self.sample(b, h * w, s.device)
        if self.training:
            self.enqueue(t, labels, draws.pixel_scores)
            self.draws += 1
        pixel_keys = self.pixel_queue[:, draws.pixel_index].flatten(0, 1)  # (K * n_p, C_t)
        region_keys = self.region_queue[:, draws.region_index].flatten(0, 1)
        terms = cirkd_loss(s, t, self.projector(s), masks, pixel_keys, region_keys,
                           num_classes=self.num_classes, ignore_index=self.ignore_index,
                           temperature=self.temperature, kd_temperature=self.kd_temperature,
                           pool=self.pool)
        self.terms = {k: v.detach() for k, v in terms._asdict().items()}
        return (self.minibatch_weight * terms.minibatch + self.pixel_weight * terms.pixel
                + self.region_weight * terms.region)
