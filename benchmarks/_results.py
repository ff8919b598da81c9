"""Appends a benchmark's section to benchmarks/RESULTS.md: title, the command that produced
it and its wall time, then the tables. Imported by the scripts of this folder, which run
as ``python benchmarks/NAME.py`` (their folder is then on ``sys.path``)."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path


def append_section(out: Path, title: str, wall_s: float, body: str, note: str = "") -> None:
    """Writes ``## title (date)``, ``Command: ...`` with the wall time and ``note``, then ``body``."""
    script = Path(sys.argv[0])
    command = "python " + " ".join([f"benchmarks/{script.name}", *sys.argv[1:]])
    extra = f"; {note}" if note else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(f"\n## {title} ({datetime.date.today()})\n\nCommand: `{command}` "
                 f"(wall time {wall_s / 60:.1f} min{extra})\n\n{body}\n")
    print(f"appended to {out}")
