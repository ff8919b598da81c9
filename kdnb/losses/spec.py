"""The language of method specs: from a plain ``methods`` dict to loss modules.

A run's ``methods`` is a plain dict (it is saved in ``config.json``)::

    {"kd": 1.0, "nfd": {"weight": 32.0, "layer": "stage2"}, "fakd": {"lambda_0": 1.0}}

Each key is a method of :data:`METHODS`; its value is a weight, a dict of options with an
optional ``"weight"`` and ``"layer"``, or None for the defaults. This module is the one
place that reads such a dict:

* :func:`as_options` normalizes one value; :func:`method_problems` lists what is out of
  range (the config checks it when it is built);
* :func:`parse_methods` reads the command line's ``--methods kd=1,nfd=2,fakd`` and
  ``--set nfd.norm=spatial``;
* :func:`resolve_methods` expands a loss given several ``layers`` into one loss per layer
  (``"nfd@stage2"``, ``"nfd@head"``, each with its weight) and folds ``fakd`` into the
  loss it augments; :func:`split_layers` takes out each loss's layer (``"head"`` or
  ``"stageN"``);
* :func:`build_losses` builds the modules; :func:`method_label` names a spec in tables.

Introduced in notebooks/04_distillation_runs.ipynb.
"""
from __future__ import annotations

import inspect
import json
import math
from typing import Mapping, NamedTuple

from torch import nn

from kdnb.features import parse_layer
from kdnb.losses.augment import FAKDLoss
from kdnb.losses.dense_contrast import AfDCDLoss
from kdnb.losses.contrast import CIRKDLoss
from kdnb.losses.feature import ATLoss, FeatureMSELoss, NFDLoss
from kdnb.losses.relation import IFVDLoss, SKDLoss
from kdnb.losses.response import CWDLoss, DISTLoss, PixelKDLoss

__all__ = ["MethodInfo", "METHODS", "FAKD_BASES", "as_options", "method_problems",
           "parse_value", "parse_methods", "resolve_methods", "split_layers", "reads_features",
    "method_of",
           "build_losses", "method_label"]


class MethodInfo(NamedTuple):
    """One registered method: its module class, default weight and family."""

    loss: type[nn.Module]
    weight: float  # default weight in the total loss
    kind: str      # "response", "feature", "relation" or "augment"


#: method name -> (module class, default weight, kind). Default weights from CIRKD's
#: scripts (docs/METHODS.md, "Conventions of the public implementations"); afdcd's 1
#: leaves its two terms at the weights of the Af-DCD authors' Cityscapes scripts, which
#: AfDCDLoss holds (mimic_weight, contrast_weight); the others are 1 until the workbook
#: tunes them.
METHODS: dict[str, MethodInfo] = {
    "kd": MethodInfo(PixelKDLoss, 1.0, "response"),
    "cwd": MethodInfo(CWDLoss, 3.0, "response"),  # on logits; CIRKD uses 50 with on="feats"
    "dist": MethodInfo(DISTLoss, 1.0, "response"),
    "mse": MethodInfo(FeatureMSELoss, 1.0, "feature"),
    "at": MethodInfo(ATLoss, 1.0, "feature"),
    "nfd": MethodInfo(NFDLoss, 1.0, "feature"),
    "skd": MethodInfo(SKDLoss, 10.0, "relation"),
    "ifvd": MethodInfo(IFVDLoss, 20.0, "relation"),
    "afdcd": MethodInfo(AfDCDLoss, 1.0, "feature"),
    # its three terms carry CIRKD's own weights (1, 0.1, 0.1) inside; the total is 1
    "cirkd": MethodInfo(CIRKDLoss, 1.0, "relation"),
    "fakd": MethodInfo(FAKDLoss, 1.0, "augment"),
}

#: the loss FAKD augments -> FAKDLoss's ``on`` (FAKD replaces that loss by its bound).
FAKD_BASES = {"kd": "logits", "nfd": "nfd", "mse": "feats"}

#: Loss options that divide by themselves (a temperature) and must stay > 0.
POSITIVE_OPTIONS = ("temperature", "tau")
#: Loss options that scale a term and must stay >= 0.
NON_NEGATIVE_OPTIONS = ("lambda_0", "beta", "gamma", "mimic_weight", "contrast_weight")

# Filled by build_losses from its own arguments, never from the spec.
_CONTEXT = ("student_channels", "teacher_channels", "num_classes")


def method_of(name: str) -> str:
    """The method of a loss name: ``"nfd@stage2"`` (one layer of a multi-layer NFD) ->
    ``"nfd"``."""
    return name.partition("@")[0]


def as_options(value) -> dict:
    """One method's value as a dict of options: ``2.0`` -> ``{"weight": 2.0}``, None -> ``{}``,
    a dict -> a copy."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {"weight": value}


def _bad_weight(weight) -> bool:
    return (isinstance(weight, bool) or not isinstance(weight, (int, float))
            or not math.isfinite(weight) or weight < 0)


def method_problems(methods: Mapping) -> list[str]:
    """What is wrong in a methods dict (names, weights, temperatures), each with its fix.

    Checked when a :class:`kdnb.config.TrainConfig` is built, before any data is read or
    model built; the loss modules check their own options again when they are built.
    """
    problems = []
    for name, value in methods.items():
        if name not in METHODS:
            problems.append(f"unknown distillation method {name!r}: choose from "
                            f"{', '.join(METHODS)}")
            continue
        if value is not None and not isinstance(value, (Mapping, int, float)):
            problems.append(f"{name}={value!r} is neither a weight nor a dict of options: "
                            f"write {name}=1.0 or {name}={{'weight': 1.0}}")
            continue
        options = as_options(value)
        weight = options.get("weight")
        if weight is not None and _bad_weight(weight):
            problems.append(f"{name} weight={weight!r} must be a finite number >= 0 (0 logs the "
                            f"loss without training on it): pass {name}=1 or drop {name}")
        layers = options.get("layers")
        if layers is not None:
            if not isinstance(layers, Mapping) or not layers:
                problems.append(f"{name} layers={layers!r} must map layer names to weights, "
                                f"e.g. {{'stage2': 8, 'head': 1}}")
            elif "weight" in options or "layer" in options:
                problems.append(f"{name}: give either layers (a weight per layer) or "
                                "weight and layer, not both")
            else:
                problems += [f"{name} layers[{layer!r}]={w!r} must be a finite number >= 0"
                             for layer, w in layers.items() if _bad_weight(w)]
        for key in POSITIVE_OPTIONS:
            x = options.get(key)
            if x is not None and not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)):
                problems.append(f"{name} {key}={x!r} must be > 0 (the logits are divided by it): "
                                f"use a value such as {name}.{key}=1 or 4")
        for key in NON_NEGATIVE_OPTIONS:
            x = options.get(key)
            if x is not None and not (isinstance(x, (int, float)) and x >= 0 and math.isfinite(x)):
                problems.append(f"{name} {key}={x!r} must be a finite number >= 0: use "
                                f"{name}.{key}=0 to switch it off")
    return problems


def parse_value(text: str):
    """A command-line value: ``'1'`` -> 1.0, ``'true'`` -> True, ``'none'`` -> None,
    ``'spatial'`` -> ``'spatial'``, and JSON for a dict or a list:
    ``'{"stage2": 8, "head": 1}'`` -> that dict."""
    if text.strip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError as err:
            raise ValueError(f"{text!r} is not valid JSON ({err}): write a dict such as "
                             '\'{"stage2": 8, "head": 1}\'') from err
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return text.strip()


def parse_methods(text: str | None, settings: list[str] | None = None) -> dict:
    """``"kd=1,nfd=2,fakd"`` plus ``["nfd.norm=spatial", "fakd.lambda_0=5"]`` -> a methods dict.

    A bare name takes the method's default weight; ``name.option=value`` sets an option.
    """
    methods: dict = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, eq, weight = item.partition("=")
        methods[name.strip()] = {"weight": float(weight)} if eq else {}
    for setting in settings or []:
        key, eq, value = setting.partition("=")
        name, dot, option = key.partition(".")
        if not (eq and dot and option):
            raise ValueError(f"--set {setting!r}: expected METHOD.OPTION=VALUE, for example "
                             "nfd.norm=spatial")
        if name not in methods:
            raise ValueError(f"--set {setting!r}: {name!r} is not in --methods "
                             f"({', '.join(methods) or 'none'})")
        methods[name][option] = parse_value(value)
    return methods


def resolve_methods(methods: Mapping) -> dict:
    """Folds ``fakd`` into the loss it augments; every value becomes a dict of options.

    A loss with ``layers`` (``{"nfd": {"layers": {"stage2": 8, "head": 1}}}``, several
    maps in one run, each with its weight: the multi-layer NFD of the paper's reading)
    becomes one loss per layer, named ``"nfd@stage2"``, ``"nfd@head"``.

    FAKD's bound *contains* the loss it augments (at ``lambda = 0`` it is that loss), so
    ``{"kd": 1, "fakd": {}}`` becomes one FAKD module on logits with KD's weight,
    temperature and pixels (all of them, unlabelled ones included, as pixel KD by default:
    ``keep_ignored``), and ``{"nfd": 2, "fakd": {}}`` one on normalized features. Other
    losses stay as they are.
    """
    spec = {}
    for name, value in methods.items():
        options = as_options(value)
        layers = options.pop("layers", None)
        if layers is None:
            spec[name] = options
            continue
        if not reads_features(name, options):
            raise ValueError(f"{name} reads the logits, so it has one layer, the head: drop "
                             "its layers option")
        for layer, weight in layers.items():
            spec[f"{name}@{layer}"] = {**options, "weight": weight, "layer": layer}
    if "fakd" not in spec:
        return spec
    several = sorted({method_of(k) for k in spec if "@" in k} & set(FAKD_BASES))
    if several:
        raise ValueError(f"fakd augments one map: give {several[0]} a single layer (its "
                         "layer option) instead of layers, or drop fakd")
    fakd = spec.pop("fakd")
    on = fakd.pop("on", None)
    if on is not None:
        by_on = {v: k for k, v in FAKD_BASES.items()}
        if on not in by_on or by_on[on] not in spec:
            raise ValueError(f"fakd on={on!r} needs its base loss in the methods: "
                             + ", ".join(f"on={v!r} with {k}" for k, v in FAKD_BASES.items()))
        base = by_on[on]
    else:
        bases = [b for b in FAKD_BASES if b in spec]
        if not bases:
            extra = " (cwd + fakd has no implemented bound yet)" if "cwd" in spec else ""
            raise ValueError("fakd augments another loss: add one of kd, nfd or mse to the "
                             f"methods (for example kd=1,fakd){extra}")
        if len(bases) > 1:
            raise ValueError(f"fakd can augment one of {bases}: choose with fakd's option "
                             "on=logits (kd), on=nfd or on=feats (mse)")
        base = bases[0]
    base_options = spec.pop(base)
    layer = base_options.pop("layer", "head")
    if "layer" in fakd:
        raise ValueError("fakd takes the layer of the loss it augments: set the layer option "
                         f"on {base}, not on fakd")
    if layer != "head":
        if base == "kd":
            raise ValueError(f"kd reads the logits, so its layer can only be 'head', got "
                             f"{layer!r}")
        fakd["layer"] = layer  # the feature bounds hold at any layer (no classifier in them)
    weight = base_options.pop("weight", METHODS[base].weight)
    carried = {}
    if base == "kd":
        if "temperature" in base_options:
            carried["temperature"] = base_options.pop("temperature")
        # The bound covers the pixels KD covers: every pixel unless KD leaves some out (its
        # ignore_index). On a pixel without a label there is no Sigma_y, so it is plain KD.
        kd_ignore = base_options.pop("ignore_index", None)
        carried["keep_ignored"] = kd_ignore is None
        if kd_ignore is not None:
            carried["ignore_index"] = kd_ignore
    if base == "nfd":
        norm = base_options.pop("norm", "channel")
        if norm != "channel":
            raise ValueError(f"fakd's NFD bound covers channel normalization only, not "
                             f"norm={norm!r}: use nfd's default norm with fakd")
        if "eps" in base_options:
            carried["nfd_eps"] = base_options.pop("eps")
    if base_options:
        raise ValueError(f"{base} options {sorted(base_options)} cannot be carried into fakd; "
                         "set them on fakd itself")
    spec["fakd"] = {"weight": fakd.pop("weight", weight), "on": FAKD_BASES[base],
                    **carried, **fakd}
    return spec


def reads_features(name: str, options: Mapping) -> bool:
    """Whether a loss reads a feature map (and so may take a ``layer``): feature and relation
    losses do, and a loss whose ``on`` option names features (CWD ``on="feats"``, FAKD on
    a feature loss); the others read the logits."""
    return (METHODS[method_of(name)].kind in ("feature", "relation")
            or options.get("on") in ("feats", "nfd"))


def split_layers(spec: dict) -> tuple[dict, dict[str, int | None]]:
    """Takes each loss's ``layer`` option out of a resolved ``spec``: the layer it distils.

    ``"head"`` (the default) is the head feature, the classifier's input; ``"stageN"`` the
    encoder's output at stride ``2**N`` (:func:`kdnb.features.parse_layer`). Only losses
    that read features take a layer (:func:`reads_features`; FAKD on a feature loss gets
    its base's layer from :func:`resolve_methods`). Returns ``(spec, layers)`` with
    ``layers[name]`` None or N.
    """
    layers = {}
    for name, options in spec.items():
        layer = options.pop("layer", "head")
        stage = parse_layer(layer)
        if stage is not None and not reads_features(name, options):
            raise ValueError(f"{name} reads the logits, so its layer can only be 'head', got "
                             f"{layer!r}; a layer applies to feature losses (mse, at, nfd, "
                             "skd, ifvd, cirkd, afdcd, cwd with on=feats)")
        layers[name] = stage
    return spec, layers


def _options(cls: type[nn.Module]) -> tuple[set[str], list[str]]:
    """(context arguments the class takes, options a spec may set) from its signature."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    context = {p.name for p in params if p.name in _CONTEXT}
    return context, [p.name for p in params if p.name not in _CONTEXT]


def build_losses(spec: Mapping[str, float | Mapping | None], *, student_channels: int,
                 teacher_channels: int, num_classes: int, seed: int | None = None
                 ) -> nn.ModuleDict:
    """Builds loss modules by name from a plain dict.

    Args:
        spec: method name -> a weight (``"kd": 1.0``), a dict of options with an optional
            ``"weight"`` (``"nfd": {"weight": 2.0, "norm": "spatial"}``), or None for the
            defaults. Names are the keys of :data:`METHODS`; options are the keyword
            arguments of the method's module, except the three below, which come from
            this function's arguments.
        student_channels: ``C_s`` of the student's features.
        teacher_channels: ``C_t`` of the teacher's features.
        num_classes: number of classes ``K``.
        seed: the run's seed, given to a loss that draws at random (one with a ``seed``
            argument: CIRKD's memories) unless the spec sets its own; None leaves the
            loss's default.

    Returns:
        An ``nn.ModuleDict`` in the order of ``spec``; each module has a float
        ``loss_weight`` attribute (>= 0; 0 keeps the loss for logging only).

    Raises:
        ValueError: an unknown method name (the message lists the choices), an unknown
            option (named, with the accepted ones), or a weight that is not a finite
            number >= 0.
    """
    context = {"student_channels": student_channels, "teacher_channels": teacher_channels,
               "num_classes": num_classes}
    losses = nn.ModuleDict()
    for name, value in spec.items():
        if method_of(name) not in METHODS:
            raise ValueError(f"unknown distillation method {name!r}: choose from "
                             f"{', '.join(METHODS)}")
        info = METHODS[method_of(name)]
        options = as_options(value)
        weight = options.pop("weight", info.weight)
        if _bad_weight(weight):
            raise ValueError(f"{name}: the weight must be a finite number >= 0, got {weight!r}")
        needs, accepted = _options(info.loss)
        for key in options:
            if key in _CONTEXT:
                raise ValueError(f"{name}: {key!r} comes from build_losses' own argument, "
                                 "not from the spec")
            if key not in accepted:
                raise ValueError(f"{name}: unknown option {key!r} for {info.loss.__name__}; "
                                 f"accepted: weight{''.join(', ' + a for a in accepted)}")
        if seed is not None and "seed" in accepted:
            options.setdefault("seed", seed)
        module = info.loss(**{k: context[k] for k in needs}, **options)
        module.loss_weight = float(weight)
        losses[name] = module
    return losses


def method_label(methods: Mapping) -> str:
    """The group name of a methods dict: loss names joined by ``+``, each with ``@layer``
    when it distils an encoder stage (``"fakd+nfd@stage2"``), ``"baseline"`` when empty."""
    names = []
    for name, value in sorted(methods.items()):
        options = as_options(value)
        layers = list(options["layers"]) if options.get("layers") else [options.get("layer", "head")]
        names.append(name if layers == ["head"] else f"{name}@{','.join(layers)}")
    return "+".join(names) or "baseline"
