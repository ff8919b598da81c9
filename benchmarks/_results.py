"""Appends a benchmark's section to benchmarks/RESULTS.md: title, the command that produced
it and its wall time, then the tables. Imported by the scripts of this folder, which run
as ``python benchmarks/NAME.py`` (their folder is then on ``sys.path``)."""
from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path


def command_line(script: str | None = None, argv: list[str] | None = None) -> str:
    """The command that runs ``script`` (a file of this folder; default: the running one)
    with ``argv`` (default: the process's own arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script or sys.argv[0]).name}",
                     *(shlex.quote(a) for a in args)])


def append_text(out: Path, text: str) -> None:
    """Appends ``text`` (a section that starts with its ``## `` heading) to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(text.rstrip("\n") + "\n")
    print(f"appended to {out}")


def append_section(out: Path, title: str, wall_s: float, body: str, note: str = "") -> None:
    """Writes ``## title (date)``, ``Command: ...`` with the wall time and ``note``, then ``body``."""
    command = command_line()
    extra = f"; {note}" if note else ""
    append_text(out, f"\n## {title} ({datetime.date.today()})\n\nCommand: `{command}` "
                     f"(wall time {wall_s / 60:.1f} min{extra})\n\n{body}\n")
