"""NFD's premise, measured: how unequal are the magnitudes of a network's channels, per layer?

    python benchmarks/nfd_premise.py                     # the cached SynthScenes teacher and baseline
    python benchmarks/nfd_premise.py --models T.pt S.pt  # any kdnb checkpoints
    python benchmarks/nfd_premise.py --quick --no-write  # random-init presets, seconds (tests/)

NFD argues that a student spends feature MSE's effort on imitating the teacher's
magnitudes, which differ widely from channel to channel; normalizing each channel removes
that. Where the magnitudes barely differ, NFD and MSE should behave alike. This script
measures the spread on the val split: for each model and each layer (encoder stages 1-5
and the head feature, the maps ``layer`` can name), the RMS of each channel over images
and positions, then its 10th, 50th and 90th percentiles across channels and the ratio
p90 / p10. It prints the table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kdnb.checkpoint import model_from_checkpoint
from kdnb.data import build_dataset
from kdnb.experiments import cache_path, teacher_config
from kdnb.models import build_model

from _results import append_section  # benchmarks/_results.py


@torch.no_grad()
def channel_rms(model, images: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """Per layer, the RMS of each channel over images and positions, ``(C,)``."""
    model.eval()
    stages = [n for n in range(1, len(model.net.encoder.out_channels))]
    squares: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for start in range(0, len(images), batch):
        _, maps = model(images[start:start + batch], features=True, stages=stages)
        for name, x in maps.items():
            if name == "logits":
                continue
            squares[name] = squares.get(name, 0) + x.double().square().sum((0, 2, 3))
            count[name] = count.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]
    order = [f"stage{n}" for n in stages] + ["feats"]
    return {("head" if k == "feats" else k): (squares[k] / count[k]).sqrt() for k in order}


def spread_rows(name: str, rms: dict[str, torch.Tensor]) -> list[str]:
    rows = []
    for layer, values in rms.items():
        q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype))
        live = values[values > 1e-8]
        rows.append(f"| {name} | {layer} | {len(values)} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} | "
                    f"{q[2] / q[0]:.1f} | {len(values) - len(live)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="kdnb checkpoints (default: the cached "
                        "synth-teacher and the seed-0 baseline of benchmarks/synth_distill.py)")
    parser.add_argument("--images", type=int, default=512, help="val images (default 512)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="random-init presets, 16 images")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = teacher_config().data_kwargs
    if args.quick:
        torch.manual_seed(0)
        models = {name: build_model(name, 9) for name in ("synth-teacher", "synth-student")}
        args.images = 16
    else:
        paths = [Path(p) for p in args.models or
                 [cache_path(teacher_config()), "runs/synth_distill/baseline-s0/model.pt"]]
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"no checkpoint {missing}: train them first (python "
                             "benchmarks/synth_distill.py --methods baseline --seeds 1) or "
                             "pass --models")
        # a run's model.pt is named by its run directory
        models = {(p.parent.name if p.stem == "model" else p.stem): model_from_checkpoint(p)
                  for p in paths}
    val = build_dataset("synth", split="val", **{**data, "length": args.images})
    images = torch.stack([val[i][0] for i in range(len(val))])
    lines = ["| model | layer | channels | RMS p10 | p50 | p90 | p90 / p10 | dead channels |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        lines += spread_rows(name, channel_rms(model, images))
    report = "\n".join(lines)
    print(report)
    wall = time.perf_counter() - start
    print(f"\n{wall:.0f} s")
    if not args.no_write:
        append_section(args.out, f"NFD's premise: the spread of channel magnitudes per layer "
                       f"({args.images} val images)", wall, report,
                       note="RMS of each channel over images and positions, eval mode")


if __name__ == "__main__":
    main()
