"""Comparing runs: mean and spread over seeds, paired gains, share of the gap recovered.

Runs are grouped by (student preset, methods, steps); seeds pair runs across groups, so a
method's gain over the student baseline of the same steps is the mean of per-seed
differences, whose spread is far smaller than the seed-to-seed spread of either (same
init and data order). The share of the teacher-student gap recovered,
``(m - baseline) / (teacher - baseline)``, is how kdnb compares methods across datasets
(CIRKD recovers 56 % on Cityscapes).

Matched compute (docs/METHODS.md, "Matched compute"): from the runs' ``cost.json``
(:mod:`kdnb.cost`), a method's compute ratio ``r`` over the baseline, and its gain over
the baseline trained ``steps * r`` steps (``r`` rounded up to a multiple of 0.05) with the
same recipe (the iteration-matched one where ``r <= 1.05``). The table says how to train a compute-matched baseline that is
missing.
"""
from __future__ import annotations

import math
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
    cost_path = run_dir / "cost.json"
    cost = read_json_object(cost_path, "the run's cost", "delete it (the run's FLOPs are then "
                            "unknown) or train the run again in a new run directory"
                            ) if cost_path.is_file() else {}
    return {"run": str(run_dir), "student": cfg["model"], "methods": methods,
            "seed": cfg.get("seed", 0), "miou": 100 * result["miou"],
            "teacher": cfg.get("teacher"), "steps": cfg.get("steps"),
            "flops": compute_per_step(cost, cfg.get("steps"))}


def compute_per_step(cost: dict, steps: int | None = None) -> float | None:
    """A run's compute per step from its ``cost.json``: its FLOPs per step (the teacher's
    forward included when the teacher runs each step) plus the FLOPs of computing the
    teacher's cached outputs spread over its steps (``cost["steps"]``, else ``steps``);
    None when its FLOPs were not counted."""
    if cost.get("flops_per_step") is None:
        return None
    cache = cost.get("teacher_cache_flops") or 0
    return cost["flops_per_step"] + (cache / (cost.get("steps") or steps) if cache else 0)


#: Up to this compute ratio the iteration-matched baseline is the compute-matched one: the
#: FLOP count leaves out elementwise work, so smaller differences are below what it resolves.
SAME_COMPUTE = 1.05


#: The compute-matched baseline's ratio is ``r`` rounded *up* to a multiple of this: the
#: baseline never gets less compute than the method, and methods of about the same cost
#: (1.11 and 1.12) share one baseline.
RATIO_STEP = 0.05


def matched_ratio(ratio: float) -> float:
    """``ratio`` rounded up to a multiple of :data:`RATIO_STEP` (the benchmark names its
    runs by it: ``baseline-x1.15-s0``)."""
    return round(math.ceil(ratio / RATIO_STEP - 1e-9) * RATIO_STEP, 2)


def matched_steps(steps: int, ratio: float) -> int:
    """The steps of the compute-matched baseline: ``steps * matched_ratio(r)``."""
    return round(steps * matched_ratio(ratio))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _paired(by_seed: dict[int, dict], base: dict[int, dict]) -> tuple[float, float, int] | None:
    """Mean and std of the per-seed mIoU differences, and the number of paired seeds."""
    diffs = [by_seed[s]["miou"] - base[s]["miou"] for s in by_seed if s in base]
    return (*_mean_std(diffs), len(diffs)) if diffs else None


def _mean_flops(runs) -> float | None:
    flops = [r["flops"] for r in runs if r.get("flops") is not None]
    return statistics.fmean(flops) if flops else None


def compare(rows: list[dict], teacher_miou: float | None = None) -> list[dict]:
    """One summary per (student, methods, steps) group, the baselines first.

    Args:
        rows: :func:`read_run` results.
        teacher_miou: the teacher's mIoU on the same split, for the share of the gap.

    Returns:
        Summaries with the mean and std over seeds, the paired gain over the baseline of
        the same steps (``gain``, ``gain_std`` over ``paired_seeds`` paired seeds) and,
        where the runs' FLOPs are known, the compute ratio ``ratio`` and the gain over the compute-matched baseline
        (``matched_gain``, ``matched_gain_std`` over ``matched_seeds`` paired seeds;
        ``matched_steps`` its steps,
        ``matched_by_iterations`` where ``ratio <= SAME_COMPUTE``, ``matched_missing``
        the baseline runs to lengthen for the seeds whose compute-matched baseline is
        missing).
    """
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        groups[(row["student"], row["methods"], row.get("steps"))][row["seed"]] = row

    def order(key):  # per student the baselines first, by steps
        student, methods, steps = key
        return student, methods != "baseline", methods, steps or 0

    summaries = []
    for (student, methods, steps), by_seed in sorted(groups.items(), key=lambda kv: order(kv[0])):
        mean, std = _mean_std([r["miou"] for r in by_seed.values()])
        summary = {"student": student, "methods": methods, "steps": steps, "seeds": len(by_seed),
                   "miou": mean, "std": std, "gain": None, "gain_std": None, "paired_seeds": None, "gap_share": None,
                   "ratio": None, "matched_gain": None, "matched_gain_std": None,
                   "matched_seeds": None, "matched_steps": None, "matched_by_iterations": False, "matched_missing": None}
        if methods == "baseline":
            summaries.append(summary)
            continue
        base = groups.get((student, "baseline", steps), {})
        paired = _paired(by_seed, base)
        if paired:
            summary["gain"], summary["gain_std"], summary["paired_seeds"] = paired
            if teacher_miou is not None:
                base_mean = statistics.fmean(base[s]["miou"] for s in by_seed if s in base)
                gap = teacher_miou - base_mean
                summary["gap_share"] = 100 * summary["gain"] / gap if gap > 0 else None
        baselines = [r for (st, m, _), runs in groups.items() if (st, m) == (student, "baseline")
                     for r in runs.values()]  # FLOPs per step do not depend on the steps
        baseline_flops = _mean_flops(baselines)
        flops = _mean_flops(by_seed.values())
        if flops is not None and baseline_flops and steps:
            ratio = flops / baseline_flops
            by_iterations = ratio <= SAME_COMPUTE
            n = steps if by_iterations else matched_steps(steps, ratio)
            summary.update(ratio=ratio, matched_steps=n, matched_by_iterations=by_iterations)
            longer = groups.get((student, "baseline", n), {})
            paired = _paired(by_seed, longer)
            if paired:
                summary["matched_gain"], summary["matched_gain_std"], summary["matched_seeds"] = paired
            missing = [base[s]["run"] for s in sorted(base) if s in by_seed and s not in longer]
            if missing or not paired:  # the seeds whose compute-matched baseline is not trained
                summary["matched_missing"] = missing
        summaries.append(summary)
    return summaries


def format_table(summaries: list[dict], teacher_miou: float | None = None, *,
                 matched_compute: bool | None = None) -> str:
    """A markdown table of :func:`compare` summaries, with footnotes.

    Args:
        summaries: :func:`compare`'s.
        teacher_miou: printed under the table.
        matched_compute: add the matched-compute columns (``r`` and the gain over the
            compute-matched baseline); None: where some run's FLOPs are known.
    """
    def fmt(x, spec="{:.2f}"):
        return "-" if x is None or x != x else spec.format(x)

    def gain(s, key, seeds_key):  # a gain over fewer seeds than the row's says how many
        n = s.get(seeds_key)
        cell = fmt(s.get(key), "{:+.2f}")
        return cell if n is None or n == s["seeds"] or cell == "-" else f"{cell} ({n} of {s['seeds']} seeds)"

    if matched_compute is None:
        matched_compute = any(s.get("ratio") is not None for s in summaries)
    show_steps = matched_compute or len({s.get("steps") for s in summaries}) > 1
    head = ["student", "methods", *(["steps"] if show_steps else []), "seeds", "mIoU", "std",
            "gain (paired)", "gain std"]
    if matched_compute:
        head += ["r", "gain at matched compute", "matched gain std"]
    head.append("% of gap")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for s in summaries:
        cells = [s["student"], s["methods"], *([fmt(s.get("steps"), "{}")] if show_steps else []),
                 str(s["seeds"]), fmt(s["miou"]), fmt(s["std"]), gain(s, "gain", "paired_seeds"),
                 fmt(s["gain_std"])]
        if matched_compute:
            ratio = fmt(s.get("ratio")) + ("*" if s.get("matched_by_iterations") else "")
            cells += [ratio, gain(s, "matched_gain", "matched_seeds"), fmt(s.get("matched_gain_std"))]
        cells.append(fmt(s["gap_share"], "{:.0f}"))
        lines.append("| " + " | ".join(cells) + " |")
    if matched_compute:
        lines += [""] + _matched_notes(summaries)
    if teacher_miou is not None:
        lines.append(f"\nteacher: {teacher_miou:.2f} mIoU")
    return "\n".join(lines)


def longer_run(run: Path, ratio: float) -> Path:
    """Where the compute-matched baseline of ``run`` goes: ``baseline-s0`` ->
    ``baseline-x1.15-s0``, as ``benchmarks/synth_distill.py --matched-compute`` names it."""
    stem, sep, seed = run.name.rpartition("-s")
    if sep and seed.isdigit():
        return run.with_name(f"{stem}-x{ratio:.2f}-s{seed}")
    return run.with_name(f"{run.name}-x{ratio:.2f}")


def _matched_notes(summaries: list[dict]) -> list[str]:
    """The footnotes of the matched-compute columns: what r is, the rows where the
    iteration-matched baseline serves, and the commands that train missing baselines."""
    notes = ["r: compute per step over the baseline's (FLOPs of matrix products and "
             "convolutions; the teacher's forward when it runs each step, its cached outputs "
             "spread over the steps); the compute-matched baseline trains steps * r steps, r "
             f"rounded up to a multiple of {RATIO_STEP}, with the same recipe (docs/METHODS.md, \"Matched compute\")."]
    if any(s.get("matched_by_iterations") for s in summaries):
        notes.append(f"*: r <= {SAME_COMPUTE}, below what the FLOP count resolves (it leaves "
                     "out elementwise work): the iteration-matched baseline is the "
                     "compute-matched one.")
    unknown = [s["methods"] for s in summaries if s["methods"] != "baseline" and s["ratio"] is None]
    if unknown:
        notes.append(f"r is missing for {', '.join(unknown)}: a run or its baseline has no "
                     "cost.json with FLOPs (trained before kdnb recorded them, or with "
                     "--no-flop-count).")
    missing: dict[tuple, list[str]] = defaultdict(list)
    for s in summaries:
        if s.get("matched_missing") is not None:
            missing[(s["matched_steps"], matched_ratio(s["ratio"]), tuple(s["matched_missing"]))].append(
                s["methods"])
    for (steps, ratio, runs), methods in missing.items():
        notes.append(f"No compute-matched baseline for {', '.join(methods)} (r up to {ratio:.2f}): "
                     f"train the baseline {steps} steps, then add its run directories"
                     + (":" if runs else " (no baseline run of these steps to start from)."))
        for run in map(Path, runs):  # the same recipe and seed, longer
            notes.append(f"    kdnb train --config {run / 'config.json'} --steps {steps} "
                         f"--run-dir {longer_run(run, ratio)}")
    return notes
