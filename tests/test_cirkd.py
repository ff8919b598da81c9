"""kdnb.losses.contrast (CIRKD): parity with the authors' code, exact resume, DDP memories.

The reference below transcribes github.com/winycg/CIRKD at commit
2d8ad0f703676da698abdf077cc5a67181d1c635: ``losses/cirkd_memory.py``
(``StudentSegContrast``), ``losses/cirkd_mini_batch.py``
(``CriterionMiniBatchCrossImagePair``) and the way ``train_cirkd.py`` combines them. It is
changed only where it cannot run here, each change marked "(test)": the device of the
inputs instead of ``.cuda()``, their dtype instead of float32 buffers (the checks run in
float64), no ``all_gather`` (one process), and each ``torch.randperm`` replaced by the
choice kdnb's module made (``CIRKDLoss.sample`` is wrapped to record it), so that both
sides draw the same pixels and memory slots.

All tensors are tiny; every test runs in well under a second except the two-process one.
"""
from __future__ import annotations

import io
import multiprocessing

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdnb.losses import (METHODS, CIRKDLoss, build_losses, cirkd_loss, cross_image_pair_loss,
                         memory_contrast_loss)
from kdnb.losses import contrast
from kdnb.losses.contrast import similarity_kl

F64 = torch.float64
K, C_S, C_T, H, W = 4, 5, 6, 6, 6


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def several_classes(seed: int, b: int = 2) -> torch.Tensor:
    masks = torch.randint(0, K, (b, H, W), generator=torch.Generator().manual_seed(seed))
    masks[:, 0, :4] = 255
    return masks


def one_class_per_image(seed: int, b: int = 2) -> torch.Tensor:
    classes = torch.randint(0, K, (b,), generator=torch.Generator().manual_seed(seed))
    return classes[:, None, None].expand(b, H, W).clone()


# ------------------------------------------------------------------ the authors' code

class Replay:
    """The random choices of one kdnb call, in the form the reference consumes them."""

    def __init__(self, draws, labels: torch.Tensor):
        self.draws, self.labels = draws, labels

    def enqueue_perm(self, bs: int, idxs: torch.Tensor) -> torch.Tensor:
        # kdnb enqueues a class's lowest-scored pixels, so replay randperm(num_pixel) as the
        # order of the class's pixels by score (positions within the class, as CIRKD's perm)
        scores = self.draws.pixel_scores[bs][idxs[:, 0]]
        return torch.argsort(scores, stable=True)


class StudentSegContrastRef(nn.Module):
    """``StudentSegContrast`` of losses/cirkd_memory.py, CIRKD commit 2d8ad0f."""

    def __init__(self, num_classes, pixel_memory_size, region_memory_size, region_contrast_size,
                 pixel_contrast_size, contrast_kd_temperature, contrast_temperature, s_channels,
                 t_channels, ignore_label, class_pixels=False):
        super().__init__()
        self.base_temperature = 0.1
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.dim = t_channels
        self.ignore_label = ignore_label
        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.SyncBatchNorm(t_channels),
            nn.ReLU(True),
            nn.Conv2d(t_channels, t_channels, 1, bias=False))
        self.num_classes = num_classes
        self.region_memory_size = region_memory_size
        self.pixel_memory_size = pixel_memory_size
        self.pixel_update_freq = 16
        self.pixel_contrast_size = pixel_contrast_size
        self.region_contrast_size = region_contrast_size
        self.register_buffer("teacher_segment_queue",
                             torch.randn(num_classes, region_memory_size, t_channels))
        self.teacher_segment_queue = F.normalize(self.teacher_segment_queue, p=2, dim=2)
        self.register_buffer("segment_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("teacher_pixel_queue",
                             torch.randn(num_classes, pixel_memory_size, t_channels))
        self.teacher_pixel_queue = F.normalize(self.teacher_pixel_queue, p=2, dim=2)
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        # (test) True: draw the enqueued pixels among the class's own pixels, as kdnb does
        self.class_pixels = class_pixels
        self.replay = None

    def _sample_negative(self, Q, index):
        class_num, cache_size, feat_size = Q.shape
        contrast_size = index.size(0)
        X_ = torch.zeros((class_num * contrast_size, feat_size), dtype=Q.dtype)  # (test) dtype
        y_ = torch.zeros((class_num * contrast_size, 1), dtype=Q.dtype)
        sample_ptr = 0
        for ii in range(class_num):
            this_q = Q[ii, index, :]
            X_[sample_ptr:sample_ptr + contrast_size, ...] = this_q
            y_[sample_ptr:sample_ptr + contrast_size, ...] = ii
            sample_ptr += contrast_size
        return X_, y_

    def _dequeue_and_enqueue(self, keys, labels):
        segment_queue = self.teacher_segment_queue
        pixel_queue = self.teacher_pixel_queue
        # (test) one process: concat_all_gather(keys) and (labels) are the identity
        batch_size, feat_dim, H, W = keys.size()
        for bs in range(batch_size):
            this_feat = keys[bs].contiguous().view(feat_dim, -1)
            this_label = labels[bs].contiguous().view(-1)
            this_label_ids = torch.unique(this_label)
            this_label_ids = [x for x in this_label_ids if x != self.ignore_label]
            for lb in this_label_ids:
                idxs = (this_label == lb).nonzero()
                # segment enqueue and dequeue
                feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
                ptr = int(self.segment_queue_ptr[lb])
                segment_queue[lb, ptr, :] = F.normalize(feat.view(-1), p=2, dim=0)
                self.segment_queue_ptr[lb] = (self.segment_queue_ptr[lb] + 1) % self.region_memory_size
                # pixel enqueue and dequeue
                num_pixel = idxs.shape[0]
                perm = self.replay.enqueue_perm(bs, idxs)  # (test) was torch.randperm(num_pixel)
                K_ = min(num_pixel, self.pixel_update_freq)
                if self.class_pixels:  # (test) kdnb's reading
                    feat = this_feat[:, idxs[perm[:K_], 0]]
                else:
                    feat = this_feat[:, perm[:K_]]
                feat = torch.transpose(feat, 0, 1)
                ptr = int(self.pixel_queue_ptr[lb])
                if ptr + K_ >= self.pixel_memory_size:
                    pixel_queue[lb, -K_:, :] = F.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = 0
                else:
                    pixel_queue[lb, ptr:ptr + K_, :] = F.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = (self.pixel_queue_ptr[lb] + K_) % self.pixel_memory_size

    def contrast_sim_kd(self, s_logits, t_logits):
        p_s = F.log_softmax(s_logits / self.contrast_kd_temperature, dim=1)
        p_t = F.softmax(t_logits / self.contrast_kd_temperature, dim=1)
        return F.kl_div(p_s, p_t, reduction='batchmean') * self.contrast_kd_temperature ** 2

    def forward(self, s_feats, t_feats, labels=None, predict=None):
        t_feats = F.normalize(t_feats, p=2, dim=1)
        s_feats = self.project_head(s_feats)
        s_feats = F.normalize(s_feats, p=2, dim=1)
        labels = labels.unsqueeze(1).float().clone()
        labels = F.interpolate(labels, (s_feats.shape[2], s_feats.shape[3]), mode='nearest')
        labels = labels.squeeze(1).long()
        ori_t_fea = t_feats
        ori_labels = labels
        batch_size = s_feats.shape[0]
        labels = labels.contiguous().view(-1)
        predict = predict.contiguous().view(batch_size, -1)
        idxs = (labels != self.ignore_label)
        s_feats = s_feats.permute(0, 2, 3, 1)
        s_feats = s_feats.contiguous().view(-1, s_feats.shape[-1])
        s_feats = s_feats[idxs, :]
        t_feats = t_feats.permute(0, 2, 3, 1)
        t_feats = t_feats.contiguous().view(-1, t_feats.shape[-1])
        t_feats = t_feats[idxs, :]
        self._dequeue_and_enqueue(ori_t_fea.detach().clone(), ori_labels.detach().clone())
        if idxs.sum() == 0:
            return 0. * (s_feats ** 2).mean(), 0. * (s_feats ** 2).mean()
        pixel_index = self.replay.draws.pixel_index  # (test) was randperm(size)[:contrast size]
        t_X_pixel_contrast, t_y_pixel_contrast = self._sample_negative(self.teacher_pixel_queue, pixel_index)
        t_pixel_logits = torch.div(torch.mm(t_feats, t_X_pixel_contrast.T), self.contrast_temperature)
        s_pixel_logits = torch.div(torch.mm(s_feats, t_X_pixel_contrast.T), self.contrast_temperature)
        region_index = self.replay.draws.region_index  # (test) idem
        t_X_region_contrast, _ = self._sample_negative(self.teacher_segment_queue, region_index)
        t_region_logits = torch.div(torch.mm(t_feats, t_X_region_contrast.T), self.contrast_temperature)
        s_region_logits = torch.div(torch.mm(s_feats, t_X_region_contrast.T), self.contrast_temperature)
        pixel_sim_dis = self.contrast_sim_kd(s_pixel_logits, t_pixel_logits.detach())
        region_sim_dis = self.contrast_sim_kd(s_region_logits, t_region_logits.detach())
        return pixel_sim_dis, region_sim_dis


def minibatch_ref(feat_S, feat_T, temperature):
    """``CriterionMiniBatchCrossImagePair.forward`` of losses/cirkd_mini_batch.py (2d8ad0f),
    ``pooling=False`` as train_cirkd.py builds it."""
    B, C, H, W = feat_S.size()
    feat_S = F.normalize(feat_S, p=2, dim=1)
    feat_T = F.normalize(feat_T, p=2, dim=1)

    def pair_wise_sim_map(fea_0, fea_1):
        C, H, W = fea_0.size()
        fea_0 = fea_0.reshape(C, -1).transpose(0, 1)
        fea_1 = fea_1.reshape(C, -1).transpose(0, 1)
        return torch.mm(fea_0, fea_1.transpose(0, 1))

    sim_dis = torch.tensor(0., dtype=feat_S.dtype)  # (test) was torch.tensor(0.).cuda()
    for i in range(B):
        for j in range(B):
            s_sim_map = pair_wise_sim_map(feat_S[i], feat_S[j])
            t_sim_map = pair_wise_sim_map(feat_T[i], feat_T[j])
            p_s = F.log_softmax(s_sim_map / temperature, dim=1)
            p_t = F.softmax(t_sim_map / temperature, dim=1)
            sim_dis = sim_dis + F.kl_div(p_s, p_t, reduction='batchmean')
    return sim_dis / (B * B)


# train_cirkd.py at 2d8ad0f: lambda-minibatch-pixel 1, lambda-memory-pixel 0.1, -region 0.1
LAMBDAS = (1.0, 0.1, 0.1)
SIZES = dict(pixel_memory_size=32, region_memory_size=3, pixel_contrast_size=10,
             region_contrast_size=4)


def paired_modules(class_pixels: bool):
    """kdnb's module and the reference with the same memories and projection weights."""
    ours = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, seed=3,
                     **SIZES).double()
    ref = StudentSegContrastRef(
        num_classes=K, pixel_memory_size=SIZES["pixel_memory_size"],
        region_memory_size=SIZES["region_memory_size"],
        # train_cirkd.py passes the per-class sizes: total // num_class + 1
        region_contrast_size=SIZES["region_contrast_size"] // K + 1,
        pixel_contrast_size=SIZES["pixel_contrast_size"] // K + 1,
        contrast_kd_temperature=1.0, contrast_temperature=0.1, s_channels=C_S, t_channels=C_T,
        ignore_label=255, class_pixels=class_pixels).double()
    ref.project_head.load_state_dict(ours.projector.state_dict())
    ref.teacher_pixel_queue.copy_(ours.pixel_queue)
    ref.teacher_segment_queue.copy_(ours.region_queue)
    drawn = []
    sample = ours.sample
    ours.sample = lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1]
    return ours, ref, drawn


def step_both(ours, ref, drawn, masks, seed):
    s = randn(2, C_S, H, W, seed=seed)
    t = randn(2, C_T, H, W, seed=seed + 1).relu()
    s_ours, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = ours({"feats": s_ours}, {"feats": t}, masks)
    ref.replay = Replay(drawn[-1], masks)
    pixel, region = ref(s_ref, t, masks, predict=torch.zeros_like(masks))
    ref_loss = LAMBDAS[0] * minibatch_ref(s_ref, t, 0.1) + LAMBDAS[1] * pixel + LAMBDAS[2] * region
    for p in (*ours.parameters(), *ref.parameters()):
        p.grad = None
    loss.backward()
    ref_loss.backward()
    return loss, ref_loss, s_ours.grad, s_ref.grad, (pixel, region)


def assert_same_step(ours, ref, drawn, masks, seed):
    loss, ref_loss, grad, ref_grad, (pixel, region) = step_both(ours, ref, drawn, masks, seed)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, **close)
    torch.testing.assert_close(ours.terms["pixel"], pixel.detach(), **close)
    torch.testing.assert_close(ours.terms["region"], region.detach(), **close)
    torch.testing.assert_close(grad, ref_grad, **close)
    for (name, p), q in zip(ours.projector.named_parameters(), ref.project_head.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **close, msg=name)
    for b, c in zip(ours.projector.buffers(), ref.project_head.buffers()):
        torch.testing.assert_close(b, c, **close)  # BatchNorm statistics
    torch.testing.assert_close(ours.pixel_queue, ref.teacher_pixel_queue, **close)
    torch.testing.assert_close(ours.region_queue, ref.teacher_segment_queue, **close)
    assert torch.equal(ours.pixel_ptr, ref.pixel_queue_ptr)
    assert torch.equal(ours.region_ptr, ref.segment_queue_ptr)


# ------------------------------------------------------------------------------ parity

def test_parity_with_cirkd_when_each_image_holds_one_class():
    """With one class per image (no ignored pixel) CIRKD's pixel draw is kdnb's: the whole
    transcription, unchanged, gives kdnb's loss, gradients and memories, step after step
    (the pointers wrap: 16 pixels per image into queues of 32, so a write ends exactly
    at the end, and regions into 3 slots)."""
    ours, ref, drawn = paired_modules(class_pixels=False)
    for step in range(4):
        assert_same_step(ours, ref, drawn, one_class_per_image(seed=step), seed=10 * step)
    assert ours.draws == 4 and ours.pixel_ptr.max() < 32


def test_parity_with_cirkd_drawing_pixels_within_their_class():
    """Several classes and ignored pixels: kdnb equals the transcription with the enqueued
    pixels drawn among the class's pixels (``idxs[perm[:K]]`` for CIRKD's ``perm[:K]``),
    the difference docs/METHODS.md documents; the faithful line fills the pixel queues
    with other positions, and only them."""
    ours, ref, drawn = paired_modules(class_pixels=True)
    for step in range(3):
        assert_same_step(ours, ref, drawn, several_classes(seed=step), seed=10 * step)
    # the faithful line, same draws: the region memories agree, the pixel memories do not
    ours2, faithful, drawn2 = paired_modules(class_pixels=False)
    step_both(ours2, faithful, drawn2, several_classes(seed=0), seed=0)
    assert torch.equal(ours2.region_ptr, faithful.segment_queue_ptr)
    torch.testing.assert_close(ours2.region_queue, faithful.teacher_segment_queue,
                               rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours2.pixel_queue, faithful.teacher_pixel_queue)


def test_no_labelled_pixel_gives_zero_memory_terms_and_writes_nothing():
    ours = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, **SIZES)
    s = randn(2, C_S, H, W, seed=0, dtype=torch.float32).requires_grad_()
    t = randn(2, C_T, H, W, seed=1, dtype=torch.float32)
    before = ours.pixel_queue.clone(), ours.region_queue.clone()
    ours({"feats": s}, {"feats": t}, torch.full((2, H, W), 255)).backward()
    assert ours.terms["pixel"].item() == 0.0 and ours.terms["region"].item() == 0.0
    assert torch.isfinite(s.grad).all()  # the in-batch term needs no labels
    assert torch.equal(ours.pixel_queue, before[0]) and torch.equal(ours.region_queue, before[1])
    assert ours.pixel_ptr.sum() == 0 and ours.region_ptr.sum() == 0


def test_functional_terms_are_zero_when_student_equals_teacher():
    t = randn(2, C_T, H, W, seed=1)
    assert cross_image_pair_loss(t.clone(), t).abs().item() < 1e-12
    keys = F.normalize(randn(7, C_T, seed=2), dim=1)
    rows = t.permute(0, 2, 3, 1).reshape(-1, C_T)
    assert memory_contrast_loss(rows.clone(), rows, keys).abs().item() < 1e-12
    s = randn(2, C_T, H, W, seed=3)
    terms = cirkd_loss(s, t, s, several_classes(0), keys, keys, num_classes=K)
    assert all(v.item() > 0 for v in terms)


def test_cross_image_pair_loss_is_resolution_invariant_and_pools():
    s, t = randn(2, C_S, 4, 4, seed=0), randn(2, C_T, 4, 4, seed=1)
    up = lambda x: x.repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    base = cross_image_pair_loss(s, t)
    torch.testing.assert_close(cross_image_pair_loss(up(s), up(t)), base, rtol=1e-10, atol=0)
    torch.testing.assert_close(cross_image_pair_loss(up(s), up(t), pool=2), base,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("block", [1 << 20, 7])  # one block; blocks of 1 row (7 // 8 keys)
def test_similarity_kl_equals_the_plain_expression_with_its_gradients(monkeypatch, block):
    """The fused blocks give the autograd expression's value and gradients (float64),
    rows of weight 0 left out even when they hold NaN."""
    monkeypatch.setattr(contrast, "_BLOCK_VALUES", block)
    s_rows, s_keys = randn(9, 4, seed=0).requires_grad_(), randn(8, 4, seed=1).requires_grad_()
    t_rows, t_keys = randn(9, 6, seed=2), randn(8, 6, seed=3)
    weights = randn(9, seed=4).abs()
    weights[[2, 5]] = 0.0
    poisoned = s_rows.detach().clone()
    poisoned[2] = float("nan")
    poisoned.requires_grad_()
    scale = 3.0

    def plain(rows):
        log_p_s = F.log_softmax(scale * rows @ s_keys.T, dim=1)
        log_p_t = F.log_softmax(scale * t_rows @ t_keys.T, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
        return (weights * kl)[weights != 0].sum()

    expected = plain(s_rows)
    want = torch.autograd.grad(expected, (s_rows, s_keys))
    fused = similarity_kl(poisoned, s_keys, t_rows, t_keys, scale=scale, weights=weights)
    got = torch.autograd.grad(2.0 * fused, (poisoned, s_keys))  # the outer gradient scales
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0][weights != 0], 2.0 * want[0][weights != 0], rtol=1e-10,
                               atol=1e-14)
    assert torch.equal(got[0][weights == 0], torch.zeros(2, 4, dtype=F64))
    torch.testing.assert_close(got[1], 2.0 * want[1], rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the loss alone, no gradient pass
        torch.testing.assert_close(similarity_kl(s_rows, s_keys, t_rows, t_keys, scale=scale,
                                                 weights=weights), expected)


def test_the_run_seed_seeds_cirkd_unless_its_options_set_one():
    def built(spec, seed):
        return build_losses(spec, student_channels=C_S, teacher_channels=C_T, num_classes=K,
                            seed=seed)["cirkd"]

    small = {"pixel_memory_size": 64, "region_memory_size": 8}
    assert built({"cirkd": small}, 7).seed == 7
    assert built({"cirkd": {**small, "seed": 3}}, 7).seed == 3
    assert not torch.equal(built({"cirkd": small}, 1).pixel_queue,
                           built({"cirkd": small}, 2).pixel_queue)
    assert build_losses({"cirkd": small}, student_channels=C_S, teacher_channels=C_T,
                        num_classes=K)["cirkd"].seed == 0  # no run seed: the default


# ----------------------------------------------------------------------- resume, contract

def batch(seed: int, dtype=torch.float32):
    s = randn(2, C_S, H, W, seed=seed, dtype=dtype).requires_grad_()
    t = randn(2, C_T, 3, 3, seed=seed + 1, dtype=dtype).relu()  # the teacher at half size
    return {"feats": s}, {"feats": t}, several_classes(seed)


def test_state_dict_resumes_memories_and_draws_exactly():
    def make():
        return CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, **SIZES)

    straight = make()
    for step in range(2):
        straight(*batch(step))
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    resumed = make()
    assert not torch.equal(resumed.pixel_queue, straight.pixel_queue)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.draws == straight.draws == 2
    for step in range(2, 5):
        a, b = straight(*batch(step)), resumed(*batch(step))
        assert torch.equal(a, b), step
        for name, x in straight.state_dict().items():
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, resumed.state_dict()[name]), name


def test_the_saved_state_holds_the_seed_and_refuses_another():
    def make(seed):
        return CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, seed=seed,
                         **SIZES)

    trained = make(3)
    trained(*batch(0))
    state = trained.state_dict()
    resumed = make(3)
    resumed.load_state_dict(state)
    assert resumed.draws == 1 and resumed.seed == 3
    with pytest.raises(ValueError, match="come from seed 3, this loss has seed 4"):
        make(4).load_state_dict(state)
    old = {k: (torch.tensor(1) if k.endswith("_extra_state") else v) for k, v in state.items()}
    older = make(3)  # a state saved before the seed was: the draw count alone
    older.load_state_dict(old)
    assert older.draws == 1


def test_eval_mode_reads_the_memories_without_writing_them():
    loss = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, **SIZES).eval()
    before = {k: v.clone() for k, v in loss.state_dict().items() if isinstance(v, torch.Tensor)}
    first = loss(*batch(0))
    assert torch.equal(first, loss(*batch(0))) and loss.draws == 0
    assert all(torch.equal(v, loss.state_dict()[k]) for k, v in before.items())


def test_gradients_reach_student_and_projector_never_teacher():
    loss = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, **SIZES)
    student, teacher, masks = batch(0)
    teacher["feats"].requires_grad_()
    value = loss(student, teacher, masks)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert teacher["feats"].grad is None
    assert student["feats"].grad.abs().sum() > 0
    for name, p in loss.projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in loss.buffers())


def test_float32_under_autocast():
    loss = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T, **SIZES).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss(*batch(0))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, loss(*batch(0)), rtol=0.05, atol=1e-3)  # bf16 projector


def test_no_data_dependent_host_sync():
    """On the meta device any .item(), boolean indexing or branch on a tensor value fails:
    the enqueue, the draws and the loss run there, forward and backward."""
    loss = CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T,
                     **SIZES).to("meta")
    student, teacher, masks = batch(0)
    value = loss({"feats": student["feats"].detach().to("meta").requires_grad_()},
                 {"feats": teacher["feats"].to("meta")}, masks.to("meta"))
    value.backward()
    assert value.shape == () and value.dtype == torch.float32


def test_registered_and_built_by_build_losses():
    info = METHODS["cirkd"]
    assert info.loss is CIRKDLoss and info.kind == "relation" and info.weight == 1.0
    losses = build_losses({"kd": 1.0, "cirkd": {"weight": 2.0, "pixel_memory_size": 64,
                                                 "region_memory_size": 8, "pool": 2}},
                          student_channels=C_S, teacher_channels=C_T, num_classes=K)
    module = losses["cirkd"]
    assert isinstance(module, CIRKDLoss) and module.loss_weight == 2.0 and module.pool == 2
    assert module.pixel_queue.shape == (K, 64, C_T) and module.region_queue.shape == (K, 8, C_T)
    student, teacher, masks = batch(0)
    student["logits"], teacher["logits"] = randn(2, K, H, W, seed=5), randn(2, K, 3, 3, seed=6)
    total = sum(m.loss_weight * m(student, teacher, masks) for m in losses.values())
    total.backward()
    assert student["feats"].grad is not None
    with pytest.raises(ValueError, match="unknown option 'pixel_size'"):
        build_losses({"cirkd": {"pixel_size": 3}}, student_channels=C_S, teacher_channels=C_T,
                     num_classes=K)
    with pytest.raises(ValueError, match="enqueue_pixels=16 must be at most"):
        CIRKDLoss(num_classes=K, student_channels=C_S, teacher_channels=C_T,
                  pixel_memory_size=8)
    with pytest.raises(ValueError, match="needs the label masks"):
        module(student, teacher, None)


# ------------------------------------------------------------------------------- DDP

def _ddp_rank(rank: int, store: str) -> None:
    """One rank of the test below: three training calls on its own images, then every
    buffer compared with the other rank's."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    loss = CIRKDLoss(num_classes=3, student_channels=4, teacher_channels=5,
                     pixel_memory_size=24, region_memory_size=4, pixel_contrast_size=6,
                     region_contrast_size=3)
    start = loss.pixel_queue.clone()
    g = torch.Generator().manual_seed(rank)  # every rank its own images
    for _ in range(3):
        s = torch.randn(1, 4, 4, 4, generator=g, requires_grad=True)
        t = torch.randn(1, 5, 4, 4, generator=g)
        masks = torch.randint(0, 3, (1, 4, 4), generator=g)
        loss({"feats": s}, {"feats": t}, masks).backward()
    assert not torch.equal(loss.pixel_queue, start)
    # both ranks' images were written: 2 images x 3 calls per class present in each
    assert loss.region_ptr.sum() > 0
    for name, x in loss.state_dict().items():
        if isinstance(x, torch.Tensor) and "projector" not in name:
            copies = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(copies, x)
            assert torch.equal(copies[0], copies[1]), name
    dist.destroy_process_group()


def test_memories_stay_identical_across_two_ranks(tmp_path):
    """Two gloo ranks, different images: each writes both ranks' entries, so every buffer
    but the projector's BatchNorm statistics is the same on both. The ranks are forked,
    so they need not import torch and kdnb again."""
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_ddp_rank, args=(rank, str(tmp_path / "store")))
             for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
    for rank in ranks:
        if rank.is_alive():  # one rank waits in a collective the other never reached
            rank.terminate()
    assert [rank.exitcode for rank in ranks] == [0, 0]
