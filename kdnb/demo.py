"""The main job on the embedded dataset: what ``make demo`` and ``kdnb demo`` run.

Trains (or reuses a cached) SynthScenes teacher, then a budgeted comparison of students
(baseline, KD, and NFD and NFD+FAKD on encoder stage 2 by default, one seed, paired: same
initial weights and data order), reports every model on the test split with the share of
the teacher-student gap each method recovers, and writes a PNG of predictions beside the
ground truth.

The comparison the demo, notebook 04 and ``benchmarks/synth_distill.py`` run is defined
once here (:data:`COMPARISON`, :func:`student_config`), with the loss weights chosen on the
val split (the sweeps are in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import TrainConfig, get_recipe
from .data import build_dataset, data_root
from .models import SegModel
from .train import (RESUME_MAY_CHANGE, config_differences, config_hash, evaluate, make_trainer,
                    model_from_checkpoint, saved_config, seed_everything)

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
#: What ``make demo`` compares after the teacher (one seed): NFD and NFD+FAKD at the layer
#: chosen on val (encoder stage 2), pixel KD on the logits.
DEMO_METHODS = ("baseline", "kd", "nfd-stage2", "nfd-stage2+fakd")
#: Student steps in the demo: the comparison of four students fits in the 15-minute
#: budget of ``make demo`` (the benchmark trains the full ``synth-student`` recipe).
DEMO_STUDENT_STEPS = 500


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
    (``cache_teacher``) and a distillation run costs what the baseline costs.
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
    return data_root(cfg.root) / "checkpoints" / f"{cfg.model}-{config_hash(cfg)}.pt"


def train_or_load(cfg: TrainConfig, run_dir: Path, *, fresh: bool = False,
                  progress: bool = True, callbacks=None) -> tuple[SegModel, bool]:
    """Returns the model trained by ``cfg``, from the cache when it holds one.

    The cache key hashes every setting that changes the weights (the teacher by its file
    name, which is itself a cache key), so a changed recipe never reuses a stale
    checkpoint. A distillation config trains with the teacher. Returns ``(model, reused)``.
    """
    cached = cache_path(cfg)
    if cached.is_file() and not fresh:
        return model_from_checkpoint(cached, preset=cfg.model), True
    if not fresh:  # a fresh run starts over wherever it is
        _set_aside_other_settings(run_dir, cfg)
    trainer = make_trainer(cfg, run_dir, progress=progress, callbacks=callbacks)
    trainer.fit(resume=run_dir.joinpath("config.json").is_file() and not fresh)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_bytes((run_dir / "model.pt").read_bytes())
    os.replace(tmp, cached)
    return trainer.model.cpu().eval(), False


def _set_aside_other_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Keeps one run directory per setting: a run left in ``run_dir`` by other settings (a
    recipe or ``COMPARISON`` changed since, another data root) is renamed
    ``<name>-<key of its settings>``, neither resumed nor deleted, and a run set aside
    earlier for ``cfg``'s settings comes back, so returning to them resumes it."""
    import hashlib
    import shutil

    def aside(settings: dict) -> Path:
        kept = {k: v for k, v in settings.items() if k not in RESUME_MAY_CHANGE}
        key = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]
        return run_dir.with_name(f"{run_dir.name}-{key}")

    wanted = aside(json.loads(json.dumps(cfg.to_dict())))
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


def gap_table(rows: dict[str, dict], teacher: str = "teacher", baseline: str = "baseline") -> str:
    """Plain-text table: mIoU, gain over the baseline, share of the teacher-student gap."""
    t, b = rows[teacher]["miou"], rows[baseline]["miou"]
    lines = [f"  {'model':16s} {'preset':15s} {'mIoU':>7s} {'gain':>7s} {'% of gap':>9s}"]
    for name, row in rows.items():
        gain = row["miou"] - b
        share = f"{100 * gain / (t - b):8.0f}%" if name not in (teacher, baseline) and t > b else ""
        gain_s = f"{gain:+7.2f}" if name not in (teacher, baseline) else ""
        lines.append(f"  {name:16s} {row['preset']:15s} {row['miou']:7.2f} {gain_s:>7s} {share:>9s}")
    lines.append(f"  teacher - baseline: {t - b:+.2f} mIoU points")
    return "\n".join(lines)


def run_demo(out: Path = Path("runs/demo"), *, quick: bool = False, fresh: bool = False,
             threads: int | None = None, methods: tuple[str, ...] = DEMO_METHODS,
             student_steps: int | None = None) -> dict:
    """Teacher, then a one-seed comparison of students; prints the table, writes a PNG."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    unknown = [m for m in methods if m not in COMPARISON]
    if unknown or "baseline" not in methods:
        raise ValueError(f"demo methods {list(methods)}: choose among {list(COMPARISON)}, "
                         "the baseline included")
    out = Path(out)
    if fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = student_steps or (None if quick else DEMO_STUDENT_STEPS)
    teacher_cfg = teacher_config(quick=quick)
    configs = {"teacher": teacher_cfg}
    teacher_path = cache_path(teacher_cfg)
    for name in methods:
        configs[name] = student_config(COMPARISON[name], seed=0, teacher=teacher_path,
                                       quick=quick, **({"steps": steps} if steps else {}))
    models, rows = {}, {}
    # Students that distil encoder stages train first: the teacher outputs they cache
    # include the head's, so the others reuse them instead of computing them again.
    order = sorted(configs, key=lambda role: role != "teacher" and not _uses_stages(configs[role]))
    for role in order:
        cfg = configs[role]
        t0 = time.perf_counter()
        model, reused = train_or_load(cfg, out / role.replace("+", "_"), fresh=fresh)
        models[role] = model
        rows[role] = {"preset": cfg.model, "methods": cfg.methods, "steps": cfg.steps,
                      "reused_cache": reused, "train_seconds": round(time.perf_counter() - t0, 1),
                      "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        print(f"{role}: {cfg.model} ({cfg.steps} steps) "
              f"{'loaded from cache' if reused else 'trained'} in {rows[role]['train_seconds']:.0f} s",
              flush=True)
    models = {role: models[role] for role in configs}  # the table in the order asked for
    rows = {role: rows[role] for role in configs}
    test = build_dataset("synth", split="test", **teacher_cfg.data_kwargs)
    for role, model in models.items():
        result = evaluate(model, test, num_classes=test.num_classes, batch_size=32)
        rows[role].update(miou=round(100 * result["miou"], 2),
                          iou=[round(100 * v, 2) for v in result["iou"]])
    gap = rows["teacher"]["miou"] - rows["baseline"]["miou"]
    print(f"\nSynthScenes test split ({len(test)} images, {test.size}x{test.size}); students: "
          f"one seed, {configs['baseline'].steps} steps, paired (same init and data order):")
    print(gap_table(rows))
    print("  one seed: a difference below about 1 mIoU point is within seed noise; "
          "benchmarks/synth_distill.py reports 5 paired seeds")
    png = out / "predictions.png"
    write_predictions(models, test, png)
    summary = {"models": rows, "gap": round(gap, 2), "quick": quick,
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"predictions: {png}\nsummary: {out / 'summary.json'}  "
          f"({summary['seconds']:.0f} s in all)")
    return summary


def _uses_stages(cfg: TrainConfig) -> bool:
    from .train import resolve_methods, split_layers

    _, layers = split_layers(resolve_methods(cfg.methods))
    return any(stage is not None for stage in layers.values())


@torch.no_grad()
def write_predictions(models: dict[str, SegModel], dataset, path: Path, rows: int = 6) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import prediction_grid

    seed_everything(0)
    images, masks = zip(*(dataset[i] for i in range(rows)))
    images, masks = torch.stack(images), torch.stack(masks)
    preds = {name: m.eval()(images).argmax(1) for name, m in models.items()}
    fig = prediction_grid(images, masks, preds, dataset.palette, class_names=dataset.classes)
    fig.savefig(path, dpi=80)
    plt.close(fig)
