"""The experiment library: the comparison every SynthScenes study runs, and a model cache.

``make demo``, the notebooks and ``benchmarks/synth_distill.py`` compare the same methods,
defined once here (the demo trains them for fewer steps, and ``make demo`` from a shorter
teacher: :mod:`kdnb.demo`): :data:`COMPARISON` (method name -> ``methods``, weights chosen
on the val split; the sweeps are in benchmarks/RESULTS.md), :func:`teacher_config` and
:func:`student_config` (the paired recipes). :func:`train_or_load` trains a config once
and caches its model under ``<data root>/checkpoints``, keyed by
:func:`kdnb.config.config_hash`, so a second run of a notebook or of the demo takes
seconds.

Introduced in notebooks/04_distillation_runs.ipynb.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .build import build_trainer
from .checkpoint import (RESUME_MAY_CHANGE, config_differences, holds_run, model_from_checkpoint,
                         saved_config)
from .config import TrainConfig, config_hash, get_recipe, settings_key
from .data import data_root
from .distill import TeacherOutputs
from .models import SegModel

#: method name -> the ``methods`` of its student run. Weights chosen on val, seed 0, for the
#: partly annotated recipes (benchmarks/RESULTS.md, "Weight sweeps on partly annotated
#: SynthScenes"); the layer (encoder stage 2) was chosen on the fully annotated ones ("Which
#: layer to distil"); KD's temperature (1 / 2 / 4) and FAKD's lambda_0 with KD (0.1 / 0.3)
#: and with NFD at stage 2 (0.1 / 0.3 / 1) on val as well.
COMPARISON: dict[str, dict] = {
    "baseline": {},
    "kd": {"kd": {"weight": 1.0, "temperature": 1.0}},
    "mse": {"mse": {"weight": 0.25}},
    "cwd": {"cwd": {"weight": 3.0}},
    "nfd": {"nfd": {"weight": 0.5}},
    "nfd+fakd": {"nfd": {"weight": 0.5}, "fakd": {"lambda_0": 1.0}},
    "kd+fakd": {"kd": {"weight": 1.0, "temperature": 1.0}, "fakd": {"lambda_0": 0.3}},
    # The same losses on the encoder's stride-4 stage instead of the head feature (layer
    # sweep on val: stage 2 is where feature distillation helps this student).
    "mse-stage2": {"mse": {"weight": 64.0, "layer": "stage2"}},
    "nfd-stage2": {"nfd": {"weight": 32.0, "layer": "stage2"}},
    "nfd-stage2+fakd": {"nfd": {"weight": 32.0, "layer": "stage2"}, "fakd": {"lambda_0": 1.0}},
    "mse-stage2+fakd": {"mse": {"weight": 64.0, "layer": "stage2"}, "fakd": {"lambda_0": 1.0}},
}

#: The authors' own choices, as variants of COMPARISON's methods (docs/METHODS.md says where
#: each comes from). ``benchmarks/synth_distill.py`` runs them by name beside COMPARISON.
ENCODER_STAGES = ("stage1", "stage2", "stage3", "stage4")
_KD = {"weight": 1.0, "temperature": 1.0}
_NFD_STAGE2 = {"weight": 32.0, "layer": "stage2"}
#: FAKD as its first author's MKD code runs the augmentation: a per-class diagonal
#: variance, a cosine ramp to a final strength of 2, the classifier detached inside the
#: bound, the teacher's logits moved as well (the last two apply to logits only).
FAKD_MKD = {"lambda_0": 2.0, "schedule": "cosine", "diagonal": True}
VARIANTS: dict[str, dict] = {
    # Several encoder stages in one run, one weight each (FastSegFormer's reading of NFD
    # distils several intermediate maps); "-frob": its unsquared Frobenius distance.
    "mse-multi": {"mse": {"layers": {s: 64.0 for s in ENCODER_STAGES}}},
    "nfd-multi": {"nfd": {"layers": {s: 32.0 for s in ENCODER_STAGES}}},
    "nfd-multi-frob": {"nfd": {"reduction": "frobenius",
                               "layers": {s: 32.0 for s in ENCODER_STAGES}}},
    "nfd-stage2-frob": {"nfd": {**_NFD_STAGE2, "reduction": "frobenius"}},
    "kd+fakd-mkd": {"kd": {**_KD},
                    "fakd": {**FAKD_MKD, "detach_classifier": True, "augment_teacher": True}},
    # ISDA's segmentation setting: diagonal variance, a linear ramp to 7.5.
    "kd+fakd-isda": {"kd": {**_KD}, "fakd": {"lambda_0": 7.5, "diagonal": True}},
    "nfd-stage2+fakd-mkd": {"nfd": {**_NFD_STAGE2}, "fakd": {**FAKD_MKD}},
}

#: The strongest methods with public code, as their authors' scripts train them: pixel KD at
#: T = 1 and weight 1 beside the method's own loss at its authors' defaults (configs/README.md
#: has the recipes per dataset). The method's loss comes first, so that a weight sweep
#: (``synth_distill.py --sweep``) scales it and leaves KD as it is. Both read the head
#: feature: Af-DCD's scripts read the encoder's last stage, which is 2x2 on a 64-pixel
#: SynthScenes image, smaller than its 4x4 pooling window; the head feature (16x16, stride
#: 4) is the map nearest in resolution to the one its authors distil (stride 8, dilated).
PUBLIC: dict[str, dict] = {
    "kd+cirkd": {"cirkd": {"weight": 1.0}, "kd": {**_KD}},
    "kd+afdcd": {"afdcd": {"weight": 1.0}, "kd": {**_KD}},
}


def quick_config(cfg: TrainConfig) -> TrainConfig:
    """A tiny budget that exercises every code path in seconds (tests, ``KDNB_QUICK=1``)."""
    return cfg.replace(steps=12, batch_size=4, eval_every=6, ckpt_every=0, log_every=3,
                       data_kwargs={**cfg.data_kwargs, "size": 64, "length": 48})


def teacher_config(*, quick: bool = False) -> TrainConfig:
    """The SynthScenes teacher every comparison distills from (``synth-teacher``)."""
    cfg = get_recipe("synth-teacher")
    return quick_config(cfg) if quick else cfg


def student_config(methods: dict, *, seed: int = 0, teacher: str | Path | None = None,
                   quick: bool = False, **changes) -> TrainConfig:
    """One student of a paired comparison: the ``synth-student`` recipe with ``methods``.

    Every student of a comparison, the baseline included, trains on the same fixed pool
    (no flip; SynthScenes already varies scale, rotation and colour) from the same initial
    weights in the same data order for a given seed, so a method's gain is a per-seed
    difference. The pool being fixed, the teacher's outputs are computed once
    (``cache_teacher``) and a distillation step costs what a baseline step costs (the
    cache itself once: ``teacher_cache_flops`` in the run's cost.json, :mod:`kdnb.cost`).
    """
    cfg = get_recipe("synth-student")
    if quick:
        cfg = quick_config(cfg)
    if methods and teacher is None:
        raise ValueError("a distillation student needs the teacher's checkpoint: pass "
                         "teacher=cache_path(teacher_config())")
    return cfg.replace(seed=seed, flip=False, methods=methods,
                       teacher=str(teacher) if methods else None,
                       cache_teacher=bool(methods), **changes)


def cache_path(cfg: TrainConfig) -> Path:
    """Where :func:`train_or_load` keeps the model ``cfg`` trains."""
    return data_root(cfg.root) / "checkpoints" / f"{cfg.model}-{config_hash(cfg)}.pt"


def cache_log(cfg: TrainConfig) -> Path:
    """The training log kept beside the cached model (a copy of its run's ``metrics.jsonl``),
    so that a notebook loading the model from the cache can replay its curves wherever the
    run was trained (``kdnb.viz.LiveCurves.replay``)."""
    return cache_path(cfg).with_suffix(".jsonl")


def train_or_load(cfg: TrainConfig, run_dir: Path, *, fresh: bool = False,
                  progress: bool = True, callbacks=None,
                  teacher_outputs: TeacherOutputs | None = None) -> tuple[SegModel, bool]:
    """Returns the model trained by ``cfg``, from the cache when it holds one.

    The cache key hashes every setting that changes the weights (the teacher by its file
    name, which is itself a cache key), so a changed recipe never reuses a stale
    checkpoint; the run's log is cached beside it (:func:`cache_log`). A distillation
    config trains with the teacher; give the students of one comparison the same
    ``teacher_outputs`` (:class:`kdnb.distill.TeacherOutputs`) and the teacher's outputs
    are computed once for all of them. Returns ``(model, reused)``.
    """
    cached = cache_path(cfg)
    if cached.is_file() and not fresh:
        return model_from_checkpoint(cached, preset=cfg.model), True
    if not fresh:  # a fresh run starts over wherever it is
        set_aside_other_settings(run_dir, cfg)
    trainer = build_trainer(cfg, run_dir, progress=progress, callbacks=callbacks,
                            teacher_outputs=teacher_outputs)
    trainer.fit(resume=holds_run(run_dir) and not fresh)
    cached.parent.mkdir(parents=True, exist_ok=True)
    for source, target in ((run_dir / "metrics.jsonl", cache_log(cfg)), (run_dir / "model.pt", cached)):
        if source.is_file():  # the log first: a cached model always has its log beside it
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(source.read_bytes())
            os.replace(tmp, target)
    return trainer.model.cpu().eval(), False


def set_aside_other_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Keeps one run directory per setting: a run left in ``run_dir`` by other settings (a
    recipe or ``COMPARISON`` changed since, another data root) is renamed
    ``<name>-<key of its settings>``, neither resumed nor deleted, and a run set aside
    earlier for ``cfg``'s settings comes back, so returning to them resumes it.

    The key covers what the Trainer's resume rule compares
    (:func:`kdnb.checkpoint.config_differences`): two settings a run could not resume
    across never share a folder.
    """
    def aside(settings: dict) -> Path:
        kept = {k: v for k, v in settings.items() if k not in RESUME_MAY_CHANGE}
        return run_dir.with_name(f"{run_dir.name}-{settings_key(kept)}")

    wanted = aside(cfg.to_json())
    saved = saved_config(run_dir / "config.json")
    if saved is not None:
        if not config_differences(saved, cfg):
            return
        if aside(saved).exists():  # an older copy of the same settings: the newer one wins
            shutil.rmtree(aside(saved))
        os.replace(run_dir, aside(saved))
        print(f"{run_dir} held a run with other settings: moved to {aside(saved)}", flush=True)
    if wanted.is_dir():
        if run_dir.exists():  # no config.json: a run killed before it wrote one, nothing to keep
            shutil.rmtree(run_dir)
        os.replace(wanted, run_dir)
        print(f"resuming the run set aside in {wanted}", flush=True)
