"""The time each distillation loss adds to a student training step, as a share of that step.

    python benchmarks/loss_overhead.py                      # CPU: synth-student, K = 19
    python benchmarks/loss_overhead.py --classes 19 150     # GPU when present: deeplabv3-r18
    python benchmarks/loss_overhead.py --quick --no-write   # seconds; what tests/ runs

Prints, for every method of :data:`kdnb.losses.METHODS` and the FAKD variants, the median
time of the loss's forward + backward in milliseconds and as a percentage of one student
forward + backward on the same batch, then appends the tables to benchmarks/RESULTS.md
with the date, the machine, the torch version and the exact command.

What is timed:

* **student step**: ``forward_with_head`` + cross-entropy on the full-resolution logits +
  ``backward()`` of a randomly initialized student in training mode (no optimizer step,
  no teacher, no data loading). On CUDA it runs like ``kdnb.train``: bf16 autocast and
  channels-last (``--amp off`` for float32).
* **each loss, in isolation**: the student's head tensors of that batch (head logits
  ``(B, K, h, w)`` and head features ``(B, C_s, h, w)``) are detached and made leaves
  that require grad; the loss module (training mode, built by ``build_losses`` with its
  default options) runs its forward and ``backward()`` into those leaves and into its own
  parameters (adapters; for FAKD on logits also the student's classifier weight, which the
  bound differentiates through).
* **teacher tensors** are random, of a DeepLabV3-R101-like teacher's shapes (``C_t = 256``
  by default, logits over the same K, at the student's head ``h, w``). No teacher is run:
  its forward costs the same whatever the loss, so it is left out of both sides.

Why isolation and not "(step with the loss) - (step alone)": everything a loss adds to a
step is its own forward, its own backward down to the head tensors, and one add of its
gradient into the gradient the classifier already sends there; past the head tensors the
student's backward is unchanged, because every loss here reads tensors that are already
on the student's graph. Timing the loss alone measures exactly that work, while the
difference of two whole steps subtracts two numbers of seconds to find a few
milliseconds, and on a shared CPU their noise is larger than the answer. The isolated
time leaves out cache and allocator effects of running inside the step; ``--in-step``
also measures the difference of whole steps (paired, per repeat) as a cross-check.

Stability: every repeat runs the student step and then every loss once, round-robin, so
slow drifts of the machine reach all methods alike; tables show the median and the
interquartile range over repeats. On CUDA each timing is bracketed by
``torch.cuda.synchronize()``, and the host synchronizations each loss makes are counted
once, untimed, with ``torch.cuda.set_sync_debug_mode("warn")``.

FAKD replaces the loss it augments (``FAKDLoss(on="logits")`` *is* KD at ``lam = 0``), so
its cost is also reported against that loss: the rows ``kd+fakd (full) - kd`` and
``nfd+fakd (full) - nfd`` are medians of per-repeat differences. The first one at
K = 19 is the acceptance criterion "FAKD adds at most 5 % to a student step". FAKD runs in
training mode, so each call also updates its class covariance (no host sync), with
``lam = lambda_0`` (the schedule's end; the cost does not depend on it). Masks are blocks
of random labels (every class present, 5 % ignored): the most classes a batch can hold,
so the per-class work of FAKD and IFVD is at its largest.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from typing import Callable

import torch

from kdnb import __version__ as kdnb_version
from kdnb.distill import task_loss
from kdnb.features import forward_with_head
from kdnb.losses import build_losses, resolve_methods
from kdnb.models import build_model

from _results import append_text, command_line  # benchmarks/_results.py
from _measure import (FAKD_DIFFS, LOSS_ROWS, add_common_arguments, count_host_syncs,
                      device_name, random_masks, resolve_common_arguments)

CRITERION = ("kd+fakd (full)", 19, 5.0)  # (row, K, at most this % of a student step)
#: CIRKD's recipe is pixel KD plus CIRKD: its step over a pixel-KD step, at K = 19 and a
#: 64x128 head map, at most this ratio.
CIRKD_CRITERION = (19, (64, 128), 2.0)
# Image size on CPU, per student, for a step of a few seconds on two cores at batch 8
# (extrapolated from one-thread steps at batch 2, 64x128: about 2 to 3 s for each).
CPU_SIZES = {"synth-student": (256, 512)}


# --------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None,
                        help="model preset (default: deeplabv3-r18 on CUDA, synth-student on CPU "
                             "and with --quick)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="one table per K (default: 19)")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (2 with --quick)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image size (default: 512 1024 on CUDA; on CPU 256 512 for "
                             "synth-student, 128 256 for the others; 64 64 with --quick)")
    parser.add_argument("--teacher-channels", type=int, default=256,
                        help="C_t of the simulated teacher's head features (default: 256)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (default: 20 on CUDA, 7 on CPU, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds first (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="bf16 autocast and channels-last, as kdnb.train; auto (the "
                             "default): on CUDA only")
    parser.add_argument("--only", nargs="+", metavar="ROW", default=None,
                        help="time these rows only (names as in the table, e.g. kd cirkd "
                             "'kd+fakd (full)'); default: every row")
    parser.add_argument("--in-step", action="store_true",
                        help="also time (step with the loss) - (step alone), paired per repeat")
    add_common_arguments(parser, "tiny sizes and 2 repeats: checks that the script runs, "
                                 "its numbers mean nothing")
    args = parser.parse_args(argv)

    cuda = resolve_common_arguments(parser, args)
    if args.student is None:
        args.student = "synth-student" if args.quick or not cuda else "deeplabv3-r18"
    args.classes = args.classes or [19]
    if args.batch is None:
        args.batch = 2 if args.quick else 8
    if args.size is None:
        if args.quick:
            args.size = [64, 64]
        elif cuda:
            args.size = [512, 1024]
        else:  # a student step of a few seconds on two cores
            args.size = list(CPU_SIZES.get(args.student, (128, 256)))
    if args.repeats is None:
        args.repeats = 2 if args.quick else (20 if cuda else 7)
    if args.warmup is None:
        args.warmup = 1 if (args.quick or not cuda) else 3
    args.amp = cuda if args.amp == "auto" else args.amp == "on"
    if args.amp and not cuda:
        parser.error("--amp on needs CUDA (the trainer uses autocast only there)")
    for name in ("repeats", "teacher_channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm in training mode, e.g. DeepLabV3's "
                     "image pooling, needs two samples)")
    if args.only:
        unknown = [r for r in args.only if r not in LOSS_ROWS or r == "base"]
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; choose among "
                         f"{[r for r in LOSS_ROWS if r != 'base']}")
    if min(args.classes) < 2 or min(args.size) < 8:
        parser.error("--classes must be >= 2 and --size at least 8 8")
    return args


# --------------------------------------------------------------------------- timing

class Timer:
    """Wall-clock seconds of a callable, synchronizing the device on both sides."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def median_iqr(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (the range itself when there are fewer than 4)."""
    if len(values) < 4:
        return statistics.median(values), max(values) - min(values)
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return med, q3 - q1


# --------------------------------------------------------------------------- one K

def build_methods(model, num_classes: int, student_channels: int, teacher_channels: int,
                  device: torch.device, only: list[str] | None = None
                  ) -> dict[str, torch.nn.Module]:
    """Every loss to time (or those of ``only``), by table label (:data:`LOSS_ROWS`, built
    as a run builds them), on ``device`` and in training mode; FAKD at ``lam = lambda_0``."""
    losses = {}
    for label, methods in LOSS_ROWS.items():
        if label == "base" or (only and label not in only):
            continue
        (name, options), = resolve_methods(methods).items()
        if name == "fakd" and options["on"] == "logits":
            options["classifier"] = model.classifier
        losses[label] = build_losses({name: options}, student_channels=student_channels,
                                     teacher_channels=teacher_channels,
                                     num_classes=num_classes)[name]
        if hasattr(losses[label], "set_progress"):
            losses[label].set_progress(1, 1)
    return {label: loss.to(device).train() for label, loss in losses.items()}


def run_one_k(args: argparse.Namespace, num_classes: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    model = build_model(args.student, num_classes).to(device).train()
    images = torch.rand(args.batch, 3, *args.size, generator=gen).to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    masks = random_masks(args.batch, tuple(args.size), num_classes, device, gen)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    with torch.no_grad(), autocast():
        _, feats, head_logits = forward_with_head(model, images)
    _, student_channels, h, w = feats.shape
    teacher = {  # a DeepLabV3-R101-like teacher at the student's head resolution
        "logits": 3 * torch.randn(args.batch, num_classes, h, w, generator=gen).to(device),
        "feats": torch.randn(args.batch, args.teacher_channels, h, w, generator=gen).to(device),
    }
    losses = build_methods(model, num_classes, student_channels, args.teacher_channels, device,
                           args.only)
    leaves = {"logits": head_logits.detach().requires_grad_(),
              "feats": feats.detach().requires_grad_()}

    def clear_grads() -> None:
        model.zero_grad(set_to_none=True)
        for loss in losses.values():
            loss.zero_grad(set_to_none=True)
        for leaf in leaves.values():
            leaf.grad = None

    def student_step(loss=None) -> None:
        with autocast():
            logits, step_feats, step_head_logits = forward_with_head(model, images)
            total = task_loss(logits, masks)
            if loss is not None:
                total = total + loss({"logits": step_head_logits, "feats": step_feats},
                                     teacher, masks)
        total.backward()

    def loss_step(loss) -> None:
        with autocast():
            value = loss(leaves, teacher, masks)
        value.backward()

    timer = Timer(device)
    step_times: list[float] = []
    loss_times: dict[str, list[float]] = {label: [] for label in losses}
    in_step: dict[str, list[float]] = {label: [] for label in losses}
    for round_ in range(args.warmup + args.repeats):
        timed = round_ >= args.warmup
        clear_grads()
        t_step = timer(student_step)
        if timed:
            step_times.append(t_step)
        for label, loss in losses.items():
            clear_grads()
            t = timer(lambda: loss_step(loss))
            if timed:
                loss_times[label].append(t)
            if args.in_step:
                clear_grads()
                t_with = timer(lambda: student_step(loss))
                clear_grads()
                t_alone = timer(student_step)
                if timed:
                    in_step[label].append(t_with - t_alone)

    syncs = {}
    if cuda:
        for label, loss in losses.items():
            clear_grads()
            syncs[label] = count_host_syncs(lambda: loss_step(loss))
    clear_grads()

    step_ms, step_iqr = median_iqr([1e3 * t for t in step_times])
    rows = []
    for label in losses:
        ms, iqr = median_iqr([1e3 * t for t in loss_times[label]])
        row = {"method": label, "ms": ms, "iqr": iqr, "pct": 100 * ms / step_ms,
               "syncs": syncs.get(label)}
        if args.in_step:
            row["in_step_ms"] = median_iqr([1e3 * t for t in in_step[label]])[0]
        rows.append(row)
    for label, replaced in FAKD_DIFFS:
        if label not in losses or replaced not in losses:
            continue
        diffs = [1e3 * (a - b) for a, b in zip(loss_times[label], loss_times[replaced])]
        ms, iqr = median_iqr(diffs)
        rows.append({"method": f"{label} - {replaced}", "ms": ms, "iqr": iqr,
                     "pct": 100 * ms / step_ms, "syncs": None})
    return {"classes": num_classes, "student_channels": student_channels, "head": (h, w),
            "step_ms": step_ms, "step_iqr": step_iqr, "rows": rows}


# --------------------------------------------------------------------------- report

def criterion_line(result: dict) -> str | None:
    """The acceptance lines this table can decide (FAKD over KD; a CIRKD step over a
    pixel-KD step), or None."""
    rows = {r["method"]: r for r in result["rows"]}
    lines = []
    row_name, k, limit = CRITERION
    row = rows.get(f"{row_name} - kd")
    if result["classes"] == k and row:
        verdict = "met" if row["pct"] <= limit else "NOT met"
        lines.append(f"FAKD over the KD it replaces at K = {k}: {row['ms']:.2f} ms = "
                     f"{row['pct']:.1f} % of a student step (criterion <= {limit:g} %): "
                     f"{verdict}")
    k, head, limit = CIRKD_CRITERION
    if result["classes"] == k and tuple(result["head"]) == head and {"kd", "cirkd"} <= set(rows):
        # CIRKD's recipe trains pixel KD beside it: step + kd + cirkd against step + kd
        kd_step = result["step_ms"] + rows["kd"]["ms"]
        ratio = (kd_step + rows["cirkd"]["ms"]) / kd_step
        verdict = "met" if ratio <= limit else "NOT met"
        lines.append(f"CIRKD step (student step + kd + cirkd) / pixel-KD step (student step "
                     f"+ kd) at K = {k}, {head[0]}x{head[1]}: {ratio:.2f} (criterion <= "
                     f"{limit:g}): {verdict}")
    return "\n".join(lines) or None


def markdown_table(result: dict, cuda: bool, in_step: bool) -> str:
    head = "| method | ms | IQR ms | % of student step |"
    rule = "|---|---:|---:|---:|"
    if in_step:
        head, rule = head + " in-step ms |", rule + "---:|"
    if cuda:
        head, rule = head + " host syncs |", rule + "---:|"
    lines = [head, rule,
             f"| student step | {result['step_ms']:.1f} | {result['step_iqr']:.1f} | 100 |"
             + (" |" if in_step else "") + (" |" if cuda else "")]
    for r in result["rows"]:
        line = f"| {r['method']} | {r['ms']:.2f} | {r['iqr']:.2f} | {r['pct']:.1f} |"
        if in_step:
            line += f" {r['in_step_ms']:.1f} |" if "in_step_ms" in r else " |"
        if cuda:
            line += f" {r['syncs']} |" if r["syncs"] is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def print_table(result: dict, cuda: bool, in_step: bool) -> None:
    h, w = result["head"]
    print(f"\nK = {result['classes']}: student step {result['step_ms']:.1f} ms "
          f"(IQR {result['step_iqr']:.1f}); head features C_s = {result['student_channels']} "
          f"at {h}x{w}")
    header = f"{'method':<24}{'ms':>10}{'IQR ms':>10}{'% of step':>11}"
    header += f"{'in-step ms':>12}" if in_step else ""
    header += f"{'syncs':>7}" if cuda else ""
    print(header)
    for r in result["rows"]:
        line = f"{r['method']:<24}{r['ms']:>10.2f}{r['iqr']:>10.2f}{r['pct']:>10.1f}%"
        if in_step:
            line += f"{r['in_step_ms']:>12.1f}" if "in_step_ms" in r else " " * 12
        if cuda:
            line += f"{r['syncs']:>7}" if r["syncs"] is not None else " " * 7
        print(line)
    line = criterion_line(result)
    if line:
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    command = command_line(__file__, argv)
    setup = (f"{args.student}, random init, training mode, batch {args.batch} at "
             f"{args.size[0]}x{args.size[1]}" + (", bf16 autocast + channels-last" if args.amp
                                                  else ", float32"))
    print(f"{device_name(device, threads)} | torch {torch.__version__} | kdnb {kdnb_version}")
    print(f"student: {setup}; {args.repeats} repeats after {args.warmup} warm-up")
    print(f"teacher: random tensors, C_t = {args.teacher_channels} (no teacher is run)")
    print("times: median of forward + backward of each loss alone on the student's head "
          "tensors; '% of step' against the student's forward + backward")
    if args.quick:
        print("--quick: tiny sizes, the numbers mean nothing")

    results = []
    for num_classes in args.classes:
        result = run_one_k(args, num_classes, device)
        print_table(result, cuda, args.in_step)
        results.append(result)

    if not args.no_write:
        parts = [f"\n## Loss overhead, {datetime.date.today()}\n",
                 f"- command: `{command}`",
                 f"- device: {device_name(device, threads)}; torch {torch.__version__}, "
                 f"kdnb {kdnb_version}",
                 f"- student: {setup}; {args.repeats} repeats after {args.warmup} warm-up",
                 f"- teacher: random tensors of a DeepLabV3-R101-like teacher (C_t = "
                 f"{args.teacher_channels}, the student's head h, w); no teacher is run",
                 "- ms: median over repeats of each loss's forward + backward alone, on the "
                 "student's detached head tensors (see the docstring of "
                 "benchmarks/loss_overhead.py); `a - b` rows: FAKD against the loss it "
                 "replaces, median of per-repeat differences"
                 + ("; in-step ms: median of (step with the loss) - (step alone)"
                    if args.in_step else "")]
        if args.quick:
            parts.append("- `--quick`: tiny sizes, the numbers mean nothing")
        for result in results:
            h, w = result["head"]
            parts.append(f"\n### K = {result['classes']}: student step "
                         f"{result['step_ms']:.1f} ms (head C_s = "
                         f"{result['student_channels']} at {h}x{w})\n")
            parts.append(markdown_table(result, cuda, args.in_step))
            for line in (criterion_line(result) or "").splitlines():
                parts.append(f"\n**{line}**")
        append_text(args.out, "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
