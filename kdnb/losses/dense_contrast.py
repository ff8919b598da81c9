"""Af-DCD: masked feature mimicking plus dense contrast over channel groups and positions.

Af-DCD (augmentation-free dense contrastive distillation) trains the student's feature map
in two ways at once, with no augmented views:

* **masked feature mimicking**: positions of the (adapted) student map are zeroed at
  random, a small trainable *generator* (two 3x3 convolutions) rebuilds the map, and the
  rebuilt map regresses the teacher's (a summed squared error);
* **omni-contrasting**: the rebuilt map and the teacher's are max-pooled, cut into
  ``patch x patch`` patches and their channels into ``groups`` groups; a token is one
  channel group at one position. Each student token is pulled towards the teacher token at
  the same position and group and pushed from the teacher tokens of the *other* groups at
  every position of its patch (an InfoNCE over negative L1 distances).

:func:`omni_contrast_loss` and :func:`afdcd_loss` take already-matched maps (the student
already through its adapter, mask and generator); :class:`AfDCDLoss` owns the adapter and
the generator and draws the mask. The scales and the defaults are the authors' (OSVAI/Af-DCD
at commit 5b086a7b4d92e5d14208d95347f05c014e5ca84a); docs/METHODS.md, section Af-DCD, says
how they convert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdnb.losses.feature import _check_features, _upcast, make_adapter, matched_feats
from kdnb.losses.relation import _full_precision

__all__ = ["MASKS", "GENERATORS", "feature_keep_mask", "omni_contrast_loss", "afdcd_loss",
           "AfDCDLoss"]

#: how :func:`feature_keep_mask` chooses the positions it hides.
MASKS = ("random", "center")
#: the generator blocks :class:`AfDCDLoss` can rebuild the masked student map with.
GENERATORS = ("plain", "enhanced")
MIMIC_REDUCTIONS = ("sum", "mean")

# The authors' values: losses/ocmgd.py (tau_ocd, M_ocd, pool_size, patch_size, mask_ratio)
# and train_scripts/cityscape/*.sh (lambda-fd, lambda-ctr) of OSVAI/Af-DCD at 5b086a7.
TEMPERATURE = 0.07
GROUPS = 16
PATCH_SIZE = 4
POOL = 4
MASK_RATIO = 0.75
MIMIC_WEIGHT = 2e-6
CONTRAST_WEIGHT = 5e-3


def feature_keep_mask(feats: torch.Tensor, *, mask: str = "random",
                      mask_ratio: float = MASK_RATIO) -> torch.Tensor:
    """Which positions of a feature map the generator sees: 1 kept, 0 hidden.

    * ``"random"``: each position of each sample is hidden with probability
      ``mask_ratio``, drawn from the global generator (``torch.rand``, float32, one value
      per position shared by every channel; a position is hidden when its draw exceeds
      ``1 - mask_ratio``, the authors' rule, so a seeded run reproduces their mask);
    * ``"center"``: the middle third in both directions (rows ``h//3 .. 2h//3``, columns
      ``w//3 .. 2w//3``) is hidden in every sample; ``mask_ratio`` is not used.

    Args:
        feats: the map to mask, for its shape, device and dtype.
        mask: ``"random"`` or ``"center"``.
        mask_ratio: share of positions hidden by ``"random"``, in ``[0, 1)``.

    Returns:
        A ``(B, 1, h, w)`` tensor of ones and zeros in ``feats``' dtype.

    Shape:
        ``feats: (B, C, h, w) -> (B, 1, h, w)``.
    """
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}: choose one of {', '.join(MASKS)}")
    b, _, h, w = feats.shape
    if mask == "center":
        keep = torch.ones(b, 1, h, w, device=feats.device, dtype=feats.dtype)
        keep[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
        return keep
    draw = torch.rand(b, 1, h, w, device=feats.device)
    return (draw <= 1 - mask_ratio).to(feats.dtype)


def _patch_tokens(f: torch.Tensor, groups: int, patch: int) -> torch.Tensor:
    # (B, C, H, W) -> (B * H/p * W/p, p*p * groups, C/groups): one row per patch, one token
    # per (position in the patch, channel group); token index = position * groups + group.
    b, c, h, w = f.shape
    f = f.reshape(b, groups, c // groups, h // patch, patch, w // patch, patch)
    f = f.permute(0, 3, 5, 4, 6, 1, 2)  # (B, H/p, W/p, p, p, groups, C/groups)
    return f.reshape(-1, patch * patch * groups, c // groups)


def omni_contrast_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
                       temperature: float = TEMPERATURE, groups: int = GROUPS,
                       patch_size: int = PATCH_SIZE, pool: int = POOL) -> torch.Tensor:
    """Af-DCD's omni-contrasting term: InfoNCE between channel groups inside each patch.

    Both maps are max-pooled (window and stride ``pool``; ``pool`` 0 or 1 leaves them as
    they are) and cropped at the bottom and right to whole ``patch_size x patch_size``
    patches **(ours: the authors' code needs the pooled size to be a multiple of the patch
    and crops CamVid's maps to 44x44 by hand)**. The ``C`` channels split into ``groups``
    blocks of ``C / groups`` consecutive channels. A token ``u(p, m)`` is group ``m`` of
    the channels at position ``p`` of a patch. For each student token,

    ``l(p, m) = -log( e^{-d(p,m; p,m)/T} / sum_{(q,k): k = m and q = p, or k != m}
    e^{-d(p,m; q,k)/T} )``, with ``d(p,m; q,k) = ||u_s(p, m) - u_t(q, k)||_1``:

    the positive is the teacher token at the same position and group, the negatives every
    teacher token of another group at any position of the patch (tokens of the same group
    at other positions are neither). The loss sums ``l`` over the ``groups`` tokens of a
    position and averages over the ``B * h' * w'`` pooled positions, which is ``groups``
    times the mean over tokens, as the authors' code scales it.

    Args:
        student_feats: the student map (for Af-DCD: adapted, masked and rebuilt by the
            generator).
        teacher_feats: the teacher map of the same shape (detached inside).
        temperature: divides the negative distances.
        groups: channel groups ``M``; must divide ``C``.
        patch_size: side of the square patches tokens are contrasted within.
        pool: max-pooling window before contrasting.

    Returns:
        A scalar tensor, >= 0, and at most ``groups * log(1 + patch_size^2 (groups - 1))``
        when the student equals the teacher.

    Shape:
        ``student_feats, teacher_feats: (B, C, h, w)``; pooled ``(B, C, h', w')``, tokens
        ``(B h' w' / patch_size^2, patch_size^2 * groups, C / groups)``.

    Reference:
        Fan et al. 2023, Af-DCD (NeurIPS 2023, arXiv 2312.04168), section on
        omni-contrasting; see :func:`afdcd_loss`.
    """
    _check_features(student_feats, teacher_feats, same_channels=True)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0: the distances are divided "
                         "by it (the authors use 0.07)")
    c = student_feats.shape[1]
    if groups < 1 or c % groups:
        raise ValueError(f"groups={groups} must divide the {c} channels of the compared maps: "
                         f"choose a divisor of {c} (the authors use 16 on 2048 channels)")
    if patch_size < 1:
        raise ValueError(f"patch_size={patch_size} must be >= 1")
    s, t = _upcast(student_feats), _upcast(teacher_feats.detach())
    if pool > 1:
        s, t = F.max_pool2d(s, pool), F.max_pool2d(t, pool)
    h, w = (size - size % patch_size for size in s.shape[-2:])
    if h == 0 or w == 0:
        raise ValueError(f"maps of {tuple(student_feats.shape[-2:])} pooled by {pool} give "
                         f"{tuple(s.shape[-2:])}, smaller than one {patch_size}x{patch_size} "
                         "patch: lower pool or patch_size")
    s, t = s[..., :h, :w], t[..., :h, :w]
    with _full_precision(s.device):
        s_tokens = _patch_tokens(s, groups, patch_size)
        t_tokens = _patch_tokens(t, groups, patch_size)
        tokens = s_tokens.shape[1]
        group = torch.arange(tokens, device=s.device) % groups
        compared = (group[:, None] != group[None, :]) | torch.eye(tokens, dtype=torch.bool,
                                                                  device=s.device)
        logits = -torch.cdist(s_tokens, t_tokens, p=1) / temperature  # (patches, L, L)
        logits = logits.masked_fill(~compared, float("-inf"))
        nll = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=1, dim2=2)
        return nll.sum() / (s.shape[0] * h * w)


def afdcd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *,
               mimic_weight: float = MIMIC_WEIGHT, contrast_weight: float = CONTRAST_WEIGHT,
               reduction: str = "sum", temperature: float = TEMPERATURE, groups: int = GROUPS,
               patch_size: int = PATCH_SIZE, pool: int = POOL) -> torch.Tensor:
    """Af-DCD on a rebuilt student map: ``mimic_weight * L_mimic + contrast_weight * L_oc``.

    ``L_mimic`` is the squared error between the maps, summed over ``C, h, w`` and averaged
    over the batch (``reduction="sum"``, the authors' scale, the one their weights are
    for), or averaged over all ``B * C * h * w`` elements (``"mean"``, which is the
    ``"sum"`` value divided by ``C * h * w`` and does not change when the maps are
    upsampled). ``L_oc`` is :func:`omni_contrast_loss`.

    Args:
        student_feats: the student map already adapted, masked and rebuilt by the generator
            (:class:`AfDCDLoss` does all three).
        teacher_feats: the teacher map of the same shape (detached inside).
        mimic_weight: weight of ``L_mimic`` (the authors' ``--lambda-fd``).
        contrast_weight: weight of ``L_oc`` (the authors' ``--lambda-ctr``).
        reduction: ``"sum"`` or ``"mean"``, for ``L_mimic`` only.
        temperature, groups, patch_size, pool: of :func:`omni_contrast_loss`.

    Returns:
        A scalar tensor, >= 0.

    Shape:
        ``student_feats, teacher_feats: (B, C_t, h, w)``.

    Reference:
        Fan et al., "Augmentation-free Dense Contrastive Knowledge Distillation for
        Efficient Semantic Segmentation", NeurIPS 2023, arXiv 2312.04168.
    """
    if reduction not in MIMIC_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: choose one of "
                         f"{', '.join(MIMIC_REDUCTIONS)}")
    contrast = omni_contrast_loss(student_feats, teacher_feats, temperature=temperature,
                                  groups=groups, patch_size=patch_size, pool=pool)
    s, t = _upcast(student_feats), _upcast(teacher_feats.detach())
    mimic = F.mse_loss(s, t, reduction=reduction)
    if reduction == "sum":
        mimic = mimic / s.shape[0]
    return mimic_weight * mimic + contrast_weight * contrast


class _EnhancedGenerator(nn.Module):
    """The authors' optional generator: two conv-ReLU blocks in a chain, each read out by
    its own 3x3 convolution, the two read-outs averaged."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.head1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.block1(x)
        second = self.block2(first)
        return (self.head1(first) + self.head2(second)) / 2


def _generator(kind: str, channels: int) -> nn.Module:
    if kind == "plain":  # conv3x3 - ReLU - conv3x3, as in the authors' default projector
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(channels, channels, 3, padding=1))
    return _EnhancedGenerator(channels)


class AfDCDLoss(nn.Module):
    """Af-DCD on feature maps, with its adapter, mask and generator.

    ``forward`` adapts the student map to ``C_t`` channels (a
    :class:`~kdnb.features.ChannelAdapter` when the channels differ; the authors' ``align``
    is the same 1x1 convolution with bias), zeroes the positions of
    :func:`feature_keep_mask`, rebuilds the map with the generator and returns
    :func:`afdcd_loss` of the rebuilt map and the teacher's (resized to the student's
    size and detached). The adapter and the generator are the module's parameters: give
    them to the optimizer with the student's. The random mask is drawn at every call, in
    eval mode too, from the global generator.

    Defaults, all from OSVAI/Af-DCD at commit 5b086a7b4d92e5d14208d95347f05c014e5ca84a:
    ``temperature=0.07`` (``tau_ocd``), ``groups=16`` (``M_ocd``), ``patch_size=4``
    (``patch_size=(4,4)``), ``pool=4`` (``pool_size``), ``mask="random"`` and
    ``mask_ratio=0.75`` (``rand_mask``, ``mask_ratio``), ``generator="plain"``
    (``enhance_projector=False``), all defaults of ``OmniContrastiveFeatureLoss`` in
    ``losses/ocmgd.py`` and of ``train_ocmgd.py``'s arguments; ``mimic_weight=2e-6`` and
    ``contrast_weight=5e-3``: ``--lambda-fd`` and ``--lambda-ctr`` of both Cityscapes
    scripts, ``train_scripts/cityscape/deeplabv3_r101_*_ocmgd.sh`` (their other datasets
    are listed in docs/METHODS.md, section Af-DCD). With these inner weights the method's
    own weight (``METHODS["afdcd"]``) is 1.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``; ``groups`` must divide it.
        temperature: of the contrast (:func:`omni_contrast_loss`).
        groups: channel groups of the contrast.
        patch_size: side of the patches of the contrast.
        pool: max-pooling window before the contrast (0 or 1: none).
        mask: ``"random"`` or ``"center"`` (:func:`feature_keep_mask`).
        mask_ratio: share of positions hidden by the random mask, in ``[0, 1)``.
        generator: ``"plain"`` (conv3x3-ReLU-conv3x3) or ``"enhanced"`` (the authors'
            ``EnhancedProjector``: two chained conv-ReLU blocks read out and averaged).
        mimic_weight: weight of the mimicking term.
        contrast_weight: weight of the contrast term.
        reduction: ``"sum"`` (the authors') or ``"mean"`` for the mimicking term.
        adapter: None builds a ChannelAdapter only when the channels differ, True always,
            False never.
        batchnorm: give the adapter a BatchNorm.

    Shape:
        ``forward(student, teacher, masks)``: ``student["feats"] (B, C_s, h, w)`` adapted,
        masked and rebuilt as ``(B, C_t, h, w)``; ``teacher["feats"] (B, C_t, h', w')``,
        detached and resized to ``h, w``; masks are not read. Returns a scalar.

    Reference:
        Fan, Li, Liu, Song, Yao, NeurIPS 2023, arXiv 2312.04168; code OSVAI/Af-DCD.
    """

    def __init__(self, *, student_channels: int, teacher_channels: int,
                 temperature: float = TEMPERATURE, groups: int = GROUPS,
                 patch_size: int = PATCH_SIZE, pool: int = POOL, mask: str = "random",
                 mask_ratio: float = MASK_RATIO, generator: str = "plain",
                 mimic_weight: float = MIMIC_WEIGHT, contrast_weight: float = CONTRAST_WEIGHT,
                 reduction: str = "sum", adapter: bool | None = None, batchnorm: bool = False):
        super().__init__()
        if groups < 1 or teacher_channels % groups:
            raise ValueError(f"groups={groups} must divide teacher_channels={teacher_channels}: "
                             f"choose a divisor of {teacher_channels} (the authors use 16)")
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}: choose one of {', '.join(MASKS)}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio={mask_ratio!r} must be in [0, 1) (the share of "
                             "positions hidden; the authors use 0.75)")
        if generator not in GENERATORS:
            raise ValueError(f"unknown generator {generator!r}: choose one of "
                             f"{', '.join(GENERATORS)}")
        if reduction not in MIMIC_REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}: choose one of "
                             f"{', '.join(MIMIC_REDUCTIONS)}")
        if patch_size < 1 or pool < 0:
            raise ValueError(f"patch_size={patch_size} must be >= 1 and pool={pool} >= 0")
        self.temperature, self.groups = temperature, groups
        self.patch_size, self.pool = patch_size, pool
        self.mask, self.mask_ratio = mask, mask_ratio
        self.mimic_weight, self.contrast_weight = mimic_weight, contrast_weight
        self.reduction = reduction
        self.adapter = make_adapter(student_channels, teacher_channels, adapter=adapter,
                                    batchnorm=batchnorm)
        self.generator = _generator(generator, teacher_channels)

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        s, t = matched_feats(student, teacher, self.adapter)
        rebuilt = self.generator(s * feature_keep_mask(s, mask=self.mask,
                                                       mask_ratio=self.mask_ratio))
        return afdcd_loss(rebuilt, t, mimic_weight=self.mimic_weight,
                          contrast_weight=self.contrast_weight, reduction=self.reduction,
                          temperature=self.temperature, groups=self.groups,
                          patch_size=self.patch_size, pool=self.pool)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, groups={self.groups}, "
                f"patch_size={self.patch_size}, pool={self.pool}, mask={self.mask!r}, "
                f"mask_ratio={self.mask_ratio}, mimic_weight={self.mimic_weight}, "
                f"contrast_weight={self.contrast_weight}, reduction={self.reduction!r}")
