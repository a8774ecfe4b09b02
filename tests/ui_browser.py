"""Helpers for the browser tests of `slimtune ui`: the app served from a thread, and Debian's
chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import uvicorn

from slimtune.ui import Allowed, create_app

CHROMIUM = Path("/usr/bin/chromium")


@contextlib.contextmanager
def served(root: Path):
    """The UI on 127.0.0.1 at a free port; yields its address."""
    app = create_app(Allowed([root]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the UI server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 860):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


# Pixels of the chart's train-loss colour (#2f6fde) below the legend: none before a step is
# logged, more as the curve grows.
CHART_LINE_PIXELS = """() => {
  const c = document.getElementById('loss-chart');
  const top = Math.ceil(24 * (window.devicePixelRatio || 1));
  const d = c.getContext('2d').getImageData(0, top, c.width, c.height - top).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - 47) < 30 && Math.abs(d[i + 1] - 111) < 30 && Math.abs(d[i + 2] - 222) < 30) n++;
  return n;
}"""
