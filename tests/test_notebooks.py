"""Every notebook runs top to bottom in quick mode (``KDNB_QUICK=1``).

This is the one place notebooks run under pytest: ``make test`` calls plain
``python -m pytest -q`` without ``--nbmake``. Each notebook gets its own empty data root
(``KDNB_DATA``), so the models quick mode trains never land in the real checkpoint cache.
"""
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (the dev extra)")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 180  # per notebook; each takes well under a minute on two CPU cores


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    # The kernel is a subprocess: it inherits this process's environment.
    monkeypatch.setenv("KDNB_QUICK", "1")
    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    # nbclient's timeout bounds each cell; this bounds the whole notebook.
    assert elapsed < TIMEOUT_S, f"{path.name} took {elapsed:.0f} s in quick mode (limit {TIMEOUT_S} s)"
