"""How long each notebook takes, top to bottom, as a learner runs them (quick mode or full).

    python benchmarks/notebook_times.py                 # quick mode, every notebook in order
    python benchmarks/notebook_times.py --full 01 02    # full budgets (the teacher from the
                                                        # cache make demo-full fills, or trained)

The notebooks run in order in one kernel each, sharing one data root, as a learner opening
00, 01, ... in JupyterLab would: a model an earlier notebook trained is loaded from the
cache by the later ones, so a notebook run alone can take longer. The data root is
``--data``; by default a new folder in quick mode, and kdnb's own data root with ``--full``
(where ``make demo-full`` cached the teacher). The kernel keeps torch's own thread count
(every core) unless ``--threads`` sets ``OMP_NUM_THREADS``. Run it on an idle machine:
under load, a multi-threaded torch kernel slows by far more than the load suggests. The
table (seconds per notebook, the slowest cell and its index among all cells, 0-based) is
printed and appended to benchmarks/RESULTS.md with the command; a notebook that fails
gets a row saying at which cell, and the script exits non-zero after the table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

from _results import append_section  # benchmarks/_results.py

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, env: dict) -> tuple[float, float | None, int | None, str | None]:
    """Runs ``path`` in a fresh kernel with ``env``; returns (seconds, the slowest cell's
    seconds and its index, or None without cells; the error of a failing cell, or None)."""
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    folder = tempfile.mkdtemp(prefix="kdnb-kernel-")  # short: a socket name is limited
    km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(folder, "k"))
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
    error = None
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        error = f"failed at cell {len(cells) - 1}: {str(err).strip().splitlines()[-1]}"
    finally:
        total = time.perf_counter() - start
        km.shutdown_kernel(now=True)
        shutil.rmtree(folder, ignore_errors=True)
    if not cells:
        return total, None, None, error
    slowest = max(range(len(cells)), key=cells.__getitem__)
    return total, cells[slowest], slowest, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook number prefixes (default: every one)")
    parser.add_argument("--full", action="store_true", help="full budgets (no KDNB_QUICK)")
    parser.add_argument("--data", help="data root the notebooks share (default: a new folder; "
                                       "with --full, KDNB_DATA or kdnb's data root)")
    parser.add_argument("--dir", default=str(NOTEBOOKS), help="folder of the notebooks "
                                                             "(default: the workbook's)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the kernels (default: "
                                                    "torch's own, every core)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    folder = Path(args.dir)
    paths = sorted(p for p in folder.glob("*.ipynb")
                   if not args.names or any(p.name.startswith(n) for n in args.names))
    if not paths:
        raise SystemExit(f"no notebook in {folder} starts with {args.names}")
    if args.data:
        data = args.data
    elif args.full:
        from kdnb.data import data_root
        data = str(data_root())
    else:
        data = tempfile.mkdtemp(prefix="kdnb-nb-data-")
    env = {k: v for k, v in os.environ.items() if k not in ("KDNB_QUICK", "OMP_NUM_THREADS")}
    env.update(KDNB_DATA=data, HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
               **({} if args.full else {"KDNB_QUICK": "1"}),
               **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    mode = "full budgets" if args.full else "quick mode (KDNB_QUICK=1)"
    threads = args.threads or "torch's default"
    print(f"{mode}, data root {data}, {os.cpu_count()} CPUs, kernel threads {threads}, "
          f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    lines = ["| notebook | time (s) | slowest cell (s) | its index |", "|---|---:|---:|---:|"]
    failed = []
    start = time.perf_counter()
    for path in paths:
        total, slow, index, error = run_notebook(path, env)
        print(f"{path.name}: {total:.1f} s" + (f" (slowest cell {index}: {slow:.1f} s)" if slow
                                                 is not None else "") + (f", {error}" if error else ""),
              flush=True)
        lines.append(f"| {path.name} | {total:.0f} | "
                     + (f"{slow:.0f} | {index} |" if slow is not None else "- | - |")
                     + (f" {error} |" if error else ""))
        if error:
            failed.append(path.name)
    wall = time.perf_counter() - start
    lines.append(f"| (all, in order) | {wall:.0f} | | |")
    body = "\n".join(lines) + (f"\n\nLoad average at the end: {os.getloadavg()[0]:.2f} (1 min); "
                               f"{os.cpu_count()} CPUs, kernel threads {threads}.")
    print(body)
    if not args.no_write:
        append_section(Path(args.out), f"Notebook times, {mode}", wall, body)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
