"""Live events between hub replicas: what one replica publishes, every replica's sockets see.

A resident's WebSocket and the agent answering them are often connected to different hub
replicas, and the agent desk's live queue and presence must be the same on all of them. The
database is what replicas already share, so the bus rides on it:

- ``LocalBus``: one hub (the embedded SQLite default). Handlers are called in-process.
- ``PostgresBus``: PostgreSQL ``LISTEN``/``NOTIFY`` (asyncpg), no extra engine. A replica delivers
  its own events in-process at once and sends them to the others through one channel; each
  message names its origin replica, which ignores its echo. Payloads over PostgreSQL's 8000-byte
  limit are sent in the short form the publisher gives (e.g. a message id to re-read).
  A lost connection is re-opened with back-off; sockets that missed events catch up from the
  transcript as they already do after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger(__name__)

# handler(payload, origin): origin is the publishing replica's id (this replica's own for local events)
Handler = Callable[[dict, str], Any]

PG_CHANNEL = "xiaozhi_hub"
NOTIFY_LIMIT = 7900  # bytes; PostgreSQL refuses NOTIFY payloads of 8000 bytes or more


class LocalBus:
    def __init__(self) -> None:
        self.replica = uuid.uuid4().hex[:12]
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._running: set[asyncio.Future] = set()  # handlers' coroutines still running (ended on close)

    @property
    def shared(self) -> bool:
        """True when other replicas may be listening (presence has to be told to them)."""
        return False

    def on(self, topic: str, handler: Handler) -> None:
        self._handlers[topic].append(handler)

    def publish(self, topic: str, payload: dict, remote: dict | None = None) -> None:
        """Deliver ``payload`` here now; other replicas get it too (or ``remote`` if it is too big)."""
        self._deliver(topic, payload, self.replica)

    def _deliver(self, topic: str, payload: dict, origin: str) -> None:
        for handler in list(self._handlers.get(topic, ())):
            try:
                result = handler(payload, origin)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            except Exception:
                log.exception("bus handler for %s failed", topic)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(set(self._running), timeout=5)


class PostgresBus(LocalBus):
    def __init__(self, dsn: str, *, retry_s: float = 1.0) -> None:
        super().__init__()
        self.dsn = dsn
        self.retry_s = retry_s
        self._outbox: asyncio.Queue[tuple[str, dict, dict | None]] = asyncio.Queue(maxsize=10_000)
        self._listen = None
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()

    @property
    def shared(self) -> bool:
        return True

    def publish(self, topic: str, payload: dict, remote: dict | None = None) -> None:
        self._deliver(topic, payload, self.replica)
        try:
            self._outbox.put_nowait((topic, payload, remote))
        except asyncio.QueueFull:  # the database is away: other replicas' sockets re-sync later
            log.warning("bus outbox full: event for %s not sent to other replicas", topic)

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.error("event bus: PostgreSQL not reachable yet; replicas share live events once it is")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await super().close()

    async def _run(self) -> None:
        import asyncpg

        while True:
            listen = send = None
            try:
                listen = await asyncpg.connect(self.dsn)
                send = await asyncpg.connect(self.dsn)
                lost = asyncio.Event()
                listen.add_termination_listener(lambda _conn: lost.set())
                await listen.add_listener(PG_CHANNEL, self._received)
                self._connected.set()
                log.info("event bus: listening on PostgreSQL as replica %s", self.replica)
                while True:
                    next_item = asyncio.ensure_future(self._outbox.get())
                    gone = asyncio.ensure_future(lost.wait())
                    done, _ = await asyncio.wait({next_item, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if next_item not in done:
                        next_item.cancel()
                        raise ConnectionError("listening connection closed")
                    gone.cancel()
                    await send.execute("SELECT pg_notify($1, $2)", PG_CHANNEL, self._encode(*next_item.result()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                log.warning("event bus: %s; reconnecting in %.0f s", exc, self.retry_s)
                await asyncio.sleep(self.retry_s)
            finally:
                for conn in (listen, send):
                    if conn is not None and not conn.is_closed():
                        try:
                            await asyncio.wait_for(conn.close(), 2)
                        except Exception:
                            conn.terminate()

    def _encode(self, topic: str, payload: dict, remote: dict | None) -> str:
        body = json.dumps({"o": self.replica, "t": topic, "p": payload}, ensure_ascii=False)
        if len(body.encode("utf-8")) > NOTIFY_LIMIT:
            body = json.dumps({"o": self.replica, "t": topic, "p": remote or {}}, ensure_ascii=False)
        return body

    def _received(self, _conn, _pid, _channel, body: str) -> None:
        try:
            message = json.loads(body)
            origin, topic, payload = message["o"], message["t"], message["p"]
        except (ValueError, KeyError, TypeError):
            log.warning("event bus: unreadable notification ignored")
            return
        if origin != self.replica:
            self._deliver(topic, payload, origin)


def make_bus(database_url: str) -> LocalBus:
    """PostgreSQL databases get the shared bus; anything else (SQLite: one hub) the local one."""
    if database_url.startswith("postgresql"):
        return PostgresBus("postgresql" + database_url[database_url.index("://"):])
    return LocalBus()
