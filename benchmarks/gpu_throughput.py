"""Throughput of a whole distillation step: kdnb's step against a plain fp32 reference loop.

    python benchmarks/gpu_throughput.py                        # GPU: the paper pair, everything
    python benchmarks/gpu_throughput.py --compile --profile    # + torch.compile, + top-ops table
    python benchmarks/gpu_throughput.py --quick --no-write     # seconds on one CPU thread (tests/)

The step is everything one optimizer step costs: the teacher's forward, the student's
forward and backward, the losses and the optimizer. The pair is docs/METHODS.md's
DeepLabV3-R101 -> DeepLabV3-R18 at 512x1024, batch 8, random init, on a synthetic batch
that already lives on the GPU (random images, 8x8-pixel blocks of random labels, 5 %
ignored, so that every class is present and the per-class work of FAKD and IFVD is at
its largest). Printed and appended to benchmarks/RESULTS.md (``--no-write`` skips):

* **variants**, each with images/s, ms/step, achieved TFLOP/s, model FLOP utilisation
  (MFU) against the GPU's dense bf16 peak, peak memory, host syncs per step and the
  speed-up over the reference:

  - ``reference-fp32``: the loop as the research codebases write it (after CIRKD's
    ``train_kd.py``): teacher under ``torch.no_grad``, float32, contiguous NCHW, CIRKD's
    KD loss (permute, contiguous, view, ``log_softmax`` / ``softmax``, ``kl_div``), the
    zero placeholders ``torch.tensor(0.).to(device)`` that CIRKD allocates every step for
    the losses switched off, a poly learning rate set by hand, and ``.item()`` on every
    logged term every step;
  - ``kdnb-fp32``, ``kdnb-bf16``, ``kdnb``: the body of :meth:`kdnb.train.Trainer.fit`'s
    loop itself (:meth:`kdnb.train.Trainer.run_step`, which computes
    :func:`kdnb.distill.distill_step`, then runs backward and the optimizer), on a trainer
    built by :func:`kdnb.build.build_trainer` with the models and the batch handed in, with
    autocast and channels-last off, autocast on, both on (``kdnb`` is kdnb's default
    config). The teacher runs under ``torch.inference_mode``. kdnb enables autocast and
    channels-last only on CUDA, so on a CPU these three rows run the same code;
  - ``kdnb-cudnn-benchmark`` (CUDA): ``kdnb`` with ``torch.backends.cudnn.benchmark``,
    which kdnb does not set;
  - ``kdnb-compile`` (``--compile``): ``kdnb`` with both networks compiled in place
    (``nn.Module.compile``; their forward passes have no hooks);
  - ``kdnb-loader``: ``kdnb`` fed by the loader ``Trainer.fit`` uses (``Trainer.loader``: StepSampler,
    ``CheckedCollate``, pinned memory on CUDA, ``--workers`` processes) over PNG files written
    to a temporary folder (Cityscapes-sized, 1024x2048, with kdnb's training transform:
    scale 0.5-2, crop, flip), and ``loader-only``: that loader alone, to see whether it
    keeps up with the step;
  - ``reference-grad`` (only with ``--variants``): the reference with the teacher's
    autograd bookkeeping on (no ``no_grad``, parameters requiring grad).

* **loss overhead**, at K = 19 and K = 150: kdnb's step (``kdnb`` variant) with each
  loss of :data:`kdnb.losses.METHODS` and the FAKD combinations, against the same step
  with the task loss alone (the teacher still runs), and FAKD against the loss it
  replaces (``kd+fakd (full) - kd``: the acceptance criterion, at most 5 % at K = 19
  and 15 % at K = 150). All methods share one teacher and one student; every timing
  round runs each method's window in turn, so drifts of the machine reach all alike, and
  differences are medians of per-round differences.

Timing: untimed warm-up steps first; then windows of steps, on CUDA between two CUDA
events with a ``synchronize`` before the window and on the end event only (nothing syncs
inside kdnb's steps unless kdnb does); the median window is reported. The variants run
one after the other, so a machine whose speed drifts during the run (a CPU shared with
other jobs) favours some of them; ``--interleave`` builds and warms up every plain variant
first and then takes their windows in turn, round by round (the order reversed every
round), and reports each speed-up as the median of its per-round ratios to the reference
(benchmarks/RESULTS.md, "kdnb's step against the research-code step": one pair measured
0.95x and 1.02x with the variants' order swapped). FLOPs are counted
once with ``torch.utils.flop_counter.FlopCounterMode`` on one kdnb step (teacher
forward, student forward and backward, the losses' matrix products); every variant does
the same model work, so MFU = those FLOPs / step time / peak. Host syncs are counted on
one step after the timing with ``torch.cuda.set_sync_debug_mode("warn")``. Peak memory
is ``torch.cuda.max_memory_allocated`` since the variant's models were placed on the GPU
(on a CPU: the process's peak resident set, reset per variant through
``/proc/self/clear_refs``, so it includes Python and torch themselves).

On a CPU (or with ``--quick``) the sizes shrink so the script keeps running in CI:
the paper pair at 64x128, batch 2, 3 timed steps; ``--quick`` swaps in the SynthScenes
presets (synth-teacher -> synth-student) and times 2 steps, about 20 s on one CPU
thread. Those numbers check that the code runs; they say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from kdnb import __version__ as kdnb_version
from kdnb.build import build_trainer
from kdnb.config import TrainConfig
from kdnb.data import IGNORE_INDEX, SegmentationFolder
from kdnb.data.transforms import Augmented, TrainTransform
from kdnb.features import forward_with_head
from kdnb.models import build_model
from kdnb.train import Trainer

from _results import append_text, command_line  # benchmarks/_results.py
from _measure import (FAKD_DIFFS, LOSS_ROWS, add_common_arguments, count_host_syncs,
                      device_name, random_masks, resolve_common_arguments)

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against
#: ``torch.cuda.get_device_name()``; anything else needs ``--peak-tflops``.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100(?!.*NVL)", "H100 SXM", 989.0),  # "NVIDIA H100 80GB HBM3"; NVL is another part
    (r"H200", "H200", 989.0),
    (r"A100", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),  # not L40 / L40S
)


@dataclass(frozen=True)
class Variant:
    """What one row of the variant table runs (see the module docstring)."""

    step: str = "kdnb"            # "kdnb" (Trainer.run_step) or "reference"
    amp: bool = True              # bf16 autocast (kdnb: CUDA only)
    channels_last: bool = True    # channels-last models and images (kdnb: CUDA only)
    cudnn_benchmark: bool = False
    compile: bool = False         # nn.Module.compile on encoders and decoders
    loader: bool = False          # batches from kdnb's loader instead of the GPU-resident one
    teacher_grad: bool = False    # reference only: the teacher's autograd bookkeeping on


#: variant name -> what it runs.
VARIANTS: dict[str, Variant] = {
    "reference-fp32": Variant(step="reference", amp=False, channels_last=False),
    "reference-grad": Variant(step="reference", amp=False, channels_last=False,
                              teacher_grad=True),
    "kdnb-fp32": Variant(amp=False, channels_last=False),
    "kdnb-bf16": Variant(amp=True, channels_last=False),
    "kdnb": Variant(),
    "kdnb-cudnn-benchmark": Variant(cudnn_benchmark=True),
    "kdnb-compile": Variant(compile=True),
    "kdnb-loader": Variant(loader=True),
}
REFERENCE, KDNB = "reference-fp32", "kdnb"

#: acceptance: (row, K, at most this % of the step with the loss FAKD replaces)
FAKD_CRITERIA = (("kd+fakd (full)", "kd", 19, 5.0), ("kd+fakd (full)", "kd", 150, 15.0))
SPEEDUP_CRITERION, MFU_CRITERION = 2.0, 30.0


# --------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None,
                        help="teacher preset (default: deeplabv3-r101; synth-teacher with --quick)")
    parser.add_argument("--student", default=None,
                        help="student preset (default: deeplabv3-r18; synth-student with --quick)")
    parser.add_argument("--classes", type=int, default=19,
                        help="K of the variant table (default: 19, Cityscapes)")
    parser.add_argument("--loss-classes", type=int, nargs="*", default=[19, 150],
                        help="one loss-overhead table per K (default: 19 150; none: skip)")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="crop size (default: 512 1024 on CUDA, 64 128 on CPU)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="default: reference-fp32 kdnb-fp32 kdnb-bf16 kdnb kdnb-loader, "
                             "+ kdnb-cudnn-benchmark on CUDA, + kdnb-compile with --compile")
    parser.add_argument("--compile", action="store_true", help="add the kdnb-compile variant")
    parser.add_argument("--interleave", action="store_true",
                        help="build and warm up every plain variant first, then time them in "
                             "rounds (one window of each per round, the order reversed every "
                             "round), the speed-up being the median per-round ratio: what a "
                             "machine whose speed drifts needs (no peak memory for those rows; "
                             "the loader variants run after them as usual; not with --profile)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: torch's; for example "
                             "max-autotune-no-cudagraphs)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timed window (default: 10 on CUDA, 3 on CPU, 2 with "
                             "--quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed windows per variant (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--loss-steps", type=int, default=None,
                        help="steps per window in the loss tables (default: 5 on CUDA, 2 on CPU)")
    parser.add_argument("--loss-repeats", type=int, default=None,
                        help="rounds in the loss tables (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes (default: min(8, CPUs) on CUDA, 1 on CPU)")
    parser.add_argument("--loader-files", type=int, default=None,
                        help="PNG pairs the loader reads (default: 2 x batch)")
    parser.add_argument("--source-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size of those PNGs (default: 1024 2048 on CUDA, 2 x crop on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the device for MFU (default: from the table "
                             "in this script, by device name)")
    parser.add_argument("--profile", action="store_true",
                        help="run the PyTorch profiler on a few steps of the kdnb variant and "
                             "print the top ops")
    parser.add_argument("--profile-rows", type=int, default=25, help="(default: 25)")
    parser.add_argument("--trace", type=Path, default=None,
                        help="with --profile: also write a Chrome trace here")
    add_common_arguments(parser, "SynthScenes presets, tiny sizes, 2 steps: checks that the "
                                 "script runs, its numbers mean nothing")
    args = parser.parse_args(argv)

    cuda = resolve_common_arguments(parser, args)
    big = cuda and not args.quick  # the acceptance setting
    args.teacher = args.teacher or ("synth-teacher" if args.quick else "deeplabv3-r101")
    args.student = args.student or ("synth-student" if args.quick else "deeplabv3-r18")
    args.batch = args.batch or (8 if big else 2)
    args.size = args.size or ([512, 1024] if big else [64, 128])
    args.steps = args.steps or (10 if big else (2 if args.quick else 3))
    args.repeats = args.repeats or (3 if big else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if big else 1)
    args.loss_steps = args.loss_steps or (5 if big else 2)
    args.loss_repeats = args.loss_repeats or (3 if big else 1)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if big else 1
    args.loader_files = args.loader_files or 2 * args.batch
    args.source_size = args.source_size or ([1024, 2048] if big else [2 * s for s in args.size])
    if args.variants is None:
        args.variants = ["reference-fp32", "kdnb-fp32", "kdnb-bf16", "kdnb"]
        if cuda:
            args.variants.append("kdnb-cudnn-benchmark")
        if args.compile:
            args.variants.append("kdnb-compile")
        args.variants.append("kdnb-loader")
    elif args.compile and "kdnb-compile" not in args.variants:
        args.variants.append("kdnb-compile")
    if args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm in training mode needs two samples)")
    if min(args.size) < 32 or args.classes < 2 or any(k < 2 for k in args.loss_classes):
        parser.error("--size must be at least 32 32 and every K >= 2")
    if min(args.steps, args.repeats, args.loss_steps, args.loss_repeats) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --loss-steps, --loss-repeats must be >= 1, "
                     "--warmup >= 0")
    if args.loader_files < args.batch:
        parser.error("--loader-files must be >= --batch")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be > 0")
    if args.interleave and args.profile:
        parser.error("--interleave times variants side by side: profile without it")
    return args


# --------------------------------------------------------------------------- the machine

def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def peak_bf16_tflops(name: str) -> tuple[str, float] | None:
    """``(part, dense bf16 TFLOP/s)`` for a CUDA device name, or None when unknown.

    A MIG slice has a fraction of the chip's peak, which the name does not tell: None.
    """
    if "MIG" in name:
        return None
    for pattern, part, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return part, tflops
    return None


class PeakMemory:
    """Peak memory since :meth:`reset`, in GiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set
    (``VmHWM``), which Linux resets through ``/proc/self/clear_refs``; where it cannot be
    reset, the peak of the whole process so far.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        with contextlib.suppress(OSError, AttributeError):
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 2**20  # kB
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def time_window(step: Callable[[], None], n: int, cuda: bool) -> float:
    """Seconds per step over ``n`` consecutive steps.

    CUDA: the device is drained first (so the window starts from an empty queue), then
    two CUDA events bracket the steps and only the end event is waited on.
    """
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def count_flops(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- data

def write_png_dataset(folder: Path, files: int, size: tuple[int, int], num_classes: int,
                      seed: int) -> SegmentationFolder:
    """PNG image/label pairs shaped like a real dataset's, read back by kdnb's own reader.

    Images are smooth colour fields with noise (they compress like photographs more than
    pure noise does); labels are 16x16 blocks of random classes, 5 % ignored.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    pairs = []
    for i in range(files):
        coarse = rng.random((3, max(1, h // 64), max(1, w // 64)), dtype=np.float32)
        smooth = F.interpolate(torch.from_numpy(coarse)[None], size=(h, w), mode="bilinear",
                               align_corners=False)[0].permute(1, 2, 0).numpy()
        pixels = np.clip(255 * smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        labels = rng.integers(0, num_classes, (-(-h // 16), -(-w // 16)))
        labels[rng.random(labels.shape) < 0.05] = IGNORE_INDEX
        labels = np.kron(labels, np.ones((16, 16), dtype=labels.dtype))[:h, :w].astype(np.uint8)
        image_path, label_path = folder / f"{i:04d}.png", folder / f"{i:04d}_label.png"
        Image.fromarray(pixels).save(image_path)
        Image.fromarray(labels, mode="L").save(label_path)
        pairs.append((image_path, label_path))
    return SegmentationFolder(pairs, num_classes=num_classes, table=None,
                              classes=[f"class {k}" for k in range(num_classes)],
                              palette=[(0, 0, 0)] * num_classes)


# --------------------------------------------------------------------------- models

@dataclass
class Pair:
    """A teacher and a student at one K, on the CPU: each variant takes copies."""

    classes: int
    teacher: nn.Module
    student: nn.Module


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of ``images``.

    A randomly initialized network in eval mode normalizes with mean 0 and variance 1,
    and through a hundred layers its activations grow by orders of magnitude; a trained
    teacher's statistics fit its inputs. One forward in training mode with a cumulative
    average (``momentum=None``) gives it such statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def build_pair(args, classes: int, device: torch.device, images: torch.Tensor) -> Pair:
    torch.manual_seed(args.seed)
    teacher = build_model(args.teacher, classes).to(device)
    calibrate_batchnorm(teacher, images[:2])
    student = build_model(args.student, classes)
    return Pair(classes, teacher.cpu(), student)


def compile_in_place(model: nn.Module, mode: str | None) -> None:
    """Compiles a SegModel in place (``nn.Module.compile``): its forward pass has no hooks."""
    model.compile(mode=mode)


# --------------------------------------------------------------------------- kdnb's step

class BatchDataset(Dataset):
    """The synthetic batch as a dataset: what a trainer is handed when no loader runs."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, num_classes: int):
        self.images, self.masks, self.num_classes = images.cpu(), masks.cpu(), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index = key if isinstance(key, int) else key[0]
        return self.images[index], self.masks[index]


def kdnb_trainer(cfg: TrainConfig, teacher: nn.Module, student: nn.Module,
                 train_set: Dataset) -> Trainer:
    """kdnb's trainer for the in-memory pair, built by :func:`kdnb.build.build_trainer`
    (the models and the data handed in; everything else from ``cfg``)."""
    return build_trainer(cfg, tempfile.gettempdir(), model=student, teacher=teacher,
                         train_set=train_set, eval_set=train_set, progress=False)


def kdnb_config(args, classes: int, methods: dict, variant: Variant) -> TrainConfig:
    data = {19: "cityscapes", 150: "ade20k"}.get(classes, "synth")
    return TrainConfig(model=args.student, data=data, teacher="(in memory)", methods=methods,
                       batch_size=args.batch, steps=1_000_000, amp=variant.amp,
                       channels_last=variant.channels_last, workers=args.workers, seed=args.seed,
                       device=str(torch.device(args.device)))


def kdnb_fit_step(trainer: Trainer, images: torch.Tensor, masks: torch.Tensor,
                  sums: dict) -> None:
    """One iteration of ``Trainer.fit``'s loop (:meth:`kdnb.train.Trainer.run_step`), without
    what it does every ``log_every`` steps (one host sync to read the summed losses)."""
    losses = trainer.run_step(images, masks)
    for k, v in losses.items():  # summed on the device, as fit does
        sums[k] = sums[k] + v if k in sums else v.clone()


# --------------------------------------------------------------------------- reference step

def cirkd_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Pixel-wise KD exactly as CIRKD's ``CriterionKD`` writes it."""
    B, C, h, w = teacher_logits.size()
    scale_pred = student_logits.permute(0, 2, 3, 1).contiguous().view(-1, C)
    scale_soft = teacher_logits.permute(0, 2, 3, 1).contiguous().view(-1, C)
    p_s = F.log_softmax(scale_pred / temperature, dim=1)
    p_t = F.softmax(scale_soft / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * temperature ** 2


class ReferenceStep:
    """One distillation step as the research codebases write it (after CIRKD's train_kd.py).

    float32, NCHW, teacher under ``torch.no_grad`` (or, with ``teacher_grad``, with its
    autograd bookkeeping on), eleven zero placeholders built on the host and copied to the
    device every step (CIRKD's ``torch.tensor(0.).cuda()`` for every loss, switched on or
    off), a poly learning rate set by hand, ``.item()`` on each logged term every step.
    """

    PLACEHOLDERS = 11  # kd, adv_G, adv_D, skd, cwd_fea, cwd_logit, ifv, fitnet, at, psd, csd

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: TrainConfig,
                 device: torch.device, *, teacher_grad: bool = False):
        self.device, self.cfg, self.teacher_grad = device, cfg, teacher_grad
        self.teacher = teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad = teacher_grad
        self.model = student.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.iteration, self.log = 0, {}

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        images = images.to(self.device)
        masks = masks.long().to(self.device)
        with contextlib.nullcontext() if self.teacher_grad else torch.no_grad():
            _, _, t_logits = forward_with_head(self.teacher, images)
        logits, _, s_logits = forward_with_head(self.model, images)
        task_loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        zeros = [torch.tensor(0.0).to(self.device) for _ in range(self.PLACEHOLDERS)]
        kd_loss = cirkd_kd_loss(s_logits, t_logits.detach())
        losses = task_loss + kd_loss + sum(zeros[1:])
        lr = self.cfg.lr * (1 - self.iteration / self.cfg.steps) ** self.cfg.poly_power
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        losses.backward()
        self.optimizer.step()
        self.iteration += 1
        self.log = {"task": task_loss.item(), "kd": kd_loss.item(), "loss": losses.item()}


# --------------------------------------------------------------------------- one variant

@dataclass
class Row:
    name: str
    s_per_step: float | None = None  # None: not measured (see note)
    peak_gib: float | None = None
    syncs: int | None = None
    note: str = ""
    speedup: float | None = None  # --interleave: median per-round ratio to the reference


def failure_row(name: str, err: Exception, peak_gib: float | None = None) -> Row:
    """The row of a variant that raised: out of memory, or the error's type; an error
    other than out of memory prints its traceback to stderr. The other variants go on."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return Row(name, None, peak_gib, note="out of memory")
    traceback.print_exc()
    return Row(name, None, peak_gib, note=f"failed: {type(err).__name__}")


def build_step(name: str, args, pair: Pair, batch: tuple[torch.Tensor, torch.Tensor],
               dataset=None) -> tuple[Callable[[], None], object, TrainConfig, int]:
    """One variant's step as a closure: (step, its runner, its config, warm-up steps)."""
    variant = VARIANTS[name]
    images, masks = batch
    teacher, student = copy.deepcopy(pair.teacher), copy.deepcopy(pair.student)
    cfg = kdnb_config(args, pair.classes, {"kd": None}, variant)
    if variant.step == "reference":
        runner = ReferenceStep(teacher, student, cfg, images.device,
                               teacher_grad=variant.teacher_grad)
        step_on = runner
    else:
        data = dataset if variant.loader else BatchDataset(images, masks, pair.classes)
        runner = kdnb_trainer(cfg, teacher, student, data)
        if variant.compile:
            compile_in_place(runner.teacher, args.compile_mode)
            compile_in_place(runner.model, args.compile_mode)
        sums: dict = {}

        def step_on(x, y):
            kdnb_fit_step(runner, x, y, sums)

    warmup = args.warmup + (3 if variant.compile else 0)
    if variant.loader:
        # The loader prefetches workers x 2 batches: skip past them, so the timed
        # steps wait for batches made while the step runs.
        warmup += 2 * max(args.workers, 1)
        loader = iter(runner.loader())

        def step() -> None:
            x, y = next(loader)
            step_on(x, y)
    else:
        def step() -> None:
            step_on(images, masks)
    return step, runner, cfg, warmup


def step_extras(name: str, step, runner, cfg: TrainConfig, images: torch.Tensor,
                device: torch.device) -> dict:
    """FLOPs of the step and of the teacher's forward, counted on a plain kdnb variant."""
    variant = VARIANTS[name]
    if variant.step != "kdnb" or variant.compile or variant.loader:
        return {}
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=cuda and cfg.amp):
        x = images.to(memory_format=torch.channels_last) if (cuda and cfg.channels_last) \
            else images
        teacher_flops = count_flops(lambda: forward_with_head(runner.teacher, x))
    return {"teacher_flops": teacher_flops, "step_flops": count_flops(step)}


def run_variant(name: str, args, pair: Pair, batch: tuple[torch.Tensor, torch.Tensor],
                device: torch.device, memory: PeakMemory, dataset=None,
                profile: bool = False) -> tuple[Row, dict]:
    """Builds one variant, warms it up, times it; returns its row and extras (FLOPs...)."""
    variant = VARIANTS[name]
    cuda = device.type == "cuda"
    extras: dict = {}
    memory.reset()
    cudnn_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    try:
        step, runner, cfg, warmup = build_step(name, args, pair, batch, dataset)
        for _ in range(warmup):
            step()
        times = [time_window(step, args.steps, cuda) for _ in range(args.repeats)]
        row = Row(name, statistics.median(times), memory.read())
        if cuda and not variant.loader:
            row.syncs = count_host_syncs(step)
        extras.update(step_extras(name, step, runner, cfg, batch[0], device))
        if profile:
            extras["profile"] = profile_steps(step, cuda, args)
    except Exception as err:  # a compiler error or a dying loader costs its own row only
        row = failure_row(name, err, memory.read())
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
    return row, extras


def run_interleaved(names: list[str], args, pair: Pair, batch: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device) -> tuple[list[Row], dict]:
    """``--interleave``: every plain variant built and warmed up first, then timed in
    rounds, one window of each variant per round, so that a drift of the machine (another
    job, a clock change) reaches every variant alike. An untimed round comes first (the
    first variants' warm-up lies minutes back once a later one has compiled), and the
    order reverses from round to round, so a steady drift favours none. A row's time is
    its median window; its speed-up is the median over rounds of the reference's window
    over its own, a ratio measured round by round. All variants live at once, so no peak
    memory is read; host syncs are counted after the rounds (CUDA). A variant that fails
    costs its own row only."""
    cuda = device.type == "cuda"
    cudnn_before = torch.backends.cudnn.benchmark
    built, rows, extras = {}, {}, {}

    def failed(name: str, err: Exception) -> None:
        built.pop(name, None)
        rows[name] = failure_row(name, err)

    try:
        for name in names:
            torch.backends.cudnn.benchmark = VARIANTS[name].cudnn_benchmark
            try:
                step, runner, cfg, warmup = build_step(name, args, pair, batch)
                for _ in range(warmup):
                    step()
                built[name] = step
                if "step_flops" not in extras:
                    found = step_extras(name, step, runner, cfg, batch[0], device)
                    extras.update(found, **({"flops_from": name} if found else {}))
            except Exception as err:
                failed(name, err)
        times: dict[str, list[float]] = {name: [] for name in built}
        for round_ in range(-1, args.repeats):  # round -1: untimed
            order = list(built) if round_ % 2 == 0 else list(built)[::-1]
            for name in order:
                torch.backends.cudnn.benchmark = VARIANTS[name].cudnn_benchmark
                try:
                    seconds = time_window(built[name], args.steps, cuda)
                except Exception as err:
                    failed(name, err)
                    continue
                if round_ >= 0:
                    times[name].append(seconds)
        syncs = {name: count_host_syncs(step) for name, step in built.items()} if cuda else {}
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
    ref = times.get(REFERENCE) if REFERENCE in built else None
    for name in built:
        window = times[name]
        speedup = statistics.median(r / t for r, t in zip(ref, window)) if ref else None
        rows[name] = Row(name, statistics.median(window), syncs=syncs.get(name), speedup=speedup)
    return [rows[name] for name in names], extras


def run_loader_only(args, dataset, device: torch.device) -> Row:
    """kdnb's loader alone (with the copy to the device): can it feed the step?"""
    cuda = device.type == "cuda"
    ahead = 2 * max(args.workers, 1)
    cfg = kdnb_config(args, dataset.num_classes, {}, VARIANTS[KDNB]).replace(teacher=None)
    student = build_model(args.student, dataset.num_classes)
    loader = iter(build_trainer(cfg, tempfile.gettempdir(), model=student, train_set=dataset,
                                eval_set=dataset, progress=False).loader())

    def step() -> None:
        x, y = next(loader)
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    for _ in range(ahead + args.warmup):
        step()
    times = [time_window(step, args.steps, cuda) for _ in range(args.repeats)]
    return Row("loader-only", statistics.median(times), note=plural(args.workers, "worker"))


def profile_steps(step: Callable[[], None], cuda: bool, args) -> str:
    """The top ops of three profiled steps (after one skipped and one warm-up step)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3)) as prof:
        for _ in range(5):
            step()
            prof.step()
    if args.trace is not None:
        prof.export_chrome_trace(str(args.trace))
    averages = prof.key_averages()
    for sort in (("self_device_time_total", "self_cuda_time_total") if cuda
                 else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=sort, row_limit=args.profile_rows)
        except (KeyError, AttributeError, RuntimeError):
            continue
    return averages.table(row_limit=args.profile_rows)


# --------------------------------------------------------------------------- loss overhead

def run_losses(args, pair: Pair, device: torch.device) -> dict:
    """kdnb's step with each loss, round-robin; per-round differences against the base."""
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed + pair.classes)
    images = torch.rand(args.batch, 3, *args.size, generator=gen).to(device)
    masks = random_masks(args.batch, tuple(args.size), pair.classes, device, gen)
    variant = VARIANTS[KDNB]
    teacher, student = copy.deepcopy(pair.teacher), copy.deepcopy(pair.student)
    data = BatchDataset(images, masks, pair.classes)
    steps, sums = {}, {}
    for label, methods in LOSS_ROWS.items():
        trainer = kdnb_trainer(kdnb_config(args, pair.classes, methods, variant),
                               teacher, student, data)
        trainer.step = trainer.cfg.steps // 2  # FAKD's lambda mid-schedule (cost is the same)
        teacher, student = trainer.teacher, trainer.model  # shared by every row
        sums[label] = {}
        steps[label] = (lambda t=trainer, s=sums[label]: kdnb_fit_step(t, images, masks, s))
    times: dict[str, list[float]] = {label: [] for label in LOSS_ROWS}
    for label, step in steps.items():
        for _ in range(min(args.warmup, 2)):  # optimizer state, FAKD's buffers, autotuning
            step()
    for _ in range(args.loss_repeats):
        for label, step in steps.items():
            times[label].append(time_window(step, args.loss_steps, cuda))
    syncs = {label: count_host_syncs(step) for label, step in steps.items()} if cuda else {}

    def diff(a: str, b: str) -> tuple[float, float]:
        """(median extra seconds per step, as % of b's step) over paired rounds."""
        extra = statistics.median(x - y for x, y in zip(times[a], times[b]))
        return extra, 100 * extra / statistics.median(times[b])

    rows = []
    for label in LOSS_ROWS:
        extra, pct = diff(label, "base")
        rows.append({"method": label, "ms": 1e3 * statistics.median(times[label]), "vs": "base",
                     "extra_ms": 1e3 * extra, "pct": pct, "syncs": syncs.get(label)})
    for fakd, replaced in FAKD_DIFFS:
        extra, pct = diff(fakd, replaced)
        rows.append({"method": f"{fakd} - {replaced}",
                     "ms": 1e3 * statistics.median(times[fakd]), "vs": replaced,
                     "extra_ms": 1e3 * extra, "pct": pct, "syncs": None})
    feats = student.classifier.in_channels
    return {"classes": pair.classes, "base_ms": 1e3 * statistics.median(times["base"]),
            "student_channels": feats, "rows": rows}


# --------------------------------------------------------------------------- report

def fmt(x: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def variant_rows(rows: list[Row], flops: int | None, peak: float | None, batch: int
                 ) -> list[dict]:
    """Derived columns of every row, as strings."""
    ref = next((r for r in rows if r.name == REFERENCE and r.s_per_step), None)
    out = []
    for r in rows:
        ips = batch / r.s_per_step if r.s_per_step else None
        tflops = flops / r.s_per_step / 1e12 if (flops and r.s_per_step) else None
        loader_only = r.name == "loader-only"
        mfu = 100 * tflops / peak if (tflops is not None and peak and not loader_only) else None
        out.append({
            "variant": r.name,
            "images/s": fmt(ips, ".2f"),
            "ms/step": fmt(1e3 * r.s_per_step if r.s_per_step else None, ".1f"),
            "TFLOP/s": "-" if loader_only else fmt(tflops, ".2f"),
            "MFU %": "-" if loader_only else fmt(mfu, ".1f"),
            "peak GiB": "-" if loader_only else fmt(r.peak_gib, ".2f"),
            "syncs/step": "-" if loader_only else fmt(r.syncs, "d"),
            "vs reference": (f"{r.speedup:.2f}x" if r.speedup is not None else
                             "-" if (loader_only or not ref or not r.s_per_step)
                             else f"{ref.s_per_step / r.s_per_step:.2f}x"),
            "note": r.note,
        })
    return out


COLUMNS = ("variant", "images/s", "ms/step", "TFLOP/s", "MFU %", "peak GiB", "syncs/step",
           "vs reference")


def print_variants(table: list[dict]) -> None:
    print(f"{COLUMNS[0]:<22}" + "".join(f"{c:>13}" for c in COLUMNS[1:]))
    for row in table:
        line = f"{row['variant']:<22}" + "".join(f"{row[c]:>13}" for c in COLUMNS[1:])
        print(line + (f"  ({row['note']})" if row["note"] else ""), flush=True)


def markdown_variants(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    for row in table:
        name = row["variant"] + (f" ({row['note']})" if row["note"] else "")
        lines.append("| " + " | ".join([name] + [row[c] for c in COLUMNS[1:]]) + " |")
    return "\n".join(lines)


def criteria_lines(rows: list[Row], flops: int | None, peak: float | None, judged: bool
                   ) -> list[str]:
    """The acceptance criteria on the variant table; verdicts only where ``judged``."""
    by_name = {r.name: r for r in rows if r.s_per_step}
    verdict = (lambda ok: "met" if ok else "NOT met") if judged else \
        (lambda ok: "judged on a GPU at full size only")
    lines = []
    if REFERENCE in by_name and KDNB in by_name:
        speedup = (by_name[KDNB].speedup if by_name[KDNB].speedup is not None  # --interleave
                   else by_name[REFERENCE].s_per_step / by_name[KDNB].s_per_step)
        lines.append(f"kdnb over reference-fp32: {speedup:.2f}x images/s (criterion >= "
                     f"{SPEEDUP_CRITERION:g}x): {verdict(speedup >= SPEEDUP_CRITERION)}")
    if KDNB in by_name:
        if flops and peak:
            mfu = 100 * flops / by_name[KDNB].s_per_step / 1e12 / peak
            lines.append(f"kdnb MFU: {mfu:.1f} % of {peak:g} TFLOP/s bf16 (criterion >= "
                         f"{MFU_CRITERION:g} %): {verdict(mfu >= MFU_CRITERION)}")
        else:
            lines.append("kdnb MFU: n/a (no bf16 peak for this device: pass --peak-tflops)")
        lines.append(f"kdnb peak memory: {fmt(by_name[KDNB].peak_gib, '.2f')} GiB")
    return lines


LOSS_COLUMNS = ("method", "ms/step", "vs", "+ms", "+%", "syncs/step")


def loss_table_rows(result: dict) -> list[list[str]]:
    return [[r["method"], f"{r['ms']:.2f}", r["vs"], f"{r['extra_ms']:.2f}", f"{r['pct']:.1f}",
             fmt(r["syncs"], "d")] for r in result["rows"]]


def fakd_lines(result: dict, judged: bool) -> list[str]:
    lines = []
    for row_name, replaced, k, limit in FAKD_CRITERIA:
        if result["classes"] != k:
            continue
        r = next(r for r in result["rows"] if r["method"] == f"{row_name} - {replaced}")
        verdict = ("met" if r["pct"] <= limit else "NOT met") if judged else \
            "judged on a GPU at full size only"
        lines.append(f"FAKD over the KD it replaces at K = {k}: {r['extra_ms']:+.2f} ms = "
                     f"{r['pct']:.1f} % of the kd step (criterion <= {limit:g} %): {verdict}")
    return lines


def print_losses(result: dict, judged: bool) -> None:
    print(f"\nloss overhead at K = {result['classes']}: base step {result['base_ms']:.1f} ms "
          f"(task loss only; the teacher still runs); student head C_s = "
          f"{result['student_channels']}")
    print(f"{LOSS_COLUMNS[0]:<24}{LOSS_COLUMNS[1]:>10}  {LOSS_COLUMNS[2]:<6}"
          + "".join(f"{c:>11}" for c in LOSS_COLUMNS[3:]))
    for cells in loss_table_rows(result):
        print(f"{cells[0]:<24}{cells[1]:>10}  {cells[2]:<6}"
              + "".join(f"{c:>11}" for c in cells[3:]))
    for line in fakd_lines(result, judged):
        print(line)
    sys.stdout.flush()


def markdown_losses(result: dict) -> str:
    lines = ["| " + " | ".join(LOSS_COLUMNS) + " |", "|---|---:|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in loss_table_rows(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # The acceptance criteria hold for the paper pair at full size on a GPU only.
    judged = (cuda and not args.quick and args.size == [512, 1024] and args.batch == 8
              and (args.teacher, args.student) == ("deeplabv3-r101", "deeplabv3-r18"))
    command = command_line(__file__, argv)
    started = time.perf_counter()

    machine = device_name(device, threads)
    peak, peak_part = args.peak_tflops, "--peak-tflops"
    if peak is None and cuda:
        found = peak_bf16_tflops(torch.cuda.get_device_name(device))
        if found:
            peak_part, peak = found
    precision = (f"cudnn TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
                 f"{torch.backends.cuda.matmul.allow_tf32}") if cuda else "float32 on CPU"
    setup = (f"{args.teacher} -> {args.student}, K = {args.classes}, batch {args.batch} at "
             f"{args.size[0]}x{args.size[1]}, random init, kd + task loss")
    print(f"{machine} | torch {torch.__version__} | kdnb {kdnb_version} | {precision}")
    print(f"pair: {setup}")
    print("bf16 dense peak: " + (f"{peak:g} TFLOP/s ({peak_part})" if peak else
                                  "unknown (MFU n/a; pass --peak-tflops)"))
    print(f"timing: {plural(args.warmup, 'warm-up step')}, median of "
          f"{plural(args.repeats, 'window')} of {plural(args.steps, 'step')}; peak memory: "
          + ("torch.cuda.max_memory_allocated" if cuda else "process peak RSS")
          + ("; --interleave: the plain variants' windows in rounds, one of each per round, "
             "no peak memory for them" if args.interleave else ""))
    if not cuda:
        print("CPU: kdnb enables bf16 autocast and channels-last on CUDA only, so kdnb-fp32, "
              "kdnb-bf16 and kdnb run the same code here")
    if args.quick:
        print("--quick: SynthScenes presets and tiny sizes, the numbers mean nothing")
    sys.stdout.flush()

    memory = PeakMemory(device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 3, *args.size, generator=gen).to(device)
    masks = random_masks(args.batch, tuple(args.size), args.classes, device, gen)
    pair = build_pair(args, args.classes, device, images)

    tmp = None
    dataset, loader_line = None, None
    rows: list[Row] = []
    extras: dict = {}
    try:
        if any(VARIANTS[v].loader for v in args.variants):
            tmp = Path(tempfile.mkdtemp(prefix="kdnb-throughput-"))
            t0 = time.perf_counter()
            files = write_png_dataset(tmp, args.loader_files, tuple(args.source_size),
                                      args.classes, args.seed)
            dataset = Augmented(files, TrainTransform(crop_size=tuple(args.size),
                                                      scale_range=(0.5, 2.0), flip=True),
                                seed=args.seed)
            loader_line = (f"loader: {args.loader_files} PNG pairs at {args.source_size[0]}x"
                           f"{args.source_size[1]} read by kdnb's SegmentationFolder, "
                           "TrainTransform scale 0.5-2 + crop + flip, "
                           f"{plural(args.workers, 'worker')}, pinned memory "
                           + ("on" if cuda else "off (CPU)"))
            print(f"{loader_line} (files written in {time.perf_counter() - t0:.1f} s)",
                  flush=True)
        print()
        plain = [v for v in args.variants if not VARIANTS[v].loader]
        profile_target = KDNB if KDNB in plain else (plain or [None])[0]
        if args.interleave:  # the plain variants timed round by round, then the loader's
            rows, found = run_interleaved(plain, args, pair, (images, masks), device)
            extras.update(found)
            for row in rows:
                ratio = (f", {row.speedup:.2f}x the reference" if row.speedup is not None else "")
                print(f"  {row.name}: " + (f"{1e3 * row.s_per_step:.1f} ms/step{ratio}"
                                           if row.s_per_step else row.note), flush=True)
        for name in [v for v in args.variants if VARIANTS[v].loader or not args.interleave]:
            row, found = run_variant(name, args, pair, (images, masks), device, memory,
                                     dataset, profile=args.profile and name == profile_target)
            rows.append(row)
            if "profile" in found:
                extras["profile"] = (name, found.pop("profile"))
            if "step_flops" in found and "step_flops" not in extras:
                extras.update(found, flops_from=name)
            if name == "kdnb-loader" and dataset is not None:
                rows.append(run_loader_only(args, dataset, device))
            status = (f"{1e3 * row.s_per_step:.1f} ms/step" if row.s_per_step else row.note)
            print(f"  {name}: {status}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    flops = extras.get("step_flops")
    if flops is None:  # no plain kdnb variant ran: count one step of the reference
        ref_runner = ReferenceStep(copy.deepcopy(pair.teacher), copy.deepcopy(pair.student),
                                   kdnb_config(args, args.classes, {"kd": None},
                                               VARIANTS[REFERENCE]), device)
        flops = count_flops(lambda: ref_runner(images, masks))
        extras.update(step_flops=flops, flops_from=REFERENCE)
        del ref_runner
    teacher_flops = extras.get("teacher_flops")
    flop_line = (f"model FLOPs per step (FlopCounterMode, one {extras['flops_from']} step): "
                 f"{flops / 1e9:.1f} GFLOP = {flops / 1e9 / args.batch:.1f} GFLOP per image"
                 + (f"; teacher forward {teacher_flops / 1e9:.1f}, student forward + backward "
                    f"and losses {(flops - teacher_flops) / 1e9:.1f}" if teacher_flops else ""))
    table = variant_rows(rows, flops, peak, args.batch)
    print(f"\n{flop_line}")
    print_variants(table)
    criteria = criteria_lines(rows, flops, peak, judged)
    for line in criteria:
        print(line)
    sys.stdout.flush()

    loss_results, loss_failures = [], []
    for k in args.loss_classes:
        try:
            k_pair = pair if k == args.classes else build_pair(args, k, device, images)
            result = run_losses(args, k_pair, device)
        except Exception as err:  # out of memory at K = 150, say: the K = 19 table still counts
            traceback.print_exc()
            loss_failures.append(f"loss overhead at K = {k}: failed ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200] if str(err) else ''})")
            print(f"\n{loss_failures[-1]}", flush=True)
            continue
        print_losses(result, judged)
        loss_results.append(result)

    if "profile" in extras:
        name, text = extras["profile"]
        print(f"\nprofile of {name} (3 steps; sorted by self {'CUDA' if cuda else 'CPU'} time):")
        print(text)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.1f} s", flush=True)

    if not args.no_write:
        title = "GPU throughput" if cuda else "Distillation step throughput on a CPU"
        parts = [f"\n## {title}, {datetime.date.today()}\n",
                 f"- command: `{command}`",
                 f"- device: {machine}; torch {torch.__version__}, kdnb {kdnb_version}; "
                 f"{precision}; bf16 dense peak "
                 + (f"{peak:g} TFLOP/s ({peak_part})" if peak else "unknown"),
                 f"- pair: {setup}; synthetic batch on the device (random images, 8x8 blocks "
                 "of random labels, 5 % ignored)",
                 f"- timing: {plural(args.warmup, 'warm-up step')}, median of "
                 f"{plural(args.repeats, 'window')} of {plural(args.steps, 'step')}"
                 + (" between CUDA events" if cuda else "")
                 + ("; --interleave: the variants' windows taken in turn, round by round, "
                    "'vs reference' the median per-round ratio" if args.interleave else ""),
                 f"- {flop_line}",
                 "- peak memory: " + ("not read for the interleaved rows (every variant "
                                      "lives at once)" if args.interleave else
                                      "`torch.cuda.max_memory_allocated` from the variant's "
                                      "models placed on the GPU" if cuda else
                                      "process peak RSS (CPU)"),
                 f"- variants: see the docstring of benchmarks/gpu_throughput.py; "
                 f"wall time {wall / 60:.1f} min"]
        if loader_line:
            parts.append(f"- {loader_line}")
        if loss_results:
            parts.append(f"- loss tables: kdnb's step (the `kdnb` variant) with each loss; "
                         f"{plural(args.loss_repeats, 'round')} of {args.loss_steps}-step "
                         "windows, every method once per round; ms/step: median window; "
                         "+ms, +%: median of per-round differences against the `vs` row's "
                         "step")
        if args.quick:
            parts.append("- `--quick`: SynthScenes presets, tiny sizes, the numbers mean nothing")
        parts += ["", markdown_variants(table), ""]
        parts += [f"**{line}**  " for line in criteria]
        for result in loss_results:
            parts.append(f"\n### Loss overhead at K = {result['classes']}: base step "
                         f"{result['base_ms']:.1f} ms (task loss only, teacher still runs)\n")
            parts.append(markdown_losses(result))
            parts += [f"\n**{line}**" for line in fakd_lines(result, judged)]
        parts += [f"\n**{line}**" for line in loss_failures]
        if "profile" in extras:
            name, text = extras["profile"]
            parts += [f"\n### Profile of {name}, top ops\n", "```text", text.rstrip(), "```"]
        append_text(args.out, "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
