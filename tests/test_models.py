"""Presets build, pad to their stride, expose a 1x1 classifier; weights pass through."""
import pytest
import torch
from torch import nn

from kdnb.models import PRESETS, available_presets, build_model


@pytest.mark.parametrize("name", ["synth-teacher", "synth-student"])
def test_cpu_presets_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name, 9)
    x = torch.rand(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 9, 64, 64)
    logits.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_a_linear_1x1_classifier(name):
    model = build_model(name, 5)
    clf = model.classifier
    assert isinstance(clf, nn.Conv2d) and clf.kernel_size == (1, 1) and clf.out_channels == 5


@pytest.mark.parametrize("name", ["deeplabv3-r18", "pspnet-r18", "deeplabv3-mbv2"])
def test_paper_students_run_at_output_stride_8(name):
    model = build_model(name, 19).eval()
    assert model.stride == 8
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, 19, 64, 96)


def test_input_not_divisible_by_stride_is_padded_and_cropped():
    model = build_model("synth-student", 4).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 70, 50))
    assert out.shape == (1, 4, 70, 50)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError) as err:
        build_model("fpn-r50", 9)
    assert "unknown model preset 'fpn-r50'" in str(err.value)
    for name in available_presets():
        assert name in str(err.value)


def test_bad_images_are_named():
    model = build_model("synth-student", 4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64))


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-kdnb-cache")
    with pytest.raises(RuntimeError) as err:
        build_model("synth-student", 9, encoder_weights="imagenet")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "kdnb weights" in msg and "encoder_weights=None" in msg


def test_imagenet_weights_load_from_a_hub_cache(tmp_path, monkeypatch):
    """The download path: smp fetches encoder weights from the Hugging Face hub. A cache
    laid out as the hub writes it (made here, offline) must be found and loaded."""
    import importlib

    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders["mobilenet_v2"]["pretrained_settings"]["imagenet"]
    repo, rev = settings["repo_id"], settings["revision"]
    reference = build_model("synth-student", 9).net.encoder.state_dict()
    reference = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
                 for k, v in reference.items()}
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    save_file(reference, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hc
    importlib.reload(hc)
    monkeypatch.setattr("huggingface_hub.file_download.constants.HF_HUB_CACHE", str(tmp_path), raising=False)
    monkeypatch.setattr("huggingface_hub.file_download.constants.HF_HUB_OFFLINE", True, raising=False)
    model = build_model("synth-student", 9, encoder_weights="imagenet")
    loaded = model.net.encoder.state_dict()
    key = next(k for k, v in reference.items() if v.is_floating_point() and v.ndim == 4)
    assert torch.equal(loaded[key], reference[key])
