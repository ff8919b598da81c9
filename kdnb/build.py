"""From a config to a trainer: the one place where a run's parts are built.

:func:`build_trainer` reads a :class:`kdnb.config.TrainConfig` and builds, in this order,
everything a :class:`kdnb.train.Trainer` is handed: the checks that can fail cheaply
(methods, teacher file, dataset), the process group and device, the datasets, the
student, the teacher and the distillation losses, the teacher's cached outputs, the
optimizer and the schedule. The CLI, the notebooks and the benchmarks all build their
trainers here.

The order is part of the result: the global generator is seeded once, then the student,
the teacher and the losses' adapters are built from it, in that order, so a seed gives
the same initial weights every time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, model_from_record
from .config import TrainConfig
from .data import build_dataset, check_dataset_options, dataset_info, validate_dataset
from .distill import TeacherOutputs, build_distill_losses
from .losses.spec import method_problems, resolve_methods, split_layers
from .models import build_model, check_model_options, get_preset
from .optim import build_optimizer, build_scheduler
from .pretrain import load_encoder
from .runtime import init_distributed, resolve_device, seed_everything
from .train import Callback, Trainer


def check_teacher(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Loads the teacher's checkpoint and checks that it can teach this run's student.

    Cheap (no data read, no model built), so a pair that cannot be distilled fails before
    any long work: a teacher inside the run directory (whose files the run
    writes), a damaged checkpoint, another class count or dataset, an unknown preset
    (unknown methods are refused when the config is built).

    Returns:
        The loaded checkpoint (:func:`kdnb.checkpoint.load_checkpoint`).
    """
    teacher, run = Path(cfg.teacher), Path(run_dir)
    if (teacher.resolve().parent == run.resolve()
            and (teacher.name == "model.pt" or teacher.name.startswith("ckpt-"))):
        raise ValueError(f"the teacher {teacher} lies in the run directory {run}, where this run "
                         "writes its own model.pt and checkpoints: choose another --run-dir")
    try:
        ckpt = load_checkpoint(teacher)
    except CheckpointError as err:
        raise CheckpointError(f"the teacher cannot be used: {err}") from err
    classes = dataset_info(cfg.data)["num_classes"]
    if ckpt["num_classes"] != classes:
        raise ValueError(f"checkpoint {teacher} predicts {ckpt['num_classes']} classes but the "
                         f"dataset has {classes}: it was trained on another dataset; pass a "
                         f"teacher trained on {cfg.data} (kdnb train --data {cfg.data})")
    trained_on = (ckpt.get("config") or {}).get("data")
    if trained_on and trained_on != cfg.data:
        raise ValueError(f"the teacher {teacher} was trained on {trained_on} but the student "
                         f"trains on {cfg.data}: pass a teacher trained on {cfg.data} "
                         f"(kdnb train --data {cfg.data})")
    get_preset(ckpt["preset"])
    return ckpt


def check_fixed_pool(train_set) -> None:
    """Cached teacher outputs need a training transform that is the identity."""
    transform = getattr(train_set, "transform", None)
    fixed = (transform is None or (not transform.flip and transform.crop_size is None
                                   and tuple(transform.scale_range) == (1.0, 1.0)))
    if not fixed:
        raise ValueError("cache_teacher needs a fixed training pool: set flip=False and no "
                         "random scale or crop (SynthScenes: --no-flip), or turn the cache off")


def smallest_eval_batch(n: int, batch_size: int, world: int = 1) -> int:
    """The fewest images :func:`kdnb.metrics.evaluate` puts in one batch: the last batch of
    the smallest non-empty shard."""
    shards = [len(range(rank, n, world)) for rank in range(world)]
    return min((k % batch_size) or batch_size for k in shards if k) if n else batch_size


def _forward_error(model: nn.Module, size: tuple[int, int], batch: int, device) -> Exception | None:
    """What one eval-mode forward pass of ``batch`` blank images of ``size`` raises, or None."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, *size, device=device))
    except (RuntimeError, ValueError) as err:
        return err
    finally:
        model.train(was_training)
    return None


def check_eval_sizes(model: nn.Module, sizes: dict[tuple[int, int], str], *, batch: int,
                     device, split: str) -> None:
    """Evaluates blank images of the evaluation set's hardest size once, at start-up, so an
    image the model cannot take fails now instead of at the first evaluation, after the
    training.

    The hardest size is the one with the fewest pixels once padded to the model's stride
    (at stride 32 a 32x32 image reaches the deepest layers as one pixel, which GroupNorm
    refuses in a batch of one); ``batch`` is the smallest batch evaluation forms
    (:func:`smallest_eval_batch`). The forward pass runs in eval mode without gradients:
    no weight, statistic or random stream changes.

    Raises:
        ValueError: naming the file, its size, the size the model needs and the fix.
    """
    if not sizes:
        return
    stride = getattr(model, "stride", 1)

    def padded(hw):
        return -(-hw[0] // stride) * -(-hw[1] // stride)

    (h, w), where = min(sizes.items(), key=lambda item: (padded(item[0]), item[0]))
    err = _forward_error(model, (h, w), batch, device)
    if err is None:
        return
    sides = [k * stride + 1 for k in range(1, 9)]  # each the smallest of its padded size
    need = next((side for side in sides
                 if _forward_error(model, (max(h, side), max(w, side)), batch, device) is None),
                None)
    takes = (f"it takes images of {need}x{need} pixels" if need is not None
             else f"no size up to {sides[-1]}x{sides[-1]} worked either")
    preset = getattr(model, "preset", type(model).__name__)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise ValueError(f"{preset} cannot evaluate the {split} images: the smallest, {where} "
                     f"({h}x{w}, {batch} at a time), fails in the forward pass ({reason}); "
                     f"{takes}: use larger images (resize the dataset) or another --model")


def build_trainer(cfg: TrainConfig, run_dir: str | Path, *, model: nn.Module | None = None,
                  teacher: nn.Module | None = None, train_set=None, eval_set=None,
                  callbacks: list[Callback] | None = None, progress: bool = True,
                  teacher_outputs: TeacherOutputs | None = None,
                  trainer_class: type[Trainer] = Trainer) -> Trainer:
    """Builds the parts of a run from ``cfg`` and hands them to a trainer.

    A config with a ``teacher`` trains a student with the teacher and ``cfg.methods``
    (:mod:`kdnb.losses.spec`); without one, a model on the labels alone.

    Args:
        cfg: the run's config.
        run_dir: its run directory (nothing is written until :meth:`Trainer.fit`).
        model, teacher, train_set, eval_set: parts of your own, used instead of the ones
            ``cfg`` names (a model or a teacher in memory, datasets that live nowhere on
            disk); they are moved to the device and checked like the built ones. A teacher
            given here is used as it is (``cfg.teacher`` then only labels it).
        callbacks: called with every log record (live plots).
        progress: show a tqdm bar.
        teacher_outputs: with ``cfg.cache_teacher``, the cache of the teacher's outputs;
            pass one object to the students of a comparison so the outputs are computed
            once (default: a new one).
        trainer_class: :class:`kdnb.train.Trainer` or a subclass.

    Raises:
        ValueError, FileNotFoundError, CheckpointError: a config, a dataset or a teacher
            that cannot work, before any long work starts; the message says how to fix it.
    """
    problems = method_problems(cfg.methods)  # again: a config may change after it is built
    if problems:
        raise ValueError("; ".join(problems))
    # A misspelt option would otherwise train with its default and be recorded as used.
    if model is None:
        check_model_options(cfg.model, cfg.model_kwargs)
    if train_set is None or eval_set is None:
        check_dataset_options(cfg.data, cfg.data_kwargs)
    if teacher is not None and not cfg.teacher:
        raise ValueError("a teacher given in memory needs cfg.teacher set (a label such as "
                         "'(in memory)'): without it the run trains on the labels alone")
    if cfg.cache_teacher and cfg.teacher and (teacher is not None or train_set is not None):
        raise ValueError("cache_teacher keys the cached outputs by the teacher's file and the "
                         "config's dataset: give both through the config (cfg.teacher, "
                         "cfg.data), or turn the cache off")
    teacher_ckpt = None
    if cfg.teacher:
        # The pair and the methods are checked before any data is read or model built.
        teacher_ckpt = check_teacher(cfg, run_dir) if teacher is None else None
        split_layers(resolve_methods(cfg.methods))  # a spec that does not parse fails now
    if cfg.encoder_init and not Path(cfg.encoder_init).is_file():
        raise FileNotFoundError(f"encoder_init {cfg.encoder_init} does not exist: pretrain the "
                                f"encoder first (kdnb pretrain --preset {cfg.model})")
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    if cfg.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU "
                         "leave it off: each process then normalizes its own shard")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    num_classes = getattr(train_set, "num_classes", None) or dataset_info(cfg.data)["num_classes"]
    get_preset(cfg.model)  # fail on a bad preset name before any data is read
    if model is not None and getattr(model, "preset", None) != cfg.model:
        raise ValueError(f"the model given is preset {getattr(model, 'preset', None)!r} but "
                         f"cfg.model is {cfg.model!r}: set cfg.model to the model's preset "
                         "(config.json and the cache key record it)")
    for role, given in (("model", model), ("teacher", teacher)):
        if given is not None and getattr(given, "num_classes", None) != num_classes:
            raise ValueError(f"the {role} given predicts {getattr(given, 'num_classes', '?')} "
                             f"classes but the training data has {num_classes}")
    if train_set is None:
        train_set = build_dataset(cfg.data, cfg.root, "train", train=True,
                                  crop_size=cfg.crop_size, scale_range=cfg.scale_range,
                                  flip=cfg.flip, seed=cfg.seed, **cfg.data_kwargs)
    if eval_set is None:
        eval_set = build_dataset(cfg.data, cfg.root, cfg.eval_split, train=False,
                                 **cfg.data_kwargs)
    # Damaged files, bad labels or a crop that padding would fill fail here, before
    # models are built or a step runs, not hours into the run.
    validate_dataset(train_set)
    eval_sizes = validate_dataset(eval_set)
    if cfg.cache_teacher and cfg.teacher:
        check_fixed_pool(train_set)
    channels_last = device.type == "cuda" and cfg.channels_last
    seed_everything(cfg.seed)
    if model is None:
        model = build_model(cfg.model, num_classes, encoder_weights=cfg.encoder_weights,
                            **cfg.model_kwargs)
        if cfg.encoder_init:  # the pretrained regime: a pretext encoder (kdnb.pretrain)
            load_encoder(model, cfg.encoder_init)
    if world > 1 and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    losses = cache = None
    trainable: nn.Module = model
    if cfg.teacher:
        if teacher is None:
            teacher = model_from_record(teacher_ckpt, cfg.teacher, num_classes=num_classes)
        teacher = teacher.to(device).eval().requires_grad_(False)
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        losses = build_distill_losses(cfg.methods, student=model, teacher=teacher,
                                      num_classes=num_classes, seed=cfg.seed).to(device)
        trainable = nn.ModuleList([model, losses])  # the adapters train with the student
        if cfg.cache_teacher:
            pool = getattr(train_set, "dataset", train_set)
            amp = device.type == "cuda" and cfg.amp
            key = TeacherOutputs.pool_key(cfg.teacher, {
                "data": cfg.data, "root": str(cfg.root), "data_kwargs": cfg.data_kwargs,
                "length": len(pool)}, device, amp)
            cache = (teacher_outputs or TeacherOutputs()).get(
                teacher, pool, losses.stages, key=key, device=device, amp=amp)
    optimizer = build_optimizer(trainable, cfg)
    # Last, after every random draw of the set-up: an image size the model cannot evaluate
    # fails now, not at the first evaluation after hours of training.
    check_eval_sizes(model, eval_sizes, device=device, split=cfg.eval_split,
                     batch=smallest_eval_batch(len(eval_set), cfg.eval_batch_size, world))
    return trainer_class(cfg, run_dir, model=model, train_set=train_set, eval_set=eval_set,
                         optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg),
                         device=device, teacher=teacher, losses=losses, teacher_cache=cache,
                         rank=rank, world=world, callbacks=callbacks, progress=progress)
