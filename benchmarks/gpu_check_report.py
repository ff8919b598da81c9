"""The results file of ``benchmarks/gpu_check.sh``: one section, ready to append to
benchmarks/RESULTS.md, read off the check's work folder.

    python benchmarks/gpu_check_report.py WORK RESULTS_MD [--print]

gpu_check.sh calls this after every step, so a call of the device machine stopped at its
limit still brings back what was measured. The work folder holds ``meta`` (KEY=VALUE
lines), ``steps`` (one tab-separated line per finished step: name, status, exit code,
seconds, limit) and, per step, ``NAME.cmd`` (the command), ``NAME.log`` (its output) and
``NAME.md`` (the section it wrote, if any). The issue-20 criteria are the verdict lines
``gpu_throughput.py`` prints. Standard library only: it runs where torch is broken.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

#: step name -> heading of its subsection (in the order gpu_check.sh runs them)
STEPS = {
    "environment": "Environment",
    "tests": "CUDA-only tests (`pytest -m gpu`)",
    "throughput": "Throughput of a distillation step (`gpu_throughput.py`)",
    "probe": "200-step bf16 distillation (`gpu_distill_probe.py`)",
    "compile": "torch.compile (`gpu_throughput.py --variants kdnb kdnb-compile`)",
}
#: issue 20's criteria: (the start of gpu_throughput.py's verdict line, what it asks)
CRITERIA = (
    ("kdnb over reference-fp32:", "kdnb's step at least 2x the images/s of the fp32 "
                                  "research-code loop"),
    ("kdnb MFU:", "at least 30 % bf16 MFU"),
    ("FAKD over the KD it replaces at K = 19:", "FAKD at most 5 % over the KD step at K = 19"),
    ("FAKD over the KD it replaces at K = 150:", "FAKD at most 15 % over the KD step at K = 150"),
)
VERDICTS = ("met", "NOT met", "judged on a GPU at full size only")
LOG_TAIL = 40  # lines of a failed step's output in the results


def read_steps(work: Path) -> dict[str, dict]:
    steps = {}
    path = work / "steps"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, rc, seconds, limit = line.split("\t")
        steps[name] = {"status": status, "rc": rc, "seconds": seconds, "limit": limit}
    return steps


def read(work: Path, name: str) -> str:
    path = work / name
    return path.read_text(errors="replace") if path.is_file() else ""


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def text_block(text: str) -> str:
    return "```text\n" + (text.rstrip("\n") or "(no output)") + "\n```"


def criterion(log: str, prefix: str) -> tuple[str, str] | None:
    """``(what was measured, verdict)`` from the line of ``log`` that starts with ``prefix``."""
    for line in log.splitlines():
        if line.startswith(prefix):
            measured = line[len(prefix):].strip()
            head, sep, verdict = measured.rpartition(": ")
            if sep and verdict in VERDICTS:
                return head, verdict
            return measured, "n/a"
    return None


def criteria_table(work: Path, steps: dict[str, dict]) -> str:
    log = read(work, "throughput.log")
    step = steps.get("throughput")
    lines = ["| criterion | measured | verdict |", "|---|---|---|"]
    for prefix, asked in CRITERIA:
        found = criterion(log, prefix)
        if found:
            lines.append(f"| {asked} | {found[0]} | **{found[1]}** |")
        else:
            why = ("step not run" if step is None else
                   "no verdict line in its output" if step["status"] == "ok" else
                   f"step {step['status']}, exit {step['rc']}: see below")
            lines.append(f"| {asked} | not measured ({why}) | - |")
    memory = criterion(log, "kdnb peak memory:")
    if memory:
        lines.append(f"\nPeak memory of the `kdnb` variant: {memory[0]}.")
    probe = next((line for line in read(work, "probe.log").splitlines()
                  if line.startswith("probe: ") and "steps/s" in line), None)
    if probe:
        lines.append(f"\nDistillation probe: {probe[len('probe: '):]}.")
    return "\n".join(lines)


def embedded(section: str, work: Path) -> str:
    """A step's own RESULTS section under our subsection: its ``## `` title dropped, its
    other headings one level down, the work folder left out of the paths it names."""
    lines = section.replace(f"{work}/", "").strip("\n").splitlines()
    if lines and lines[0].startswith("## "):
        lines = lines[1:]
    return "\n".join("#" + line if re.match(r"#{2,5} ", line) else line for line in lines).strip()


def step_section(work: Path, name: str, steps: dict[str, dict]) -> str:
    step = steps.get(name)
    command = read(work, f"{name}.cmd").strip()
    parts = [f"### {STEPS[name]}", ""]
    status = ("not run (the check was stopped before it)" if step is None else
              f"{step['status']} (exit {step['rc']}, {step['seconds']} s of {step['limit']})")
    parts.append(f"`{command}`: {status}" if command else status)
    log = read(work, f"{name}.log")
    section = read(work, f"{name}.md")
    if section:
        parts += ["", embedded(section, work)]
    elif name in ("environment", "tests") and log:
        parts += ["", text_block(tail(log, 60))]
    if step is not None and step["status"] != "ok":
        parts += ["", f"Last {LOG_TAIL} lines of its output:", "", text_block(tail(log, LOG_TAIL))]
    return "\n".join(parts)


def device_line(work: Path) -> str:
    for line in read(work, "environment.log").splitlines():
        if line.startswith("device: "):
            return line[len("device: "):].split(",")[0]
    return "no CUDA device"


def report(work: Path) -> str:
    meta = dict(line.split("=", 1) for line in read(work, "meta").splitlines() if "=" in line)
    steps = read_steps(work)
    dry = meta.get("mode") == "dry-run"
    seconds = sum(int(s["seconds"]) for s in steps.values() if s["seconds"].isdigit())
    done = "" if len(steps) == len(STEPS) else f"; {len(steps)} of {len(STEPS)} steps done"
    title = f"## GPU check of issue 20 ({meta.get('date', '?')}): {device_line(work)}"
    parts = [title, "",
             f"Command: `{meta.get('command', 'bash benchmarks/gpu_check.sh')}` (wall time "
             f"{seconds / 60:.1f} min{done}; kdnb commit {meta.get('commit') or 'unknown'}). "
             "The device call that runs it is at the top of benchmarks/gpu_check.sh."]
    if dry:
        parts += ["", "**Dry run on the CPU: reduced sizes and quick modes, the tests only "
                      "collected; the numbers mean nothing.**"]
    parts += ["", "| step | result | seconds (limit) |", "|---|---|---:|"]
    for name in STEPS:
        step = steps.get(name)
        result = "not run" if step is None else (
            step["status"] + ("" if step["status"] in ("ok", "skipped") else
                              f" (exit {step['rc']})"))
        time_cell = "-" if step is None else f"{step['seconds']} ({step['limit']})"
        parts.append(f"| {name} | {result} | {time_cell} |")
    parts += ["", "### The criteria of issue 20", "", criteria_table(work, steps)]
    for name in STEPS:
        parts += ["", step_section(work, name, steps)]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--print"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    text = report(work)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n" + text)  # a blank line first: it appends to RESULTS.md as it is
    tmp.replace(out)
    if len(argv) == 3:  # the end of a device call's output: the steps and the verdicts
        steps = read_steps(work)
        print("\n".join(f"{name}: {steps[name]['status'] if name in steps else 'not run'}"
                        for name in STEPS))
        print(criteria_table(work, steps))
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
