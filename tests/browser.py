"""Headless Chromium driven through the DevTools protocol (for tests of the Prefect UI).

Prefect's UI is a single-page app: what a page shows appears only after its scripts ran
and fetched from the API, and some of its tabs exist only once the run is loaded, so a
test waits for text and clicks like a user. The protocol is JSON over a WebSocket
(``websockets``, which Prefect already depends on): no driver binary, no extra package.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any."""
    names = ("chromium", "chromium-browser", "google-chrome")
    return next(filter(None, map(shutil.which, names)), None)


class Page:
    """One browser tab: navigate, run JavaScript, wait for text, click, screenshot."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; answers carry the id
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, predicate: Any, timeout: float = 60, what: str = "") -> str:
        """Poll the page's text until ``predicate(text)``; return that text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if predicate(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"page never showed {what or predicate}; it shows:\n{text[:3000]}")

    def click(self, selector: str, timeout: float = 60) -> None:
        found = f"document.querySelector({json.dumps(selector)})"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(f"{found} ? ({found}.click(), true) : false"):
                return
            time.sleep(0.5)
        raise AssertionError(f"no element {selector} to click")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def browser_page(executable: str, width: int = 1440, height: int = 1000) -> Iterator[Page]:
    """A headless Chromium on a free loopback port with a throw-away profile; one tab."""
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(prefix="fcn-chromium-") as profile:
        process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
             f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            port = _devtools_port(process)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as socket:
                page = Page(socket)
                page.call("Page.enable")
                yield page
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _devtools_port(process: subprocess.Popen) -> int:
    """The port from Chromium's ``DevTools listening on ws://127.0.0.1:PORT/...`` line."""
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
            # Keep reading what Chromium logs, so that a full pipe never blocks it.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return int(found.group(1))
    raise RuntimeError("Chromium did not start its DevTools server:\n" + "".join(seen)[-2000:])
