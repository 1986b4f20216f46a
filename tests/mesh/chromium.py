"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe (`--remote-debugging-pipe`: the
browser reads commands on fd 3 and writes replies and events on fd 4, NUL-separated JSON), so a test can
drive a browser that runs in a network namespace without any socket between them.

    browser = Chromium.launch(profile_dir, prefix=["ip", "netns", "exec", "ns"])
    tab = browser.open("http://127.0.0.1:8740/join#…")
    tab.evaluate("document.title")
    browser.close()
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # timers and rendering as in a tab in front (automation's usual flags): a tab Chromium deems in the
    # background gets its timers batched, then once a minute — its heartbeats would stop and its links die
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--disable-features=WebRtcHideLocalIpsWithMdns,IntensiveWakeUpThrottling",
    "--allow-loopback-in-peer-connection",
    "--window-size=900,720",
)
"""Headless as root; WebRTC may use (and show) loopback candidates: the test's namespace has only `lo`."""


def executable() -> str | None:
    """Debian's `chromium` (or another Chromium/Chrome on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


@dataclass
class Chromium:
    process: subprocess.Popen[bytes]
    commands: int
    replies: int
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, queue.Queue[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    events: list[dict[str, Any]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def launch(cls, profile_dir: Path, prefix: list[str] | None = None, log: Path | None = None) -> Chromium:
        binary = executable()
        if binary is None:
            raise FileNotFoundError("no chromium on PATH")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child: the pipe ends become fds 3 and 4, open across exec
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            os.dup2(high[0], 3)  # (via fds >= 10: a pipe end that already is fd 3 or 4 keeps close-on-exec)
            os.dup2(high[1], 4)

        stderr = open(log, "ab") if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            [*(prefix or []), binary, *FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, close_fds=False, preexec_fn=wire_fds,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        if log is not None:
            stderr.close()  # the browser has its own copy
        browser = cls(process, to_browser_w, from_browser_r)
        browser._reader = threading.Thread(target=browser._read, name="cdp-reader", daemon=True)
        browser._reader.start()
        browser.call("Browser.getVersion", timeout=30)
        return browser

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self.replies, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    for waiter in self._waiting.values():
                        waiter.put({"error": {"message": "browser closed the pipe"}})
                return
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiter = self._waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter.put(message)
                else:
                    self.events.append(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        waiter: queue.Queue[dict[str, Any]] = queue.Queue(1)
        with self._lock:
            self._waiting[message_id] = waiter
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        try:
            reply = waiter.get(timeout=timeout)
        except queue.Empty:
            raise CdpError(f"{method}: no reply within {timeout} s") from None
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str) -> Tab:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, target, session)
        tab.call("Page.enable")
        tab.call("Runtime.enable")
        tab.call("Network.enable")  # requests and WebSocket frames show up in `Tab.sent()`
        tab.call("Page.navigate", {"url": url})
        return tab

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except CdpError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for fd in (self.commands, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class Tab:
    browser: Chromium
    target: str
    session: str

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
             ) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); `CdpError` on an exception."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"page exception: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll `expression` until it is truthy (a deadline, not a timing claim)."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except CdpError as exc:
                value = exc
            if value and not isinstance(value, CdpError):
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} (last: {value!r:.300}); console:\n"
                             + "\n".join(self.console()[-20:]))

    def sent(self) -> list[str]:
        """What the page sent: each request's URL (browsers keep the fragment: CDP's `urlFragment`) and body,
        and each WebSocket frame."""
        out = []
        for event in list(self.browser.events):
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Network.requestWillBeSent":
                request = params.get("request", {})
                out += [request.get("url", ""), request.get("postData", "")]
            elif event.get("method") == "Network.webSocketFrameSent":
                out.append(params.get("response", {}).get("payloadData", ""))
        return out

    def console(self) -> list[str]:
        """The page's console messages so far (`console.log` & co., uncaught exceptions)."""
        lines = []
        for event in list(self.browser.events):
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                lines.append(f"{params.get('type')}: {args}")
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                lines.append(f"exception: {text}")
        return lines

    def type_text(self, selector: str, text: str) -> None:
        """Focus the element and type `text` into it as keyboard input would."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "text": "\r"})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Close the tab as a user would (its `pagehide` handlers run)."""
        self.browser.call("Target.closeTarget", {"targetId": self.target})
