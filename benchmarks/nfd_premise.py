"""NFD's premise, measured: how unequal are the magnitudes of a network's channels, per layer?

    python benchmarks/nfd_premise.py                     # the cached SynthScenes teacher and baseline
    python benchmarks/nfd_premise.py --regime pretrained # the same, encoders from the pretext task
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
from kdnb.features import channel_rms, magnitude_spread
from kdnb.models import build_model
from kdnb.pretrain import PretrainConfig, pretext_path

from _results import append_section  # benchmarks/_results.py


def spread_rows(name: str, rms: dict[str, torch.Tensor]) -> list[str]:
    rows = []
    for layer, values in rms.items():
        q = magnitude_spread(values)
        rows.append(f"| {name} | {layer} | {len(values)} | {q['p10']:.3g} | {q['p50']:.3g} | "
                    f"{q['p90']:.3g} | {q['ratio']:.1f} | {q['dead']} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="kdnb checkpoints (default: the cached "
                        "synth-teacher and the seed-0 baseline of benchmarks/synth_distill.py)")
    parser.add_argument("--regime", choices=("scratch", "pretrained"), default="scratch",
                        help="whose teacher and baseline by default: the random-init runs or "
                             "those of synth_distill.py --regime pretrained")
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
        teacher, runs = teacher_config(), Path("runs/synth_distill")
        if args.regime == "pretrained":  # as synth_distill.py --regime pretrained names them
            init = pretext_path(PretrainConfig(preset="synth-teacher"))
            teacher, runs = teacher.replace(encoder_init=str(init)), runs / "pretrained"
        paths = [Path(p) for p in args.models or
                 [cache_path(teacher), runs / "baseline-s0" / "model.pt"]]
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"no checkpoint {missing}: train them first (python "
                             f"benchmarks/synth_distill.py --regime {args.regime} --methods "
                             "baseline --seeds 1) or pass --models")
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
        regime = "" if args.models else f", {args.regime} regime"
        append_section(args.out, f"NFD's premise: the spread of channel magnitudes per layer "
                       f"({args.images} val images{regime})", wall, report,
                       note="RMS of each channel over images and positions, eval mode")


if __name__ == "__main__":
    main()
