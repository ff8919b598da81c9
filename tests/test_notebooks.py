"""Every notebook runs top to bottom in quick mode (``KDNB_QUICK=1``), widgets included.

This is the one place notebooks run under pytest: ``make test`` calls plain
``python -m pytest -q`` without ``--nbmake``. Each notebook gets its own empty data root
(``KDNB_DATA``), so the models quick mode trains never land in the real checkpoint cache.
"""
import os
import re
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (the dev extra)")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: Per cell: a hang guard, not a budget (the slowest cell takes about a minute on an idle
#: 2-core machine; CI machines of this kind have been up to 4x slower).
TIMEOUT_S = 600


def kernel_manager():
    """A kernel that talks to the client over Unix sockets (IPC) in a new short folder.

    Over TCP on loopback (jupyter_client's default), a kernel on a busy 2-core machine
    sometimes answers a cell and the client sees the answer only when the per-cell timeout
    ends: measured on notebook 03 beside one busy core, 5 of 8 runs stalled for the whole 150 s
    cell timeout, mostly on its first ``widgets.interact`` cell (CI once failed so on
    notebook 04); over IPC, none of 5.
    """
    from jupyter_client.manager import KernelManager

    # a short path: a Unix socket's name is limited to about 100 characters
    folder = tempfile.mkdtemp(prefix="kdnb-kernel-")
    return KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(folder, "k"))


def execute(client) -> None:
    """Runs the notebook, then shuts its kernel down: a client given its own kernel manager
    leaves the kernel running (it does not own it) until pytest exits."""
    try:
        client.execute()
    finally:
        if client.km.has_kernel:
            client.km.shutdown_kernel(now=True)


#: Run in the notebook's kernel after its last cell: every ``widgets.interact`` control is
#: moved to another value (the last option, the maximum, the other state), which calls the
#: plotting function again through ipywidgets. ipywidgets catches an exception in that call
#: and prints it into the widget's output area, where no front end would show it here; the
#: hook below collects it instead, so a callback that breaks on a widget value fails the test.
#: ``index``, ``max`` and ``kwargs_widgets`` are the same in ipywidgets 7.7 (Colab) and 8.
WIDGET_CHECK = """
import sys as _sys
import ipywidgets as _widgets
from IPython import get_ipython as _get_ipython

_shell, _errors = _get_ipython(), []
_show = _shell.showtraceback


def _collect(*args, **kwargs):
    _errors.append(repr(_sys.exc_info()[1]))
    _show(*args, **kwargs)


_shell.showtraceback = _collect
_moved = {}
try:
    for _name, _obj in list(globals().items()):
        _box = getattr(_obj, "widget", None)
        if not isinstance(_box, _widgets.interactive):
            continue
        _moved[_name] = 0
        for _control in _box.kwargs_widgets:
            # a slider that redraws on every intermediate value queues multi-second redraws
            assert not getattr(_control, "continuous_update", False), (_name, _control.description)
            if isinstance(_control, _widgets.Checkbox):
                _control.value = not _control.value
            elif hasattr(_control, "index"):
                _control.index = len(_control.options) - 1
            else:
                _control.value = _control.max
            _moved[_name] += 1
finally:
    _shell.showtraceback = _show
assert not _errors, f"a widget callback raised: {_errors}"
print(f"ipywidgets {_widgets.__version__}: moved {_moved}")
assert len(_moved) == EXPECTED, f"found {len(_moved)} interact widgets, expected EXPECTED: {_moved}"
assert all(_moved.values()), _moved
"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    # The kernel is a subprocess: it inherits this process's environment.
    monkeypatch.setenv("KDNB_QUICK", "1")
    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread, like the test process (conftest): a kernel with several OpenMP threads
    # on a loaded machine spin-waits for busy cores and runs many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    sources = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    interacts = len(re.findall(r"\bwidgets\.interact\(", sources))
    if interacts:
        nb.cells.append(nbformat.v4.new_code_cell(WIDGET_CHECK.replace("EXPECTED", str(interacts))))
    client = nbclient.NotebookClient(nb, km=kernel_manager(), timeout=TIMEOUT_S,
                                     kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    execute(client)  # raises on the first failing cell; TIMEOUT_S bounds each cell (a hang guard)
    # The budget (3 minutes per notebook on two cores) is reported, not asserted:
    # a timed assertion would fail on a loaded machine without anything being wrong.
    print(f"{path.name}: {time.perf_counter() - start:.1f} s in quick mode")
    if interacts:
        printed = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
        assert "moved" in printed, nb.cells[-1].outputs
        print(f"{path.name}: {printed.strip()}")


def test_widget_check_catches_a_failing_callback(monkeypatch):
    """The widget check fails a notebook whose callback raises on a value it only reaches
    through the widget (the initial render succeeds)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    source = ("import ipywidgets as widgets\n\n"
              "def show(k=0):\n"
              "    if k == 3:\n"
              "        raise ValueError('k = 3 breaks the plot')\n"
              "    print(k)\n\n"
              "widgets.interact(show, k=widgets.IntSlider(continuous_update=False, min=0, max=3, value=0));\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source),
                                         nbformat.v4.new_code_cell(WIDGET_CHECK.replace("EXPECTED", "1"))])
    client = nbclient.NotebookClient(nb, km=kernel_manager(), timeout=60)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="k = 3 breaks the plot"):
        execute(client)
    # the same notebook with a callback that works passes
    nb.cells[0].source = source.replace("k == 3", "k == 4")
    execute(nbclient.NotebookClient(nb, km=kernel_manager(), timeout=60))
    assert "moved {'show': 1}" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
