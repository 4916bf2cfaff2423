"""Open a built book in headless Chromium and report what rendered and what the pages requested.

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages separated by
NUL bytes on file descriptors 3 and 4), so the check needs nothing beyond the standard library and the Debian
``/usr/bin/chromium`` binary: no driver, no downloaded browser. The book is served by a local HTTP server on
127.0.0.1; every request a page makes is recorded, and host names other than localhost do not resolve, so nothing
can leave the machine even when a page tries.

Reuse on the real book: ``python tests/browser.py book/_build/html`` prints a summary, or in a test under tests/::

    from browser import check_book_in_browser
    report = check_book_in_browser("book/_build/html")
    assert not report["external_requests"]
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import select
import subprocess
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = Path("/usr/bin/chromium")
#: Flags from the project's environment notes, plus the pipe transport and a resolver that only knows localhost.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
    "--remote-debugging-pipe", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}

#: Resolves once MathJax has typeset the page, web fonts are ready and every image finished (or failed) loading.
_SETTLE_JS = """
(async () => {
  const settle = async () => {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
    await document.fonts.ready;
    await Promise.all([...document.images].map(img => { img.loading = 'eager';
      return img.complete ? null : new Promise(done => { img.onload = img.onerror = done; }); }));
  };
  await Promise.race([settle(), new Promise(done => setTimeout(done, %d))]);
  return true;
})()
"""
_SUMMARY_JS = """
(() => {
  // text lines of an element: a rect whose vertical centre lies below the current line starts a new one, so a
  // glyph from a fallback font (a taller box on the same line, e.g. a check mark) does not count as a line
  const lines = el => { const range = document.createRange(); range.selectNodeContents(el);
    const rects = [...range.getClientRects()].filter(r => r.width > 0).sort((a, b) => a.top - b.top);
    let count = 0, bottom = -Infinity;
    for (const r of rects) { if ((r.top + r.bottom) / 2 > bottom) { count += 1; bottom = r.bottom; }
                             else { bottom = Math.max(bottom, r.bottom); } }
    return count; };
  const scrolls = el => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
  const cells = '.cell_input, .cell_output';
  const scrollsInCell = el => { for (let e = el; e; e = e.parentElement) { if (scrolls(e)) return true;
                                                                           if (e.matches(cells)) break; }
                                 return false; };
  const wide = [...document.querySelectorAll(`${cells}, :is(${cells}) *`)]
    .filter(el => el.scrollWidth > el.clientWidth + 1 && !el.closest('table')
                  && !(el.querySelector('table') && scrollsInCell(el)));
  return JSON.stringify({
    title: document.title,
    text: document.body ? document.body.innerText : '',
    math: document.querySelectorAll('mjx-container').length,
    math_errors: document.querySelectorAll('mjx-merror').length,
    images: [...document.images].map(img => ({src: img.currentSrc || img.src, width: img.naturalWidth})),
    too_wide: wide.map(el => `${el.closest('.cell_input') ? 'input' : 'output'} `
                           + `${el.tagName.toLowerCase()}.${el.className}: ${el.scrollWidth} > ${el.clientWidth} px: `
                           + el.innerText.split('\\n').sort((a, b) => b.length - a.length)[0].slice(0, 120)),
    parameter_blocks: document.querySelectorAll('.tag_parameters, .tag_injected-parameters').length,
    wrapped_cells: [...document.querySelectorAll('td, th')]
      .filter(el => /[±\\[]/.test(el.innerText) && lines(el) > 1).map(el => el.innerText),
    links: [...document.links].map(a => a.getAttribute('href')),
  });
})()
"""


def is_external(url: str) -> bool:
    """True for a network URL whose host is not this machine (``data:``, ``blob:``, ``file:`` are local)."""
    parts = urlsplit(url)
    return parts.scheme in NETWORK_SCHEMES and parts.hostname not in LOCAL_HOSTS


def _above_ten(fd: int) -> int:
    """The same pipe end moved to a descriptor >= 10."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class _DevTools:
    """Minimal CDP client over Chromium's debugging pipe; records network activity and JS exceptions."""

    def __init__(self, user_data_dir: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        to_chrome_r, from_chrome_w = _above_ten(to_chrome_r), _above_ten(from_chrome_w)
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash maps our pipe ends onto them
        # (the ends sit above fd 10, so the mapping cannot overwrite one with the other; dash rejects such fds).
        mapping = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self._stderr = open(Path(user_data_dir) / "stderr.log", "wb")
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", mapping, str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.requests: list[str] = []
        self._urls: dict[str, str] = {}
        self.failed: list[str] = []
        self.js_errors: list[str] = []
        self.loads = 0

    def close(self) -> None:
        try:
            self.post("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
        self._stderr.close()

    def post(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise self._exited() from None
        return self._next_id

    def _exited(self) -> RuntimeError:
        self._stderr.flush()
        tail = Path(self._stderr.name).read_text(errors="replace").strip().splitlines()[-5:]
        return RuntimeError(f"Chromium exited (code {self.proc.poll()}): " + " | ".join(tail))

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        """Send a command and return its result, handling the events that arrive meanwhile."""
        wanted = self.post(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message is None:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})

    def pump(self, seconds: float) -> None:
        """Handle events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while self._receive(deadline) is not None:
            pass

    def wait_for_load(self, loads_before: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.loads <= loads_before:
            if self._receive(deadline) is None:
                raise TimeoutError(f"page did not finish loading within {timeout:.0f} s")

    def _receive(self, deadline: float) -> dict | None:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_chrome], [], [], remaining)[0]:
                return None
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise self._exited()
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        self._on_event(message)
        return message

    def _on_event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
            self._urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            if urlsplit(params["response"]["url"]).path == "/favicon.ico":  # asked for by the browser, not a page
                return
            self.failed.append(f"{params['response']['status']} {params['response']['url']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.failed.append(f"{params.get('errorText')} {self._urls.get(params['requestId'], '?')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.js_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Page.loadEventFired":
            self.loads += 1
        elif method == "Target.attachedToTarget":  # iframes in other processes, workers: watch their traffic too
            child = params["sessionId"]
            for command in ("Network.enable", "Runtime.enable", "Runtime.runIfWaitingForDebugger"):
                self.post(command, session=child)


def _serve(root: Path) -> ThreadingHTTPServer:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def book_pages(html_root: str | Path) -> list[str]:
    """HTML pages of a built book, relative to its root; skips asset folders (``_static``...) and the redirect stub."""
    root = Path(html_root)
    pages = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.html"))]
    return [p for p in pages if not p.startswith("_") and p != "index.html"]


def check_book_in_browser(html_root: str | Path, settle_ms: int = 15000) -> dict:
    """Load every page of the built book in headless Chromium and report what it rendered and requested.

    Returns ``{"pages": [{"page", "title", "text", "math", "math_errors", "images", "too_wide",
    "parameter_blocks", "wrapped_cells", "links"}], "images": [{"page", "src", "width"}], "requests": [...],
    "external_requests": [...], "failed_requests": [...], "js_errors": [...]}``.

    ``math`` counts MathJax ``mjx-container`` elements; an image with ``width`` 0 did not load. ``too_wide``
    describes each part of a notebook cell (input, output and everything inside) whose content is wider than
    itself, so that it scrolls or spills sideways, prefixed "input" or "output"; a box that holds a table inside
    a scrolling box of the same cell is allowed (a wide table scrolls as a whole). ``parameter_blocks`` counts
    cells tagged ``parameters`` or ``injected-parameters``;
    ``wrapped_cells`` lists table cells with "±" or "[" whose text runs over more than one line; ``links`` holds
    the page's link targets.
    """
    root = Path(html_root)
    report: dict = {"pages": [], "images": []}
    server = _serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    with tempfile.TemporaryDirectory(prefix="fairbook-chromium-") as profile:
        chrome = _DevTools(profile)
        try:
            target = chrome.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = chrome.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Network.enable", "Page.enable", "Runtime.enable"):
                chrome.call(domain, session=session)
            chrome.call("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": False,
                                                 "flatten": True}, session=session)
            for page in book_pages(root):
                loads = chrome.loads
                chrome.call("Page.navigate", {"url": base + page}, session=session)
                chrome.wait_for_load(loads)
                chrome.call("Runtime.evaluate", {"expression": _SETTLE_JS % settle_ms, "awaitPromise": True},
                            session=session, timeout=settle_ms / 1000 + 10)
                result = chrome.call("Runtime.evaluate", {"expression": _SUMMARY_JS, "returnByValue": True},
                                     session=session)
                summary = json.loads(result["result"]["value"])
                report["pages"].append({"page": page, **summary})
                report["images"] += [{"page": page, **image} for image in summary["images"]]
            chrome.pump(0.5)  # late requests (fonts, lazy scripts)
        finally:
            chrome.close()
            server.shutdown()
            server.server_close()
    report["requests"] = chrome.requests
    report["external_requests"] = [url for url in chrome.requests if is_external(url)]
    report["failed_requests"] = chrome.failed
    report["js_errors"] = chrome.js_errors
    return report


if __name__ == "__main__":  # python tests/browser.py book/_build/html
    import sys

    found = check_book_in_browser(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html")
    for entry in found["pages"]:
        print(f"{entry['page']}: title={entry['title']!r} math={entry['math']} images={len(entry['images'])}")
    for key in ("external_requests", "failed_requests", "js_errors"):
        print(f"{key}: {found[key] or 'none'}")
