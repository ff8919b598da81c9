"""`make lab`: JupyterLab starts on the workbook and has the widget front end enabled.

The notebooks' widgets are exercised in the kernel by tests/test_notebooks.py; what a browser
adds is the JupyterLab extension that draws them (@jupyter-widgets/jupyterlab-manager, from
jupyterlab_widgets). Without it a learner sees "Loading widget..." instead of a slider.
"""
import json
import os
import urllib.request
from pathlib import Path

import pytest
from conftest import running_jupyterlab

pytest.importorskip("jupyterlab", reason="the lab test needs JupyterLab (the notebooks extra)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TOKEN = "kdnb-test"


def _get(port: int, path: str) -> tuple[int, bytes]:
    sep = "&" if "?" in path else "?"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{sep}token={TOKEN}", timeout=10) as r:
        return r.status, r.read()


@pytest.fixture
def lab(tmp_path):
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}  # no user settings leak in
    with running_jupyterlab(NOTEBOOKS, tmp_path / "jupyterlab.log", token=TOKEN, env=env) as port:
        yield port


def test_lab_serves_the_workbook_with_the_widget_extension(lab):
    status, body = _get(lab, "/api/contents")
    assert status == 200
    listed = {item["name"] for item in json.loads(body)["content"]}
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} <= listed
    status, body = _get(lab, "/lab/api/extensions")
    extensions = {ext["name"]: ext for ext in json.loads(body)}
    widgets = extensions.get("jupyter-widgets-jupyterlab-manager")
    assert widgets is not None, f"the widget front end is not installed: {sorted(extensions)}"
    assert widgets["enabled"] and widgets["status"] == "ok", widgets
    status, page = _get(lab, "/lab")
    assert status == 200 and b"@jupyter-widgets/jupyterlab-manager" in page
