"""Headless Chromium (Debian's, driven by Playwright) and a hub served over real HTTP for it to load.

Never `playwright install`: the browser is /usr/bin/chromium from Debian (see platform notes).
WebRTC tests add their own flags (fake media devices are on for every page).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
# Tests take their screenshots on every run (a page that cannot render fails there), into a scratch
# folder so that a test run leaves the tree clean. To refresh the ones in the docs:
#   SCREENSHOT_DIR=docs/screenshots scripts/test.sh -k "console or widget or video_browser or dashboard"
SCREENSHOT_DIR = Path(os.environ.get("SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "xiaozhi-screenshots").resolve()


def launch_chromium(playwright, extra_args: list[str] | None = None):
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS + list(extra_args or [])
    )


@contextmanager
def serve(app, port: int, **options):
    """Serve an ASGI app with uvicorn in a background thread; yields the base URL. ``options``: more
    uvicorn.Config arguments (e.g. ``log_config=None, log_level=None`` to log as `xiaozhi hub` does)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning", **options}))
    thread = threading.Thread(target=server.run, name="live-hub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the hub did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def refuse_first_posts(page, url_pattern, times: int) -> list[str]:
    """The page's first ``times`` POSTs to URLs matching ``url_pattern`` (a compiled regex) fail as a
    dropped connection would; later ones and other methods go through. Returns the refused URLs, as they happen."""
    refused: list[str] = []

    def route(request_route) -> None:
        if request_route.request.method == "POST" and len(refused) < times:
            refused.append(request_route.request.url)
            request_route.abort()
        else:
            request_route.continue_()

    page.route(url_pattern, route)
    return refused
