"""kdnb.losses: every loss against its definition, its paper's properties and a golden value.

All tensors are tiny (at most 2 x 10 x 16 x 16) so the file runs in seconds on a CPU.
"""
from __future__ import annotations

from conftest import load_fixture_script
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdnb.features import ChannelAdapter
from kdnb.losses import (METHODS, NORMS, ATLoss, CWDLoss, DISTLoss, FeatureMSELoss, IFVDLoss,
                         NFDLoss, PixelKDLoss, SKDLoss, at_loss, build_losses, cwd_loss,
                         dist_loss, feature_mse_loss, ifvd_loss, nfd_loss, normalize_features,
                         pixel_kd_loss, skd_pairwise_loss)

FIXTURES = Path(__file__).parent / "fixtures"
K = 5  # classes of the small inputs


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_masks(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    masks = torch.randint(0, K, (b, h, w), generator=torch.Generator().manual_seed(seed))
    masks[:, 0, :3] = 255
    return masks


def up2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-upsamples the last two axes by 2: the same content at twice the resolution."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


# Functional forms on matched tensors (B, K, h, w) with K = C: name -> loss(s, t, masks).
FUNCTIONAL = {
    "kd": lambda s, t, m: pixel_kd_loss(s, t, temperature=2.0),
    "kd_masked": lambda s, t, m: pixel_kd_loss(s, t, mask=m != 255),
    "cwd": lambda s, t, m: cwd_loss(s, t),
    "dist": lambda s, t, m: dist_loss(s, t),
    "mse": lambda s, t, m: feature_mse_loss(s, t),
    "at": lambda s, t, m: at_loss(s, t),
    **{f"nfd_{norm}": (lambda norm: lambda s, t, m: nfd_loss(s, t, norm=norm))(norm)
       for norm in NORMS},
    "nfd_paper": lambda s, t, m: nfd_loss(s, t, reduction="paper"),
    "skd": lambda s, t, m: skd_pairwise_loss(s, t),
    "ifvd": lambda s, t, m: ifvd_loss(s, t, m, num_classes=K),
}


def matched_inputs(seed: int = 0, size: int = 8):
    s = randn(2, K, size, size, seed=seed)
    t = 3 * randn(2, K, size, size, seed=seed + 1) + 0.5
    return s, t, random_masks(2, size, size, seed=seed)


# ---------------------------------------------------------------------------- all losses

@pytest.mark.parametrize("name", FUNCTIONAL)
def test_zero_when_student_equals_teacher(name):
    _, t, masks = matched_inputs()
    loss = FUNCTIONAL[name](t.clone(), t, masks)
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item()) < 1e-5  # DIST: 0 up to the 1e-8 of its correlation


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_non_negative(name):
    for seed in range(3):
        s, t, masks = matched_inputs(seed)
        assert FUNCTIONAL[name](s, t, masks).item() >= 0


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_forms_detach_the_teacher(name):
    s, t, masks = matched_inputs()
    s.requires_grad_()
    t.requires_grad_()
    FUNCTIONAL[name](s, t, masks).backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in FUNCTIONAL if n != "skd"])
def test_same_value_at_twice_the_resolution(name):
    """Mean-based losses, CWD (a KL between distributions), AT (a squared norm of unit
    vectors), DIST and IFVD (means of correlations / similarities) are all exactly
    unchanged when the same content is nearest-upsampled."""
    s, t, masks = matched_inputs()
    low = FUNCTIONAL[name](s, t, masks)
    high = FUNCTIONAL[name](up2(s), up2(t), up2(masks))
    torch.testing.assert_close(high, low, rtol=1e-5, atol=1e-7)


def test_skd_resolution():
    """SKD is a mean over pairs of pooled positions: unchanged by nearest-upsampling at
    pool=1; with pool=2 it sees a map twice coarser, so up2 + pool 2 == original + pool 1."""
    s, t, _ = matched_inputs()
    t = randn(2, 7, 8, 8, seed=5)  # channels may differ
    pool1 = skd_pairwise_loss(s, t, pool=1)
    torch.testing.assert_close(skd_pairwise_loss(up2(s), up2(t), pool=1), pool1, rtol=1e-5, atol=0)
    torch.testing.assert_close(skd_pairwise_loss(up2(s), up2(t), pool=2), pool1, rtol=1e-5, atol=0)
    torch.testing.assert_close(skd_pairwise_loss(up2(up2(s)), up2(up2(t)), pool=2),
                               skd_pairwise_loss(up2(s), up2(t), pool=1), rtol=1e-5, atol=0)


def student_teacher(seed: int = 0):
    """Dicts of the calling contract: C_s = 6, C_t = 10, the teacher at half the size."""
    student = {"logits": randn(2, K, 8, 8, seed=seed).requires_grad_(),
               "feats": randn(2, 6, 8, 8, seed=seed + 1).requires_grad_()}
    teacher = {"logits": (2 * randn(2, K, 4, 4, seed=seed + 2)).requires_grad_(),
               "feats": randn(2, 10, 4, 4, seed=seed + 3).relu().requires_grad_()}
    return student, teacher, random_masks(2, 32, 32, seed=seed)  # masks at image size


MODULES = {
    "kd": lambda: PixelKDLoss(temperature=2.0),
    "kd_ignore": lambda: PixelKDLoss(ignore_index=255),
    "cwd": lambda: CWDLoss(),
    "cwd_feats": lambda: CWDLoss(on="feats", student_channels=6, teacher_channels=10),
    "dist": lambda: DISTLoss(),
    "mse": lambda: FeatureMSELoss(student_channels=6, teacher_channels=10),
    "at": lambda: ATLoss(),
    "nfd": lambda: NFDLoss(student_channels=6, teacher_channels=10),
    "nfd_spatial_bn": lambda: NFDLoss(student_channels=6, teacher_channels=10, norm="spatial",
                                      batchnorm=True),
    "skd": lambda: SKDLoss(),
    "ifvd": lambda: IFVDLoss(num_classes=K),
}


@pytest.mark.parametrize("name", MODULES)
def test_gradients_reach_student_and_adapter_never_teacher(name):
    module = MODULES[name]()
    student, teacher, masks = student_teacher()
    loss = module(student, teacher, masks)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for value in teacher.values():
        assert value.grad is None  # detached inside the loss
    grads = [v.grad for v in student.values() if v.grad is not None]
    assert len(grads) == 1 and torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    adapter = getattr(module, "adapter", None)
    if name in ("cwd_feats", "mse", "nfd", "nfd_spatial_bn"):
        assert isinstance(adapter, ChannelAdapter)
    if adapter is not None:
        for p in adapter.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODULES)
def test_float32_under_autocast(name):
    """Inputs are upcast and matrix products run with autocast off; only an adapter (part
    of the student) runs in bfloat16, so only losses with one may move a little."""
    module = MODULES[name]()
    student, teacher, masks = student_teacher()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = module(student, teacher, masks)
    assert half.dtype == torch.float32
    full = module(student, teacher, masks)
    if getattr(module, "adapter", None) is None:
        torch.testing.assert_close(half, full)
    else:
        torch.testing.assert_close(half, full, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("name", MODULES)
def test_no_data_dependent_host_sync(name):
    """On the meta device any .item(), boolean indexing or branch on a tensor value fails,
    so a forward and backward that run there cannot synchronize with the host."""
    module = MODULES[name]().to("meta")
    student, teacher, masks = student_teacher()
    student = {k: v.detach().to("meta").requires_grad_() for k, v in student.items()}
    teacher = {k: v.detach().to("meta") for k, v in teacher.items()}
    loss = module(student, teacher, masks.to("meta"))
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32


def test_golden_values():
    make_golden = load_fixture_script("make_golden")
    expected = json.loads((FIXTURES / "golden_losses.json").read_text())
    got = make_golden.compute_golden()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-5, abs_tol=1e-7), (name, got[name], value)


# ------------------------------------------------------------------------------ response

def test_pixel_kd_matches_a_loop_over_pixels():
    s, t = randn(2, K, 3, 4, seed=1), randn(2, K, 3, 4, seed=2)
    for temperature in (1.0, 3.0):
        total, n = 0.0, 0
        for b, i, j in itertools.product(range(2), range(3), range(4)):
            p = torch.softmax(t[b, :, i, j] / temperature, 0)
            q = torch.softmax(s[b, :, i, j] / temperature, 0)
            total += (p * (p.log() - q.log())).sum()
            n += 1
        expected = temperature ** 2 * total / n
        torch.testing.assert_close(pixel_kd_loss(s, t, temperature=temperature), expected)
    # the pitfall: kl_div's "batchmean" divides by B only, h*w times too much
    batchmean = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    torch.testing.assert_close(pixel_kd_loss(s, t), batchmean / 12)


def test_pixel_kd_ignores_masked_pixels():
    s, t = randn(2, K, 4, 4, seed=1), randn(2, K, 4, 4, seed=2)
    mask = randn(2, 4, 4, seed=3) > 0
    loss = pixel_kd_loss(s, t, mask=mask)
    s2 = torch.where(mask[:, None], s, 100 * randn(2, K, 4, 4, seed=4))  # change masked pixels
    torch.testing.assert_close(pixel_kd_loss(s2, t, mask=mask), loss)
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    torch.testing.assert_close(loss, kl[mask].mean())
    none = pixel_kd_loss(s, t, mask=torch.zeros_like(mask))
    assert none.item() == 0.0  # no valid pixel: 0, not nan


def test_pixel_kd_module_ignore_index_resizes_masks():
    student, teacher, _ = student_teacher()
    masks = torch.full((2, 16, 16), 255)
    masks[:, :8] = 1  # top half labelled, at twice the logits' size
    loss = PixelKDLoss(ignore_index=255)(student, teacher, masks)
    t = F.interpolate(teacher["logits"].detach(), size=(8, 8), mode="bilinear", align_corners=False)
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :4] = True
    torch.testing.assert_close(loss, pixel_kd_loss(student["logits"], t, mask=valid))


def test_pixel_kd_temperature_squared_scaling():
    s = randn(2, K, 4, 4, seed=1, dtype=torch.float64)
    t = randn(2, K, 4, 4, seed=2, dtype=torch.float64)
    torch.testing.assert_close(pixel_kd_loss(s, t, temperature=3.0),
                               9 * pixel_kd_loss(s / 3, t / 3))
    # T^2 * KL has a finite limit: (1 / 2K) * ||d - mean(d)||^2 per pixel, d = z_s - z_t
    d = s - t
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * K)
    torch.testing.assert_close(pixel_kd_loss(s, t, temperature=1000.0), limit, rtol=1e-2, atol=0)


def test_cwd_matches_a_loop_over_channels():
    s, t = randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2)
    tau, total = 4.0, 0.0
    for b, c in itertools.product(range(2), range(3)):
        p = torch.softmax(t[b, c].flatten() / tau, 0)
        q = torch.softmax(s[b, c].flatten() / tau, 0)
        total += (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(cwd_loss(s, t, tau=tau), tau ** 2 * total / 6)
    torch.testing.assert_close(cwd_loss(s, t, tau=2.0), 4 * cwd_loss(s / 2, t / 2, tau=1.0))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.corrcoef(torch.stack([a, b]))[0, 1]


def test_dist_matches_pearson_over_pooled_pixels():
    s = randn(2, K, 3, 3, seed=1, dtype=torch.float64)
    t = randn(2, K, 3, 3, seed=2, dtype=torch.float64)
    temperature = 2.0
    p_s = torch.softmax(s / temperature, 1).permute(0, 2, 3, 1).reshape(-1, K)  # (B*h*w, K)
    p_t = torch.softmax(t / temperature, 1).permute(0, 2, 3, 1).reshape(-1, K)
    inter = 1 - torch.stack([pearson(p_s[i], p_t[i]) for i in range(len(p_s))]).mean()
    intra = 1 - torch.stack([pearson(p_s[:, k], p_t[:, k]) for k in range(K)]).mean()
    expected = temperature ** 2 * (2.0 * inter + 0.5 * intra)
    got = dist_loss(s, t, beta=2.0, gamma=0.5, temperature=temperature)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # the intra-class correlation runs over the batch's pixels together, not per image
    per_image = (dist_loss(s[:1], t[:1]) + dist_loss(s[1:], t[1:])) / 2
    assert not torch.allclose(dist_loss(s, t), per_image)


# ------------------------------------------------------------------------------- feature

def test_feature_mse_and_at_match_their_definitions():
    s, t = randn(2, 4, 3, 5, seed=1), randn(2, 4, 3, 5, seed=2)
    torch.testing.assert_close(feature_mse_loss(s, t), ((s - t) ** 2).mean())
    wide = randn(2, 9, 3, 5, seed=3)  # AT compares attention maps: channels may differ
    total = 0.0
    for b in range(2):
        a_s = (s[b] ** 2).mean(0).flatten()
        a_t = (wide[b] ** 2).mean(0).flatten()
        total += ((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum()
    torch.testing.assert_close(at_loss(s, wide), total / 2)


def structured_features() -> torch.Tensor:
    """Offsets per sample, per channel and per pixel, and a scale per channel, so that
    normalizing over one set of axes does not normalize over another by accident."""
    b, c, h, w = 3, 4, 5, 6
    scale = 1 + 2 * torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(2))
    x = randn(b, c, h, w, seed=1) * scale
    return (x + 3 * randn(b, 1, 1, 1, seed=3) + 3 * randn(1, c, 1, 1, seed=4)
            + 3 * randn(1, 1, h, w, seed=5))


# the axes each normalization is named for (docs/METHODS.md, section NFD), written out, not read from kdnb
AXES = {"channel": (2, 3), "spatial": (1,), "layer": (1, 2, 3), "batch": (0, 2, 3)}


def test_norm_choices():
    assert list(NORMS) == ["none", "channel", "spatial", "layer", "batch"]


@pytest.mark.parametrize("norm", AXES)
def test_normalize_features_standardizes_exactly_the_named_axes(norm):
    x = structured_features()
    y = normalize_features(x, norm)
    var, mean = torch.var_mean(y, dim=AXES[norm], correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-3)
    for other, axes in AXES.items():
        if set(AXES[norm]) <= set(axes):
            continue  # a superset of groups that are each standardized is standardized too
        var, mean = torch.var_mean(y, dim=axes, correction=0)
        assert mean.abs().max() > 0.1 or (var - 1).abs().max() > 0.1, (norm, other)
    assert normalize_features(x, "none") is x


def standardized_by_definition(x, axes, eps):
    """(x - mean) / sqrt(var + eps) over ``axes``, biased var: autograd through var_mean,
    the formula normalize_features computed before it used PyTorch's fused kernels."""
    var, mean = torch.var_mean(x, dim=axes, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


@pytest.mark.parametrize("norm", AXES)
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (1, 3, 1, 1), (3, 4, 1, 2)])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_normalize_features_and_nfd_equal_the_definition_in_float64(norm, shape, eps):
    """Values and gradients of the fused normalizations against the formula, in float64,
    with one value per group (h = w = 1) and without eps as edge cases."""
    x = structured_features().double()[:shape[0], :shape[1], :shape[2], :shape[3]].clone()
    if eps == 0.0 and math.prod(shape[i] for i in AXES[norm]) == 1:
        return  # a single value over the axes and no eps: 0 / 0
    upstream = randn(*shape, seed=7, dtype=torch.float64)
    got, expected = x.clone().requires_grad_(), x.clone().requires_grad_()
    (normalize_features(got, norm, eps) * upstream).sum().backward()
    (standardized_by_definition(expected, AXES[norm], eps) * upstream).sum().backward()
    torch.testing.assert_close(normalize_features(x, norm, eps),
                               standardized_by_definition(x, AXES[norm], eps),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-10)
    teacher = randn(*shape, seed=8, dtype=torch.float64) * 3 + 1
    got, expected = x.clone().requires_grad_(), x.clone().requires_grad_()
    nfd_loss(got, teacher, norm=norm, eps=eps).backward()
    reference = (standardized_by_definition(expected, AXES[norm], eps)
                 - standardized_by_definition(teacher, AXES[norm], eps)).pow(2).mean()
    reference.backward()
    torch.testing.assert_close(nfd_loss(x, teacher, norm=norm, eps=eps), reference.detach(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-10)


# per normalization, the teacher transformation it must not see: (a, b) shapes
AFFINE_SHAPES = {
    "channel": (1, 6, 1, 1),  # a, b per channel; per (sample, channel) would do too
    "batch": (1, 6, 1, 1),    # per channel, shared by the batch
    "layer": (2, 1, 1, 1),    # per sample
    "spatial": (2, 1, 8, 8),  # per pixel
}


@pytest.mark.parametrize("norm", AFFINE_SHAPES)
def test_nfd_does_not_imitate_magnitude(norm):
    s, t = randn(2, 6, 8, 8, seed=1), randn(2, 6, 8, 8, seed=2)
    shape = AFFINE_SHAPES[norm]
    a = 0.2 + 5 * torch.rand(shape, generator=torch.Generator().manual_seed(3))
    b = 10 * randn(*shape, seed=4)
    torch.testing.assert_close(nfd_loss(s, a * t + b, norm=norm), nfd_loss(s, t, norm=norm),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nfd_loss(s, a * t + b, norm=norm, eps=0.0),
                               nfd_loss(s, t, norm=norm, eps=0.0), rtol=1e-5, atol=1e-6)
    # zero when the (adapted) student is such a map of the teacher
    assert nfd_loss(a * t + b, t, norm=norm).item() < 1e-6
    # while the unnormalized MSE follows the teacher's magnitude
    assert feature_mse_loss(s, a * t + b) > 2 * feature_mse_loss(s, t)


def test_nfd_paper_scale_is_channels_times_mean():
    s, t = randn(2, 6, 4, 8, seed=1), randn(2, 6, 4, 8, seed=2)
    diff = normalize_features(s) - normalize_features(t)
    paper = torch.stack([diff[b].norm() ** 2 / (4 * 8) for b in range(2)]).mean()
    torch.testing.assert_close(nfd_loss(s, t, reduction="paper"), paper)
    torch.testing.assert_close(nfd_loss(s, t, reduction="paper"), 6 * nfd_loss(s, t))


def test_nfd_module_adapts_and_resizes():
    student, teacher, _ = student_teacher()
    module = NFDLoss(student_channels=6, teacher_channels=10)
    t = F.interpolate(teacher["feats"].detach(), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(module(student, teacher, None),
                               nfd_loss(module.adapter(student["feats"]), t))
    assert NFDLoss(student_channels=6, teacher_channels=6).adapter is None
    assert isinstance(NFDLoss(student_channels=6, teacher_channels=6, adapter=True).adapter,
                      ChannelAdapter)


# ------------------------------------------------------------------------------ relation

def test_skd_matches_pairwise_cosines():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 7, 4, 4, seed=2)  # channels may differ
    total = 0.0
    for b in range(2):
        ps = F.max_pool2d(s[b:b + 1], 2)[0].flatten(1)  # (C, N = 4)
        pt = F.max_pool2d(t[b:b + 1], 2)[0].flatten(1)
        for i, j in itertools.product(range(4), range(4)):
            cs = F.cosine_similarity(ps[:, i], ps[:, j], dim=0)
            ct = F.cosine_similarity(pt[:, i], pt[:, j], dim=0)
            total += (cs - ct) ** 2
    torch.testing.assert_close(skd_pairwise_loss(s, t), total / (2 * 16))
    assert skd_pairwise_loss(randn(1, 3, 5, 5), randn(1, 3, 5, 5, seed=1)).isfinite()  # odd size


@pytest.mark.parametrize("pool", [1, 2])
def test_skd_value_and_gradient_equal_the_explicit_graphs_in_float64(pool):
    """SKD never forms S_s or the square separately: in float64 its value and the student's
    gradient equal autograd through the two (B, N, N) similarity graphs."""
    s = randn(2, 3, 5, 7, seed=1, dtype=torch.float64)  # odd sizes: ceil-mode pooling
    t = randn(2, 6, 5, 7, seed=2, dtype=torch.float64)

    def graph(f):
        if pool > 1:
            f = F.max_pool2d(f, pool, pool, ceil_mode=True)
        u = F.normalize(f.flatten(2), dim=1)
        return u.transpose(1, 2) @ u

    got, expected = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = skd_pairwise_loss(got, t, pool=pool)
    loss.backward()
    reference = (graph(expected) - graph(t)).pow(2).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-14)


def test_skd_in_float32_sums_its_graph_accurately():
    """2 x 1024^2 pairs: the float32 loss is within 1e-6 of its float64 value (a single
    float32 dot over all pairs was 3e-6 off at this size)."""
    s, t = randn(2, 8, 64, 64, seed=1), randn(2, 16, 64, 64, seed=2)
    torch.testing.assert_close(skd_pairwise_loss(s, t).double(),
                               skd_pairwise_loss(s.double(), t.double()), rtol=1e-6, atol=0)


def test_ifvd_matches_a_loop_and_skips_ignored_positions():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 7, 4, 4, seed=2)
    masks = random_masks(2, 4, 4, seed=3)

    def centroid_sims(f):
        sims = torch.zeros(2, 4, 4)
        for b in range(2):
            for c in masks[b].unique().tolist():
                if c == 255:
                    continue
                where = masks[b] == c
                centre = f[b][:, where].mean(1)
                sims[b][where] = F.cosine_similarity(f[b][:, where], centre[:, None], dim=0)
        return sims

    valid = masks != 255
    expected = ((centroid_sims(s) - centroid_sims(t))[valid] ** 2).mean()
    loss = ifvd_loss(s, t, masks, num_classes=K)
    torch.testing.assert_close(loss, expected)
    s2 = torch.where(valid[:, None], s, 50 * randn(2, 3, 4, 4, seed=9))  # change ignored positions
    torch.testing.assert_close(ifvd_loss(s2, t, masks, num_classes=K), loss)
    # masks at image size are nearest-resized to the features
    torch.testing.assert_close(ifvd_loss(s, t, up2(masks), num_classes=K), loss)
    assert ifvd_loss(s, t, torch.full_like(masks, 255), num_classes=K).item() == 0.0


def test_ifvd_value_and_gradient_equal_cosine_similarity_in_float64():
    """IFVD's similarities come from one product against all centroids: in float64 the value
    and the student's gradient equal F.cosine_similarity to each gathered centroid, with a
    zero feature vector among the positions (gradient finite, as with F.cosine_similarity)."""
    s = randn(2, 3, 5, 6, seed=1, dtype=torch.float64)
    s[0, :, 2, 3] = 0  # a dead position
    t = randn(2, 7, 5, 6, seed=2, dtype=torch.float64)
    masks = random_masks(2, 5, 6, seed=3)

    def reference(f):
        m = masks.flatten(1)
        labels = torch.where(m == 255, K, m)
        feats = f.flatten(2).transpose(1, 2)  # (B, N, C)
        onehot = F.one_hot(labels, K + 1).to(f.dtype)  # (B, N, K+1)
        centroids = onehot.transpose(1, 2) @ feats / onehot.sum(1).clamp_min(1)[..., None]
        centre = centroids.gather(1, labels[..., None].expand(-1, -1, f.shape[1]))
        return F.cosine_similarity(feats, centre, dim=2, eps=1e-8)  # (B, N)

    valid = (masks != 255).flatten(1).to(torch.float64)
    got, expected = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = ifvd_loss(got, t, masks, num_classes=K)
    loss.backward()
    ref = ((reference(expected) - reference(t)).pow(2) * valid).sum() / valid.sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got.grad).all()
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- registry

def test_build_losses_from_a_plain_dict():
    spec = {"kd": 1.0, "nfd": {"weight": 2.0, "norm": "spatial"}, "cwd": 3.0, "ifvd": None,
            "skd": {"pool": 1}, "at": 0}
    losses = build_losses(spec, student_channels=6, teacher_channels=10, num_classes=K)
    assert list(losses) == list(spec)
    assert {n: m.loss_weight for n, m in losses.items()} == {
        "kd": 1.0, "nfd": 2.0, "cwd": 3.0, "ifvd": METHODS["ifvd"].weight, "skd": 10.0, "at": 0.0}
    assert isinstance(losses["nfd"], NFDLoss) and losses["nfd"].norm == "spatial"
    assert isinstance(losses["nfd"].adapter, ChannelAdapter)  # 6 != 10
    assert losses["ifvd"].num_classes == K and losses["skd"].pool == 1
    student, teacher, masks = student_teacher()
    total = sum(m.loss_weight * m(student, teacher, masks) for m in losses.values())
    total.backward()
    assert all(v.grad is not None for v in student.values())
    assert all(v.grad is None for v in teacher.values())


def test_every_registered_method_has_a_kind_and_a_weight():
    for name in ("kd", "cwd", "dist", "mse", "at", "nfd", "skd", "ifvd"):
        info = METHODS[name]
        assert info.kind in ("response", "feature", "relation") and info.weight >= 0
    weights = {n: METHODS[n].weight for n in ("kd", "cwd", "skd", "ifvd")}
    assert weights == {"kd": 1.0, "cwd": 3.0, "skd": 10.0, "ifvd": 20.0}  # docs/METHODS.md, "Conventions"
    names = ("kd", "cwd", "dist", "mse", "at", "nfd", "skd", "ifvd")
    losses = build_losses(dict.fromkeys(names), student_channels=6, teacher_channels=10,
                          num_classes=K)
    student, teacher, masks = student_teacher()
    for name, module in losses.items():
        assert module(student, teacher, masks).isfinite(), name


# ---------------------------------------------------------------------------- bad inputs

def test_channel_mismatch_says_to_adapt():
    s, t = torch.zeros(2, 64, 8, 8), torch.zeros(2, 128, 8, 8)
    message = ("student features (2, 64, 8, 8) and teacher features (2, 128, 8, 8) differ: "
               "adapt the student with ChannelAdapter(64, 128) first")
    for loss in (feature_mse_loss, nfd_loss):
        with pytest.raises(ValueError, match=re.escape(message)):
            loss(s, t)
    for module in (FeatureMSELoss, NFDLoss):
        with pytest.raises(ValueError, match="differ but adapter=False"):
            module(student_channels=64, teacher_channels=128, adapter=False)
    with pytest.raises(ValueError, match="needs student_channels"):
        CWDLoss(on="feats")


def test_mismatched_shapes_say_what_came():
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(2, 4, 4, 4\).*match_size"):
        nfd_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(3, 4, 8, 8\).*batch size"):
        skd_pairwise_loss(torch.zeros(2, 4, 8, 8), torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"student logits \(2, 5, 8, 8\) and teacher logits "
                                         r"\(2, 6, 8, 8\)"):
        pixel_kd_loss(torch.zeros(2, 5, 8, 8), torch.zeros(2, 6, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, K, h, w\).*\(2, 5, 8\)"):
        dist_loss(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of valid pixels \(2, 8, 8\), "
                                         r"got torch.int64 \(2, 8, 8\)"):
        pixel_kd_loss(torch.zeros(2, 5, 8, 8), torch.zeros(2, 5, 8, 8),
                      mask=torch.ones(2, 8, 8, dtype=torch.long))


def test_unknown_norm_and_reduction_list_the_choices():
    x = torch.zeros(1, 2, 3, 3)
    choices = "none, channel, spatial, layer, batch"
    with pytest.raises(ValueError, match=f"unknown norm 'group': choose one of {choices}"):
        normalize_features(x, "group")
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        nfd_loss(x, x, norm="group")
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        NFDLoss(student_channels=2, teacher_channels=2, norm="group")
    with pytest.raises(ValueError, match="unknown reduction 'sum': choose one of mean, paper"):
        nfd_loss(x, x, reduction="sum")


def test_masks_with_the_wrong_batch_size():
    s, t = torch.zeros(2, 4, 8, 8), torch.zeros(2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"masks must be \(B, H, W\) with B = 2 like the "
                                         r"features, got \(3, 32, 32\)"):
        ifvd_loss(s, t, torch.zeros(3, 32, 32, dtype=torch.long), num_classes=K)
    student, teacher, _ = student_teacher()
    with pytest.raises(ValueError, match=r"with B = 2, got \(3, 32, 32\)"):
        PixelKDLoss(ignore_index=255)(student, teacher, torch.zeros(3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="IFVDLoss needs the label masks"):
        IFVDLoss(num_classes=K)(student, teacher, None)


def test_build_losses_rejects_bad_specs():
    kw = dict(student_channels=6, teacher_channels=10, num_classes=K)
    with pytest.raises(ValueError, match="unknown distillation method 'nfdd': choose from "
                                         "kd, cwd, dist, mse, at, nfd, skd, ifvd"):
        build_losses({"nfdd": 1.0}, **kw)
    with pytest.raises(ValueError, match="nfd: unknown option 'normalization' for NFDLoss; "
                                         "accepted: weight, norm, eps, reduction"):
        build_losses({"nfd": {"normalization": "channel"}}, **kw)
    with pytest.raises(ValueError, match="at: unknown option 'pool' for ATLoss; accepted: weight$"):
        build_losses({"at": {"pool": 2}}, **kw)
    with pytest.raises(ValueError, match="'num_classes' comes from build_losses"):
        build_losses({"ifvd": {"num_classes": 3}}, **kw)
    for weight in (-1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="kd: the weight must be a finite number >= 0"):
            build_losses({"kd": weight}, **kw)


# --------------------------------------------------------------------------- NFD, unsquared

def test_nfd_frobenius_is_the_unsquared_per_sample_norm_over_hw():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 5, 7, dtype=torch.float64), torch.randn(3, 6, 5, 7, dtype=torch.float64)
    value = nfd_loss(s, t, reduction="frobenius")
    d = normalize_features(s) - normalize_features(t)
    per_sample = [d[b].norm() / 35 for b in range(3)]
    assert torch.allclose(value, torch.stack(per_sample).mean(), rtol=1e-12)
    # Invariant to a per-channel affine map of either side, zero (with a zero gradient,
    # not NaN) at the optimum.
    scale = torch.rand(1, 6, 1, 1, dtype=torch.float64) + 0.5
    assert torch.allclose(nfd_loss(s * scale + 2, t, reduction="frobenius"), value, rtol=1e-6)
    same = s.clone().requires_grad_()
    nfd_loss(same, s, reduction="frobenius").backward()
    assert torch.isfinite(same.grad).all() and same.grad.abs().max() < 1e-12


def test_nfd_frobenius_gradient_keeps_its_size_as_the_error_shrinks():
    """The unsquared norm's gradient is a unit direction times 1/(B h w) per sample; the
    squared loss's gradient shrinks with the error."""
    torch.manual_seed(1)
    t = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    direction = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    sizes = {}
    for reduction in ("frobenius", "paper"):
        for eps in (1e-1, 1e-3):
            s = (normalize_features(t, eps=0.0) + eps * direction).requires_grad_()
            nfd_loss(s, t, reduction=reduction, eps=0.0).backward()
            sizes[reduction, eps] = s.grad.norm().item()
    assert sizes["frobenius", 1e-1] == pytest.approx(sizes["frobenius", 1e-3], rel=2e-2)
    assert sizes["paper", 1e-3] < sizes["paper", 1e-1] / 50


def test_nfd_frobenius_against_fastsegformer():
    """Parity with the one public NFD reading: caixiongjiang/FastSegFormer,
    utils/distillation_loss.py at commit 9ce0466dcfe36f0af47f32bab22112148cc6ced4,
    transcribed below (``Normal``, ``D_L2``, and the ``/ (W * H)`` of
    ``NFD_loss_after_conv1x1.forward``). Their forward does not call ``Normal``; the
    transcription applies it to both sides as the paper intends. Their ``torch.std`` is
    the unbiased one and ``D_L2`` takes one norm over the whole batch, so for maps of
    ``n = h w`` positions: theirs = sqrt((n - 1) / n) * sqrt(sum_b v_b^2), with ``v_b`` kdnb's
    per-sample value at ``eps = 0`` (kdnb averages the per-sample norms instead)."""
    def normal(f):  # FastSegFormer's Normal
        mean = torch.mean(f, dim=(2, 3), keepdim=True)
        std = torch.std(f, dim=(2, 3), keepdim=True)
        return (f - mean) / std

    def d_l2(f1, f2):  # FastSegFormer's D_L2
        return torch.norm(f1 - f2)

    torch.manual_seed(2)
    f_t = torch.randn(3, 8, 6, 5, dtype=torch.float64)
    f_s = torch.randn(3, 8, 6, 5, dtype=torch.float64)  # already through the 1x1 adapter
    _, _, s_w, s_h = f_s.shape
    theirs = d_l2(normal(f_t), normal(f_s)) / (s_w * s_h)
    per_sample = torch.stack([nfd_loss(f_s[b:b + 1], f_t[b:b + 1], reduction="frobenius", eps=0.0)
                              for b in range(3)])
    n = s_w * s_h
    assert torch.allclose(theirs, math.sqrt((n - 1) / n) * per_sample.square().sum().sqrt(),
                          rtol=1e-10)
    assert torch.allclose(nfd_loss(f_s, f_t, reduction="frobenius", eps=0.0), per_sample.mean(),
                          rtol=1e-10)
