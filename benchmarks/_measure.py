"""What the timing scripts of this folder share: the loss rows they time, synthetic masks,
host-sync counting and the machine's name. Imported by the scripts of this folder, which
run as ``python benchmarks/NAME.py`` (their folder is then on ``sys.path``)."""
from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kdnb.data import IGNORE_INDEX
from kdnb.losses import METHODS

#: loss-overhead rows: label -> the ``methods`` of a run (``fakd`` folds into the loss it
#: augments, as in training); "base" is the step with the task loss alone.
LOSS_ROWS: dict[str, dict] = {
    "base": {},
    **{name: {name: None} for name in METHODS if name != "fakd"},
    "kd+fakd (full)": {"kd": None, "fakd": {}},
    "kd+fakd (diag)": {"kd": None, "fakd": {"diagonal": True}},
    "nfd+fakd (full)": {"nfd": None, "fakd": {}},
    "nfd+fakd (diag)": {"nfd": None, "fakd": {"diagonal": True}},
}
#: FAKD rows against the loss they replace.
FAKD_DIFFS = (("kd+fakd (full)", "kd"), ("kd+fakd (diag)", "kd"),
              ("nfd+fakd (full)", "nfd"), ("nfd+fakd (diag)", "nfd"))


def random_masks(batch: int, size: tuple[int, int], num_classes: int, device: torch.device,
                 gen: torch.Generator) -> torch.Tensor:
    """Blocks of random labels (8 x 8 pixels), 5 % of them ignored: ``(B, H, W)`` long.

    Every class is present, so the per-class work of FAKD and IFVD is at its largest.
    """
    h, w = size
    coarse = torch.randint(0, num_classes, (batch, 1, -(-h // 8), -(-w // 8)), generator=gen)
    ignored = torch.rand(coarse.shape, generator=gen) < 0.05
    coarse = torch.where(ignored, torch.full_like(coarse, IGNORE_INDEX), coarse)
    masks = F.interpolate(coarse.float(), scale_factor=8, mode="nearest")[:, 0, :h, :w]
    return masks.long().to(device)


def count_host_syncs(fn: Callable[[], None]) -> int | None:
    """Synchronizing CUDA calls made by ``fn`` (None where they cannot be counted)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception:  # an old torch or a build without the debug mode
        return None
    return sum("synchroniz" in str(w.message) for w in caught)


def device_name(device: torch.device, threads: int) -> str:
    """``GPU <name>`` or ``CPU <model name>, N threads``."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model or platform.machine()}, {threads} thread{'s' * (threads != 1)}"


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--device --threads --seed --quick --no-write --out``, as every timing script has them."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (the default): CUDA when available")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                        help="markdown file to append to (default: benchmarks/RESULTS.md)")


def resolve_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Fills ``--device auto`` and ``--threads`` (1 with ``--quick``) and sets torch's CPU
    threads when given; returns whether the device is CUDA."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args.device == "cuda"
