"""Notebook 03 in a real browser: JupyterLab on localhost, headless Chromium driven over the DevTools
protocol (websocket-client, which jupyter_server already depends on; no browser download).

Runs every cell, then checks that the widgets and the plotly figures render, that a widget change goes
to the kernel and back, that the console has no errors, and that a screenshot (artifacts/) is not blank.
Skipped where Debian's `chromium` is missing (`make browser` installs it). Bounded: DEADLINE_S overall.
"""
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_split_axis_flow.ipynb"
ARTIFACTS = REPO / "artifacts"
DEADLINE_S = 90
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"browser test ran past its {DEADLINE_S} s budget")
        return left

    def wait_for(self, what: str, check, every: float = 0.25):
        """Poll check() until it returns something truthy; fail with `what` when the budget runs out."""
        while True:
            try:
                value = check()
            except (OSError, ValueError):
                value = None
            if value:
                return value
            if self.end - time.monotonic() <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log: Path, env=None) -> subprocess.Popen:
    """A child in its own process group (so stop() ends it and everything it started)."""
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def server_up(lab: subprocess.Popen, status_url: str) -> bool:
    if lab.poll() is not None:
        raise AssertionError(f"jupyter lab exited with {lab.returncode} (see jupyterlab.log in the test's tmp dir)")
    return urllib.request.urlopen(status_url, timeout=2).status == 200


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def js(self, expression: str):
        """Evaluate in the page (promises awaited) and return the value."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def console_errors(self) -> list:
        self.js("0")  # drain events that arrived meanwhile
        errors = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("exception", {}).get("description", str(p)))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"{p['entry'].get('url', '')}: {p['entry']['text']}")
        return errors

    def close(self):
        self.ws.close()


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
  explain: Array.from(document.querySelectorAll('.kvlab-explain')).map(e => e.textContent),
  errors: Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
          .map(e => e.textContent).filter(t => /Error|Traceback/.test(t)),
}))()"""
PICK_ERA = """(() => {
  const select = Array.from(document.querySelectorAll('.jupyter-widgets .widget-dropdown'))
      .find(d => d.textContent.trim().startsWith('era')).querySelector('select');
  select.value = Array.from(select.options).find(o => o.textContent === '%s').value;
  select.dispatchEvent(new Event('change', {bubbles: true}));
  select.closest('.jupyter-widgets').scrollIntoView();
  return true;
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


def test_notebook_03_renders_in_jupyterlab(tmp_path):
    deadline = Deadline(DEADLINE_S)
    ARTIFACTS.mkdir(exist_ok=True)
    work = tmp_path / "lab"
    work.mkdir()
    cleared_copy(REPO / "notebooks" / NOTEBOOK, work / NOTEBOOK)
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
    browser = None
    tools = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline.wait_for("the JupyterLab server", lambda: server_up(lab, f"{base}/api/status?token={token}"))
        browser = start([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
                         "--window-size=1400,1000", "about:blank"], tmp_path / "chromium.log")
        devtools_port = deadline.wait_for(
            "chromium's DevTools port", lambda: (tmp_path / "profile" / "DevToolsActivePort").read_text().split()[0])
        pages = deadline.wait_for("a chromium page", lambda: [t for t in json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{devtools_port}/json/list", timeout=2)) if t["type"] == "page"])
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=f"{base}/lab/tree/{NOTEBOOK}?reset&token={token}")
        deadline.wait_for("the notebook and an idle kernel", lambda: tools.js(NOTEBOOK_READY))

        tools.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        n_cells = deadline.wait_for("every cell to run", lambda: tools.js(ALL_RUN), every=0.5)
        counts = deadline.wait_for("the figures and widgets to render", lambda: (
            lambda c: c if c["plots"] >= 3 and c["dropdowns"] >= 6 else None)(tools.js(COUNTS)))
        assert counts["errors"] == [], counts["errors"]
        assert counts["checkboxes"] >= 2
        assert any("split state abort" in t for t in counts["explain"]), counts["explain"]

        # a widget change goes through the live kernel and comes back redrawn
        tools.js(PICK_ERA % "pr23792")
        deadline.wait_for("the explorer to redraw for pr23792", lambda: any(
            "every node has a split state" in t for t in tools.js(COUNTS)["explain"]))
        time.sleep(1.0)  # let plotly finish drawing before the screenshot
        png = tools.call("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "browser_03_split_axis_flow.png").write_bytes(base64.b64decode(png))
        spread = tools.js(PIXEL_SPREAD % png)
        assert spread > 10, f"the screenshot looks blank (luminance std {spread:.1f})"
        assert tools.console_errors() == []
        assert n_cells >= 8
    finally:
        if tools is not None:
            tools.close()
        if browser is not None:
            stop(browser)
        stop(lab)
