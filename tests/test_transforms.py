"""Joint transforms: consistent image/mask geometry, ignore padding, per-sample seeding."""
import torch

from kdnb.data import Augmented, SynthScenes, TrainTransform, build_dataset


def _pair(h=40, w=60):
    image = torch.rand(3, h, w)
    mask = torch.arange(w).repeat(h, 1) % 5  # columns encode position: flips are visible
    return image, mask


def test_crop_pads_mask_with_ignore_and_image_with_zero():
    image, mask = _pair(40, 60)
    t = TrainTransform(crop_size=(64, 64), scale_range=(1.0, 1.0), flip=False)
    out_image, out_mask = t(image, mask, torch.Generator().manual_seed(0))
    assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
    assert (out_mask[40:] == 255).all() and (out_mask[:, 60:] == 255).all()
    assert (out_image[:, 40:] == 0).all()
    assert torch.equal(out_mask[:40, :60], mask)


def test_flip_moves_image_and_mask_together():
    image, mask = _pair()
    image[0] = mask.float() / 4  # the image's first channel mirrors the mask
    t = TrainTransform(crop_size=None, scale_range=(1.0, 1.0), flip=True)
    flipped = 0
    for s in range(20):
        out_image, out_mask = t(image, mask, torch.Generator().manual_seed(s))
        assert torch.allclose(out_image[0], out_mask.float() / 4)
        flipped += not torch.equal(out_mask, mask)
    assert 0 < flipped < 20


def test_scale_keeps_mask_labels_nearest():
    image, mask = _pair()
    t = TrainTransform(crop_size=None, scale_range=(0.5, 2.0), flip=False)
    for s in range(5):
        out_image, out_mask = t(image, mask, torch.Generator().manual_seed(s))
        assert out_image.shape[-2:] == out_mask.shape
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())


def test_augmented_is_a_function_of_seed_epoch_index():
    ds = SynthScenes("train", size=64, length=8)
    aug = Augmented(ds, TrainTransform(crop_size=(48, 48), scale_range=(0.5, 2.0)), seed=1)
    a, b = aug[(3, 0)], aug[(3, 0)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(aug[3][0], a[0])  # a plain index is epoch 0
    c = aug[(3, 1)]
    assert not torch.equal(a[0], c[0])  # a new epoch draws new augmentations
    assert aug.num_classes == ds.num_classes and aug.palette == ds.palette


def test_build_dataset_train_flag_wraps_with_transform():
    ds = build_dataset("synth", split="train", train=True, size=64, length=4,
                       crop_size=(32, 32), scale_range=(0.5, 1.0))
    image, mask = ds[(0, 0)]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
