"""The benchmark scripts keep running: quick mode, no timing assertions."""
import os
import re
import subprocess
import sys
from pathlib import Path

from kdnb.losses import METHODS

ROOT = Path(__file__).resolve().parents[1]
FAKD_ROWS = ("kd+fakd (full)", "kd+fakd (diag)", "nfd+fakd (full)", "nfd+fakd (diag)",
             "kd+fakd (full) - kd", "nfd+fakd (full) - nfd")


def test_loss_overhead_quick_prints_every_method():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_overhead.py"), "--quick", "--no-write"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "student step" in out
    # every registered method (FAKD through its variants), each with a time in ms
    rows = [m for m in METHODS if m != "fakd"] + list(FAKD_ROWS)
    for row in rows:
        assert re.search(rf"^{re.escape(row)}\s+-?\d+\.\d+\s", out, re.MULTILINE), \
            f"no row for {row!r} in:\n{out}"
    assert "FAKD over the KD it replaces at K = 19" in out
    assert "appended to" not in out  # --no-write wrote nothing


def test_synth_distill_quick_runs_every_method_and_resumes(tmp_path):
    """Quick budgets: every method trains, both tables print; a rerun reuses the runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "KDNB_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "synth_distill.py"), "--quick", "--no-write",
           "--seeds", "1", "--threads", "1", "--root", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for table in ("val (model selection)", "test (reported)"):
        assert table in proc.stdout
    for method in ("| baseline |", "| kd |", "| mse |", "| cwd |", "| nfd |", "| nfd+fakd |",
                   "| kd+fakd |"):
        assert method in proc.stdout, proc.stdout
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "runs").glob("*/model.pt")}
    assert len(stamps) == 8  # seven students and the teacher
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0
    assert {p: p.stat().st_mtime for p in stamps} == stamps  # nothing was trained again
