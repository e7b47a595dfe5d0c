"""Headless Chromium over the DevTools protocol (websocket-client, which jupyter_server already depends on;
no browser download): the helpers the browser tests share. Debian's `chromium` (`make browser`)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("browser test ran past its time budget")
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


def open_chromium(tmp_path: Path, deadline: Deadline, width: int = 1400, height: int = 1000):
    """(chromium process, DevTools of its first page) with Runtime, Log and Page events on."""
    browser = start([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
                     f"--window-size={width},{height}", "about:blank"], tmp_path / "chromium.log")
    try:
        port = deadline.wait_for("chromium's DevTools port",
                                 lambda: (tmp_path / "profile" / "DevToolsActivePort").read_text().split()[0])
        pages = deadline.wait_for("a chromium page", lambda: [t for t in json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=2)) if t["type"] == "page"])
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            tools.call(f"{domain}.enable")
        return browser, tools
    except BaseException:
        stop(browser)
        raise
