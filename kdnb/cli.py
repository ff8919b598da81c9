"""The ``kdnb`` command: train, evaluate, list datasets and presets, run the demo.

Every subcommand works on the same :class:`kdnb.config.TrainConfig` that the library and
the notebooks use; ``kdnb <command> --help`` lists the options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .config import RECIPES, TrainConfig, get_recipe, read_json_object
from .losses.spec import parse_methods, parse_value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe")
    p.add_argument("--config", help="start from a config JSON (configs/ holds the paper recipes)")
    p.add_argument("--model", help="model preset (kdnb presets lists them)")
    p.add_argument("--data", help="dataset: synth, voc, cityscapes, ade20k, camvid")
    p.add_argument("--root", help="data root (default: $KDNB_DATA or <repo>/data)")
    p.add_argument("--size", type=int, help="SynthScenes image size")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int, help="steps between loss log lines")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--encoder-weights", help="'imagenet' (needs the network or a warm cache)")
    p.add_argument("--encoder-init", help="a pretext encoder file (kdnb pretrain) to start from")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="an smp model option, e.g. decoder_dropout=0 (repeatable)")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="a dataset option, e.g. unlabelled=0 (SynthScenes fully annotated) or "
                        "length=1000 (repeatable)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm keeps its running statistics")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--cache-teacher", action="store_true",
                   help="compute the teacher's outputs once (needs a fixed pool: --no-flip)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradients are NaN/Inf instead of stopping "
                        "(costs one host sync per step); may be turned on when resuming")
    p.add_argument("--no-flop-count", action="store_true",
                   help="do not count FLOPs for cost.json (the count copies the student once "
                        "at the start: turn it off where that is slow or does not fit)")
    p.add_argument("--run-dir", help="output folder (default runs/<model>-<data>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")


#: on/off flags: argparse name -> (config field, the value the flag sets)
SWITCHES = {"sync_bn": ("sync_bn", True), "freeze_bn": ("freeze_bn", True),
            "no_flip": ("flip", False), "cache_teacher": ("cache_teacher", True),
            "no_amp": ("amp", False), "skip_nonfinite": ("skip_nonfinite", True),
            "no_flop_count": ("count_flops", False)}


def config_from_args(args) -> TrainConfig:
    if args.recipe and args.config:
        raise ValueError("pass --recipe or --config, not both")
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist (configs/ holds the recipes)")
        saved = read_json_object(path, "config", "fix it, or start from one in configs/")
        cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if not k.startswith("_")})
    else:
        cfg = get_recipe(args.recipe) if args.recipe else TrainConfig()
    mapping = {"model": "model", "data": "data", "root": "root", "steps": "steps",
               "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
               "weight_decay": "weight_decay", "eval_every": "eval_every",
               "ckpt_every": "ckpt_every", "log_every": "log_every", "seed": "seed", "device": "device",
               "workers": "workers", "threads": "threads", "encoder_weights": "encoder_weights",
               "encoder_init": "encoder_init"}
    changes = {field: getattr(args, arg) for arg, field in mapping.items()
               if getattr(args, arg) is not None}
    if args.crop:
        changes["crop_size"] = tuple(args.crop)
    data = changes.get("data", cfg.data)
    # A recipe's dataset options belong to its dataset: another --data starts from none.
    data_kwargs = dict(cfg.data_kwargs) if data == cfg.data else {}
    if args.size is not None:
        data_kwargs["size"] = args.size
    model_kwargs = dict(cfg.model_kwargs)
    for flag, options, example in (("model-arg", model_kwargs, "decoder_dropout=0"),
                                   ("data-arg", data_kwargs, "unlabelled=0")):
        for item in getattr(args, flag.replace("-", "_")) or []:
            key, eq, text = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
            value = parse_value(text)
            if isinstance(value, float) and value.is_integer() and "." not in text:
                value = int(value)
            options[key.strip()] = value
    if data_kwargs != cfg.data_kwargs:
        changes["data_kwargs"] = data_kwargs
    if model_kwargs != cfg.model_kwargs:
        changes["model_kwargs"] = model_kwargs
    for flag, (field, value) in SWITCHES.items():
        if getattr(args, flag):
            changes[field] = value
    if data != "synth" and "eval_batch_size" not in changes:
        changes["eval_batch_size"] = 1  # real images differ in size
    return cfg.replace(**changes)


def cmd_train(args) -> int:
    from .build import build_trainer

    cfg = config_from_args(args)
    if getattr(args, "teacher", None):
        cfg = cfg.replace(teacher=args.teacher, methods=parse_methods(args.methods, args.set))
    name = f"{cfg.model}-{cfg.data}-{'+'.join(cfg.methods) or 'alone'}-s{cfg.seed}"
    run_dir = Path(args.run_dir or f"runs/{name}")
    trainer = build_trainer(cfg, run_dir)
    final = trainer.fit(resume=args.resume)
    if trainer.rank == 0:
        print(f"{cfg.model} on {cfg.data} {cfg.eval_split}: mIoU {100 * final['miou']:.2f}  "
              f"(run directory {run_dir})")
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_checkpoint, model_from_record
    from .data import build_dataset, dataset_info
    from .metrics import evaluate
    from .runtime import resolve_device

    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt.get("config", {})
    data = args.data or cfg.get("data", "synth")
    kwargs = cfg.get("data_kwargs", {}) if data == cfg.get("data") else {}
    info = dataset_info(data)
    model = model_from_record(ckpt, args.ckpt, num_classes=info["num_classes"])
    device = resolve_device(args.device)
    dataset = build_dataset(data, args.root or cfg.get("root"), args.split, **kwargs)
    result = evaluate(model.to(device), dataset, num_classes=info["num_classes"],
                      batch_size=args.batch_size or (16 if data == "synth" else 1),
                      device=device, progress=True)
    print(f"{ckpt['preset']} on {data} {args.split}: mIoU {100 * result['miou']:.2f}  "
          f"pixel acc {100 * result['acc']:.2f}")
    for name, iou in zip(info["classes"], result["iou"]):
        print(f"  {name:24s} {100 * iou:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "data": data,
                                               "split": args.split, **result}, indent=2))
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, format_table, read_run

    rows = [read_run(run, args.split) for run in args.runs]
    teacher = args.teacher_miou
    if teacher is None:  # the teacher's own run directory, when the checkpoint sits in one
        paths = {r["teacher"] for r in rows if r["teacher"]}
        if len(paths) == 1:
            try:
                teacher = read_run(Path(paths.pop()).parent, args.split)["miou"]
            except FileNotFoundError:
                teacher = None
    table = format_table(compare(rows, teacher), teacher)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def cmd_datasets(args) -> int:
    from .data import REAL_DATASETS, data_root, dataset_module

    base = data_root(args.root)
    print(f"data root: {base}  (set by --root, $KDNB_DATA, or <repo>/data)")
    print(f"  {'synth':11s} built in (procedural, no files)")
    for name in REAL_DATASETS:
        mod = dataset_module(name)
        problem = mod.check(base)
        state = "found" if problem is None else f"missing ({problem})"
        print(f"  {name:11s} {state}: {base / mod.FOLDER}")
        if problem is not None:
            print(f"  {'':11s} {mod.HOW_TO_GET}"
                  + ("  Or: build_dataset(..., download=True)." if hasattr(mod, "download") else ""))
    return 0


def cmd_presets(args) -> int:
    from .models import PRESETS

    for name, p in sorted(PRESETS.items()):
        print(f"  {name:16s} {p.role:8s} {p.description}")
    return 0


def cmd_weights(args) -> int:
    from .models import build_model

    build_model(args.preset, 2, encoder_weights="imagenet")
    print(f"ImageNet weights for {args.preset} are in the Hugging Face cache "
          f"({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}).")
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretext_path, pretrain_encoder

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(preset=args.preset, **({"steps": args.steps} if args.steps else {}))
    path = Path(args.out) if args.out else pretext_path(cfg, args.root)
    if path.is_file() and not args.out:
        print(f"{path} exists (cached): use it as encoder_init")
        return 0
    record = pretrain_encoder(cfg, path)
    print(f"{cfg.preset}'s encoder ({record['encoder']}): pretext val accuracy "
          f"{100 * record['val_accuracy']:.1f} %, {record['seconds']:.0f} s; written to {path}\n"
          f"start a run from it with --encoder-init {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(out=Path(args.out), quick=args.quick or os.environ.get("KDNB_QUICK") == "1",
             fresh=args.fresh, threads=args.threads, methods=methods,
             student_steps=args.student_steps, full=args.full)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdnb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a teacher or a student alone")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("distill", help="train a student with a frozen teacher")
    _add_train_args(p)
    p.add_argument("--teacher", required=True, help="the teacher's model.pt")
    p.add_argument("--methods", default="kd",
                   help="losses and weights, e.g. kd=1,nfd=2,fakd (fakd augments kd, nfd or mse)")
    p.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                   help="a loss option, e.g. nfd.norm=spatial or fakd.lambda_0=5 (repeatable)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("--ckpt", required=True, help="model.pt or ckpt-*.pt of a run")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--root")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this file")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="table of runs: mean and std over seeds, paired gains")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--split", default="val", help="val (model selection) or test (reporting)")
    p.add_argument("--teacher-miou", type=float, help="the teacher's mIoU on that split")
    p.add_argument("--out", help="also write the table to this file")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("datasets", help="which datasets are available, and where kdnb looks")
    p.add_argument("--root")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("pretrain", help="pretrain a preset's encoder on PretextShapes (the "
                       "pretrained regime, no download)")
    p.add_argument("--preset", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--root", help="data root whose checkpoints/ caches it")
    p.add_argument("--out", help="write here instead of the cache")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("weights", help="download ImageNet encoder weights for a preset")
    p.add_argument("--preset", required=True)
    p.set_defaults(func=cmd_weights)
    p = sub.add_parser("demo", help="teacher, then students compared on SynthScenes (one seed), "
                       "with a prediction PNG")
    p.add_argument("--out", default="runs/demo")
    from .demo import DEMO_METHODS, DEMO_STUDENT_STEPS, DEMO_TEACHER_STEPS, FULL_STUDENT_STEPS
    from .experiments import COMPARISON, teacher_config

    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"students to compare (kdnb.experiments.COMPARISON: "
                        f"{', '.join(COMPARISON)})")
    p.add_argument("--student-steps", type=int,
                   help=f"steps per student (default: {DEMO_STUDENT_STEPS}, with --full "
                        f"{FULL_STUDENT_STEPS})")
    p.add_argument("--full", action="store_true",
                   help=f"the teacher the notebooks and benchmarks share ({teacher_config().steps} "
                        f"steps, cached for them) instead of the 15-minute budget's "
                        f"({DEMO_TEACHER_STEPS})")
    p.add_argument("--quick", action="store_true", help="a tiny budget (for tests); also KDNB_QUICK=1")
    p.add_argument("--fresh", action="store_true", help="retrain even if a cached model exists")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kdnb: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line, without kdnb's source
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError,
            FloatingPointError) as err:
        if os.environ.get("KDNB_DEBUG"):
            raise
        print(f"kdnb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: the trainer's message says how to go on
        if os.environ.get("KDNB_DEBUG"):
            raise
        print(f"kdnb {args.command}: "
              f"{str(err) or 'interrupted before training started; nothing to resume'}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
