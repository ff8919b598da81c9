"""FeatureRecorder taps and cleans up; the head feature feeds the classifier."""
import pytest
import torch
import torch.nn.functional as F

from kdnb.features import ChannelAdapter, FeatureRecorder, forward_with_head, match_size
from kdnb.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("synth-student", 9).eval()


def test_records_inside_block_and_removes_hooks(model):
    x = torch.rand(2, 3, 64, 64)
    path = model.classifier_name
    with FeatureRecorder(model, {"head": path}, capture="input") as rec:
        model(x)
        feat = rec["head"]
    assert feat.shape == (2, model.classifier.in_channels, 16, 16)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_hooks_removed_even_when_forward_raises(model):
    with pytest.raises(ValueError):
        with FeatureRecorder(model, ["net.encoder"]):
            model(torch.rand(2, 4, 64, 64))  # wrong channel count
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_forward_with_head_is_consistent(model):
    x = torch.rand(2, 3, 64, 64)
    logits, feats, head_logits = forward_with_head(model, x)
    assert torch.allclose(model.classifier(feats), head_logits, atol=1e-5)
    # FPN's head upsamples the classifier output 4x (bilinear, align_corners=True)
    up = F.interpolate(head_logits, scale_factor=4, mode="bilinear", align_corners=True)
    assert torch.allclose(up, logits, atol=1e-5)
    assert torch.allclose(model(x), logits)


def test_unknown_module_and_missing_key_are_explained(model):
    with pytest.raises(ValueError, match="no module 'net.nope'"):
        FeatureRecorder(model, ["net.nope"])
    rec = FeatureRecorder(model, {"enc": "net.encoder"})
    with pytest.raises(KeyError, match="nothing recorded"):
        rec["enc"]
    with pytest.raises(ValueError, match="capture"):
        FeatureRecorder(model, ["net.encoder"], capture="grad")


def test_recorded_features_carry_gradients(model):
    x = torch.rand(1, 3, 64, 64)
    with FeatureRecorder(model, {"head": model.classifier_name}, capture="input") as rec:
        model(x)
    rec["head"].sum().backward()
    assert any(p.grad is not None for p in model.net.decoder.parameters())
    model.zero_grad()


def test_channel_adapter_and_match_size():
    adapter = ChannelAdapter(8, 16, batchnorm=True)
    y = adapter(torch.rand(2, 8, 5, 7))
    assert y.shape == (2, 16, 5, 7)
    with pytest.raises(ValueError, match=r"expects \(B, 8, h, w\)"):
        adapter(torch.rand(2, 4, 5, 7))
    t = torch.rand(2, 16, 10, 14)
    assert match_size(t, (5, 7)).shape == (2, 16, 5, 7)
    assert match_size(t, (10, 14)) is t


def test_channel_rms_is_each_channels_rms_at_every_layer(model):
    """channel_rms equals the RMS written out on the model's own maps, for every stage and
    the head, and is invariant to how the images are batched."""
    from kdnb.features import channel_rms

    images = torch.rand(6, 3, 32, 32)
    rms = channel_rms(model, images, batch=4)
    stages = list(range(1, len(model.net.encoder.out_channels)))
    assert list(rms) == [f"stage{n}" for n in stages] + ["head"]
    with torch.no_grad():
        _, maps = model(images, features=True, stages=stages)
    for name, values in rms.items():
        x = maps["feats" if name == "head" else name].double()
        torch.testing.assert_close(values, x.square().mean((0, 2, 3)).sqrt())
    for name, values in channel_rms(model, images, batch=6).items():
        torch.testing.assert_close(values, rms[name])


def test_magnitude_spread_percentiles_ratio_and_dead_channels():
    from kdnb.features import magnitude_spread

    equal = magnitude_spread(torch.full((8,), 0.5, dtype=torch.float64))
    assert equal["ratio"] == pytest.approx(1.0) and equal["dead"] == 0
    spread = magnitude_spread(torch.arange(1, 12, dtype=torch.float64))  # 1..11
    assert (spread["p10"], spread["p50"], spread["p90"]) == pytest.approx((2.0, 6.0, 10.0))
    assert spread["ratio"] == pytest.approx(5.0)
    dead = magnitude_spread(torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    assert dead["dead"] == 2 and dead["ratio"] == float("inf")
