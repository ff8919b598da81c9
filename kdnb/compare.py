"""Comparing runs: mean and spread over seeds, paired gains, share of the gap recovered.

Runs are grouped by (student preset, methods); seeds pair runs across groups, so a
method's gain over the student baseline is the mean of per-seed differences, whose spread
is far smaller than the seed-to-seed spread of either (same init and data order).
The share of the teacher-student gap recovered, ``(m - baseline) / (teacher - baseline)``,
is how kdnb compares methods across datasets (CIRKD recovers 56 % on Cityscapes).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .config import read_json_object
from .losses.spec import method_label


def read_run(run_dir: str | Path, split: str = "val", label: str | None = None) -> dict:
    """``{"student", "methods", "seed", "miou", "teacher"}`` of a finished run.

    Runs are grouped by ``methods``: :func:`method_label` (``"fakd+nfd"``,
    ``"mse@stage2"``), or ``label`` when given (two settings of one loss, e.g. ``"kd-t1"`` and ``"kd"``).

    The mIoU comes from ``<split>.json`` (``kdnb eval --split test --json RUN/test.json``)
    or from ``final.json`` when the run evaluated ``split`` at its end, whichever was
    written last.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a kdnb run directory (no config.json)")
    cfg = read_json_object(config_path, "the run's config", "delete it and run kdnb train ... "
                           "--resume (which restores it from the newest checkpoint), or leave the "
                           "run out")
    # The latest evaluation of the split wins: a run retrained after `kdnb eval` wrote
    # <split>.json ends with a newer final.json.
    scores = [f for f in (run_dir / f"{split}.json", run_dir / "final.json") if f.is_file()]
    score = (f"kdnb eval --ckpt {run_dir / 'model.pt'} --split {split} --json "
             f"{run_dir / (split + '.json')}")
    scores = [(f.stat().st_mtime, read_json_object(
        f, "the result", f"delete it and score the run again ({score}), or leave the run out"))
        for f in scores]
    scores = [(t, r) for t, r in scores if r.get("split", split) == split]
    result = max(scores, key=lambda s: s[0])[1] if scores else None
    if result is None:
        raise FileNotFoundError(f"{run_dir} has no {split} result: run `{score}` first")
    methods = label or method_label(cfg.get("methods") or {})
    return {"run": str(run_dir), "student": cfg["model"], "methods": methods,
            "seed": cfg.get("seed", 0), "miou": 100 * result["miou"],
            "teacher": cfg.get("teacher")}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def compare(rows: list[dict], teacher_miou: float | None = None) -> list[dict]:
    """One summary per (student, methods) group, the baseline first.

    Args:
        rows: :func:`read_run` results.
        teacher_miou: the teacher's mIoU on the same split, for the share of the gap.
    """
    groups: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        groups[(row["student"], row["methods"])][row["seed"]] = row["miou"]
    summaries = []
    for (student, methods), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "baseline", kv[0][1])):
        mean, std = _mean_std(list(by_seed.values()))
        summary = {"student": student, "methods": methods, "seeds": len(by_seed),
                   "miou": mean, "std": std, "gain": None, "gain_std": None, "gap_share": None}
        base = groups.get((student, "baseline"))
        if base and methods != "baseline":
            paired = [by_seed[s] - base[s] for s in by_seed if s in base]
            if paired:
                summary["gain"], summary["gain_std"] = _mean_std(paired)
                summary["paired_seeds"] = len(paired)
                if teacher_miou is not None:
                    base_mean = statistics.fmean(base[s] for s in by_seed if s in base)
                    gap = teacher_miou - base_mean
                    summary["gap_share"] = 100 * summary["gain"] / gap if gap > 0 else None
        summaries.append(summary)
    return summaries


def format_table(summaries: list[dict], teacher_miou: float | None = None) -> str:
    """A markdown table of :func:`compare` summaries."""
    def fmt(x, spec="{:.2f}"):
        return "-" if x is None or x != x else spec.format(x)

    lines = ["| student | methods | seeds | mIoU | std | gain (paired) | gain std | % of gap |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['student']} | {s['methods']} | {s['seeds']} | {fmt(s['miou'])} | "
                     f"{fmt(s['std'])} | {fmt(s['gain'], '{:+.2f}')} | {fmt(s['gain_std'])} | "
                     f"{fmt(s['gap_share'], '{:.0f}')} |")
    if teacher_miou is not None:
        lines.append(f"\nteacher: {teacher_miou:.2f} mIoU")
    return "\n".join(lines)
