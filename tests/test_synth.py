"""SynthScenes: determinism, disjoint splits, class coverage, colour carries no label."""
import hashlib

import numpy as np
import pytest
import torch

from kdnb.data import SynthScenes, build_dataset


def test_sample_types_and_range():
    image, mask = SynthScenes("train", size=64, length=4)[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert mask.dtype == torch.int64 and mask.shape == (64, 64)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert int(mask.min()) >= 0 and int(mask.max()) < SynthScenes.num_classes


def test_deterministic_per_seed_split_index():
    a, b = SynthScenes("val", size=64, seed=3), SynthScenes("val", size=64, seed=3)
    for i in (0, 7, 123):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    c = SynthScenes("val", size=64, seed=4)
    assert not torch.equal(a[0][0], c[0][0])


def test_splits_never_share_samples():
    digests = {}
    for split in ("train", "val", "test"):
        ds = SynthScenes(split, size=48, length=150)
        digests[split] = {hashlib.sha1(ds[i][0].numpy().tobytes()).hexdigest() for i in range(len(ds))}
        assert len(digests[split]) == len(ds)  # no duplicates inside a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_every_class_occurs_and_background_dominates_less_than_90_percent():
    ds = SynthScenes("train", size=64, length=200)
    counts = np.zeros(ds.num_classes)
    for i in range(len(ds)):
        counts += np.bincount(ds[i][1].flatten().numpy(), minlength=ds.num_classes)
    assert (counts > 0).all(), counts
    assert counts[0] / counts.sum() < 0.9


def _object_colours(ds):
    colours = {k: [] for k in range(1, ds.num_classes)}
    for i in range(len(ds)):
        image, mask = ds[i]
        for k in mask.unique().tolist():
            if k > 0 and (mask == k).sum() > 20:
                colours[k].append(image[:, mask == k].mean(1))
    return {k: torch.stack(v) for k, v in colours.items()}


def test_colour_alone_does_not_identify_a_class():
    """Classes of one hue family have the same colour distribution: a nearest-centroid
    colour classifier, fitted and scored on the same objects, stays near chance."""
    colours = _object_colours(SynthScenes("train", size=64, length=300))
    for first in range(1, 9, 2):
        a, b = colours[first], colours[first + 1]
        ca, cb = a.mean(0), b.mean(0)
        correct = ((a - ca).norm(dim=1) < (a - cb).norm(dim=1)).sum() + \
                  ((b - cb).norm(dim=1) < (b - ca).norm(dim=1)).sum()
        accuracy = float(correct) / (len(a) + len(b))
        assert accuracy < 0.7, (first, accuracy)


def test_hue_jitter_half_removes_the_colour_cue():
    colours = _object_colours(SynthScenes("train", size=64, length=200, hue_jitter=0.5))
    for k, c in colours.items():
        assert (c.std(0) > 0.12).all(), (k, c.std(0))


def test_build_dataset_synth_and_lengths():
    ds = build_dataset("synth", split="test", size=64, length=10)
    assert len(ds) == 10 and ds[9][0].shape == (3, 64, 64)
    with pytest.raises(IndexError):
        ds[10]
    assert len(SynthScenes("train")) == 4000


@pytest.mark.parametrize("kwargs, words", [
    ({"split": "training"}, "unknown split"),
    ({"size": 16}, "too small"),
    ({"scale": (0.4, 0.2)}, "scale"),
    ({"label_noise": 0.5}, "label_noise"),
    ({"label_noise": -0.1}, "label_noise"),
    ({"unlabelled": 1.0}, "unlabelled"),
    ({"length": 0}, "at least one sample"),
    ({"unlabelled": -0.2}, "unlabelled"),
])
def test_bad_arguments(kwargs, words):
    split = kwargs.pop("split", "train")
    with pytest.raises(ValueError, match=words):
        SynthScenes(split, **kwargs)


def test_label_noise_swaps_pair_classes_in_train_masks_only():
    """Annotation noise relabels whole objects as the other class of their hue pair, at
    the given rate, in the train split only; the images never change."""
    clean = SynthScenes("train", size=64, length=120)
    noisy = SynthScenes("train", size=64, length=120, label_noise=0.3)
    swapped = objects = 0
    for i in range(len(clean)):
        (image_c, mask_c), (image_n, mask_n) = clean[i], noisy[i]
        assert torch.equal(image_c, image_n)
        changed = mask_c != mask_n
        # Only object pixels change, and only to the partner class (1<->2, 3<->4, ...).
        assert not (changed & (mask_c == 0)).any()
        partner = torch.where(mask_c % 2 == 1, mask_c + 1, mask_c - 1)
        assert torch.equal(mask_n[changed], partner[changed])
        for k in range(1, clean.num_classes):
            if (mask_c == k).any():  # visible objects of class k in this image
                objects += 1
                swapped += bool(changed[mask_c == k].any())
    assert objects > 200
    assert 0.2 < swapped / objects < 0.4  # about 0.3 (an object's visible part counts once)
    for split in ("val", "test"):  # the ground truth models are scored against stays exact
        a, b = SynthScenes(split, size=64, length=20), SynthScenes(split, size=64, length=20,
                                                                     label_noise=0.3)
        assert all(torch.equal(a[i][1], b[i][1]) for i in range(20))


def test_unlabelled_objects_are_ignored_in_train_masks_only():
    """Partial annotation marks whole objects 255 at the given rate, in the train split
    only; every other pixel keeps its label and the images never change."""
    full = SynthScenes("train", size=64, length=120)
    partial = SynthScenes("train", size=64, length=120, unlabelled=0.5)
    ignored = objects = 0
    for i in range(len(full)):
        (image_f, mask_f), (image_p, mask_p) = full[i], partial[i]
        assert torch.equal(image_f, image_p)
        changed = mask_f != mask_p
        assert (mask_p[changed] == 255).all()  # a skipped object's pixels, nothing else
        for k in range(1, full.num_classes):
            if (mask_f == k).any():
                objects += 1
                ignored += bool(changed[mask_f == k].any())
    assert objects > 200
    assert 0.4 < ignored / objects < 0.6  # about 0.5
    # The background itself stays labelled: unannotated pixels lie on objects.
    assert (partial[0][1] == 0).float().mean() > 0.3
    # Noise and partial annotation draw from their own streams: together, the objects
    # that stay labelled carry the noisy labels.
    both = SynthScenes("train", size=64, length=20, label_noise=0.3, unlabelled=0.5)
    noisy = SynthScenes("train", size=64, length=20, label_noise=0.3)
    for i in range(20):
        kept = both[i][1] != 255
        assert torch.equal(both[i][1][kept], noisy[i][1][kept])
        assert torch.equal((both[i][1] == 255), (partial[i][1] == 255))
    for split in ("val", "test"):  # scored against complete masks
        a, b = SynthScenes(split, size=64, length=20), SynthScenes(split, size=64, length=20,
                                                                     unlabelled=0.5)
        assert all(torch.equal(a[i][1], b[i][1]) for i in range(20))
