"""The embedded distillation benchmark: every method on SynthScenes over paired seeds.

    python benchmarks/synth_distill.py                       # 5 seeds, every method
    python benchmarks/synth_distill.py --sweep nfd=0.5,1,2,4  # choose a weight on val (seed 0)
    python benchmarks/synth_distill.py --quick --no-write     # seconds; what the test runs

Protocol:
* one teacher (the ``synth-teacher`` recipe, cached in data/checkpoints);
* per seed, a student baseline and one student per method, all from the same initial
  weights and the same data order (paired), so a method's gain is a per-seed difference;
* the training pool is fixed (no flip: SynthScenes already varies scale, rotation and
  colour), so the teacher's outputs are computed once and a distillation run costs what
  the baseline costs;
* hyperparameters are chosen on the val split (``--sweep``), numbers reported on test.

Runs land in ``runs/synth_distill/<method>-s<seed>``; finished runs are reused, so an
interrupted benchmark continues where it stopped. The tables (val and test, from
``kdnb.compare``) are printed and appended to benchmarks/RESULTS.md with the command and
the wall time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from kdnb.compare import compare, format_table, read_run
from kdnb.config import get_recipe
from kdnb.data import build_dataset
from kdnb.demo import quick_config, train_or_load
from kdnb.train import evaluate, make_trainer, model_from_checkpoint

#: method name -> the ``methods`` dict of its runs (weights chosen on val; see RESULTS.md).
METHODS = {
    "baseline": {},
    "kd": {"kd": {"weight": 0.25, "temperature": 2.0}},  # weight chosen on val (RESULTS.md)
    "mse": {"mse": {"weight": 1.0}},
    "cwd": {"cwd": {"weight": 3.0}},
    "nfd": {"nfd": {"weight": 2.0}},
    "nfd+fakd": {"nfd": {"weight": 2.0}, "fakd": {"lambda_0": 1.0}},
    "kd+fakd": {"kd": {"weight": 0.25, "temperature": 2.0}, "fakd": {"lambda_0": 1.0}},
}


def student_config(methods: dict, seed: int, teacher: str | None, quick: bool):
    cfg = get_recipe("synth-student")
    if quick:
        cfg = quick_config(cfg)
    return cfg.replace(seed=seed, flip=False, methods=methods, teacher=teacher if methods else None,
                       cache_teacher=bool(methods), eval_every=0)


def run_one(name: str, methods: dict, seed: int, teacher: str, root: Path, quick: bool,
            test_set) -> Path:
    run_dir = root / f"{name}-s{seed}"
    if (run_dir / "final.json").is_file() and (run_dir / "test.json").is_file():
        return run_dir  # finished earlier
    cfg = student_config(methods, seed, teacher, quick)
    trainer = make_trainer(cfg, run_dir, progress=not quick)
    trainer.fit(resume=(run_dir / "config.json").is_file())
    result = evaluate(trainer.model, test_set, num_classes=test_set.num_classes, batch_size=32)
    (run_dir / "test.json").write_text(json.dumps({"split": "test", **result}, indent=2))
    return run_dir


def parse_sweep(text: str) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    if name not in METHODS or name == "baseline" or not values:
        raise SystemExit(f"--sweep expects METHOD=w1,w2,... with METHOD in "
                         f"{[m for m in METHODS if m != 'baseline']}, got {text!r}")
    return name, [float(v) for v in values.split(",")]


def with_weight(methods: dict, weight: float) -> dict:
    """The method's main loss (the first key) at another weight."""
    first = next(iter(methods))
    return {**methods, first: {**methods[first], "weight": weight}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sweep", help="METHOD=w1,w2,...: val mIoU per weight, seed 0")
    parser.add_argument("--root", default="runs/synth_distill")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (tests)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = Path(args.root)
    teacher_cfg = get_recipe("synth-teacher")
    if args.quick:
        teacher_cfg = quick_config(teacher_cfg)
    train_or_load(teacher_cfg, root / "teacher", progress=not args.quick)
    from kdnb.demo import cache_path
    teacher = str(cache_path(teacher_cfg))
    test_set = build_dataset("synth", split="test", **teacher_cfg.data_kwargs)
    teacher_model = model_from_checkpoint(teacher)
    teacher_test = 100 * evaluate(teacher_model, test_set, num_classes=test_set.num_classes,
                                  batch_size=32)["miou"]
    val_set = build_dataset("synth", split="val", **teacher_cfg.data_kwargs)
    teacher_val = 100 * evaluate(teacher_model, val_set, num_classes=val_set.num_classes,
                                 batch_size=32)["miou"]

    if args.sweep:
        name, weights = parse_sweep(args.sweep)
        runs = [run_one("baseline", {}, 0, teacher, root, args.quick, test_set)]
        for w in weights:
            runs.append(run_one(f"{name}-w{w:g}", with_weight(METHODS[name], w), 0, teacher,
                                root, args.quick, test_set))
        lines = [f"{Path(r).name}: val mIoU {read_run(r, 'val')['miou']:.2f}" for r in runs]
        report = "\n".join(lines)
        title = f"Weight sweep for {name} on val (seed 0)"
    else:
        runs = [run_one(name, METHODS[name], seed, teacher, root, args.quick, test_set)
                for seed in range(args.seeds) for name in args.methods]
        val = format_table(compare([read_run(r, "val") for r in runs], teacher_val), teacher_val)
        test = format_table(compare([read_run(r, "test") for r in runs], teacher_test), teacher_test)
        report = f"val (model selection):\n\n{val}\n\ntest (reported):\n\n{test}"
        title = f"SynthScenes distillation, {args.seeds} paired seeds"
    wall = time.perf_counter() - start
    print(report)
    print(f"\n{wall:.0f} s")
    if not args.no_write:
        command = "python " + " ".join(["benchmarks/synth_distill.py", *sys.argv[1:]])
        with open(args.out, "a") as fh:
            fh.write(f"\n## {title} ({datetime.date.today()})\n\nCommand: `{command}` "
                     f"(wall time {wall / 60:.1f} min; teacher outputs cached: fixed pool, no "
                     f"flip)\n\n{report}\n")


if __name__ == "__main__":
    main()
