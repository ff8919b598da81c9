"""The workbook in a real browser: JupyterLab driven by headless Chromium (``make test-browser``).

tests/test_notebooks.py runs every notebook and moves every widget inside the kernel;
tests/test_lab.py checks that JupyterLab ships the widget front end. What only a browser
shows is whether that front end draws the widgets: a learner who sees "Loading widget..."
or the text ``interactive(children=(...))`` under a cell has no slider to move. This test
starts JupyterLab on a copy of the notebooks (``KDNB_QUICK=1`` in the server's
environment, so in every kernel), opens each notebook in Chromium, runs all its cells and
checks that:

- every cell ran and none shows an error (in its outputs or inside a widget's output);
- every ``widgets.interact`` output holds real widget elements (a slider, a dropdown and a
  figure drawn by the plotting function), and neither "Loading widget..." nor a repr;
- moving a slider with the mouse, then picking another dropdown entry, each redraws the
  figure (the ``src`` of the output image changes).

Screenshots of each notebook's first figure and first widget (as first drawn) are written
to ``<pytest's temporary folder>/lab0/screenshots/``: ``runs/test-browser/lab0/screenshots/``
under ``make test-browser``, which prints each path.

Deselected by default (the ``browser`` marker, pyproject.toml); ``make test-browser`` runs
it. It skips, saying why, without selenium (the ``browser`` extra) or without Chromium and
its driver (Debian: ``apt-get install chromium chromium-driver``).
"""
import contextlib
import json
import os
import re
import secrets
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import running_jupyterlab

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: "
                                "pip install -e '.[browser]' (make test-browser does)")
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TOKEN = secrets.token_hex(16)  # the server takes requests from this test only
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(f"the browser test needs Chromium and chromedriver on PATH (found {CHROMIUM} and "
                f"{CHROMEDRIVER}); on Debian: apt-get install chromium chromium-driver",
                allow_module_level=True)
#: Hang guards, not budgets: the slowest notebook (04) ran all its cells in 3 minutes on a
#: 2-core machine loaded by two training processes, and a redraw takes seconds.
RUN_TIMEOUT_S = 600
REDRAW_TIMEOUT_S = 300
#: JupyterLab settings for the test: every cell stays in the page (no virtual scrolling),
#: nothing is saved over the copies, and no news or update toast covers the cells.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def _api(port: int, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@contextlib.contextmanager
def running_lab(base: Path, notebooks, disabled: tuple[str, ...] = ()):
    """JupyterLab on 127.0.0.1 (a free port, a token) over copies of ``notebooks``, with
    the ``disabled`` front-end extensions switched off; yields its port and folders."""
    work = base / "notebooks"
    work.mkdir(parents=True)
    for path in notebooks:
        shutil.copy(path, work / path.name)
    settings = base / "settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    (base / "config" / "labconfig").mkdir(parents=True)
    (base / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {name: True for name in disabled}}))
    env = {**os.environ,
           "KDNB_QUICK": "1", "KDNB_DATA": str(base / "data"), "HF_HUB_OFFLINE": "1",
           # one thread per kernel: several OpenMP threads on a loaded machine spin-wait
           "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")}
    env.pop("MPLBACKEND", None)  # the notebooks' %matplotlib inline draws the figures
    with running_jupyterlab(work, base / "jupyterlab.log", token=TOKEN, env=env,
                            args=("--LabApp.expose_app_in_browser=True",)) as port:
        yield {"port": port, "work": work, "shots": base / "screenshots"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with running_lab(tmp_path_factory.mktemp("lab"), NOTEBOOKS) as server:
        yield server


@contextlib.contextmanager
def chromium():
    """A headless Chromium under chromedriver; skips the test when it cannot start."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # given, so that Selenium Manager never downloads one
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    except WebDriverException as error:
        pytest.skip(f"Chromium did not start ({CHROMIUM}, {CHROMEDRIVER}): {error.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(lab):
    """A fresh Chromium per notebook; the notebook's kernel is shut down afterwards."""
    with chromium() as driver:
        yield driver
    for session in _api(lab["port"], "/api/sessions"):
        _api(lab["port"], f"/api/sessions/{session['id']}", method="DELETE")


#: The state of the notebook in the current tab, read from JupyterLab's own models.
STATE_JS = """
const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.content.model || !panel.sessionContext) return null;
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
let code = 0, ran = 0;
const errors = [];
for (const cell of panel.content.model.cells) {
  if (cell.type !== 'code') continue;
  code += 1;
  if (cell.executionCount !== null) ran += 1;
  for (let i = 0; i < cell.outputs.length; i++) {
    const out = cell.outputs.get(i).toJSON();
    if (out.output_type === 'error') errors.push(`cell ${code}: ${out.ename}: ${out.evalue}`);
  }
}
const pending = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
  .filter(p => p.textContent.includes('*')).length;
return {code, ran, pending, errors, kernel: kernel ? kernel.status : 'none',
        ready: panel.sessionContext.isReady};
"""

def _wait(what: str, timeout: float, check, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except StaleElementReferenceException:  # a widget redrawn while it was read: again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def open_and_run(driver, port: int, name: str) -> dict:
    """Opens ``name`` in JupyterLab, runs all its cells, returns the final state."""
    driver.get(f"http://127.0.0.1:{port}/lab/tree/{name}?reset&token={TOKEN}")
    _wait(f"{name} to open with a ready kernel", 180,
          lambda: (s := driver.execute_script(STATE_JS)) and s["ready"] and s["kernel"] == "idle")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    def finished():
        state = driver.execute_script(STATE_JS)
        if state["errors"]:
            return state  # a failing cell stops the run: report it now
        if state["ran"] == state["code"] and not state["pending"] and state["kernel"] == "idle":
            return state
        return None

    state = _wait(f"{name} to run all cells", RUN_TIMEOUT_S, finished, interval=2.0)
    assert not state["errors"], f"{name}: a cell failed: {state['errors']}"
    return state


def _figure(box) -> str | None:
    """The ``src`` of the figure in an interact box's output, once it is drawn."""
    images = box.find_elements(By.CSS_SELECTOR, ".widget-output img")
    return images[0].get_attribute("src") if images else None


def _drag_slider(driver, slider) -> None:
    """Drags a slider's handle a third of its track towards its far end, as a mouse would."""
    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle, .ui-slider-handle")  # ipywidgets 8, 7
    track = slider.find_element(By.CSS_SELECTOR, ".noUi-target, .ui-slider")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", track)
    left, width = track.rect["x"], track.rect["width"]
    centre = handle.rect["x"] + handle.rect["width"] / 2
    offset = width / 3 if centre - left < width / 2 else -width / 3
    ActionChains(driver).click_and_hold(handle).move_by_offset(offset / 2, 0) \
        .move_by_offset(offset / 2, 0).release().perform()


def shown_errors(scope) -> list[str]:
    """Tracebacks drawn in ``scope`` (the page or one widget), widget outputs included:
    ipywidgets prints a callback's exception into its Output widget, not into the notebook."""
    shown = scope.find_elements(By.CSS_SELECTOR,
                                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    return [e.text[-600:] for e in shown if re.search(r"Traceback|Error:", e.text)]


def _redraws(driver, box, action, what: str) -> None:
    """``action`` redraws the figure of ``box``; a traceback in its output fails at once."""
    before = _wait(f"{what}: the figure before the change", REDRAW_TIMEOUT_S, lambda: _figure(box))
    action()

    def redrawn():
        if errors := shown_errors(box):
            raise AssertionError(f"{what}: the callback raised: {errors}")
        return (src := _figure(box)) is not None and src != before

    _wait(f"{what} to redraw the figure", REDRAW_TIMEOUT_S, redrawn)


def _drawn_as_text(driver) -> list[str]:
    """Outputs where a widget should be but text is: the widget front end is missing."""
    texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
    return [t[:200] for t in texts if "Loading widget" in t or t.lstrip().startswith("interactive(")]


def drawn_widgets(driver, name: str, expected: int, timeout: float = 120) -> list:
    """The ``expected`` interact boxes, each drawn with a slider, a dropdown and a figure."""
    def enough():
        found = driver.find_elements(By.CSS_SELECTOR, ".widget-interact")
        return (found,) if len(found) >= expected else None  # a tuple: true even when empty

    try:
        (boxes,) = _wait(f"{name}: {expected} interact widgets drawn", timeout, enough)
    except AssertionError as error:
        raise AssertionError(f"{error}; drawn as text instead: {_drawn_as_text(driver)}") from None
    assert len(boxes) == expected, f"{name}: {len(boxes)} interact widgets drawn, {expected} in the source"
    as_text = _drawn_as_text(driver)
    assert not as_text, f"{name}: a widget is drawn as text, not as a widget: {as_text}"
    for k, box in enumerate(boxes, start=1):
        sliders = box.find_elements(By.CSS_SELECTOR, ".widget-slider")
        dropdowns = box.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
        assert sliders and dropdowns, f"{name}, widget {k}: expected a slider and a dropdown, found " \
                                      f"{len(sliders)} and {len(dropdowns)}: {box.get_attribute('outerHTML')[:500]}"
        _wait(f"{name}, widget {k}: its figure", REDRAW_TIMEOUT_S, lambda: _figure(box))
    return boxes


def move_widgets(driver, name: str, boxes: list) -> None:
    """In every interact box, moving the slider and then the dropdown each redraw the figure."""
    for k, box in enumerate(boxes, start=1):
        slider = box.find_element(By.CSS_SELECTOR, ".widget-slider")
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        value = readout.text
        _redraws(driver, box, lambda: _drag_slider(driver, slider), f"{name}, widget {k}: the slider")
        assert readout.text != value, f"{name}, widget {k}: the slider's value did not change ({value})"
        menu = Select(box.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
        other = next(i for i, option in enumerate(menu.options) if not option.is_selected())
        _redraws(driver, box, lambda: menu.select_by_index(other), f"{name}, widget {k}: the dropdown")


def _screenshot(driver, element, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.screenshot(str(path))


def _interacts(path: Path) -> int:
    cells = json.loads(path.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return len(re.findall(r"\bwidgets\.interact\(", source))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_draws_its_widgets_in_the_browser(path, lab, browser):
    start = time.perf_counter()
    state = open_and_run(browser, lab["port"], path.name)
    ran = time.perf_counter() - start
    boxes = drawn_widgets(browser, path.name, _interacts(path))
    figures = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    assert figures, f"{path.name}: no figure drawn"
    shots = [lab["shots"] / f"{path.stem}-figure.png"]
    _screenshot(browser, figures[0], shots[0])
    if boxes:  # as a learner first sees it
        shots.append(lab["shots"] / f"{path.stem}-widget.png")
        _screenshot(browser, boxes[0], shots[1])
    move_widgets(browser, path.name, boxes)
    assert not (shown := shown_errors(browser)), f"{path.name}: an error is shown: {shown}"
    print(f"{path.name}: {state['code']} cells in {ran:.0f} s, {len(boxes)} widgets redrawn, "
          f"{time.perf_counter() - start:.0f} s in all; screenshots: {', '.join(map(str, shots))}")


#: A notebook of one widget whose callback draws at k = 0 and raises at any other k.
FAILING_WIDGET = ("import ipywidgets as widgets\n"
                  "import matplotlib.pyplot as plt\n"
                  "%matplotlib inline\n\n"
                  "def show(k=0, colour='red'):\n"
                  "    if k != 0:\n"
                  "        raise ValueError('moving the slider breaks the plot')\n"
                  "    plt.plot([0, 1], [0, 1], color=colour)\n"
                  "    plt.show()\n\n"
                  "widgets.interact(show, k=widgets.IntSlider(continuous_update=False, min=0, max=3),\n"
                  "                 colour=widgets.Dropdown(options=['red', 'blue']));\n")


def _write_notebook(folder: Path, name: str, source: str) -> None:
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "id": "only",
                           "metadata": {}, "outputs": [], "source": source}],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                            "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    (folder / name).write_text(json.dumps(notebook))


def test_a_failing_widget_callback_is_caught(lab, browser):
    """The check above fails a notebook whose callback raises once the slider moves."""
    _write_notebook(lab["work"], "failing_widget.ipynb", FAILING_WIDGET)
    open_and_run(browser, lab["port"], "failing_widget.ipynb")
    boxes = drawn_widgets(browser, "failing_widget.ipynb", 1)  # the first drawing works
    with pytest.raises(AssertionError, match="the slider: the callback raised.*moving the slider breaks"):
        move_widgets(browser, "failing_widget.ipynb", boxes)
    assert any("moving the slider breaks the plot" in text for text in shown_errors(browser))


def test_widgets_drawn_as_text_are_caught(tmp_path):
    """Without the widget front end (its extension switched off) a learner sees the
    ``interactive(...)`` repr: the check fails and shows it."""
    with running_lab(tmp_path, [], disabled=("@jupyter-widgets/jupyterlab-manager",)) as server, \
            chromium() as driver:
        _write_notebook(server["work"], "widget.ipynb", FAILING_WIDGET)
        open_and_run(driver, server["port"], "widget.ipynb")
        with pytest.raises(AssertionError, match=r"drawn as text instead: \[.interactive\(children"):
            drawn_widgets(driver, "widget.ipynb", 1, timeout=20)
