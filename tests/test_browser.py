"""Notebooks 03 and 04 in a real browser: JupyterLab on localhost, headless Chromium driven over the DevTools
protocol (tests/browser_tools.py).

Runs every cell, then checks that the widgets and the plotly figures render, that a widget change goes
to the kernel and back (nb03: the era; nb04: the metric, redrawn on a linear scale), that the console has
no errors, and that a screenshot (artifacts/) is not blank. Skipped where Debian's `chromium` is missing
(`make browser` installs it). Bounded: DEADLINE_S / DEADLINE_04_S overall.
"""
import base64
import contextlib
import json
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from tests.browser_tools import ARTIFACTS, CHROMIUM, Deadline, free_port, open_chromium, server_up, start, stop

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_split_axis_flow.ipynb"
DEADLINE_S = 90
DEADLINE_04_S = 300   # notebook 04 runs a sweep and captures MiniLM's K/V first

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")


def cleared_copy(src: Path, dst: Path) -> None:
    """The notebook without its stored outputs, so everything on the page comes from this run."""
    import nbformat
    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dst)


# Page scripts (JupyterLab 4 DOM; window.jupyterapp from --expose-app-in-browser)
PANEL = "Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.content && w.sessionContext)"
NOTEBOOK_READY = """(() => {
  const w = window.jupyterapp && %s;
  if (w) window.jupyterapp.shell.activateById(w.id);   // run-all-cells acts on the active notebook
  return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel &&
            w.sessionContext.session.kernel.status === 'idle' && document.querySelector('.jp-Notebook .jp-Cell'));
})()""" % PANEL
ALL_RUN = """(() => {
  const w = %s;
  const cells = Array.from(w.content.model.cells).filter(c => c.type === 'code');
  const done = cells.every(c => c.executionCount !== null) && w.sessionContext.session.kernel.status === 'idle';
  return done ? cells.length : 0;
})()""" % PANEL
COUNTS = """(() => ({
  plots: document.querySelectorAll('.js-plotly-plot .main-svg .cartesianlayer').length,
  dropdowns: document.querySelectorAll('.jupyter-widgets .widget-dropdown select').length,
  checkboxes: document.querySelectorAll('.jupyter-widgets .widget-checkbox input').length,
  sliders: document.querySelectorAll('.js-plotly-plot .slider-container').length,
  explain: Array.from(document.querySelectorAll('.kvlab-explain')).map(e => e.textContent),
  errors: Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
          .map(e => e.textContent).filter(t => /Error|Traceback/.test(t)),
}))()"""
PICK = """(() => {   // label, which of the dropdowns with that label (0 = first, -1 = last), option
  const all = Array.from(document.querySelectorAll('.jupyter-widgets .widget-dropdown'))
      .filter(d => d.textContent.trim().startsWith('%s'));
  const select = all.at(%d).querySelector('select');
  select.value = Array.from(select.options).find(o => o.textContent === '%s').value;
  select.dispatchEvent(new Event('change', {bubbles: true}));
  select.closest('.jupyter-widgets').scrollIntoView();
  return true;
})()"""
FLOW_TITLES = """Array.from(document.querySelectorAll('.js-plotly-plot .gtitle'))
  .map(t => t.textContent).filter(t => t.startsWith('Split of each tensor'))"""
SCROLL_TO_LAST_FLOW = """(() => {
  const plots = Array.from(document.querySelectorAll('.jupyter-widgets .widget-output .js-plotly-plot'));
  plots[plots.length - 1].scrollIntoView();
  return true;
})()"""
EXPLORER_COLORBAR = """(() => {   // the colourbar title of the figure drawn right below the last widget row
  const outs = Array.from(document.querySelectorAll('.jupyter-widgets .widget-output'));
  const title = outs.length && outs[outs.length - 1].querySelector('.colorbar .cbtitle');
  return title ? title.textContent : null;
})()"""
PIXEL_SPREAD = """new Promise(resolve => {
  const img = new Image();
  img.onload = () => {
    const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0, s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 4) { const y = 0.299*d[i] + 0.587*d[i+1] + 0.114*d[i+2]; n++; s += y; s2 += y*y; }
    resolve(Math.sqrt(s2/n - (s/n)*(s/n)));
  };
  img.src = 'data:image/png;base64,%s';
})"""


@contextlib.contextmanager
def notebook_in_lab(tmp_path: Path, notebook: str, deadline: Deadline):
    """JupyterLab serving a cleared copy of the notebook, open in headless Chromium: yields its DevTools."""
    work = tmp_path / "lab"
    work.mkdir()
    cleared_copy(REPO / "notebooks" / notebook, work / notebook)
    port, token = free_port(), secrets.token_hex(16)
    labconfig = tmp_path / "cfg" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(   # no "Jupyter news?" toast over the screenshot
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    lab = start([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                 f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                 f"--ServerApp.root_dir={work}", "--expose-app-in-browser", "--LabApp.news_url=None",
                 "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                 "--LabApp.extension_manager=readonly", "--allow-root"],
                tmp_path / "jupyterlab.log", env)
    browser = tools = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline.wait_for("the JupyterLab server", lambda: server_up(lab, f"{base}/api/status?token={token}"))
        browser, tools = open_chromium(tmp_path, deadline)
        tools.call("Page.navigate", url=f"{base}/lab/tree/{notebook}?reset&token={token}")
        deadline.wait_for("the notebook and an idle kernel", lambda: tools.js(NOTEBOOK_READY))
        yield tools
    finally:
        if tools is not None:
            tools.close()
        if browser is not None:
            stop(browser)
        stop(lab)


def run_all(tools, deadline: Deadline, plots: int, dropdowns: int) -> tuple:
    """Run every cell; (number of code cells, the page's counts) once the figures and widgets are drawn."""
    tools.js("window.jupyterapp.commands.execute('notebook:run-all-cells'), true")   # not awaited: nb04 runs minutes
    n_cells = deadline.wait_for("every cell to run", lambda: tools.js(ALL_RUN), every=0.5)
    counts = deadline.wait_for("the figures and widgets to render", lambda: (
        lambda c: c if c["plots"] >= plots and c["dropdowns"] >= dropdowns else None)(tools.js(COUNTS)))
    assert counts["errors"] == [], counts["errors"]
    return n_cells, counts


def screenshot(tools, name: str) -> None:
    """Save the visible page as artifacts/<name> and fail if it is blank."""
    time.sleep(1.0)  # let plotly finish drawing
    png = tools.call("Page.captureScreenshot", format="png")["data"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(base64.b64decode(png))
    spread = tools.js(PIXEL_SPREAD % png)
    assert spread > 10, f"the screenshot looks blank (luminance std {spread:.1f})"


def test_notebook_03_renders_in_jupyterlab(tmp_path):
    deadline = Deadline(DEADLINE_S)
    with notebook_in_lab(tmp_path, NOTEBOOK, deadline) as tools:
        n_cells, counts = run_all(tools, deadline, plots=4, dropdowns=6)
        assert counts["checkboxes"] >= 2
        assert any("split state abort" in t for t in counts["explain"]), counts["explain"]
        assert counts["sliders"] >= 1   # the signature figure's node slider

        # a widget change goes through the live kernel and comes back redrawn
        tools.js(PICK % ("era", 0, "pr23792"))
        deadline.wait_for("the explorer to redraw for pr23792", lambda: any(
            "every node has a split state" in t for t in tools.js(COUNTS)["explain"]))
        screenshot(tools, "browser_03_split_axis_flow.png")
        # the signature figure redrawn for 3 devices (the second "devices" dropdown: the boxes explorer)
        tools.js(PICK % ("devices", -1, "3"))
        deadline.wait_for("the split-flow figure to redraw for 3 devices", lambda: any(
            "3 devices" in t for t in tools.js(FLOW_TITLES)))
        tools.js(SCROLL_TO_LAST_FLOW)
        screenshot(tools, "browser_03_split_flow_3_devices.png")
        assert tools.console_errors() == []
        assert n_cells >= 8


def test_notebook_04_metric_dropdown_redraws_on_its_scale(tmp_path):
    deadline = Deadline(DEADLINE_04_S)
    with notebook_in_lab(tmp_path, "04_error_growth.ipynb", deadline) as tools:
        run_all(tools, deadline, plots=6, dropdowns=3)   # the explorer: metric, context, flavor
        tools.js(PICK % ("metric", 0, "out_cos"))
        title = deadline.wait_for("the heatmap to redraw for out_cos", lambda: (
            lambda t: t if t and "cosine" in t else None)(tools.js(EXPLORER_COLORBAR)))
        assert "log10" not in title   # a similarity is drawn on a linear scale
        screenshot(tools, "browser_04_error_growth.png")
        assert tools.console_errors() == []
