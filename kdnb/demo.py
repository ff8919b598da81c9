"""The main job on the embedded dataset: what ``make demo`` and ``kdnb demo`` run.

Trains (or reuses a cached) SynthScenes teacher and a student baseline, reports both on
the test split, and writes a PNG of predictions beside the ground truth.
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
from .train import Trainer, config_hash, evaluate, model_from_checkpoint, seed_everything


def quick_config(cfg: TrainConfig) -> TrainConfig:
    """A tiny budget that exercises every code path in seconds (tests, ``KDNB_QUICK=1``)."""
    return cfg.replace(steps=12, batch_size=4, eval_every=6, ckpt_every=0, log_every=3,
                       data_kwargs={**cfg.data_kwargs, "size": 64, "length": 48})


def cache_path(cfg: TrainConfig) -> Path:
    return data_root(cfg.root) / "checkpoints" / f"{cfg.model}-{config_hash(cfg)}.pt"


def train_or_load(cfg: TrainConfig, run_dir: Path, *, fresh: bool = False,
                  progress: bool = True) -> tuple[SegModel, bool]:
    """Returns the model trained by ``cfg``, from the cache when it holds one.

    The cache key hashes every setting that changes the weights, so a changed recipe
    never reuses a stale checkpoint. Returns ``(model, reused)``.
    """
    cached = cache_path(cfg)
    if cached.is_file() and not fresh:
        return model_from_checkpoint(cached, preset=cfg.model), True
    trainer = Trainer(cfg, run_dir, progress=progress)
    trainer.fit(resume=run_dir.joinpath("config.json").is_file() and not fresh)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_bytes((run_dir / "model.pt").read_bytes())
    os.replace(tmp, cached)
    return trainer.model.cpu().eval(), False


def run_demo(out: Path = Path("runs/demo"), *, quick: bool = False, fresh: bool = False,
             threads: int | None = None) -> dict:
    """Teacher and student baseline on SynthScenes; prints mIoU and writes a PNG."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {"teacher": get_recipe("synth-teacher"), "student": get_recipe("synth-student")}
    if quick:
        configs = {k: quick_config(v) for k, v in configs.items()}
    models, rows = {}, {}
    for role, cfg in configs.items():
        t0 = time.perf_counter()
        model, reused = train_or_load(cfg, out / role, fresh=fresh)
        models[role] = model
        rows[role] = {"preset": cfg.model, "reused_cache": reused,
                      "train_seconds": round(time.perf_counter() - t0, 1),
                      "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        print(f"{role}: {cfg.model} {'loaded from cache' if reused else 'trained'} "
              f"in {rows[role]['train_seconds']:.0f} s")
    cfg = configs["teacher"]
    test = build_dataset("synth", split="test", **cfg.data_kwargs)
    for role, model in models.items():
        result = evaluate(model, test, num_classes=test.num_classes, batch_size=32)
        rows[role].update(miou=round(100 * result["miou"], 2),
                          iou=[round(100 * v, 2) for v in result["iou"]])
    gap = rows["teacher"]["miou"] - rows["student"]["miou"]
    print(f"\nSynthScenes test split ({len(test)} images, {test.size}x{test.size}):")
    print(f"  {'model':9s} {'preset':15s} {'params':>8s} {'mIoU':>7s}")
    for role, row in rows.items():
        print(f"  {role:9s} {row['preset']:15s} {row['params_m']:7.1f}M {row['miou']:7.2f}")
    print(f"  teacher - student: {gap:+.2f} mIoU points")
    png = out / "predictions.png"
    write_predictions(models, test, png)
    summary = {"models": rows, "gap": round(gap, 2), "quick": quick,
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"predictions: {png}\nsummary: {out / 'summary.json'}  "
          f"({summary['seconds']:.0f} s in all)")
    return summary


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
