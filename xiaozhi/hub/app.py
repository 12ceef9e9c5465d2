"""The hub: the one FastAPI application every channel talks to. This module only assembles it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from xiaozhi.hub.accounts import Accounts, Role
from xiaozhi.hub.bus import make_bus
from xiaozhi.hub.conversation import ConversationService
from xiaozhi.hub.errors import install_error_handlers
from xiaozhi.hub.rasa_client import RasaClient
from xiaozhi.hub.security import HubSecurityMiddleware, Limits
from xiaozhi.hub.routers import chat, knowledge, staff
from xiaozhi.hub.metrics import install_metrics  # issue 17: Prometheus, HTTP timing
from xiaozhi.hub.routers import analytics as analytics_router, surveys as surveys_router
from xiaozhi.hub.surveys import start_surveys, stop_surveys
from xiaozhi.hub.widget import install_widget
from xiaozhi.hub.routers import video as video_router
from xiaozhi.hub.desk import AgentDesk  # issue 5: escalation queue and agent console
from xiaozhi.hub.routers import agent as agent_router
from xiaozhi.hub.retention import retention_loop
from xiaozhi.hub.store import Store
from xiaozhi.log_context import RequestIdMiddleware
from xiaozhi.settings import Settings, get_settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
RETENTION_CHECK_S = 3600.0  # how often old recordings are looked for
IDLE_CHECK_S = 60.0  # how often idle web conversations are looked for


def _load_knowledge_base(settings: Settings, embedder=None):
    from knowledge_base.factory import open_knowledge_base

    return open_knowledge_base(settings, embedder=embedder)


async def _stop_tasks(*tasks: asyncio.Task | None, timeout_s: float = 10.0) -> None:
    """Cancel the hub's background tasks and wait (a bounded time) until they have ended."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    if running:
        _, pending = await asyncio.wait(running, timeout=timeout_s)
        for task in pending:
            log.warning("background task %s still running %g s after it was cancelled", task.get_name(), timeout_s)


async def _watch_knowledge_base(app: FastAPI, settings: Settings) -> None:
    """Reload when `xiaozhi kb index` marks a new index current; the old one serves until then."""
    from knowledge_base.embedded import current_generation

    loaded = current_generation(settings.kb_index_dir)
    while True:
        await asyncio.sleep(settings.kb_reload_interval_s)
        generation = current_generation(settings.kb_index_dir)
        if generation is None or generation == loaded:
            continue
        old = app.state.knowledge_base
        try:
            fresh = await asyncio.to_thread(_load_knowledge_base, settings, getattr(old, "embedder", None))
        except Exception:  # a broken corpus must not take the running knowledge base down
            log.exception("reloading the knowledge base failed; still serving generation %s", loaded)
            loaded = generation
            continue
        app.state.knowledge_base = fresh
        loaded = current_generation(settings.kb_index_dir)
        log.info("knowledge base reloaded: %d entries (index %s)", len(fresh.entries), loaded)


async def _bootstrap_admin(accounts: Accounts, settings: Settings) -> None:
    """A new installation gets one admin account, so somebody can log in and create the rest.

    Its password comes from XIAOZHI_ADMIN_PASSWORD, or is generated and written to a file only
    the service user can read (never to the log).
    """
    if await accounts.count_users():
        return
    if settings.admin_password is not None:
        password = settings.admin_password.get_secret_value()
        where = "XIAOZHI_ADMIN_PASSWORD"
    else:
        import secrets

        password = secrets.token_urlsafe(12)
        path = settings.var_dir / "initial-admin-password"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(password + "\n", encoding="utf-8")
        where = str(path)
    await accounts.create_user(settings.admin_username, password, Role.admin, display_name="管理员")
    await accounts.audit("system", "user.create", settings.admin_username, {"role": "admin", "bootstrap": True})
    log.warning("created the first admin account %r; its password is in %s", settings.admin_username, where)


async def _start_phone(settings: Settings, store: Store, conversations: ConversationService, metrics=None):
    """The phone hotline (xiaozhi/hub/phone.py), started when sip_enabled; a failure leaves the hub serving chat.

    Always returned (not started: no live calls, ``attach_agent`` raises KeyError).
    """
    from xiaozhi.hub.phone import PhoneService

    phone = PhoneService(settings, store, conversations, metrics=metrics)
    if settings.sip_enabled:
        try:
            await phone.start()
        except Exception:
            log.exception("phone hotline not started (SIP port %s); the hub serves the other channels",
                          settings.sip_port)
            await phone.stop()
    return phone


NEARLY_FULL = 0.9  # share of the hotline's call slots at which /readyz reports it nearly full


def hotline_slots(in_use: int, capacity: int) -> dict:
    """The hotline's call slots as /readyz reports them."""
    return {"calls": in_use, "max_calls": capacity, "free": max(0, capacity - in_use),
            "nearly_full": in_use >= max(1, math.ceil(NEARLY_FULL * capacity))}


def create_app(settings: Settings | None = None, *, knowledge_base=None) -> FastAPI:
    """``knowledge_base`` may be given ready-made (tests share one); otherwise it loads at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.effective_database_url)
        await store.create_schema(migrate=settings.db_migrate_on_start)  # xiaozhi/hub/migrations
        token = settings.rasa_token.get_secret_value() if settings.rasa_token else None
        rasa = RasaClient(settings.effective_rasa_url, timeout_s=settings.rasa_timeout_s, token=token)
        app.state.store = store
        app.state.rasa = rasa
        app.state.accounts = Accounts(store, session_hours=settings.staff_session_hours,
                                      hash_concurrency=settings.password_hash_concurrency)
        async with store.exclusive("xiaozhi.admin-bootstrap"):  # replicas starting together: one first admin
            await _bootstrap_admin(app.state.accounts, settings)
        app.state.knowledge_base = knowledge_base
        bus = make_bus(settings.effective_database_url)  # live events across hub replicas
        await bus.start()
        app.state.conversations = ConversationService(store, rasa, lambda: app.state.knowledge_base, bus)
        app.state.desk = AgentDesk(store, app.state.conversations, app.state.accounts, settings)
        await app.state.desk.start()
        survey_poller = start_surveys(app, settings)  # follow-up surveys on close
        await app.state.metrics.start(app)  # turn metrics, cached gauges (after the desk's and surveys' hooks)
        if knowledge_base is None:
            app.state.knowledge_base = await asyncio.to_thread(_load_knowledge_base, settings)
            log.info("knowledge base ready: %d entries", len(app.state.knowledge_base.entries))
        watcher = (
            asyncio.create_task(_watch_knowledge_base(app, settings), name="kb-reload")
            if settings.kb_reload_interval_s > 0 else None
        )
        app.state.phone = await _start_phone(settings, store, app.state.conversations, app.state.metrics.voice)
        idle = (
            asyncio.create_task(app.state.conversations.close_idle_forever(
                dt.timedelta(minutes=settings.idle_close_min), dt.timedelta(minutes=4 * settings.idle_close_min),
                IDLE_CHECK_S,
            ), name="idle-close")
            if settings.idle_close_min > 0 else None
        )
        retention = (
            asyncio.create_task(retention_loop(settings.var_dir / "recordings", settings.recording_retention_days,
                                               RETENTION_CHECK_S, app.state.accounts), name="retention")
            if settings.recording_retention_days > 0 else None
        )
        try:
            yield
        finally:
            # Stopped and waited for before anything they use closes: a task cancelled in the middle
            # of a query finishes its session's cleanup first, and must not find the pool gone.
            await _stop_tasks(retention, idle, watcher)
            if getattr(app.state, "video", None) is not None:
                await app.state.video.close_all()  # both peers of every video/phone-bridge session
            await app.state.phone.stop()  # hangs up live calls: their conversations close
            await stop_surveys(app, survey_poller)
            await app.state.metrics.stop()
            await app.state.conversations.drain(settings.rasa_timeout_s + 5)
            await app.state.desk.stop()
            await bus.close()
            await rasa.close()
            await app.state.limits.close()
            await store.close()

    app = FastAPI(
        title="医保小智 hub",
        description="Conversation hub of the 医保小智 medical-insurance assistant: web chat, knowledge base, "
        "and (in later releases) phone, video and the agent desk.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)

    # Outermost layer: rate limits, body limits (declared and chunked), security headers (xiaozhi/hub/security.py).
    app.state.limits = Limits(settings)
    app.add_middleware(
        HubSecurityMiddleware,
        limits=app.state.limits,
        max_body_bytes=settings.max_body_bytes,
        frame_ancestors=settings.frame_ancestors,
    )
    install_metrics(app)  # app.state.metrics; HTTP timing outside the limits, so 429 and 413 are timed too

    app.include_router(chat.router)
    app.include_router(knowledge.router)
    app.include_router(staff.router)
    app.include_router(surveys_router.router)
    app.include_router(analytics_router.router)
    install_widget(app, settings)  # /widget.js, /widget-demo, CORS for XIAOZHI_WIDGET_ORIGINS (outermost)
    app.include_router(video_router.router)
    app.include_router(video_router.pages)
    app.include_router(agent_router.router)  # /api/agent/..., its WebSocket
    app.include_router(agent_router.page_router)  # /agent console page

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The hub process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz(request: Request) -> JSONResponse:
        """Ready to answer: knowledge base loaded; reports whether Rasa answers (degraded mode if not) and,
        where the hotline runs, how many of its call slots are taken (``nearly_full`` from 90 %)."""
        kb_ready = request.app.state.knowledge_base is not None
        rasa_ready = await request.app.state.rasa.healthy()
        body = {"knowledge_base": kb_ready, "rasa": rasa_ready, "degraded": not rasa_ready}
        user_agent = getattr(getattr(request.app.state, "phone", None), "user_agent", None)
        if user_agent is not None:
            body["phone"] = hotline_slots(user_agent.slots_in_use, user_agent.config.max_calls)
        return JSONResponse(body, status_code=200 if kb_ready else 503)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added last, so outermost: every log line of a request, the rate limiter's and the access log's
    # included, carries its request id, and every response returns it (xiaozhi/log_context.py).
    app.add_middleware(RequestIdMiddleware)
    return app
