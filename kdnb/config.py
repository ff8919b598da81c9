"""Run configurations: one dataclass, a comment on each default, and named recipes.

A run's config is saved as ``config.json`` in its run directory and inside every
checkpoint, so a result can always be traced to the settings that produced it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    """Everything a supervised (or, later, distillation) run needs."""

    # What to train, on what.
    model: str = "synth-student"      # a preset name from kdnb.models.PRESETS
    data: str = "synth"               # synth | voc | cityscapes | ade20k | camvid
    root: str | None = None           # data root; default KDNB_DATA or <repo>/data
    data_kwargs: dict = field(default_factory=dict)  # e.g. {"size": 96} for synth
    encoder_weights: str | None = None  # "imagenet" needs the network or a warm cache
    encoder_init: str | None = None   # a pretext encoder file (kdnb.pretrain) to start from
    model_kwargs: dict = field(default_factory=dict)  # smp overrides, e.g. {"decoder_dropout": 0.0}
    # Distillation (empty methods: supervised training alone).
    teacher: str | None = None        # path of the teacher's model.pt (frozen, eval mode)
    methods: dict = field(default_factory=dict)  # e.g. {"kd": 1.0, "nfd": {"weight": 2.0}, "fakd": {}}
    task_weight: float = 1.0          # weight of the cross-entropy on the labels
    cache_teacher: bool = False       # compute the teacher's outputs once (fixed training pool)
    # Optimization (docs/METHODS.md, "Training recipe": SGD 0.02, momentum 0.9, wd 1e-4, poly 0.9).
    steps: int = 1000                 # optimizer steps
    batch_size: int = 16              # global batch (split across DDP ranks)
    optimizer: str = "sgd"            # sgd | adamw
    lr: float = 0.02                  # peak learning rate
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 1e-4
    poly_power: float = 0.9           # lr = peak * (1 - step / steps) ** power
    warmup_steps: int = 0             # linear warm-up before the poly decay
    # Augmentation (None: the dataset's default; synth has no crop and no rescale).
    crop_size: tuple[int, int] | None = None
    scale_range: tuple[float, float] | None = None
    flip: bool = True
    # Evaluation, logging and checkpoints.
    eval_every: int = 250             # steps between evaluations (0: only at the end)
    eval_split: str = "val"           # model selection happens on val, never on test
    eval_batch_size: int = 16         # 1 for datasets with images of different sizes
    log_every: int = 25               # steps between train-loss log lines (one host sync)
    ckpt_every: int = 250             # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2         # older ones are deleted
    count_flops: bool = True          # count the FLOPs of one step (on copies) for cost.json
                                      # (kdnb.cost); off where that is slow or does not fit
    # Machine.
    seed: int = 0                     # model init, data order, augmentation
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True        # channels-last memory format on CUDA
    workers: int = 0                  # DataLoader workers (0: load in the main process)
    threads: int | None = None        # torch CPU threads (None: leave torch's default)
    sync_bn: bool = False             # convert BatchNorm to SyncBatchNorm under DDP (CUDA only)
    freeze_bn: bool = False           # BatchNorm uses its running statistics, never updates them
    # Reliability.
    skip_nonfinite: bool = False      # skip steps with a NaN/Inf loss or gradient (one host sync
                                      # per step) instead of stopping the run at the first one

    def __post_init__(self):
        wrong = [f"{k}={getattr(self, k)!r} ({need})" for k, need in self._type_problems()]
        if wrong:  # before the range checks, which compare numbers
            raise ValueError(f"config values of the wrong type: {', '.join(wrong)}: change them "
                             "in the config file or on the command line")
        if self.crop_size is not None:
            self.crop_size = tuple(self.crop_size)
        if self.scale_range is not None:
            self.scale_range = tuple(self.scale_range)
        problems = [f"{k}={getattr(self, k)!r} ({need})" for k, need in self._range_problems()]
        if problems:
            raise ValueError(f"config values out of range: {', '.join(problems)}: change them in "
                             "the config file or on the command line")
        if self.encoder_init and self.encoder_weights:
            raise ValueError("encoder_weights and encoder_init both set the encoder's initial "
                             "weights: choose one")
        if self.methods and not self.teacher:
            raise ValueError(f"methods {sorted(self.methods)} need a teacher: pass --teacher "
                             "PATH/model.pt (train one with `kdnb train`)")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: choose 'sgd' or 'adamw'")
        # the method-spec language lives with the losses (kdnb.losses.spec); imported here,
        # not at the top, so that the config, the lowest layer, does not load the losses
        from .losses.spec import as_options, method_problems

        problems = method_problems(self.methods)
        if problems:
            raise ValueError(f"distillation methods: {'; '.join(problems)}")
        if self.methods and self.task_weight == 0 and all(as_options(v).get("weight") == 0
                                                          for v in self.methods.values()):
            raise ValueError("task_weight=0 and no distillation loss with a weight > 0: nothing "
                             "would train; give the task or a method a weight > 0")

    def _type_problems(self) -> list[tuple[str, str]]:
        """(field, what it must be) for every field whose value has the wrong type (a JSON
        config can hold ``"steps": "30"``, ``[30]`` or ``2.5``)."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            kinds = [k.strip() for k in hint.split("|")]  # "tuple[int, int] | None"
            kind = kinds[0].partition("[")[0]
            if (value is None and "None" in kinds) or kind not in _TYPES:
                continue
            types = _TYPES[kind][0]
            if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
                need = _TYPES[kind][1] + (", or null" if "None" in kinds else "")
                if isinstance(value, str) and kind in ("int", "float") and _is_number(value):
                    need += f": write {value.strip()} without quotes"
                elif kind == "int" and isinstance(value, float) and math.isfinite(value):
                    need += (f": write {int(value)}" if value.is_integer()
                             else f" such as {math.floor(value)} or {math.ceil(value)}")
                problems.append((f.name, f"{json_kind(value)}; must be {need}"))
        return problems

    def _range_problems(self) -> list[tuple[str, str]]:
        """(field, what it must be) for every field out of range."""
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        checks = {
            "steps": (self.steps > 0, "must be > 0"),
            "batch_size": (self.batch_size > 0, "must be > 0"),
            "lr": (number(self.lr) and self.lr > 0, "must be a finite number > 0"),
            "momentum": (0 <= self.momentum < 1, "must be in [0, 1)"),
            "weight_decay": (number(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            "poly_power": (self.poly_power >= 0, "must be >= 0"),
            "warmup_steps": (0 <= self.warmup_steps < max(self.steps, 1),
                             f"must be >= 0 and below steps={self.steps}"),
            "eval_every": (self.eval_every >= 0, "must be >= 0 (0: only at the end)"),
            "eval_batch_size": (self.eval_batch_size > 0, "must be > 0"),
            "ckpt_every": (self.ckpt_every >= 0, "must be >= 0 (0: only at the end)"),
            "log_every": (self.log_every > 0, "must be > 0"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "must be >= 1"),
            "workers": (self.workers >= 0, "must be >= 0"),
            "threads": (self.threads is None or self.threads >= 1, "must be >= 1, or None"),
            "task_weight": (number(self.task_weight) and self.task_weight >= 0,
                            "must be a finite number >= 0"),
            "crop_size": (self.crop_size is None or (
                len(self.crop_size) == 2 and all(isinstance(c, int) and c > 0
                                                 for c in self.crop_size)),
                          "must be two positive integers (H, W), or None"),
            "scale_range": (self.scale_range is None or (
                len(self.scale_range) == 2 and all(number(x) for x in self.scale_range)
                and 0 < self.scale_range[0] <= self.scale_range[1]),
                            "must be (min, max) with 0 < min <= max, or None"),
        }
        return [(k, need) for k, (ok, need) in checks.items() if not ok]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> dict:
        """:meth:`to_dict` as JSON stores it (tuples become lists): what ``config.json``
        holds and what a saved config is compared with."""
        return json.loads(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


#: annotation -> (the Python types a value may have, what the message calls it)
_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"),
          "bool": (bool, "true or false"), "str": (str, "a string"),
          "dict": (dict, "an object of options"), "tuple": ((tuple, list), "a pair [a, b]")}


def read_json_object(path: str | Path, what: str, fix: str) -> dict:
    """A JSON file that must hold an object (a config, a result); an error names the file,
    what is wrong with it (not JSON, cut short, a list...) and ``fix``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not a text file ({err.reason}): {fix}") from None
    except ValueError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}; cut short or edited?): "
                         f"{fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} holds {json_kind(value)}, not an object {{...}}: {fix}")
    return value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def json_kind(value) -> str:
    """What JSON calls a value's type, for messages: ``[30]`` -> "a list"."""
    for types, name in ((bool, "true or false"), (str, "a string"), ((int, float), "a number"),
                        ((list, tuple), "a list"), (dict, "an object")):
        if isinstance(value, types):
            return name
    return "null" if value is None else f"a {type(value).__name__}"


def settings_key(settings: dict) -> str:
    """A short, stable hash of a settings dict (sorted keys; tuples hash as lists)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()
                          ).hexdigest()[:10]


#: Fields that change how a run is watched or where it runs, not the weights it trains.
NOT_IN_CACHE_KEY = ("eval_every", "log_every", "ckpt_every", "keep_checkpoints", "workers",
                    "threads", "eval_batch_size", "device", "count_flops")


def config_hash(cfg: TrainConfig) -> str:
    """A short hash of the settings that change the trained weights (a cache key).

    Settings at their default value are left out, so a new config field does not
    invalidate the models cached before it existed; the teacher and a pretext encoder count
    by their file names (themselves cache keys), so the same files cached under another
    data root match.
    """
    defaults = TrainConfig().to_dict()
    d = {k: v for k, v in cfg.to_dict().items() if v != defaults[k] and k not in NOT_IN_CACHE_KEY}
    for k in ("teacher", "encoder_init"):  # by file name: the file names are cache keys
        if d.get(k):
            d[k] = Path(d[k]).name
    return settings_key(d)


#: Recipes for SynthScenes on a 2-core CPU: AdamW converges in the few minutes a CPU
#: budget allows, where SGD (the real-data recipe) needs far more steps from scratch.
SYNTH_SIZE = 64
#: The training annotation is partial, as real annotation is (Cityscapes' void and coarse
#: sets, VOC's boundary band, ADE20K's "other"): half of the objects of a training scene
#: carry no label (``SynthScenes(unlabelled=0.5)``); val and test masks are complete. A
#: teacher's predictions cover those pixels too; on fully annotated scenes pixel KD's
#: gain stays within two paired standard deviations of zero (benchmarks/RESULTS.md).
SYNTH_DATA = {"size": SYNTH_SIZE, "unlabelled": 0.5}
RECIPES: dict[str, TrainConfig] = {
    "synth-teacher": TrainConfig(model="synth-teacher", data="synth",
                                 data_kwargs=dict(SYNTH_DATA), steps=1800, batch_size=16,
                                 optimizer="adamw", lr=1e-3, eval_every=600, ckpt_every=300),
    "synth-student": TrainConfig(model="synth-student", data="synth",
                                 data_kwargs=dict(SYNTH_DATA), steps=1200, batch_size=16,
                                 optimizer="adamw", lr=1e-3, eval_every=600, ckpt_every=300),
}


def get_recipe(name: str) -> TrainConfig:
    try:
        recipe = RECIPES[name]
        return dataclasses.replace(recipe, data_kwargs=dict(recipe.data_kwargs))
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}") from None
