"""SynthScenes generation speed on one core (the foundation asks for >= 200 images/s at 128x128).

    python benchmarks/synth_speed.py [--sizes 96 128] [--n 500]

Prints images/s per size and appends a section to benchmarks/RESULTS.md with the command.
"""
import argparse
import platform
import time
from pathlib import Path

import torch

from kdnb.data import SynthScenes

from _results import append_section  # benchmarks/_results.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, t0 = [], time.perf_counter()
    for size in args.sizes:
        ds = SynthScenes("train", size=size, length=args.n)
        ds[0]
        start = time.perf_counter()
        for i in range(args.n):
            ds[i]
        rate = args.n / (time.perf_counter() - start)
        rows.append((size, rate))
        print(f"SynthScenes {size}x{size}: {rate:.0f} images/s on one core")
    if not args.no_write:
        body = "\n".join(f"- {s}x{s}: {r:.0f} images/s" for s, r in rows)
        append_section(Path(__file__).with_name("RESULTS.md"), "SynthScenes generation speed",
                       time.perf_counter() - t0, body,
                       note=f"{platform.processor() or platform.machine()}, 1 thread")


if __name__ == "__main__":
    main()
