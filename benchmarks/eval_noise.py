"""How much of a paired mIoU difference is the draw of the test images: a bootstrap.

    python benchmarks/eval_noise.py RUN_A RUN_B [RUN_A2 RUN_B2 ...] --images 500 4000

For each pair of runs (a baseline and a distilled student of the same seed), scores both
models image by image on the first N SynthScenes test images, then resamples the images
with replacement (``--resamples`` times) and reports the difference ``B - A`` in mIoU
with its bootstrap std: the spread that the choice of test images alone puts on a paired
gain. A paired std over seeds that is not much larger than this is measuring the test
split, not the methods. Prints a table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kdnb.data import build_dataset
from kdnb.metrics import SegMetric
from kdnb.checkpoint import model_from_checkpoint

from _results import append_section  # benchmarks/_results.py


@torch.no_grad()
def image_confusions(model, dataset, batch_size: int = 64) -> torch.Tensor:
    """``(N, K, K)`` confusion matrix of every image (rows: target, columns: prediction)."""
    k = dataset.num_classes
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        images, masks = map(torch.stack, zip(*(dataset[i] for i in
                                               range(start, min(start + batch_size, len(dataset))))))
        preds = model(images).argmax(1)
        for pred, mask in zip(preds, masks):
            metric = SegMetric(k, dataset.ignore_index)
            metric.update(pred[None], mask[None])
            out.append(metric.confusion)
    return torch.stack(out)


def miou(confusion: torch.Tensor, ignore_index: int = 255) -> float:
    """mIoU of a summed confusion matrix, by :class:`SegMetric`'s rule."""
    metric = SegMetric(confusion.shape[0], ignore_index)
    metric.confusion = confusion
    return 100 * metric.compute()["miou"]


def paired_bootstrap(conf_a: torch.Tensor, conf_b: torch.Tensor, sizes: list[int],
                     resamples: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """``(images, difference B - A, bootstrap std)`` on the first ``n`` images, per size."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        a, b = conf_a[:n], conf_b[:n]
        diffs = []
        for _ in range(resamples):
            idx = torch.from_numpy(rng.integers(0, n, n))
            diffs.append(miou(b[idx].sum(0)) - miou(a[idx].sum(0)))
        rows.append((n, miou(b.sum(0)) - miou(a.sum(0)), float(np.std(diffs))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="pairs of run directories: A B [A B ...]")
    parser.add_argument("--images", nargs="+", type=int, default=[500, 4000],
                        help="test-split sizes to measure (the first N test images)")
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if len(args.runs) % 2:
        raise SystemExit("give the runs in pairs: BASELINE DISTILLED [BASELINE DISTILLED ...]")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # The test split the runs were trained for: their dataset settings, which must agree.
    settings = {r: json.loads((Path(r) / "config.json").read_text()) for r in args.runs}
    data = {(c.get("data", "synth"), json.dumps(c.get("data_kwargs", {}), sort_keys=True))
            for c in settings.values()}
    if len(data) > 1 or next(iter(data))[0] != "synth":
        raise SystemExit(f"the runs must share one SynthScenes setting to be scored on one "
                         f"test split; they have {sorted(data)}")
    data_kwargs = {k: v for k, v in json.loads(next(iter(data))[1]).items()
                   if k != "length"}
    test = build_dataset("synth", split="test", **data_kwargs, length=max(args.images))
    lines = ["| A | B | " + " | ".join(f"B - A on {n} (bootstrap std)" for n in args.images) + " |",
             "|---|---|" + "---:|" * len(args.images)]
    for run_a, run_b in zip(args.runs[::2], args.runs[1::2]):
        conf = [image_confusions(model_from_checkpoint(Path(r) / "model.pt"), test)
                for r in (run_a, run_b)]
        cells = [f"{d:+.2f} ({s:.2f})" for _, d, s in paired_bootstrap(*conf, args.images,
                                                                        args.resamples)]
        lines.append(f"| {run_a} | {run_b} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    wall = time.perf_counter() - start
    print(f"\n{report}\n\n{wall:.0f} s")
    if not args.no_write:
        append_section(args.out, "Test-image noise of paired differences", wall, report,
                       note=f"{args.resamples} bootstrap resamples of the test images")

if __name__ == "__main__":
    main()
