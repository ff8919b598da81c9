"""Teacher and student presets over segmentation-models-pytorch.

Every preset is a :class:`SegModel`: an smp network behind a fixed input normalization
(images go in as floats in [0, 1], so datasets, plots and checkpoints never disagree on
statistics), padding to the network's stride, and the name of its *classifier*: the final
1x1 convolution whose input is the head feature that feature distillation taps.

Two families:

* the paper pairs of docs/METHODS.md, "Training recipe and model pairs" (DeepLabV3-ResNet101 teacher; DeepLabV3-ResNet18,
  PSPNet-ResNet18 and DeepLabV3-MobileNetV2 students; output stride 8);
* CPU presets sized for SynthScenes, which train in minutes on two cores.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .options import check_options, keyword_parameters

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """A named model recipe.

    Attributes:
        arch: smp class name (``"FPN"``, ``"DeepLabV3"``, ``"PSPNet"``...).
        encoder: smp encoder name.
        kwargs: further arguments of the smp class.
        role: ``"teacher"`` or ``"student"`` (a hint for the CLI and the notebooks).
        description: one line for ``kdnb presets``.
        head_kernel: if set, the classifier is replaced by a convolution of this size.
            PSPNet's stock head is 3x3; a 1x1 head keeps the classifier linear on each
            position, which FAKD's closed form needs (ours).
    """

    arch: str
    encoder: str
    kwargs: dict = field(default_factory=dict)
    role: str = "student"
    description: str = ""
    head_kernel: int | None = None


PRESETS: dict[str, Preset] = {
    # Paper pairs (CIRKD's Cityscapes table).
    "deeplabv3-r101": Preset("DeepLabV3", "resnet101", {"encoder_output_stride": 8}, "teacher",
                             "paper teacher, DeepLabV3-ResNet101, output stride 8"),
    "deeplabv3-r18": Preset("DeepLabV3", "resnet18", {"encoder_output_stride": 8}, "student",
                            "paper student, DeepLabV3-ResNet18, output stride 8"),
    "deeplabv3-mbv2": Preset("DeepLabV3", "mobilenet_v2", {"encoder_output_stride": 8}, "student",
                             "paper student, DeepLabV3-MobileNetV2, output stride 8"),
    "pspnet-r18": Preset("PSPNet", "resnet18", {"encoder_depth": 3, "upsampling": 8}, "student",
                         "paper student, PSPNet-ResNet18 (stride 8), 1x1 classifier", head_kernel=1),
    # CPU presets sized for SynthScenes.
    "synth-teacher": Preset("FPN", "resnet18", {}, "teacher",
                            "SynthScenes teacher, FPN-ResNet18 (13 M parameters)"),
    "synth-student": Preset("FPN", "mobilenet_v2",
                            {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32},
                            "student", "SynthScenes student, FPN-MobileNetV2, thin decoder (2.4 M)"),
}


#: Every smp network ends in ``segmentation_head``: the classifier (a convolution), then the
#: upsampling to the image size and the activation (identity for logits).
CLASSIFIER = "segmentation_head.0"


class SegModel(nn.Module):
    """An smp network with input normalization, stride padding and a named classifier.

    Args:
        net: the smp model (encoder, decoder, ``segmentation_head``).
        preset: name of the preset it was built from (checked when a checkpoint loads).
        num_classes: number of output classes.

    Attributes:
        classifier_name: module path of the final classifier (for a
            :class:`kdnb.features.FeatureRecorder` tap).

    Shape:
        ``forward``: images ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, K, H, W)``.
    """

    def __init__(self, net: nn.Module, *, preset: str, num_classes: int):
        super().__init__()
        self.net = net
        self.preset = preset
        self.num_classes = num_classes
        self.classifier_name = "net." + CLASSIFIER
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stride = int(getattr(getattr(net, "encoder", None), "output_stride", 32))

    @property
    def classifier(self) -> nn.Conv2d:
        """The final classifier; its input is the head feature, its output the logits."""
        return self.get_submodule(self.classifier_name)

    def forward(self, images: torch.Tensor, *, features: bool = False, stages: Sequence[int] = ()):
        """Runs encoder -> decoder -> head explicitly, so the maps distillation reads come
        out of the same pass (no hooks; the pass compiles with ``torch.compile``).

        Args:
            images: ``(B, 3, H, W)`` floats in [0, 1].
            features: also return the maps distillation reads.
            stages: encoder stages to return as well, ``N`` for the output at stride
                ``2**N`` (see :func:`kdnb.features.parse_layer`); only with ``features``.

        Returns:
            The logits ``(B, K, H, W)``; with ``features``, ``(logits, maps)`` where
            ``maps`` holds ``"feats"``, the head feature (the classifier's input,
            ``(B, C, h, w)``), ``"logits"``, the classifier's output before the head
            upsamples it (``(B, K, h, w)``), and ``"stageN"`` for each stage asked for.
            The maps are those of the padded input (see below).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - self.mean) / self.std
        # smp networks need sides divisible by their stride: pad with the mean colour (0
        # after normalization) and crop the logits back.
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        encoded = self.net.encoder(x)  # [input, stride 2, 4, ..., 32]
        feats = self.net.decoder(encoded)  # (B, C, h, w): the head feature
        head_logits = self.classifier(feats)  # (B, K, h, w)
        logits = head_logits
        for module in list(self.net.segmentation_head)[1:]:  # its upsampling, activation
            logits = module(logits)
        if ph or pw:
            logits = logits[..., :h, :w]
        if not features:
            return logits
        maps = {"feats": feats, "logits": head_logits}
        for stage in sorted(set(stages)):
            if not 1 <= stage < len(encoded):
                raise ValueError(f"{self.preset}'s encoder has stages 1..{len(encoded) - 1}; "
                                 f"got stage{stage}")
            maps[f"stage{stage}"] = encoded[stage]
        return logits, maps


def available_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: "
                         f"{', '.join(available_presets())}") from None


#: smp keywords kdnb sets itself, with what sets them (never a --model-arg).
SET_BY_KDNB = {"encoder_name": "the preset's encoder", "encoder_weights": "--encoder-weights",
               "classes": "the dataset's class count", "in_channels": "RGB images, 3",
               "activation": "losses read logits", "aux_params": "no auxiliary head is trained"}


def check_model_options(preset: str, options: dict) -> None:
    """Refuses model options (``--model-arg``, ``model_kwargs``) that the preset's smp class
    does not take, or of the wrong type, listing the valid names.

    smp hands unknown keywords to the encoder, which ignores them (only timm's ``tu-``
    encoders read them), so a misspelt option would otherwise train with its default.
    """
    spec = get_preset(preset)
    cls = getattr(smp, spec.arch)
    accepted = {name: (hint, spec.kwargs.get(name, default))  # the preset's own values
                for name, (hint, default) in keyword_parameters(cls.__init__,
                                                                skip=tuple(SET_BY_KDNB)).items()}
    if spec.encoder.startswith("tu-"):  # timm encoders take options of their own
        options = {k: v for k, v in options.items() if k in accepted or k in SET_BY_KDNB}
    check_options(options, accepted, what=f"model {preset} (smp {spec.arch})",
                  flag="--model-arg", fixed=SET_BY_KDNB)


def build_model(preset: str, num_classes: int, *, encoder_weights: str | None = None,
                **overrides) -> SegModel:
    """Builds a preset.

    Args:
        preset: a name from :data:`PRESETS` (``kdnb presets`` lists them).
        num_classes: number of output classes.
        encoder_weights: ``"imagenet"`` to start from pretrained encoder weights (needs the
            network, or a warm Hugging Face / torch hub cache), or None for random init.
        **overrides: replace any smp keyword of the preset.

    Returns:
        A :class:`SegModel` in training mode.
    """
    spec = get_preset(preset)
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a segmentation model needs at least 2")
    cls = getattr(smp, spec.arch)
    kwargs = {**spec.kwargs, **overrides}
    try:
        net = cls(encoder_name=spec.encoder, encoder_weights=encoder_weights,
                  classes=num_classes, **kwargs)
    except Exception as err:  # smp raises many kinds of network errors
        if encoder_weights is None:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load {encoder_weights!r} weights for encoder {spec.encoder!r} "
            f"({type(err).__name__}: {err}). "
            + ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded. " if offline else "")
            + "Fetch them once with `kdnb weights --preset " + preset + "` on a machine with "
            "internet (they land in the Hugging Face / torch hub cache), or pass "
            "encoder_weights=None to start from random weights.") from err
    if spec.head_kernel is not None:
        old = net.segmentation_head[0]
        net.segmentation_head[0] = nn.Conv2d(old.in_channels, num_classes, spec.head_kernel,
                                             padding=spec.head_kernel // 2)
    return SegModel(net, preset=preset, num_classes=num_classes)
