"""The embedded distillation benchmark: every method on SynthScenes over paired seeds.

    python benchmarks/synth_distill.py                        # 5 seeds, every method
    python benchmarks/synth_distill.py --sweep nfd=0.5,1,2,4   # choose a weight on val (seed 0)
    python benchmarks/synth_distill.py --methods baseline kd --seeds 1 --set steps=400 --tag s400
                                                              # a regime probe (other budget)
    python benchmarks/synth_distill.py --methods baseline kd --seeds 1 --teacher-set steps=3600 \
        --tag teacher3600                                     # another teacher (own folder)
    python benchmarks/synth_distill.py --regime pretrained     # both encoders pretrained first
    python benchmarks/synth_distill.py --matched-compute       # + baselines trained longer, at
                                                              # each method's compute
    python benchmarks/synth_distill.py --quick --no-write      # seconds; what the test runs

Protocol:
* one teacher (the ``synth-teacher`` recipe, cached in data/checkpoints);
* per seed, a student baseline and one student per method, all from the same initial
  weights and the same data order (paired), so a method's gain is a per-seed difference;
* the training pool is fixed (no flip: SynthScenes already varies scale, rotation and
  colour), so the teacher's outputs are computed once and a distillation step costs what
  a baseline step costs (with the cache's FLOPs spread over the steps, 1.11-1.12 times
  as much: cost.json);
* hyperparameters are chosen on the val split (``--sweep``), numbers reported on test;
* ``--matched-compute``: after the methods' runs, the baseline is trained again for
  ``round(steps * r)`` steps for each distinct compute ratio ``r > 1.05`` of a method over
  the baseline (from the runs' ``cost.json``; docs/METHODS.md, "Matched compute"), in
  ``baseline-x<r>-s<seed>``, and the tables gain the compute-matched gain.

The methods and their weights are ``kdnb.experiments.COMPARISON`` (what ``make demo`` and
notebook 04 run). Runs land in ``runs/synth_distill[/<tag>]/<method>-s<seed>``; finished
runs are reused, so an interrupted benchmark continues where it stopped. The tables (val
and test, from ``kdnb.compare``) are printed and appended to benchmarks/RESULTS.md with
the command and the wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from kdnb.build import build_trainer
from kdnb.checkpoint import holds_run, load_checkpoint, model_from_checkpoint
from kdnb.compare import compare, format_table, matched_ratio, read_run
from kdnb.config import TrainConfig, config_hash
from kdnb.cost import FLOPS_COUNTED, count_run_flops
from kdnb.data import build_dataset
from kdnb.distill import TeacherOutputs
from kdnb.experiments import COMPARISON, PUBLIC, VARIANTS, cache_path, student_config, teacher_config, train_or_load
from kdnb.metrics import evaluate
from kdnb.pretrain import PretrainConfig, pretrain_or_load

from _results import append_section  # benchmarks/_results.py


def run_one(name: str, methods: dict, seed: int, teacher: str, root: Path, quick: bool,
            held_out: dict, changes: dict, teacher_outputs: TeacherOutputs,
            count_missing: bool = False) -> Path:
    run_dir = root / f"{name}-s{seed}"
    cfg = student_config(methods, seed=seed, teacher=teacher, quick=quick,
                         **{"eval_every": 0, **changes})
    saved = run_dir / "config.json"
    if saved.is_file() and config_hash(TrainConfig.from_dict(json.loads(saved.read_text()))) \
            != config_hash(cfg):
        raise SystemExit(f"{run_dir} holds a run with other settings than {name} has now "
                         f"({cfg.methods}): delete it, or give these runs another --tag")
    if (run_dir / "final.json").is_file():  # trained earlier
        model = None
        if count_missing and not (run_dir / "cost.json").is_file():
            # trained before kdnb wrote cost.json: its FLOPs follow from its config
            trainer = build_trainer(cfg, run_dir, progress=False, teacher_outputs=teacher_outputs)
            (run_dir / "cost.json").write_text(json.dumps(
                {"steps": cfg.steps, "seconds_per_step": None, **count_run_flops(trainer),
                 "flops_counted": FLOPS_COUNTED, "note": "counted after the run, which "
                 "predates cost.json: no times"}, indent=2))
    else:
        trainer = build_trainer(cfg, run_dir, progress=not quick, teacher_outputs=teacher_outputs)
        trainer.fit(resume=holds_run(run_dir))
        model = trainer.model
    for split, dataset in held_out.items():
        # A score counts when it was taken on the split as it is now: a run scored before
        # SynthScenes' held-out splits grew is scored again.
        path = run_dir / f"{split}.json"
        scored = [json.loads(f.read_text()) for f in (path, run_dir / "final.json") if f.is_file()]
        current = [r for r in scored if r.get("split") == split and r.get("images") == len(dataset)]
        if current:
            if not path.is_file():
                path.write_text(json.dumps(current[0], indent=2))
            continue
        if model is None:
            model = model_from_checkpoint(run_dir / "model.pt")
        result = evaluate(model, dataset, num_classes=dataset.num_classes, batch_size=32)
        path.write_text(json.dumps({"split": split, **result}, indent=2))
    return run_dir


def matched_baselines(runs: dict[tuple[str, int], Path], one, seeds
                      ) -> dict[tuple[str, int], Path]:
    """``--matched-compute``: for each distinct compute ratio ``r > 1.05`` of a method over
    the baseline (``kdnb.compare``, from the runs' cost.json), the baseline trained
    ``steps * r`` steps (``r`` rounded up to a multiple of 0.05) with the same recipe, per
    seed, as ``baseline-x<r>-s<seed>``
    (trained once, resumed when cut short, like every run here)."""
    rows = [read_run(run, "val", name) for (name, _), run in runs.items()]
    needed = sorted({(matched_ratio(s["ratio"]), s["matched_steps"]) for s in compare(rows)
                     if s["ratio"] is not None and not s["matched_by_iterations"]})
    return {(f"baseline-x{r:.2f}", seed): one(f"baseline-x{r:.2f}", {}, seed, steps=steps)
            for r, steps in needed for seed in seeds}


#: (method, reference): the comparisons the papers make, beside the gains over the baseline.
PAIRS = [("nfd", "mse"), ("nfd+fakd", "nfd"), ("kd+fakd", "kd"),
         ("nfd-stage2", "mse-stage2"), ("nfd-stage2", "nfd"), ("mse-stage2", "mse"),
         ("nfd-stage2+fakd", "nfd-stage2"), ("mse-stage2+fakd", "mse-stage2"),
         # the authors' variants (kdnb.experiments.VARIANTS)
         ("nfd-multi", "mse-multi"), ("nfd-multi", "nfd-stage2"), ("nfd-multi-frob", "nfd-multi"),
         ("nfd-stage2-frob", "nfd-stage2"), ("kd+fakd-mkd", "kd"), ("kd+fakd-isda", "kd"),
         ("nfd-stage2+fakd-mkd", "nfd-stage2"),
         # the public methods (kdnb.experiments.PUBLIC) train KD beside their own loss
         ("kd+cirkd", "kd"), ("kd+afdcd", "kd")]


def paired_table(rows: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Paired differences between two methods (same seeds): mean, std, seeds, mean/std."""
    miou = {(r["methods"], r["seed"]): r["miou"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| method | against | seeds | difference (paired) | std | difference / std |",
             "|---|---|---:|---:|---:|---:|"]
    for a, b in pairs:
        diffs = [miou[a, s] - miou[b, s] for s in seeds if (a, s) in miou and (b, s) in miou]
        if len(diffs) < 2:
            continue
        mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
        lines.append(f"| {a} | {b} | {len(diffs)} | {mean:+.2f} | {std:.2f} | "
                     f"{mean / std if std > 0 else float('nan'):+.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def per_seed_table(rows: list[dict]) -> str:
    """Every run's mIoU, a row per method and a column per seed: the record from which any
    paired table can be recomputed (run directories are not kept forever)."""
    seeds = sorted({r["seed"] for r in rows})
    names = list(dict.fromkeys(r["methods"] for r in rows))
    miou = {(r["methods"], r["seed"]): r["miou"] for r in rows}
    lines = ["| method | " + " | ".join(f"s{s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for name in names:
        cells = [f"{miou[name, s]:.2f}" if (name, s) in miou else "-" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in order): equal
    for bit-identical weights however the file was written, so tables of two sessions can
    be told to come from the same teacher."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1)  # (a 0-dim count, as BatchNorm's, too)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def parse_sweep(text: str, methods: dict) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    if name not in methods or name == "baseline" or not values:
        raise SystemExit(f"--sweep expects METHOD=w1,w2,... with METHOD in "
                         f"{[m for m in methods if m != 'baseline']}, got {text!r}")
    return name, [float(v) for v in values.split(",")]


def parse_set(items: list[str]) -> dict:
    """``FIELD=JSON`` pairs -> config changes, e.g. ``steps=400`` or ``optimizer="sgd"``."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value  # a bare string: optimizer=sgd
    return changes


def with_weight(methods: dict, weight: float) -> dict:
    """The method's main loss (the first key) at another weight (every layer's, when it
    distils several)."""
    first = next(iter(methods))
    options = methods[first]
    if "layers" in options:
        return {**methods, first: {**options, "layers": {k: weight for k in options["layers"]}}}
    return {**methods, first: {**options, "weight": weight}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--start-seed", type=int, default=0,
                        help="train and tabulate seeds START..SEEDS-1 only (two processes "
                             "can share a comparison without training the same run)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="another setting to compare, e.g. 'kd-t1={\"kd\": {\"weight\": 1, "
                             "\"temperature\": 1}}'; then list NAME in --methods")
    parser.add_argument("--methods", nargs="+", default=list(COMPARISON),
                        help="names of kdnb.experiments.COMPARISON, VARIANTS (the authors' "
                             "choices) or PUBLIC (CIRKD, Af-DCD), or of a --variant")
    parser.add_argument("--pair", action="append", default=[], metavar="METHOD:AGAINST",
                        help="another paired method-vs-method row (beside PAIRS), e.g. "
                             "nfd-multi-w8:mse-multi")
    parser.add_argument("--sweep", help="METHOD=w1,w2,...: val mIoU per weight, seed 0")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a student config field for every run (use with --tag)")
    parser.add_argument("--teacher-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a teacher config field, e.g. steps=3600 (use with --tag)")
    parser.add_argument("--tag", help="runs go to ROOT/TAG (other settings, other runs)")
    parser.add_argument("--regime", choices=("scratch", "pretrained"), default="scratch",
                        help="scratch: random init (the default); pretrained: teacher and "
                             "students start from encoders trained on PretextShapes "
                             "(kdnb.pretrain, cached), runs under ROOT/pretrained")
    parser.add_argument("--matched-compute", action="store_true",
                        help="after the methods, train the baseline longer at each method's "
                             "compute ratio and add the compute-matched gain to the tables")
    parser.add_argument("--root", default="runs/synth_distill")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (tests)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    changes = parse_set(args.set)
    teacher_changes = parse_set(args.teacher_set)
    methods = {**COMPARISON, **VARIANTS, **PUBLIC}
    for item in args.variant:
        name, sep, spec = item.partition("=")
        if not sep or name in methods:
            raise SystemExit(f"--variant expects NAME=JSON with a new NAME, got {item!r}")
        methods[name] = json.loads(spec)
    pairs = list(PAIRS)
    for item in args.pair:
        a, sep, b = item.partition(":")
        if not sep or a not in methods or b not in methods:
            raise SystemExit(f"--pair expects METHOD:AGAINST, two of {list(methods)}, got {item!r}")
        pairs.append((a, b))
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose among {list(methods)} "
                         "(or define one with --variant)")
    if args.matched_compute and (args.sweep or "baseline" not in args.methods):
        raise SystemExit("--matched-compute compares the methods with the baseline: keep "
                         "baseline among --methods, and leave out --sweep")
    if (changes or teacher_changes) and not args.tag:  # (before --regime adds its own)
        raise SystemExit("--set and --teacher-set change the runs: give them their own folder "
                         "with --tag NAME")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = Path(args.root)
    if args.regime == "pretrained":
        # Both encoders start from the pretext task; a separate folder, like a --tag.
        root = root / "pretrained"
        pretext = (PretrainConfig(steps=8, batch_size=16, length=256) if args.quick
                   else PretrainConfig())
        for preset, target in (("synth-teacher", teacher_changes), ("synth-student", changes)):
            path = pretrain_or_load(dataclasses.replace(pretext, preset=preset),
                                    progress=not args.quick)
            target.setdefault("encoder_init", str(path))
            print(f"{preset}: encoder from {path.name} (pretext val accuracy "
                  f"{load_checkpoint(path)['val_accuracy']:.3f})", flush=True)
    teacher_cfg = teacher_config(quick=args.quick).replace(**teacher_changes)
    teacher_dir = root / ("teacher" if set(teacher_changes) <= {"encoder_init"}
                          else f"teacher-{args.tag}")
    train_or_load(teacher_cfg, teacher_dir, progress=not args.quick)
    teacher = str(cache_path(teacher_cfg))
    if args.tag:
        root = root / args.tag
    test_set = build_dataset("synth", split="test", **teacher_cfg.data_kwargs)
    teacher_model = model_from_checkpoint(teacher)
    teacher_digest = weights_digest(teacher_model.state_dict())
    teacher_test = 100 * evaluate(teacher_model, test_set, num_classes=test_set.num_classes,
                                  batch_size=32)["miou"]
    val_set = build_dataset("synth", split="val", **teacher_cfg.data_kwargs)
    teacher_val = 100 * evaluate(teacher_model, val_set, num_classes=val_set.num_classes,
                                 batch_size=32)["miou"]

    held_out = {"val": val_set, "test": test_set}
    shared = TeacherOutputs()  # every student distils the same teacher on the same pool

    def one(name, methods, seed, **more):
        return run_one(name, methods, seed, teacher, root, args.quick, held_out,
                       {**changes, **more}, shared, count_missing=args.matched_compute)

    if args.sweep:
        name, weights = parse_sweep(args.sweep, methods)
        runs = [one("baseline", {}, 0)]
        for w in weights:
            spec = with_weight(methods[name], w)
            # the chosen weight's run is seed 0 of the paired table: trained once
            runs.append(one(name if spec == methods[name] else f"{name}-w{w:g}", spec, 0))
        lines = [f"{Path(r).name}: val mIoU {read_run(r, 'val')['miou']:.2f}, "
                 f"test {read_run(r, 'test')['miou']:.2f}" for r in runs]
        lines.append(f"teacher: val mIoU {teacher_val:.2f}, test {teacher_test:.2f} ({Path(teacher).name}, "
                     f"weights SHA-256 {teacher_digest[:16]})")
        report = "\n".join(lines)
        title = f"Weight sweep for {name} on val (seed 0)"
    else:
        seeds = range(args.start_seed, args.seeds)
        runs = {(name, seed): one(name, methods[name], seed)
                for seed in seeds for name in args.methods}
        longer = matched_baselines(runs, one, seeds) if args.matched_compute else {}
        parts = []
        for split, teacher_miou in (("val", teacher_val), ("test", teacher_test)):
            named = [read_run(r, split, n) for (n, _), r in {**runs, **longer}.items()]
            # compare() knows the longer baselines as baselines of other steps
            rows = [{**row, "methods": "baseline"} if (row["methods"], row["seed"]) in longer
                    else row for row in named]
            table = format_table(compare(rows, teacher_miou), teacher_miou,
                                 matched_compute=args.matched_compute)
            paired = paired_table(named, pairs)
            heading = "val (model selection)" if split == "val" else "test (reported)"
            parts.append(f"{heading}:\n\n{table}" + (f"\n\n{paired}" if paired else "")
                         + f"\n\nPer seed ({split}):\n\n{per_seed_table(named)}")
        report = "\n\n".join(parts) + f"\n\nTeacher weights: SHA-256 {teacher_digest[:16]}"
        title = f"SynthScenes distillation, {args.seeds} paired seeds"
    if args.regime == "pretrained":
        title += ", pretrained regime (encoders from the pretext task)"
    if args.matched_compute:
        title += ", with compute-matched baselines"
    shown = {k: v for k, v in changes.items() if k != "encoder_init"}
    if shown:
        title += f", student changes {shown}"
    shown = {k: v for k, v in teacher_changes.items() if k != "encoder_init"}
    if shown:
        title += f", teacher changes {shown}"
    wall = time.perf_counter() - start
    print(report)
    print(f"\n{wall:.0f} s")
    if not args.no_write:
        append_section(args.out, title, wall, report,
                       note="teacher outputs cached: fixed pool, no flip")


if __name__ == "__main__":
    main()
