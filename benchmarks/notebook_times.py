"""How long each notebook takes, top to bottom, as a learner runs them (quick mode or full).

    python benchmarks/notebook_times.py                 # quick mode, every notebook in order
    python benchmarks/notebook_times.py --full 01 02    # full budgets (models from the cache
                                                        # that make demo fills, or trained)

The notebooks run in order in one kernel each, sharing one data root (``--data``, default a
new folder), as a learner opening 00, 01, ... in JupyterLab would: a model an earlier
notebook trained is loaded from the cache by the later ones. The kernel keeps torch's own
thread count (every core), unlike the tests' one-thread kernels. Run it on an idle machine:
under load, a multi-threaded torch kernel slows by far more than the load suggests. The
table (seconds per notebook, the slowest cell) is printed and appended to
benchmarks/RESULTS.md with the command.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
import torch

from _results import append_section  # benchmarks/_results.py

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, env: dict) -> tuple[float, float, int]:
    """Runs ``path`` in a fresh kernel with ``env``; returns (seconds, slowest cell's
    seconds, index of that cell)."""
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3", transport="ipc",
                       ip=os.path.join(tempfile.mkdtemp(prefix="kdnb-kernel-"), "k"))
    km.start_kernel(env=env)
    cells: list[float] = []

    class Timed(nbclient.NotebookClient):
        async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
            start = time.perf_counter()
            try:
                return await super().async_execute_cell(cell, cell_index, *args, **kwargs)
            finally:
                cells.append(time.perf_counter() - start)

    client = Timed(nb, km=km, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        km.shutdown_kernel(now=True)
    total = time.perf_counter() - start
    slowest = max(range(len(cells)), key=cells.__getitem__)
    return total, cells[slowest], slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook number prefixes (default: every one)")
    parser.add_argument("--full", action="store_true", help="full budgets (no KDNB_QUICK)")
    parser.add_argument("--data", help="data root the notebooks share (default: a new folder)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    paths = sorted(p for p in NOTEBOOKS.glob("*.ipynb")
                   if not args.names or any(p.name.startswith(n) for n in args.names))
    if not paths:
        raise SystemExit(f"no notebook in {NOTEBOOKS} starts with {args.names}")
    data = args.data or tempfile.mkdtemp(prefix="kdnb-nb-data-")
    env = {k: v for k, v in os.environ.items() if k not in ("KDNB_QUICK", "OMP_NUM_THREADS")}
    env.update(KDNB_DATA=data, HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
               **({} if args.full else {"KDNB_QUICK": "1"}))
    mode = "full budgets" if args.full else "quick mode (KDNB_QUICK=1)"
    print(f"{mode}, data root {data}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at the start",
          flush=True)
    lines = ["| notebook | time (s) | slowest cell (s) | its index |", "|---|---:|---:|---:|"]
    start = time.perf_counter()
    for path in paths:
        total, slow, index = run_notebook(path, env)
        print(f"{path.name}: {total:.1f} s (slowest cell {index}: {slow:.1f} s)", flush=True)
        lines.append(f"| {path.name} | {total:.0f} | {slow:.0f} | {index} |")
    wall = time.perf_counter() - start
    lines.append(f"| (all, in order) | {wall:.0f} | | |")
    body = "\n".join(lines) + (f"\n\nLoad average at the end: {os.getloadavg()[0]:.2f} (1 min); "
                               f"{os.cpu_count()} CPUs.")
    print(body)
    if not args.no_write:
        append_section(Path(args.out), f"Notebook times, {mode}", wall, body)


if __name__ == "__main__":
    main()
