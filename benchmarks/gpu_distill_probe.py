"""A 200-step bf16 distillation on a GPU: steps/s and peak memory of the Cityscapes recipe.

    python benchmarks/gpu_distill_probe.py                      # GPU: 200 steps, batch 16
    python benchmarks/gpu_distill_probe.py --methods kd=1,cirkd # another method of the recipe
    python benchmarks/gpu_distill_probe.py --quick --no-write   # seconds on one CPU thread

The run is ``configs/cityscapes-student-r18.json`` (DeepLabV3-R18 student, SGD lr 0.02,
poly 0.9, batch 16 at 512x1024, bf16 autocast and channels-last) distilled from a
DeepLabV3-R101 teacher with ``--methods`` (default ``nfd=1,fakd``, the one-GPU command of
configs/README.md), both randomly initialized (the teacher's BatchNorm statistics
calibrated on the batch, as in ``gpu_throughput.py``), on synthetic batches that already
live on the device (random images, 8x8-pixel blocks of random labels, 5 % ignored;
``--batches`` of them in turn): no dataset, no download. Each step is kdnb's own:
:meth:`kdnb.train.Trainer.run_step` (:func:`kdnb.distill.distill_step`, backward, the
optimizer, the schedule) on a trainer built by :func:`kdnb.build.build_trainer`, as
``Trainer.fit``'s loop runs it, without the loader and the log lines.

Measured: untimed warm-up steps, then ``--steps`` steps between two CUDA events (nothing
syncs inside; the losses are read after the window): steps/s, images/s, TFLOP/s and MFU
(FLOPs of one step counted with ``FlopCounterMode``, against the bf16 peak of
``gpu_throughput.py``'s table), and the peak memory of the whole run
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``: models, optimizer state,
activations). On a CPU the sizes shrink (``--quick``: SynthScenes presets at 64x128,
batch 2, 2 steps), and peak memory is the process's peak RSS: the numbers mean nothing.
``benchmarks/gpu_check.sh`` runs this as one step of the GPU check.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from kdnb import __version__ as kdnb_version
from kdnb.config import TrainConfig, read_json_object
from kdnb.data import dataset_info
from kdnb.losses.spec import parse_methods

from _measure import add_common_arguments, device_name, random_masks, resolve_common_arguments
from _results import append_text, command_line
from gpu_throughput import (BatchDataset, PeakMemory, build_pair, count_flops, fmt,
                            kdnb_trainer, peak_bf16_tflops, plural, time_window)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "cityscapes-student-r18.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=RECIPE,
                        help="the student's recipe (default: configs/cityscapes-student-r18.json)")
    parser.add_argument("--teacher", default=None,
                        help="teacher preset (default: deeplabv3-r101; synth-teacher with --quick)")
    parser.add_argument("--methods", default="nfd=1,fakd", help="as kdnb distill takes them "
                        "(default: nfd=1,fakd)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                        help="a method's option, as kdnb distill --set")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: the recipe's (16) on CUDA, 2 on CPU")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="default: the recipe's crop (512 1024) on CUDA, 64 128 on CPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default: 200 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--batches", type=int, default=4,
                        help="synthetic batches on the device, used in turn (default: 4)")
    add_common_arguments(parser, "SynthScenes presets, tiny sizes, 2 steps: checks that the "
                                 "script runs, its numbers mean nothing")
    args = parser.parse_args(argv)

    cuda = resolve_common_arguments(parser, args)
    big = cuda and not args.quick
    saved = read_json_object(args.config, "config", "pass a file of configs/")
    args.recipe = TrainConfig.from_dict({k: v for k, v in saved.items() if not k.startswith("_")})
    args.teacher = args.teacher or ("synth-teacher" if args.quick else "deeplabv3-r101")
    args.student = "synth-student" if args.quick else args.recipe.model
    args.batch = args.batch or (args.recipe.batch_size if big else 2)
    args.size = args.size or (list(args.recipe.crop_size) if big else [64, 128])
    args.steps = args.steps or (200 if big else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if big else 1)
    args.workers = 0  # no loader: the batches live on the device
    try:
        args.method_spec = parse_methods(args.methods, args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.batch < 2 or args.steps < 1 or args.warmup < 0 or args.batches < 1:
        parser.error("--batch must be >= 2, --steps and --batches >= 1, --warmup >= 0")
    return args


def probe_config(args) -> TrainConfig:
    """The recipe, with the teacher in memory, random init, one process and the probe's sizes."""
    return args.recipe.replace(
        model=args.student, teacher="(in memory)", methods=args.method_spec,
        encoder_weights=None, sync_bn=False, batch_size=args.batch, crop_size=tuple(args.size),
        steps=args.warmup + args.steps + 1, workers=0, seed=args.seed,
        device=str(torch.device(args.device)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    command = command_line(__file__, argv)
    cfg = probe_config(args)
    classes = dataset_info(cfg.data)["num_classes"]
    machine = device_name(device, torch.get_num_threads())
    setup = (f"{args.teacher} -> {args.student}, K = {classes}, methods {args.methods}"
             + "".join(f" --set {s}" for s in args.set)
             + f"; batch {args.batch} at {args.size[0]}x{args.size[1]}")
    config = args.config.resolve()
    recipe = (f"{config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"
              f" ({cfg.optimizer} lr {cfg.lr:g}, poly {cfg.poly_power:g}; bf16 autocast "
              f"{'on' if cuda and cfg.amp else 'off'}, channels-last "
              f"{'on' if cuda and cfg.channels_last else 'off'})")
    print(f"{machine} | torch {torch.__version__} | kdnb {kdnb_version}")
    print(f"probe: {setup}\nrecipe: {recipe}", flush=True)

    started = time.perf_counter()
    memory = PeakMemory(device)
    memory.reset()
    gen = torch.Generator().manual_seed(args.seed)
    batches = [(torch.rand(args.batch, 3, *args.size, generator=gen).to(device),
                random_masks(args.batch, tuple(args.size), classes, device, gen))
               for _ in range(args.batches)]
    result: dict = {}
    try:
        pair = build_pair(args, classes, device, batches[0][0])
        trainer = kdnb_trainer(cfg, pair.teacher, pair.student,
                               BatchDataset(*batches[0], num_classes=classes))
        trainer.train_mode()  # what fit does before its loop
        losses: list[torch.Tensor] = []

        def step() -> None:
            images, masks = batches[trainer.step % len(batches)]
            out = trainer.run_step(images, masks)
            losses.append(out["loss"])

        for _ in range(args.warmup):
            step()
        losses.clear()
        s_per_step = time_window(step, args.steps, cuda)
        timed = torch.stack(losses).float().cpu()
        peak = memory.read()
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
        flops = count_flops(step)
        head = min(10, args.steps)
        result = {"s_per_step": s_per_step, "peak": peak, "reserved": reserved, "flops": flops,
                  "first": timed[:head].mean().item(), "last": timed[-head:].mean().item(),
                  "finite": bool(torch.isfinite(timed).all())}
    except torch.cuda.OutOfMemoryError:
        result = {"error": f"out of memory at batch {args.batch} ({memory.read():.1f} GiB "
                           "allocated at the peak)"}
    wall = time.perf_counter() - started

    peak_tflops = peak_bf16_tflops(torch.cuda.get_device_name(device)) if cuda else None
    if "error" in result:
        summary = table = f"probe: {result['error']}"
    else:
        rate = 1 / result["s_per_step"]
        tflops = result["flops"] / result["s_per_step"] / 1e12
        mfu = 100 * tflops / peak_tflops[1] if peak_tflops else None
        summary = (f"probe: {rate:.2f} steps/s, {rate * args.batch:.1f} images/s, "
                   f"{tflops:.1f} TFLOP/s (MFU {fmt(mfu, '.1f')} %), peak memory "
                   f"{result['peak']:.2f} GiB {'allocated' if cuda else 'RSS'} (batch "
                   f"{args.batch} at {args.size[0]}x{args.size[1]}); loss {result['first']:.3f} "
                   f"over the first {head} timed steps, {result['last']:.3f} over the last {head}"
                   + ("" if result["finite"] else "; NOT FINITE"))
        cells = [str(args.steps), f"{rate:.2f}", f"{rate * args.batch:.1f}",
                 f"{1e3 * result['s_per_step']:.1f}", f"{tflops:.1f}", fmt(mfu, ".1f"),
                 f"{result['peak']:.2f}", fmt(result["reserved"], ".2f"),
                 f"{result['first']:.3f}", f"{result['last']:.3f}"]
        table = "\n".join([
            "| steps | steps/s | images/s | ms/step | TFLOP/s | MFU % | peak GiB | reserved GiB "
            f"| loss, first {head} | loss, last {head} |", "|---:" * len(cells) + "|",
            "| " + " | ".join(cells) + " |"])
    print(summary)
    print(f"wall time {wall:.1f} s", flush=True)

    if not args.no_write:
        parts = [f"\n## Distillation probe, {datetime.date.today()}\n",
                 f"- command: `{command}`",
                 f"- device: {machine}; torch {torch.__version__}, kdnb {kdnb_version}"
                 + (f"; bf16 dense peak {peak_tflops[1]:g} TFLOP/s ({peak_tflops[0]})"
                    if peak_tflops else ""),
                 f"- run: {recipe}; {setup}; random init; {args.batches} synthetic batches on "
                 "the device in turn (random images, 8x8 blocks of random labels, 5 % ignored)",
                 f"- timing: {plural(args.warmup, 'warm-up step')}, then {plural(args.steps, 'step')}"
                 + (" between CUDA events" if cuda else "") + "; peak memory: "
                 + ("`torch.cuda.max_memory_allocated` over the whole run" if cuda else
                    "process peak RSS (CPU)") + f"; wall time {wall:.0f} s"]
        if args.quick:
            parts.append("- `--quick`: SynthScenes presets, tiny sizes, the numbers mean nothing")
        parts += ["", table, "", f"**{summary}**"]
        append_text(args.out, "\n".join(parts))
    return 1 if "error" in result or not result.get("finite", True) else 0


if __name__ == "__main__":
    sys.exit(main())
