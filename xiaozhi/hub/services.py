"""The hub's composition root: every service built, wired, started and stopped here, in one readable order.

``HubServices(settings)`` makes what the HTTP layer needs before start-up (the limits and the metrics
registry, which middleware wraps); ``start()`` builds the rest in dependency order and registers every
hook explicitly; ``stop()`` undoes it in the reverse order. No service sets attributes on another: they
meet only through the hooks registered below.

Start (in this order):
 1. store (schema upgraded), Rasa client, staff accounts (the first admin on a new installation)
 2. event bus (live events across replicas), the conversation core
 3. agent desk: the core's escalations go to its queue (``use_queue``)
 4. knowledge base (loaded unless given), before the hotline can answer a call; the knowledge records and
    their publisher: a database with a publication serves the published records instead of the data files
 5. phone hotline (started when SIP is enabled; a failure leaves chat serving)
 6. follow-up surveys (their phone caller uses the hotline's voice and SIP endpoint)
 7. video channel (its peer sessions and the phone bridge)
 8. metrics: turn observer, claim hook, queue changes on the bus, gauges refreshed in the background
 9. conversation close hooks, run in this order on each close:
    desk (a waiting item abandoned) -> surveys (one scheduled) -> metrics (how it ended, classified
    after the desk has marked the item) -> video (its session hung up)
10. background tasks: the knowledge base's reload watcher (a new publication, or a re-indexed data
    directory while no publication exists), the idle close, recording retention

Stop: background tasks first (nothing they use may close under them), then video sessions, phone
calls (their conversations close and run the hooks), surveys, metrics, turns in progress (drained),
desk, bus, Rasa client, limits, store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets

from xiaozhi.hub.channels.phone.hotline import PhoneService
from xiaozhi.hub.channels.video import VideoChannel
from xiaozhi.hub.domain.accounts import Accounts, Role
from xiaozhi.hub.domain.conversation import ConversationService
from xiaozhi.hub.domain.desk import AgentDesk
from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
from xiaozhi.hub.domain.surveys import SurveyService
from xiaozhi.hub.infra.bus import LocalBus, make_bus
from xiaozhi.hub.infra.collector import collector_paused
from xiaozhi.hub.infra.cpu import one_blas_thread
from xiaozhi.hub.infra.rasa_client import RasaClient
from xiaozhi.hub.infra.retention import retention_loop
from xiaozhi.hub.infra.security import Limits
from xiaozhi.hub.infra.store import Store
from xiaozhi.hub import migrations
from xiaozhi.hub.metrics import HubMetrics
from xiaozhi.settings import Settings

log = logging.getLogger(__name__)

RETENTION_CHECK_S = 3600.0  # how often old recordings are looked for
IDLE_CHECK_S = 60.0  # how often idle web conversations are looked for
STOP_WAIT_S = 10.0  # how long a cancelled background task may take to end


RETIRE_AFTER_S = 120.0  # a replaced knowledge base is retired this long after: searches on it have ended


def load_knowledge_base(settings: Settings, embedder=None):
    """The knowledge base of the data files, opened with the garbage collector paused and then frozen
    (blocking; xiaozhi/hub/infra/collector.py): no full collection walks it, at start or later."""
    from knowledge_base.factory import open_knowledge_base

    with collector_paused():
        return open_knowledge_base(settings.knowledge_base_config(), embedder=embedder)


class HubServices:
    """Every long-lived object of one hub, and the order they start and stop in."""

    def __init__(self, settings: Settings, *, knowledge_base=None) -> None:
        self.settings = settings
        self.knowledge_base = knowledge_base  # given ready-made (tests share one), else loaded at start
        self._given = knowledge_base  # never retired: its owner (a test session) keeps using it
        # Made before start: the HTTP middleware wraps them.
        self.limits = Limits(settings)
        self.metrics = HubMetrics()
        self.metrics.watch(self)
        # Made by start().
        self.store: Store | None = None
        self.rasa: RasaClient | None = None
        self.accounts: Accounts | None = None
        self.bus: LocalBus | None = None
        self.conversations: ConversationService | None = None
        self.desk: AgentDesk | None = None
        self.phone: PhoneService | None = None
        self.surveys: SurveyService | None = None
        self.video: VideoChannel | None = None
        self.knowledge: KnowledgeStore | None = None
        self.publisher: KnowledgePublisher | None = None
        self._tasks: list[asyncio.Task] = []

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        one_blas_thread()  # numpy's BLAS threads spin on the cores chat needs (infra/cpu.py)
        # 1. persistence, the dialogue engine, staff accounts
        self.store = Store(s.effective_database_url)
        await migrations.prepare(self.store, migrate=s.db_migrate_on_start)
        token = s.rasa_token.get_secret_value() if s.rasa_token else None
        self.rasa = RasaClient(s.effective_rasa_url, timeout_s=s.rasa_timeout_s, token=token)
        self.accounts = Accounts(self.store, session_hours=s.staff_session_hours,
                                 hash_concurrency=s.password_hash_concurrency)
        async with self.store.exclusive("xiaozhi.admin-bootstrap"):  # replicas starting together: one first admin
            await bootstrap_admin(self.accounts, s)
        # 2. live events across replicas, the conversation core
        self.bus = make_bus(s.effective_database_url)
        await self.bus.start()
        self.conversations = ConversationService(self.store, self.rasa, lambda: self.knowledge_base, self.bus)
        # 3. the agent desk takes the core's escalations
        self.desk = AgentDesk(self.store, self.conversations, self.accounts, s)
        self.conversations.use_queue(self.desk.enqueue)
        await self.desk.start()
        # 4. the knowledge base (before the hotline answers its first call)
        if self.knowledge_base is None:
            self.knowledge_base = await asyncio.to_thread(load_knowledge_base, s)
            log.info("knowledge base ready: %d entries", len(self.knowledge_base.entries))
        self.knowledge = KnowledgeStore(self.store, expiry_warn_days=s.kb_expiry_warn_days)
        self.publisher = KnowledgePublisher(self.knowledge, s.knowledge_base_config(),
                                            lambda: self.knowledge_base, self._use_knowledge_base)
        await self.publisher.catch_up(starting=True)  # the staff's published records, if any (worker warmed after)
        # 5. the phone hotline
        self.phone = PhoneService(s, self.store, self.conversations, metrics=self.metrics.voice)
        if s.sip_enabled:
            try:
                await self.phone.start()
            except Exception:
                log.exception("phone hotline not started (SIP port %s); the hub serves the other channels", s.sip_port)
                await self.phone.stop()
        # 6. follow-up surveys
        self.surveys = SurveyService.from_settings(
            s, self.store, phone_caller=self._survey_caller(),
            publish=self.conversations.publish,  # the conversation's WebSocket subscribers see the survey at once
        )
        # 7. video help and the phone bridge
        self.video = VideoChannel(s, self.store, self.conversations, self.accounts, self.phone)
        # 8. metrics
        self.conversations.turn_observers.append(self.metrics.turn)
        self.desk.claimed_hooks.append(self.metrics.claimed)
        self.bus.on("desk", lambda payload, _origin: payload.get("kind") == "changed" and self.metrics.kick())
        # 9. what runs when a conversation closes, in this order
        self.conversations.closed_hooks.extend([
            self.desk.conversation_closed,
            self.surveys.on_closed,
            functools.partial(self.metrics.conversation_closed, store=self.store, low_confidence=s.kb_abstain_threshold),
            self.video.conversation_closed,
        ])
        self.surveys.start(s.survey_poll_interval_s)
        await self.metrics.start(self.store)
        # 10. background tasks
        if s.kb_reload_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._watch_knowledge_base(), name="kb-reload"))
        if s.idle_close_min > 0:
            self._tasks.append(asyncio.create_task(self.conversations.close_idle_forever(
                dt.timedelta(minutes=s.idle_close_min), dt.timedelta(minutes=4 * s.idle_close_min), IDLE_CHECK_S,
            ), name="idle-close"))
        if s.recording_retention_days > 0:
            self._tasks.append(asyncio.create_task(retention_loop(
                s.var_dir / "recordings", s.recording_retention_days, RETENTION_CHECK_S, self.accounts,
            ), name="retention"))

    def _survey_caller(self):
        """The outbound survey caller when a trunk is configured; a bad URI is logged and chat still serves."""
        if not self.settings.survey_sip_uri:
            return None
        from xiaozhi.hub.channels.phone.survey_calls import PhoneSurveyCaller

        try:
            return PhoneSurveyCaller.from_settings(self.settings, self.phone, self.metrics.voice)
        except ValueError as exc:
            log.error("phone follow-up surveys disabled: XIAOZHI_SURVEY_SIP_URI %s", exc)
            return None

    # -- stop -------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Everything start() made, in the reverse order; safe after a start that failed half-way."""
        # Stopped and waited for before anything they use closes: a task cancelled in the middle
        # of a query finishes its session's cleanup first, and must not find the pool gone.
        await stop_tasks(*reversed(self._tasks))
        self._tasks.clear()
        if self.publisher is not None:
            await self.publisher.close()  # its build worker process
        if self.video is not None:
            await self.video.close_all()  # both peers of every video/phone-bridge session
        if self.phone is not None:
            await self.phone.stop()  # hangs up live calls: their conversations close
        if self.surveys is not None:
            await self.surveys.stop()
        await self.metrics.stop()
        if self.conversations is not None:
            await self.conversations.drain(self.settings.rasa_timeout_s + 5)
        if self.desk is not None:
            await self.desk.stop()
        if self.bus is not None:
            await self.bus.close()
        if self.rasa is not None:
            await self.rasa.close()
        await self.limits.close()
        if self.store is not None:
            await self.store.close()

    # -- the knowledge base's reload --------------------------------------------------------------
    def _use_knowledge_base(self, kb) -> None:
        """Serve ``kb``. A search in progress finishes on the base it started with; the replaced base is retired
        after ``RETIRE_AFTER_S`` (frozen, it is freed only once its reference cycle is broken), unless it was
        given to the hub ready-made (tests share one)."""
        old, self.knowledge_base = self.knowledge_base, kb
        if old is not None and old is not kb and old is not self._given:
            asyncio.get_running_loop().call_later(RETIRE_AFTER_S, old.retire)

    async def _watch_knowledge_base(self) -> None:
        """Serve a publication another replica made; without any, reload when `xiaozhi kb index` marks a new
        index current. The old knowledge base serves until the new one is ready."""
        from knowledge_base.embedded import current_generation

        s = self.settings
        loaded = current_generation(s.kb_index_dir)
        while True:
            await asyncio.sleep(s.kb_reload_interval_s)
            try:
                await self.publisher.catch_up()
            except Exception:  # the database away for a moment: the next round tries again
                log.exception("checking for a new knowledge-base publication failed")
            if self.publisher.serving_database:
                continue  # the data files are a seed now; `xiaozhi kb import-packs` brings their changes in
            generation = current_generation(s.kb_index_dir)
            if generation is None or generation == loaded:
                continue
            old = self.knowledge_base
            try:
                fresh = await asyncio.to_thread(load_knowledge_base, s, getattr(old, "embedder", None))
            except Exception:  # a broken corpus must not take the running knowledge base down
                log.exception("reloading the knowledge base failed; still serving generation %s", loaded)
                loaded = generation
                continue
            self._use_knowledge_base(fresh)
            loaded = current_generation(s.kb_index_dir)
            log.info("knowledge base reloaded: %d entries (index %s)", len(fresh.entries), loaded)


async def stop_tasks(*tasks: asyncio.Task | None, timeout_s: float = STOP_WAIT_S) -> None:
    """Cancel background tasks and wait (a bounded time) until they have ended."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    if running:
        _, pending = await asyncio.wait(running, timeout=timeout_s)
        for task in pending:
            log.warning("background task %s still running %g s after it was cancelled", task.get_name(), timeout_s)


async def bootstrap_admin(accounts: Accounts, settings: Settings) -> None:
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
        password = secrets.token_urlsafe(12)
        path = settings.var_dir / "initial-admin-password"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(password + "\n", encoding="utf-8")
        where = str(path)
    await accounts.create_user(settings.admin_username, password, Role.admin, display_name="管理员")
    await accounts.audit("system", "user.create", settings.admin_username, {"role": "admin", "bootstrap": True})
    log.warning("created the first admin account %r; its password is in %s", settings.admin_username, where)
