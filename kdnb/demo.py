"""The main job on the embedded dataset: what ``make demo`` and ``kdnb demo`` run.

Trains (or reuses a cached) SynthScenes teacher, then a budgeted comparison of students
(baseline, KD, and NFD and NFD+FAKD on encoder stage 2 by default, one seed, paired: same
initial weights and data order), reports every model on the test split with the share of
the teacher-student gap each method recovers, and writes a PNG of predictions beside the
ground truth. The students are those of :data:`kdnb.experiments.COMPARISON`. After a few
steps of the first model it trains (its first log line) it prints the time the whole demo
is expected to take, from the measured rate and the recipes' step counts
(:class:`DemoClock`).

Two budgets. The default one (``make demo``) fits 15 minutes on two slow cores: its
teacher trains the ``synth-teacher`` recipe for :data:`DEMO_TEACHER_STEPS` steps only,
its students :data:`DEMO_STUDENT_STEPS`. ``full=True`` (``kdnb demo --full``, ``make
demo-full``) trains the teacher every notebook and benchmark shares (the full recipe,
1800 steps; it lands in the cache they read) and students of :data:`FULL_STUDENT_STEPS`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .data import build_dataset
from .distill import TeacherOutputs
from .experiments import COMPARISON, cache_path, student_config, teacher_config, train_or_load
from .losses.spec import resolve_methods, split_layers
from .metrics import evaluate
from .models import SegModel

#: What ``make demo`` compares after the teacher (one seed): NFD and NFD+FAKD at the layer
#: chosen on val (encoder stage 2), pixel KD on the logits.
DEMO_METHODS = ("baseline", "kd", "nfd-stage2", "nfd-stage2+fakd")
#: The default budget. The full demo took 9 min on a fast day and 27 on a slow one
#: (benchmarks/RESULTS.md, "`make demo`: time and result"), its 1800-step teacher alone 16
#: of them; the budget is 15 minutes where the teacher trains at 1.5 steps/s. A teacher of
#: 400 steps (its own cosine schedule, evaluated once, at the end) and four students of 150
#: fit it with the fixed costs (the teacher's outputs on the students' pool, every model's
#: evaluations, the prediction PNG): 400 and 150 took 320 s at 4.0 teacher steps/s, 14.3
#: min at 1.5 by that rate; 500 and 200 took 405 s at 3.8, about 17 min at 1.5
#: (benchmarks/RESULTS.md, "`make demo`: time and result").
DEMO_TEACHER_STEPS = 400
DEMO_STUDENT_STEPS = 150
#: Student steps of the full demo (the benchmark trains the full ``synth-student`` recipe).
FULL_STUDENT_STEPS = 500


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


def duration(seconds: float) -> str:
    """``"40 s"`` under a minute and a half, else ``"14 minutes"``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} minutes"


class DemoClock:
    """The demo's expected time, printed after a few steps of the models that train.

    At the first log line of the teacher (a train record, ``log_every`` steps in), every
    step still to train is counted at the teacher's measured rate (a student step costs
    less, so this errs long); at the first log line of the first student that trains, the
    students' steps are counted again at its rate. The time spent so far (set-up, teacher
    outputs, evaluations) is included; models found in the cache take no steps.

    Args:
        steps: role -> training steps of each model the demo trains (cached ones left
            out), in the order they train.
        cached: the roles loaded from the cache.
        start: ``time.perf_counter()`` when the demo started.
    """

    def __init__(self, steps: dict[str, int], cached: list[str], start: float):
        self.steps, self.cached, self.start = steps, cached, start
        self.told: set[str] = set()

    def callback(self, role: str):
        """The trainer callback of ``role``: prints the estimate at its first train record."""
        def on_record(record: dict) -> None:
            kind = "teacher" if role == "teacher" else "students"
            if record.get("kind") == "train" and kind not in self.told:
                self.told.add(kind)
                from tqdm.auto import tqdm  # written above the progress bar, not through it
                tqdm.write(self.line(role, record["step"], 1 / record["s_per_step"]))
        return on_record

    def line(self, role: str, step: int, rate: float) -> str:
        order = list(self.steps)
        left = self.steps[role] - step + sum(self.steps[r] for r in order[order.index(role) + 1:])
        total = time.perf_counter() - self.start + left / rate
        teacher = ("teacher from the cache" if "teacher" in self.cached
                   else f"teacher {self.steps['teacher']} steps")
        trained = [self.steps[r] for r in order if r != "teacher"]
        from_cache = [r for r in self.cached if r != "teacher"]
        if trained:
            each = "/".join(str(n) for n in sorted(set(trained)))
            students = (f"students {len(trained)} x {each} steps"
                        + (" counted at the teacher's rate" if role == "teacher" else "")
                        + (f", {len(from_cache)} more from the cache" if from_cache else ""))
        else:
            students = "students from the cache"
        who = " for the students" if role != "teacher" and "teacher" not in self.cached else ""
        return (f"at {rate:.1f} steps/s{who}, the demo takes about {duration(total)} "
                f"({teacher}, {students})")


def demo_configs(methods: tuple[str, ...] = DEMO_METHODS, *, quick: bool = False,
                 full: bool = False, student_steps: int | None = None) -> dict:
    """Role -> the config the demo trains: ``"teacher"``, then one student per method.

    Raises:
        ValueError: a method :data:`kdnb.experiments.COMPARISON` lacks, or no baseline.
    """
    unknown = [m for m in methods if m not in COMPARISON]
    if unknown or "baseline" not in methods:
        raise ValueError(f"demo methods {list(methods)}: choose among {list(COMPARISON)}, "
                         "the baseline included")
    steps = student_steps or (None if quick else FULL_STUDENT_STEPS if full else DEMO_STUDENT_STEPS)
    teacher_cfg = teacher_config(quick=quick)
    if not (quick or full):  # a teacher of its own: the shared one trains 3x longer
        teacher_cfg = teacher_cfg.replace(steps=DEMO_TEACHER_STEPS, eval_every=0)
    configs = {"teacher": teacher_cfg}
    for name in methods:
        configs[name] = student_config(COMPARISON[name], seed=0, teacher=cache_path(teacher_cfg),
                                       quick=quick, **({"steps": steps} if steps else {}))
    return configs


def run_demo(out: Path = Path("runs/demo"), *, quick: bool = False, fresh: bool = False,
             threads: int | None = None, methods: tuple[str, ...] = DEMO_METHODS,
             student_steps: int | None = None, full: bool = False) -> dict:
    """Teacher, then a one-seed comparison of students; prints the table, writes a PNG.

    ``full``: the shared teacher (the ``synth-teacher`` recipe as the notebooks and
    benchmarks train it) and longer students, instead of the 15-minute budget.
    """
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    configs = demo_configs(methods, quick=quick, full=full, student_steps=student_steps)
    teacher_cfg = configs["teacher"]
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    models, rows = {}, {}
    shared = TeacherOutputs()  # the students share the teacher and the pool
    # Students that distil encoder stages train first: the teacher outputs they cache
    # include the head's, so the others reuse them instead of computing them again.
    order = sorted(configs, key=lambda role: role != "teacher" and not _uses_stages(configs[role]))
    cached = [r for r in order if not fresh and cache_path(configs[r]).is_file()]
    clock = DemoClock({r: configs[r].steps for r in order if r not in cached}, cached, start)
    for role in order:
        cfg = configs[role]
        t0 = time.perf_counter()
        model, reused = train_or_load(cfg, out / role.replace("+", "_"), fresh=fresh,
                                      callbacks=[clock.callback(role)], teacher_outputs=shared)
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
    if not (quick or full):
        print(f"  the 15-minute budget: a teacher of {teacher_cfg.steps} steps; the teacher the "
              f"notebooks and benchmarks share trains {teacher_config().steps} (make demo-full "
              f"trains it and compares students of {FULL_STUDENT_STEPS} steps)")
    png = out / "predictions.png"
    write_predictions(models, test, png)
    summary = {"models": rows, "gap": round(gap, 2), "quick": quick, "full": full,
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"predictions: {png}\nsummary: {out / 'summary.json'}  "
          f"({summary['seconds']:.0f} s in all)")
    return summary


def _uses_stages(cfg) -> bool:
    _, layers = split_layers(resolve_methods(cfg.methods))
    return any(stage is not None for stage in layers.values())


@torch.no_grad()
def write_predictions(models: dict[str, SegModel], dataset, path: Path, rows: int = 6) -> None:
    """A PNG of the first ``rows`` images: image, ground truth, one column per model.

    Drawn on a figure of its own (no pyplot state, no backend switch), so it runs
    headless and leaves a notebook's plotting as it was.
    """
    from matplotlib.figure import Figure

    from .viz import prediction_grid

    images, masks = zip(*(dataset[i] for i in range(rows)))
    images, masks = torch.stack(images), torch.stack(masks)
    preds = {name: m.eval()(images).argmax(1) for name, m in models.items()}
    fig = prediction_grid(images, masks, preds, dataset.palette, class_names=dataset.classes,
                          figure=Figure())
    fig.savefig(path, dpi=80)
