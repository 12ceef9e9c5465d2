"""The hub: the one FastAPI application every channel talks to. This module only assembles it: middleware
and routers. What runs at start, on each turn and at close is the composition root's
(xiaozhi/hub/services.py); the lifespan starts and stops it.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import State

from xiaozhi.hub.infra.errors import install_error_handlers
from xiaozhi.hub.infra.security import HubSecurityMiddleware
from xiaozhi.hub.metrics import install_http_metrics
from xiaozhi.hub.routers import agent, analytics, chat, knowledge, knowledge_admin, operations, staff, surveys, video
from xiaozhi.hub.services import HubServices
from xiaozhi.hub.widget import install_widget
from xiaozhi.log_context import RequestIdMiddleware
from xiaozhi.settings import Settings, get_settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
# What ``app.state.<name>`` reads from the running services (operators' scripts and tests look there).
SERVICE_NAMES = frozenset({
    "settings", "limits", "metrics", "store", "rasa", "accounts", "bus", "conversations", "desk", "phone",
    "surveys", "video", "knowledge_base",
})


class HubState(State):
    """``app.state``: ``services`` (the composition root), and its services read through by name."""

    def __init__(self, services: HubServices) -> None:
        super().__init__({"services": services})

    def __getattr__(self, key: str):
        if key in SERVICE_NAMES:
            return getattr(self._state["services"], key)
        return super().__getattr__(key)


def create_app(settings: Settings | None = None, *, knowledge_base=None) -> FastAPI:
    """``knowledge_base`` may be given ready-made (tests share one); otherwise it loads at start-up."""
    services = HubServices(settings or get_settings(), knowledge_base=knowledge_base)
    settings = services.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await services.start()
            yield
        finally:
            await services.stop()

    app = FastAPI(
        title="医保小智 hub",
        description="Conversation hub of the 医保小智 medical-insurance assistant: web chat, the phone hotline, "
        "video help, the agent desk, follow-up surveys and analytics over one knowledge base.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state = HubState(services)
    install_error_handlers(app)

    # Outermost layer: rate limits, body limits (declared and chunked), security headers
    # (xiaozhi/hub/infra/security.py).
    app.add_middleware(
        HubSecurityMiddleware,
        limits=services.limits,
        max_body_bytes=settings.max_body_bytes,
        frame_ancestors=settings.frame_ancestors,
        upload_paths=knowledge_admin.UPLOAD_PATHS,
    )
    install_http_metrics(app, services.metrics)  # HTTP timing outside the limits, so 429 and 413 are timed too

    app.include_router(chat.router)
    app.include_router(knowledge.router)
    app.include_router(staff.router)
    app.include_router(surveys.router)
    app.include_router(analytics.router)
    app.include_router(knowledge_admin.router)  # /api/staff/kb/...: the knowledge console's records and publishing
    app.include_router(knowledge_admin.pages)  # /staff/knowledge
    install_widget(app, settings)  # /widget.js, /widget-demo, CORS for XIAOZHI_WIDGET_ORIGINS (outermost)
    app.include_router(video.router)
    app.include_router(video.pages)
    app.include_router(agent.router)  # /api/agent/..., its WebSocket
    app.include_router(agent.page_router)  # /agent console page
    app.include_router(chat.pages)  # / (the chat page)
    app.include_router(operations.router)  # /healthz, /readyz

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added last, so outermost: every log line of a request, the rate limiter's and the access log's
    # included, carries its request id, and every response returns it (xiaozhi/log_context.py).
    app.add_middleware(RequestIdMiddleware)
    return app
