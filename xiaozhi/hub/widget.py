"""The embeddable web widget: serves web_widget/widget.js (gzipped when the browser accepts it) and its
demo host page, and lets configured host-page origins call the resident chat API cross-origin (CORS).

Only the resident endpoints (/api/sessions...) are opened to other origins; staff endpoints stay
same-origin. Allowed origins come from ``XIAOZHI_WIDGET_ORIGINS``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from xiaozhi.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)
WIDGET_DIR = REPO_ROOT / "web_widget"
WIDGET_JS = WIDGET_DIR / "widget.js"
DEMO_HTML = WIDGET_DIR / "demo.html"
CORS_PATH_PREFIXES = ("/api/sessions",)

router = APIRouter(tags=["widget"])


def allowed_origins(settings: Settings) -> list[str]:
    return [o.strip().rstrip("/") for o in settings.widget_origins.split(",") if o.strip()]


class WidgetCors:
    """CORS for the widget's calls to the resident API only; every other path passes untouched."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
            allow_credentials=False,  # the widget sends a bearer token, never cookies
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(CORS_PATH_PREFIXES):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _Bundle:
    """widget.js in memory, plain and gzipped, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = None
        self.plain = b""
        self.gz = b""
        self.etag = ""

    def current(self) -> "_Bundle":
        mtime = self.path.stat().st_mtime_ns
        if mtime != self._mtime:
            self.plain = self.path.read_bytes()
            self.gz = gzip.compress(self.plain, compresslevel=9, mtime=0)
            self.etag = '"' + hashlib.sha256(self.plain).hexdigest()[:16] + '"'
            self._mtime = mtime
        return self


_bundle = _Bundle(WIDGET_JS)


def widget_sizes() -> dict[str, int]:
    b = _bundle.current()
    return {"bytes": len(b.plain), "gzip_bytes": len(b.gz)}


@router.get("/widget.js", include_in_schema=False)
async def widget_js(request: Request) -> Response:
    b = _bundle.current()
    headers = {
        "Cache-Control": "public, max-age=300",
        "ETag": b.etag,
        "Vary": "Accept-Encoding",
        "Access-Control-Allow-Origin": "*",  # a plain script: any page may load it
    }
    if request.headers.get("if-none-match") == b.etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(
            b.gz, media_type="text/javascript; charset=utf-8", headers={**headers, "Content-Encoding": "gzip"}
        )
    return Response(b.plain, media_type="text/javascript; charset=utf-8", headers=headers)


@router.get("/widget-demo", include_in_schema=False)
async def widget_demo() -> FileResponse:
    return FileResponse(DEMO_HTML, media_type="text/html; charset=utf-8")


@router.get("/widget-demo.css", include_in_schema=False)
async def widget_demo_css() -> FileResponse:
    return FileResponse(WIDGET_DIR / "demo.css", media_type="text/css; charset=utf-8")


def install_widget(app: FastAPI, settings: Settings) -> None:
    """Serve the widget and open the resident API to the configured host-page origins."""
    app.include_router(router)
    origins = allowed_origins(settings)
    if origins:
        app.add_middleware(WidgetCors, origins=origins)
        log.info("widget CORS open to %s", ", ".join(origins))
