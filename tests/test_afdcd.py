"""kdnb.losses.dense_contrast: Af-DCD against the authors' code, its properties, its gradients.

The parity tests transcribe ``OmniContrastiveFeatureLoss`` and ``EnhancedProjector`` of
OSVAI/Af-DCD, ``losses/ocmgd.py`` at commit 5b086a7b4d92e5d14208d95347f05c014e5ca84a, and
the weighting of ``train_ocmgd.py`` (``lambda_fd * fd_loss + lambda_ctr * ctr_loss``).
Tensors are at most 2 x 32 x 32 x 32, so each test takes well under a second on a CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdnb.features import ChannelAdapter
from kdnb.losses import (METHODS, AfDCDLoss, afdcd_loss, build_losses, feature_keep_mask,
                         omni_contrast_loss)


def randn(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def up(x: torch.Tensor, r: int) -> torch.Tensor:
    """Nearest-upsamples the last two axes by ``r``."""
    return x.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1)


# ------------------------------------------------------- the authors' code, transcribed

class AuthorsEnhancedProjector(nn.Module):
    """``EnhancedProjector`` of OSVAI/Af-DCD ``losses/ocmgd.py`` @ 5b086a7."""

    def __init__(self, in_channels=2048, out_channels=2048):
        super().__init__()
        self.block_1 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        self.adpator_1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.adpator_2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x):
        x_1 = self.block_1(x)
        x_2 = self.block_2(x_1)
        x_1 = self.adpator_1(x_1)
        x_2 = self.adpator_2(x_2)
        return (x_1 + x_2) / 2.


class AuthorsOmniContrastiveFeatureLoss(nn.Module):
    """``OmniContrastiveFeatureLoss`` of OSVAI/Af-DCD ``losses/ocmgd.py`` @ 5b086a7, line by
    line (``self.generator = None`` and the unused ``device`` moves left out; the
    ``dataset`` switch kept, CamVid crops to 44x44 instead of pooling)."""

    def __init__(self, student_channels=512, teacher_channels=2048, tau_ocd=0.07, M_ocd=16,
                 pool_size=4, patch_size=(4, 4), rand_mask=True, mask_ratio=0.75,
                 enhance_projector=False, dataset='citys'):
        super().__init__()
        self.zeta_fd = mask_ratio
        self.tau_ocd = tau_ocd
        self.M_ocd = M_ocd
        self.pool_size = pool_size
        self.patch_size = patch_size
        self.dataset = dataset
        self.rand_mask = rand_mask
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1,
                                   padding=0)
        if enhance_projector:
            self.projetor = AuthorsEnhancedProjector(teacher_channels, teacher_channels)
        else:
            self.projetor = nn.Sequential(
                nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1))

    def forward(self, feat_S, feat_T):
        feat_S = self.align(feat_S)
        return self.get_dis_loss(feat_S, feat_T)

    def get_dis_loss(self, preds_S, preds_T):
        loss_mse = nn.MSELoss(reduction='sum')
        BS, C, H, W = preds_T.shape
        if self.rand_mask:
            mat = torch.rand((BS, 1, H, W))
            mat = torch.where(mat > 1 - self.zeta_fd, 0, 1)
        else:
            mat = torch.ones((BS, 1, H, W))
            mat[:, :, H // 3:2 * H // 3, W // 3:2 * W // 3] = 0
        masked_fea = torch.mul(preds_S, mat)
        new_fea = self.projetor(masked_fea)
        dis_loss = loss_mse(new_fea, preds_T) / BS
        ctr_loss = self.get_omni_contrastive_loss(new_fea, preds_T) / BS
        return dis_loss, ctr_loss

    def get_omni_contrastive_loss(self, preds, targets):
        loss_ce = nn.CrossEntropyLoss(reduction='sum')
        if self.dataset == 'camvid':
            preds = preds[:, :, :44, :44]
            targets = targets[:, :, :44, :44]
        else:
            if self.pool_size != 0:
                preds = F.max_pool2d(preds, self.pool_size)
                targets = F.max_pool2d(targets, self.pool_size)
        BS, C, H, W = preds.shape
        N2 = self.patch_size[0] * self.patch_size[1]
        M = self.M_ocd
        preds = self._to_ctr_format(preds, patch_size=self.patch_size)
        targets = self._to_ctr_format(targets, patch_size=self.patch_size)
        similarity_matrix = - torch.cdist(preds, targets, p=1)
        mask = torch.eye(N2 * M, dtype=torch.bool)
        mask = mask.repeat(similarity_matrix.shape[0], 1, 1)
        mask_c = torch.cat([torch.arange(M) for i in range(N2)], dim=0)
        mask_c = (mask_c.unsqueeze(0) == mask_c.unsqueeze(1)).bool()
        mask_negative = ~ mask_c.repeat(similarity_matrix.shape[0], 1, 1)
        positives = similarity_matrix[mask].view(BS * H * W * M, -1)
        negatives = similarity_matrix[mask_negative].view(BS * H * W * M, -1)
        logits = torch.cat([positives, negatives], dim=1)
        labels = torch.zeros((logits.shape[0]), dtype=torch.long)
        logits = logits / self.tau_ocd
        ctr_loss = loss_ce(logits, labels)
        ctr_loss /= (H * W)
        return ctr_loss

    def _to_ctr_format(self, x, patch_size=(4, 4)):
        M = self.M_ocd
        BS, C, H, W = x.shape
        H_p, W_p = patch_size
        num_p = (H * W) // (H_p * W_p)
        N2 = H_p * W_p
        x = x.contiguous().view(BS, C, H // H_p, H_p, W // W_p, W_p).permute(0, 2, 4, 1, 3, 5)
        x = torch.stack(x.split(C // M, dim=3), dim=3)
        x = x.contiguous().view(BS, num_p, M, C // M, N2)
        x = x.permute(0, 1, 4, 2, 3).contiguous().view(-1, N2 * M, C // M)
        return x


def copy_authors_weights(theirs: AuthorsOmniContrastiveFeatureLoss, ours: AfDCDLoss) -> None:
    """Loads the authors' align and projector into kdnb's adapter and generator."""
    with torch.no_grad():
        ours.adapter.conv.weight.copy_(theirs.align.weight)
        ours.adapter.conv.bias.copy_(theirs.align.bias)
        if isinstance(theirs.projetor, AuthorsEnhancedProjector):
            pairs = [(ours.generator.block1[0], theirs.projetor.block_1[0]),
                     (ours.generator.block2[0], theirs.projetor.block_2[0]),
                     (ours.generator.head1, theirs.projetor.adpator_1),
                     (ours.generator.head2, theirs.projetor.adpator_2)]
        else:
            pairs = [(ours.generator[0], theirs.projetor[0]),
                     (ours.generator[2], theirs.projetor[2])]
        for mine, their in pairs:
            mine.weight.copy_(their.weight)
            mine.bias.copy_(their.bias)


# (authors' constructor options, kdnb's options): the defaults, and each switch changed
CONFIGS = {
    "defaults": ({}, {}),
    "center_mask_enhanced": ({"rand_mask": False, "enhance_projector": True},
                             {"mask": "center", "generator": "enhanced"}),
    "no_pool_small_patches": ({"pool_size": 0, "patch_size": (2, 2), "M_ocd": 4, "tau_ocd": 0.5,
                               "mask_ratio": 0.5},
                              {"pool": 0, "patch_size": 2, "groups": 4, "temperature": 0.5,
                               "mask_ratio": 0.5}),
}
LAMBDA_FD, LAMBDA_CTR = 2e-6, 5e-3  # train_scripts/cityscape/*.sh at 5b086a7


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_the_authors_value_and_gradients(name):
    """Same weights, same random mask (one seed before each side's forward): equal loss,
    equal gradients for the student's map and for every weight, in float64, to 1e-10."""
    theirs_options, our_options = CONFIGS[name]
    c_s, c_t, size = 6, 32, 32
    torch.manual_seed(0)
    theirs = AuthorsOmniContrastiveFeatureLoss(c_s, c_t, **theirs_options).double()
    ours = AfDCDLoss(student_channels=c_s, teacher_channels=c_t, mimic_weight=LAMBDA_FD,
                     contrast_weight=LAMBDA_CTR, **our_options).double()
    copy_authors_weights(theirs, ours)
    s_theirs = randn(2, c_s, size, size, seed=1).requires_grad_()
    s_ours = s_theirs.detach().clone().requires_grad_()
    t = randn(2, c_t, size, size, seed=2)

    torch.manual_seed(7)
    fd, ctr = theirs(s_theirs, t)
    loss_theirs = LAMBDA_FD * fd + LAMBDA_CTR * ctr
    torch.manual_seed(7)
    loss_ours = ours({"feats": s_ours}, {"feats": t})

    assert loss_ours.dtype == torch.float64
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-10, atol=0)
    loss_theirs.backward()
    loss_ours.backward()
    torch.testing.assert_close(s_ours.grad, s_theirs.grad, rtol=1e-10, atol=1e-14)
    their_params = [theirs.align.weight, theirs.align.bias,
                    *(p for p in theirs.projetor.parameters())]
    our_params = [ours.adapter.conv.weight, ours.adapter.conv.bias,
                  *(p for p in ours.generator.parameters())]
    assert len(our_params) == len(list(ours.parameters()))  # nothing left out of the check
    for mine, their in zip(our_params, their_params):
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-10, atol=1e-14)


def test_parity_of_the_two_terms_and_the_mean_reduction():
    """Each term apart: weight 1 on one term gives the authors' fd_loss or ctr_loss; the
    ``"mean"`` mimicking term is their fd_loss / (C_t h w)."""
    c_s, c_t, size = 6, 32, 16
    torch.manual_seed(0)
    theirs = AuthorsOmniContrastiveFeatureLoss(c_s, c_t).double()
    s, t = randn(2, c_s, size, size, seed=3), randn(2, c_t, size, size, seed=4)
    values = {}
    for key, options in {"fd": {"mimic_weight": 1.0, "contrast_weight": 0.0},
                         "ctr": {"mimic_weight": 0.0, "contrast_weight": 1.0},
                         "mean": {"mimic_weight": 1.0, "contrast_weight": 0.0,
                                  "reduction": "mean"}}.items():
        ours = AfDCDLoss(student_channels=c_s, teacher_channels=c_t, **options).double()
        copy_authors_weights(theirs, ours)
        torch.manual_seed(11)
        values[key] = ours({"feats": s}, {"feats": t})
    torch.manual_seed(11)
    fd, ctr = theirs(s, t)
    torch.testing.assert_close(values["fd"], fd, rtol=1e-10, atol=0)
    torch.testing.assert_close(values["ctr"], ctr, rtol=1e-10, atol=0)
    torch.testing.assert_close(values["mean"], fd / (c_t * size * size), rtol=1e-10, atol=0)


def test_contrast_crops_to_whole_patches_as_the_authors_camvid_crop():
    """kdnb crops the pooled map to whole patches at the bottom and right; with pool 0 on
    a 46x45 map that is the top-left 44x44 the authors' CamVid branch takes."""
    theirs = AuthorsOmniContrastiveFeatureLoss(8, 16, M_ocd=4, dataset="camvid").double()
    s, t = randn(1, 16, 46, 45, seed=5), randn(1, 16, 46, 45, seed=6)
    expected = theirs.get_omni_contrastive_loss(s, t)  # / BS with BS = 1
    got = omni_contrast_loss(s, t, groups=4, pool=0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- properties

def test_contrast_is_a_sum_over_groups_of_a_cross_entropy_written_out():
    """One patch, written out token by token: ``l(p, m) = -log softmax`` over the positive
    and the other groups' teacher tokens, summed and divided by the positions."""
    groups, patch = 2, 2
    s, t = randn(1, 4, patch, patch, seed=7), randn(1, 4, patch, patch, seed=8)
    total = 0.0
    for p in range(patch * patch):
        for m in range(groups):
            def token(f, q, k):
                return f[0, 2 * k:2 * k + 2].flatten(1)[:, q]
            anchor = token(s, p, m)
            pos = -(anchor - token(t, p, m)).abs().sum() / 0.07
            negs = [-(anchor - token(t, q, k)).abs().sum() / 0.07
                    for q in range(patch * patch) for k in range(groups) if k != m]
            total = total - pos + torch.logsumexp(torch.stack([pos, *negs]), 0)
    got = omni_contrast_loss(s, t, groups=groups, patch_size=patch, pool=1)
    torch.testing.assert_close(got, total / (patch * patch), rtol=1e-12, atol=0)


def test_contrast_lower_bound_and_its_value_at_the_optimum():
    """>= 0 always; at s = t the positives are at distance 0, so each token's term is
    ``log(1 + sum_neg exp(-d / T))``: between 0 and ``log(1 + #negatives)``, falling as
    the negatives move apart (here: as the map is scaled up)."""
    t = randn(2, 32, 16, 16, seed=9)
    for seed in range(3):
        assert omni_contrast_loss(randn(2, 32, 16, 16, seed=seed), t).item() >= 0
    negatives = 16 * 15  # positions of a 4x4 patch x the 15 other groups
    ceiling = 16 * torch.log(torch.tensor(1.0 + negatives, dtype=torch.float64))  # 16 groups
    at_optimum = torch.stack([omni_contrast_loss(k * t, k * t) for k in (0.01, 0.1, 1.0, 10.0)])
    assert (at_optimum > 0).all() and (at_optimum < ceiling).all()
    assert (at_optimum.diff() < 0).all() and at_optimum[-1] < at_optimum[0] / 100
    # every token equal: all logits 0, each token's term is exactly log(1 + #negatives)
    flat = torch.ones(1, 32, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(omni_contrast_loss(flat, flat, pool=1), ceiling, rtol=1e-12, atol=0)
    assert afdcd_loss(t, t, contrast_weight=0.0).item() == 0.0  # the mimicking term alone


def test_contrast_is_invariant_to_permuting_groups_patches_and_positions_in_a_patch():
    """Relabelling whole channel groups, channels inside a group, whole patches, or the
    positions inside every patch (the same way on both sides) changes nothing; moving one
    channel into another group does."""
    s, t = randn(2, 32, 8, 8, seed=10), randn(2, 32, 8, 8, seed=11)
    base = omni_contrast_loss(s, t, pool=1)

    def same(f):
        return torch.testing.assert_close(omni_contrast_loss(f(s), f(t), pool=1), base,
                                          rtol=1e-10, atol=0)

    groups = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    same(lambda f: f.reshape(2, 16, 2, 8, 8)[:, groups].reshape(2, 32, 8, 8))
    same(lambda f: f.reshape(2, 16, 2, 8, 8).flip(2).reshape(2, 32, 8, 8))
    same(lambda f: f.roll(4, dims=-1).roll(-4, dims=-2))           # whole 4x4 patches
    same(lambda f: f.reshape(2, 32, 2, 4, 2, 4).flip(3).flip(5).reshape(2, 32, 8, 8))
    swapped = torch.arange(32)
    swapped[[0, 2]] = swapped[[2, 0]]  # channel 0 (group 0) <-> channel 2 (group 1)
    moved = omni_contrast_loss(s[:, swapped], t[:, swapped], pool=1)
    assert not torch.isclose(moved, base, rtol=1e-6)


def test_resolution_behaviour():
    """Nearest-upsampling by the pooling window is undone by the max-pool, so the contrast
    is unchanged; the ``"sum"`` mimicking term grows with the area, ``"mean"`` does not."""
    s, t = randn(2, 32, 8, 8, seed=12), randn(2, 32, 8, 8, seed=13)
    torch.testing.assert_close(omni_contrast_loss(up(s, 4), up(t, 4), pool=4),
                               omni_contrast_loss(s, t, pool=1), rtol=1e-12, atol=0)
    mimic = {r: {red: afdcd_loss(up(s, r), up(t, r), mimic_weight=1.0, contrast_weight=0.0,
                                 reduction=red, pool=1) for red in ("sum", "mean")} for r in (1, 2)}
    torch.testing.assert_close(mimic[2]["sum"], 4 * mimic[1]["sum"], rtol=1e-12, atol=0)
    torch.testing.assert_close(mimic[2]["mean"], mimic[1]["mean"], rtol=1e-12, atol=0)


def test_keep_masks():
    """Random: hides about mask_ratio of the positions, the same ones in every channel, and
    the draw the authors' rule makes from the same seed; center: the middle third."""
    f = torch.zeros(4, 3, 32, 32)
    torch.manual_seed(3)
    keep = feature_keep_mask(f)
    torch.manual_seed(3)
    authors = torch.where(torch.rand((4, 1, 32, 32)) > 1 - 0.75, 0, 1)
    assert keep.shape == (4, 1, 32, 32) and torch.equal(keep, authors.float())
    assert abs(1 - keep.mean().item() - 0.75) < 0.03
    assert feature_keep_mask(f, mask_ratio=0.0).min() == 1
    center = feature_keep_mask(torch.zeros(1, 1, 9, 6), mask="center")[0, 0]
    expected = torch.ones(9, 6)
    expected[3:6, 2:4] = 0
    assert torch.equal(center, expected)


def test_bad_options_say_what_to_choose():
    with pytest.raises(ValueError, match="groups=5 must divide teacher_channels=32"):
        AfDCDLoss(student_channels=6, teacher_channels=32, groups=5)
    with pytest.raises(ValueError, match="groups=3 must divide the 32 channels"):
        omni_contrast_loss(randn(1, 32, 8, 8), randn(1, 32, 8, 8), groups=3)
    with pytest.raises(ValueError, match="smaller than one 4x4 patch: lower pool or patch_size"):
        omni_contrast_loss(randn(1, 32, 8, 8), randn(1, 32, 8, 8), pool=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        AfDCDLoss(student_channels=6, teacher_channels=32, mask_ratio=1.0)
    for option in ({"mask": "block"}, {"generator": "mlp"}, {"reduction": "none"}):
        with pytest.raises(ValueError, match="choose one of"):
            AfDCDLoss(student_channels=6, teacher_channels=32, **option)
    with pytest.raises(ValueError, match="adapt the student"):
        afdcd_loss(randn(1, 16, 16, 16), randn(1, 32, 16, 16))


# ------------------------------------------------------------------------------ gradients

def contract_inputs(c_s: int = 6, c_t: int = 32):
    """The calling contract: the teacher at half the student's 32x32."""
    student = {"logits": randn(2, 5, 32, 32, seed=20, dtype=torch.float32).requires_grad_(),
               "feats": randn(2, c_s, 32, 32, seed=21, dtype=torch.float32).requires_grad_()}
    teacher = {"logits": randn(2, 5, 16, 16, seed=22, dtype=torch.float32).requires_grad_(),
               "feats": randn(2, c_t, 16, 16, seed=23, dtype=torch.float32).relu().requires_grad_()}
    return student, teacher


@pytest.mark.parametrize("generator", ["plain", "enhanced"])
def test_gradients_reach_every_parameter_never_the_teacher(generator):
    module = AfDCDLoss(student_channels=6, teacher_channels=32, generator=generator)
    assert isinstance(module.adapter, ChannelAdapter)
    student, teacher = contract_inputs()
    torch.manual_seed(0)
    loss = module(student, teacher, None)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(v.grad is None for v in teacher.values())
    assert student["logits"].grad is None
    assert torch.isfinite(student["feats"].grad).all() and student["feats"].grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_equal_channels_need_no_adapter():
    module = AfDCDLoss(student_channels=32, teacher_channels=32)
    assert module.adapter is None
    student, teacher = contract_inputs(c_s=32)
    module(student, teacher).backward()
    assert student["feats"].grad.abs().sum() > 0


def test_float32_under_autocast_and_no_host_sync():
    """bf16 autocast: the adapter and the generator (student side) may run in bf16, the loss
    is float32. On the meta device any .item() or data-dependent indexing would fail."""
    module = AfDCDLoss(student_channels=6, teacher_channels=32)
    student, teacher = contract_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(student, teacher).dtype == torch.float32
    meta = AfDCDLoss(student_channels=6, teacher_channels=32).to("meta")
    s = {"feats": student["feats"].detach().to("meta").requires_grad_()}
    t = {"feats": teacher["feats"].detach().to("meta")}
    loss = meta(s, t)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32


# ----------------------------------------------------------------------------- registry

def test_build_losses_with_different_channels():
    assert METHODS["afdcd"].kind == "feature" and METHODS["afdcd"].weight == 1.0
    losses = build_losses({"afdcd": {"generator": "enhanced", "temperature": 0.1}, "kd": 1.0},
                          student_channels=6, teacher_channels=32, num_classes=5)
    module = losses["afdcd"]
    assert isinstance(module, AfDCDLoss) and module.loss_weight == 1.0
    assert module.temperature == 0.1 and isinstance(module.adapter, ChannelAdapter)
    assert (module.mimic_weight, module.contrast_weight) == (2e-6, 5e-3)
    student, teacher = contract_inputs()
    total = sum(m.loss_weight * m(student, teacher, None) for m in losses.values())
    total.backward()
    assert all(v.grad is not None for v in student.values())
    assert all(v.grad is None for v in teacher.values())
    with pytest.raises(ValueError, match="unknown option 'tau'"):
        build_losses({"afdcd": {"tau": 0.1}}, student_channels=6, teacher_channels=32,
                     num_classes=5)
