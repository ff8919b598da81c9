"""SegMetric against an independent computation, with ignored pixels."""
import numpy as np
import pytest
import torch

from kdnb.metrics import SegMetric


def reference_iou(preds, targets, k, ignore=255):
    """Per-class IoU by counting sets, one class at a time (no confusion matrix)."""
    preds, targets = preds.numpy().ravel(), targets.numpy().ravel()
    keep = targets != ignore
    preds, targets = preds[keep], targets[keep]
    ious = []
    for c in range(k):
        inter = np.sum((preds == c) & (targets == c))
        union = np.sum((preds == c) | (targets == c))
        ious.append(inter / union if union else np.nan)
    return np.array(ious), np.mean(preds == targets)


def test_matches_reference_on_random_data_with_ignore(gen):
    k = 6
    metric = SegMetric(k)
    all_p, all_t = [], []
    for _ in range(4):
        preds = torch.randint(0, k, (3, 17, 23), generator=gen)
        targets = torch.randint(0, k, (3, 17, 23), generator=gen)
        targets[torch.rand(targets.shape, generator=gen) < 0.2] = 255
        # bias predictions towards the truth so IoUs are not all alike
        agree = torch.rand(targets.shape, generator=gen) < 0.5
        preds = torch.where(agree & (targets != 255), targets, preds)
        metric.update(preds, targets)
        all_p.append(preds), all_t.append(targets)
    ref_iou, ref_acc = reference_iou(torch.cat(all_p), torch.cat(all_t), k)
    out = metric.compute()
    np.testing.assert_allclose(out["iou"], ref_iou, rtol=1e-12)
    assert out["miou"] == pytest.approx(np.nanmean(ref_iou), rel=1e-12)
    assert out["acc"] == pytest.approx(ref_acc, rel=1e-12)


def test_logits_are_argmaxed_and_absent_classes_do_not_count(gen):
    metric = SegMetric(4)
    targets = torch.zeros(2, 5, 5, dtype=torch.long)
    targets[:, :2] = 1
    logits = torch.zeros(2, 4, 5, 5)
    logits[:, 0] = 1.0
    logits[:, 1, :2] = 2.0
    metric.update(logits, targets)
    out = metric.compute()
    assert out["miou"] == 1.0 and out["acc"] == 1.0
    assert np.isnan(out["iou"][2]) and np.isnan(out["iou"][3])


def test_split_updates_equal_one_update(gen):
    preds = torch.randint(0, 5, (4, 9, 9), generator=gen)
    targets = torch.randint(0, 5, (4, 9, 9), generator=gen)
    one, two = SegMetric(5), SegMetric(5)
    one.update(preds, targets)
    two.update(preds[:2], targets[:2])
    two.update(preds[2:], targets[2:])
    assert torch.equal(one.confusion, two.confusion)
    two.all_reduce()  # no process group: a no-op
    assert torch.equal(one.confusion, two.confusion)


def test_bad_input_is_named():
    metric = SegMetric(3)
    with pytest.raises(ValueError, match="outside the 3 classes"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
