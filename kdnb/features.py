"""Tapping intermediate features, and adapters between student and teacher features.

:class:`FeatureRecorder` taps named modules of any ``nn.Module`` with forward hooks inside
a ``with`` block and removes every hook on exit, so a model is never left instrumented.
:class:`ChannelAdapter` is the trainable connector (1x1 convolution, optional BatchNorm)
that maps student channels to teacher channels; it trains with the student and is dropped
at inference. :func:`match_size` (feature maps, bilinear) and :func:`resize_labels` (label
masks, nearest) are the one place where maps of different sizes are brought to the same
resolution. :func:`channel_rms` and :func:`magnitude_spread` measure how unequal a
network's channel magnitudes are per layer, the premise of NFD.

Training needs no hooks: a :class:`kdnb.models.SegModel` returns its head feature and its
encoder stages from its own forward pass (``model(images, features=True, stages=...)``);
:class:`FeatureRecorder` taps any other module.

Introduced in notebooks/01_feature_magnitude.ipynb.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import unwrap


class FeatureRecorder:
    """Records the inputs or outputs of named submodules during forward passes.

    Args:
        model: the module to tap.
        taps: module paths to record (``model.get_submodule`` names), or a mapping from
            a short key to such a path.
        capture: ``"output"`` to record what a module returns, ``"input"`` to record its
            first positional input (the input of a classifier is the head feature).
        detach: store detached tensors (for analysis); keep False to backpropagate
            through recorded features.

    Example:
        >>> with FeatureRecorder(model, {"head": model.classifier_name}, capture="input") as rec:
        ...     logits = model(images)
        >>> rec["head"].shape  # (B, C, h, w)

    Only the latest forward pass is kept: ``rec[key]`` is overwritten on each call.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] | Mapping[str, str], *,
                 capture: str = "output", detach: bool = False):
        if capture not in ("input", "output"):
            raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
        self.model = model
        self.taps = dict(taps) if isinstance(taps, Mapping) else {t: t for t in taps}
        if not self.taps:
            raise ValueError("FeatureRecorder needs at least one module path to tap")
        names = dict(model.named_modules())
        for key, path in self.taps.items():
            if path not in names:
                close = [n for n in names if path.split(".")[-1] in n][:5]
                raise ValueError(f"no module {path!r} in {type(model).__name__} (tap {key!r}); "
                                 f"similar names: {close or 'none'}; "
                                 "list them with [n for n, _ in model.named_modules()]")
        self.capture, self.detach = capture, detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, key: str):
        def hook(module, args, output):
            value = args[0] if self.capture == "input" else output
            self.features[key] = value.detach() if self.detach else value
        return hook

    def __enter__(self) -> "FeatureRecorder":
        if self._handles:
            raise RuntimeError("this FeatureRecorder is already active; nested use is not supported")
        for key, path in self.taps.items():
            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Removes every hook; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.features:
            raise KeyError(f"nothing recorded for {key!r} yet: run a forward pass inside the "
                           f"`with` block (taps: {sorted(self.taps)})")
        return self.features[key]

    def clear(self) -> None:
        self.features.clear()


def forward_with_head(model: nn.Module, images: torch.Tensor, classifier: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass that returns the logits, the head feature and the head logits.

    Args:
        model: a :class:`kdnb.models.SegModel` (possibly wrapped in DDP), which returns
            them from its own pass (``model(images, features=True)``); or any model with
            ``classifier``, the module path of its final classifier, tapped with a
            :class:`FeatureRecorder`.
        images: ``(B, 3, H, W)``.
        classifier: module path of the final classifier of a model that is no SegModel.

    Returns:
        ``(logits, head_feats, head_logits)``: output logits ``(B, K, H, W)``, the
        classifier's input ``(B, C, h, w)`` and output ``(B, K, h, w)`` (logits at the
        feature resolution, before any upsampling).
    """
    if classifier is None:
        logits, maps = model(images, features=True)
        return logits, maps["feats"], maps["logits"]
    inner = unwrap(model)  # hooks go on the wrapped module; the call goes through DDP
    with FeatureRecorder(inner, {"feat": classifier}, capture="input") as feats, \
            FeatureRecorder(inner, {"logits": classifier}) as head:
        logits = model(images)
    return logits, feats["feat"], head["logits"]


def parse_layer(layer: str) -> int | None:
    """A distillation layer name to an encoder stage: ``"head"`` -> None, ``"stageN"`` -> N.

    ``"head"`` is the head feature (the input of the final classifier); ``"stageN"`` is
    the encoder's N-th output, at stride ``2**N`` (N = 1..5 for smp's encoders).
    """
    if layer == "head":
        return None
    if isinstance(layer, str) and layer.startswith("stage") and layer[5:].isdigit():
        stage = int(layer[5:])
        if 1 <= stage <= 5:
            return stage
    raise ValueError(f"unknown layer {layer!r}: use 'head' (the classifier's input) or "
                     "'stage1'..'stage5' (the encoder's output at stride 2, 4, ..., 32)")


def stage_channels(model: nn.Module, stage: int) -> int:
    """Channels of encoder stage ``stage`` of a :class:`kdnb.models.SegModel`."""
    inner = unwrap(model)
    channels = list(inner.net.encoder.out_channels)
    if not 1 <= stage < len(channels):
        raise ValueError(f"{getattr(inner, 'preset', type(inner).__name__)}'s encoder has "
                         f"stages 1..{len(channels) - 1}; got stage{stage}")
    return int(channels[stage])


@torch.no_grad()
def channel_rms(model: nn.Module, images: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """NFD's premise, measured: per layer, the RMS of each channel over images and positions.

    Runs a :class:`kdnb.models.SegModel` in eval mode on ``images (N, 3, H, W)`` and
    returns ``{"stage1": (C_1,), ..., "head": (C,)}`` in float64: every encoder stage and
    the head feature, the maps a loss's ``layer`` can name. :func:`magnitude_spread`
    summarizes how unequal the channels are. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    stages = list(range(1, len(unwrap(model).net.encoder.out_channels)))
    squares: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for start in range(0, len(images), batch):
        _, maps = model(images[start:start + batch], features=True, stages=stages)
        for name, x in maps.items():
            if name == "logits":
                continue
            squares[name] = squares.get(name, 0) + x.double().square().sum((0, 2, 3))
            count[name] = count.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]
    model.train(was_training)
    order = [f"stage{n}" for n in stages] + ["feats"]
    return {("head" if k == "feats" else k): (squares[k] / count[k]).sqrt() for k in order}


def magnitude_spread(rms: torch.Tensor) -> dict[str, float]:
    """How unequal channel magnitudes are: the 10th, 50th and 90th percentiles of ``rms
    (C,)`` across channels, their ratio ``p90 / p10`` (1 when every channel has the same
    size), and the number of dead channels (RMS below 1e-8)."""
    q = torch.quantile(rms, torch.tensor([0.1, 0.5, 0.9], dtype=rms.dtype, device=rms.device)).tolist()
    return {"p10": q[0], "p50": q[1], "p90": q[2],
            "ratio": q[2] / q[0] if q[0] > 0 else float("inf"),
            "dead": int((rms <= 1e-8).sum())}


def match_size(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinearly resizes ``x (B, C, h, w)`` to ``size``; a no-op when it already fits.

    The teacher map is resized to the student's size, never the other way
    (docs/METHODS.md, "Conventions").
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def resize_labels(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest-resizes label masks ``(B, H, W)`` to ``size``; returns long labels.

    Labels are never blended: nearest on floats is exact for labels below 2^24 and never
    invents a class.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.long()
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class ChannelAdapter(nn.Module):
    """A 1x1 convolution (optionally + BatchNorm) from student to teacher channels.

    Args:
        in_channels: student channels ``C_s``.
        out_channels: teacher channels ``C_t``.
        batchnorm: append a BatchNorm2d (CIRKD's CWD connector is a bare 1x1 conv).

    Shape:
        ``(B, C_s, h, w) -> (B, C_t, h, w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, batchnorm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ChannelAdapter expects (B, {self.in_channels}, h, w), "
                             f"got {tuple(x.shape)}")
        return self.bn(self.conv(x))
