"""Prometheus metrics of one hub, exposed at ``/metrics`` (docs/operations.md lists them with the alerts
an on-call person would set; deploy/grafana/xiaozhi.json draws them).

* Each app has its own registry (tests build many hubs in one process): the process, GC and platform
  collectors are registered in it too.
* HTTP requests are timed by ``HttpMetricsMiddleware`` under their route *template*
  (``/api/sessions/{session_id}/messages``), never the raw path: ids would explode the label set and
  leak tokens. Requests no route matches share the label ``unmatched``.
* Dialogue turns, outcomes and closes are counted by the conversation core's hooks (``turn``,
  ``conversation_closed``, registered by the composition root, xiaozhi/hub/services.py);
  each closed conversation is classified as 精准分析 does at that moment (``analytics.classify``), so
  the dashboard's 自助解决率 needs no query of its own (surveys answered and repeat contacts come later:
  精准分析 refines those).
* A scrape costs no database query: what lives in the database (the escalation queue, open surveys) is
  counted by one background task every ``refresh_s`` seconds, sooner after a queue change (at most one
  refresh a second), and the scrape reads the cached values; live calls, video sessions and the
  rate-limit state are read from memory.
* The hotline's speech and RTP figures are ``telephony.metrics.VoiceMetrics`` in this same registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import GC_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from sqlalchemy import func, select
from starlette.routing import Match, Mount

from telephony.metrics import VoiceMetrics
from xiaozhi.hub.domain.analytics import RESOLUTIONS, classify
from xiaozhi.hub.domain.surveys import Survey
from xiaozhi.hub.infra.store import Conversation, Escalation, aware, utcnow

if TYPE_CHECKING:
    from xiaozhi.hub.services import HubServices
    from xiaozhi.hub.infra.store import Store

log = logging.getLogger(__name__)

REFRESH_S = 15.0  # how often the database-backed gauges are counted again
MIN_REFRESH_GAP_S = 1.0  # ... and never more often than this, however busy the queue
SURVEY_OPEN = ("pending", "offered", "calling")
LIVE_STATUSES = ("open", "escalated", "with_agent")  # a conversation not yet closed
CHANNELS = ("web", "phone", "video")  # their failure and queue-wait series exist (at 0) from the start
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
QUEUE_WAIT_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class HubMetrics:
    def __init__(self, *, refresh_s: float = REFRESH_S) -> None:
        self.refresh_s = refresh_s
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds...
        PlatformCollector(registry=r)  # python_info
        if GC_COLLECTOR is not None:  # (None where the interpreter has no gc.get_stats)
            GCCollector(registry=r)
        self.http = Histogram(
            "xiaozhi_http_request_duration_seconds", "HTTP requests: received to response sent",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r)
        self.turns = Counter("xiaozhi_turns", "Resident turns handled", ["channel"], registry=r)
        self.outcomes = Counter("xiaozhi_bot_outcomes", "Bot replies by outcome", ["channel", "outcome"], registry=r)
        self.turn_latency = Histogram(
            "xiaozhi_turn_latency_seconds", "Resident message stored to replies stored", ["channel"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30), registry=r)
        self.turn_failures = Counter("xiaozhi_turn_failures", "Turns that raised", ["channel"], registry=r)
        self.closed = Counter("xiaozhi_conversations_closed", "Conversations closed", ["channel", "reason"], registry=r)
        self.resolutions = Counter(
            "xiaozhi_conversations_resolved",
            "Closed conversations with a question, by how they ended as classified at close (analytics.classify): "
            "confirmed + answered over all is 自助解决率", ["channel", "resolution"], registry=r)
        self.queue = Gauge("xiaozhi_escalation_queue_length", "Escalations waiting for an agent", registry=r)
        self.oldest_wait = Gauge(
            "xiaozhi_escalation_oldest_wait_seconds", "How long the longest-waiting escalation has waited (0: none)",
            registry=r)
        self.callbacks = Gauge("xiaozhi_escalation_callbacks_open", "Out-of-hours callbacks not yet taken", registry=r)
        self.queue_wait = Histogram(
            "xiaozhi_queue_wait_seconds", "Escalated to first taken by an agent (live queue, not callbacks)",
            ["channel"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.surveys_open = Gauge("xiaozhi_surveys_open", "Follow-up surveys not yet answered", ["status"], registry=r)
        self.conversations_live = Gauge(
            "xiaozhi_conversations_live", "Conversations not yet closed, by channel and status (all replicas' together)",
            ["channel", "status"], registry=r)
        self.gauges_age = Gauge(
            "xiaozhi_metrics_gauges_refreshed_timestamp_seconds",
            "When the database-backed gauges were last counted (Unix time)", registry=r)
        self.active_calls = Gauge("xiaozhi_active_calls", "Phone calls in progress", registry=r)
        self.live_loss = Gauge(
            "xiaozhi_rtp_live_loss_ratio", "Calls in progress: share of the callers' audio packets lost so far, all calls "
            "together (0 without calls)", registry=r)
        self.live_jitter = Gauge(
            "xiaozhi_rtp_live_jitter_seconds", "Calls in progress: the highest current RFC 3550 jitter among them",
            registry=r)
        self.video_sessions = Gauge("xiaozhi_active_video_sessions", "Video sessions in progress", registry=r)
        self.limits_shared = Gauge(
            "xiaozhi_rate_limits_shared",
            "1 while rate limits are shared through Redis, 0 while this replica limits on its own (Redis away)",
            registry=r)
        for channel in CHANNELS:  # so that rate() and the dashboard see 0, not "no data"
            self.turn_failures.labels(channel)
            self.queue_wait.labels(channel)
        self.voice = VoiceMetrics(r)
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- what lives in memory: read at scrape time, no query -------------------------------------
    def watch(self, services: HubServices) -> None:
        """Gauges read from the running services at scrape time (live calls, video sessions, shared limits)."""

        def live() -> list:
            ua = getattr(services.phone, "user_agent", None)
            return [call.media.stats for call in list(ua.calls.values())] if ua is not None else []

        def calls() -> int:
            ua = getattr(services.phone, "user_agent", None)
            return len(ua.calls) if ua is not None else 0

        def loss() -> float:
            stats = live()
            lost = sum(s.lost for s in stats)
            expected = lost + sum(s.audio_received for s in stats)
            return lost / expected if expected else 0.0

        def video() -> int:
            return len(services.video.sessions) if services.video is not None else 0

        def shared() -> int:
            limits = services.limits.shared  # only with a Redis URL
            return 1 if limits is not None and limits.redis_ok else 0

        self.active_calls.set_function(calls)
        self.live_loss.set_function(loss)
        self.live_jitter.set_function(lambda: max((s.jitter_s for s in live()), default=0.0))
        self.video_sessions.set_function(video)
        self.limits_shared.set_function(shared)

    # -- events (hooks the composition root registers) ---------------------------------------------
    def turn(self, conv: Conversation, seconds: float, replies: list | None) -> None:
        """A turn observer of the conversation core: latency, count and outcomes; ``None``: it failed."""
        channel = conv.channel or "web"
        if replies is None:
            self.turn_failures.labels(channel).inc()
            return
        self.turn_latency.labels(channel).observe(seconds)
        self.turns.labels(channel).inc()
        for reply in replies:
            self.outcomes.labels(channel, (reply.meta or {}).get("outcome") or "answered").inc()

    async def conversation_closed(self, conv: Conversation, reason: str, *, store: Store,
                                  low_confidence: float = 0.5) -> None:
        """A closed hook (after the desk's and the surveys'): the close and how the conversation ended."""
        channel = conv.channel or "web"
        self.closed.labels(channel, reason[:32] or "unknown").inc()
        self.kick()  # a waiting escalation may have been abandoned, a survey offered
        # (hooks run in order: the desk has marked a waiting item abandoned by now)
        async with store.sessions() as s:
            escalations = list((await s.execute(
                select(Escalation).where(Escalation.conversation_id == conv.id))).scalars())
        resolution = classify(conv, await store.transcript(conv.id), escalations, low_confidence=low_confidence)
        if resolution.status in RESOLUTIONS:
            self.resolutions.labels(channel, resolution.status).inc()

    def claimed(self, item: Escalation, now: dt.datetime) -> None:
        """The desk's claim hook: ``item`` as it was before an agent took it."""
        if item.status == "waiting" and item.claimed_at is None:
            self.queue_wait.labels(item.channel or "web").observe(max(0.0, (now - aware(item.created_at)).total_seconds()))

    def kick(self) -> None:
        """Something the gauges count changed: count again soon."""
        self._kick.set()

    # -- the database-backed gauges ----------------------------------------------------------------
    async def refresh(self, store) -> None:
        """Count the queue, the open surveys and the live conversations (small indexed queries: the conversations
        by their status index, never the closed ones) into the cached gauges."""
        async with store.sessions() as s:
            rows = (await s.execute(
                select(Escalation.status, func.count(), func.min(Escalation.created_at))
                .where(Escalation.status.in_(("waiting", "callback"))).group_by(Escalation.status))).all()
            surveys = dict((await s.execute(
                select(Survey.status, func.count()).where(Survey.status.in_(SURVEY_OPEN)).group_by(Survey.status))).all())
            live = {(channel, status): n for channel, status, n in (await s.execute(
                select(Conversation.channel, Conversation.status, func.count())
                .where(Conversation.status.in_(LIVE_STATUSES))
                .group_by(Conversation.channel, Conversation.status))).all()}
        by_status = {status: (n, oldest) for status, n, oldest in rows}
        waiting, oldest = by_status.get("waiting", (0, None))
        self.queue.set(waiting)
        self.oldest_wait.set(max(0.0, (utcnow() - aware(oldest)).total_seconds()) if oldest is not None else 0.0)
        self.callbacks.set(by_status.get("callback", (0, None))[0])
        for status in SURVEY_OPEN:
            self.surveys_open.labels(status).set(surveys.get(status, 0))
        for channel, status in {*((c, st) for c in CHANNELS for st in LIVE_STATUSES), *live}:  # gone: back to 0
            self.conversations_live.labels(channel, status).set(live.get((channel, status), 0))
        self.gauges_age.set(time.time())

    async def _refresh_forever(self, store) -> None:
        while True:
            self._kick.clear()
            try:
                await self.refresh(store)
            except Exception:  # the database away: the gauges keep their last values (and their age says so)
                log.exception("metrics: counting the queue and surveys failed; the gauges keep their last values")
            await asyncio.sleep(MIN_REFRESH_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(0.0, self.refresh_s - MIN_REFRESH_GAP_S))

    async def start(self, store: Store) -> None:
        """The background count of the database-backed gauges."""
        self._task = asyncio.create_task(self._refresh_forever(store), name="metrics-gauges")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _route_of(scope: dict, before: dict, app: Any) -> str:
    """The route template that served the request: the one the router put in ``scope`` (API routes), else
    the mount matching the scope as it came in, ``before`` (/static: a mount rewrites the scope's paths
    and names no route), else ``unmatched`` (no route ran: a 404, or a request the limits layer refused
    before routing, 429 and 413)."""
    route = scope.get("route")
    if route is None:
        route = next((m for m in getattr(app, "routes", ()) if isinstance(m, Mount)
                      and m.matches(before)[0] is Match.FULL), None)
    return getattr(route, "path", None) or UNMATCHED


class HttpMetricsMiddleware:
    """Times each HTTP request into ``xiaozhi_http_request_duration_seconds{method, route, status}``;
    status is the class (2xx, 4xx, 5xx). A request that raises counts as 5xx. WebSockets are not timed."""

    def __init__(self, app, metrics: HubMetrics, root) -> None:
        self.app = app
        self.metrics = metrics
        self.root = root  # the FastAPI app, whose routes name a request no route took

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        before = dict(scope)  # (a shallow copy: the router adds to the scope as it goes)
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.http.labels(method, _route_of(scope, before, self.root), f"{status // 100}xx").observe(
                time.perf_counter() - started)


def install_http_metrics(app, metrics: HubMetrics) -> None:
    """The HTTP timing middleware (outside the ones added before it)."""
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, root=app)
