"""Rasa's SQL tracker store, keeping the tracker it just saved for the conversation's next turn.

Every turn Rasa loads the conversation from the tracker store (query every event of the session,
parse each one's JSON, replay them into a tracker) and, when it saves, counts the stored events
again to find the new ones: about a quarter of Rasa's CPU per turn in the chat benchmark
(docs/performance.md). Between two turns of one conversation nothing else writes its events, so
the tracker saved at the end of a turn is exactly what the next turn would load.

``CachedSQLTrackerStore`` keeps that tracker (least recently used first out, ``cache_size``
conversations) and hands it to the next turn after one indexed query: the id of the
conversation's newest stored event must still be the one this process wrote. Anything else
(another Rasa replica answered a turn meanwhile, a turn failed before saving, the process
restarted, a new session started) loads from the database exactly as ``SQLTrackerStore`` does.
What is written, and so what any other process reads, is unchanged: the same rows in the same
``events`` table. The store works on every dialect Rasa's SQL store supports (SQLite by default,
PostgreSQL with several replicas).

On SQLite (the embedded store of ``xiaozhi run``) its connections use WAL mode with
synchronous=NORMAL: a commit then needs no fsync of its own (a tenth of Rasa's CPU per turn), and a
killed Rasa still loses nothing it committed (only a power cut can drop the last commits).
PostgreSQL in production is unaffected.

Configured in bot/endpoints.yml as ``type: xiaozhi_tracker_store.CachedSQLTrackerStore`` (this
folder is on Rasa's PYTHONPATH); other keys are ``SQLTrackerStore``'s, plus ``cache_size``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Text

import sqlalchemy as sa
import sqlalchemy.orm
import sqlalchemy.pool
from rasa.core.tracker_store import SQLTrackerStore
from rasa.shared.core.events import SessionStarted
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.shared.nlu.constants import INTENT_NAME_KEY

log = logging.getLogger(__name__)


@dataclass
class _Held:
    tracker: DialogueStateTracker
    stored: int  # how many of tracker.events are in the database
    last_id: Optional[int]  # id of the newest stored event of the conversation, when known


def _sqlite_wal(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class CachedSQLTrackerStore(SQLTrackerStore):
    def __init__(self, *args: Any, cache_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.engine.dialect.name == "sqlite":
            # SQLAlchemy 1.4 opens a new SQLite connection (and runs the WAL pragmas) for every
            # session without a pool; Rasa uses the store from its one event-loop thread.
            self.engine = sa.create_engine(self.engine.url, poolclass=sa.pool.SingletonThreadPool)
            sa.event.listen(self.engine, "connect", _sqlite_wal)
            self.sessionmaker = sa.orm.sessionmaker(bind=self.engine)
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[Text, _Held]" = OrderedDict()  # saved, waiting for the next turn
        self._out: dict[Text, _Held] = {}  # handed to a turn, not saved yet
        self.hits = self.misses = 0

    def _newest_id(self, session, sender_id: Text) -> Optional[int]:
        return session.execute(
            sa.select(sa.func.max(self.SQLEvent.id)).where(self.SQLEvent.sender_id == sender_id)
        ).scalar()

    async def retrieve(self, sender_id: Text) -> Optional[DialogueStateTracker]:
        held = self._cache.pop(sender_id, None)
        if held is not None and len(held.tracker.events) == held.stored:
            with self.session_scope() as session:
                current = self._newest_id(session, sender_id) == held.last_id
            if current:
                self.hits += 1
                self._out[sender_id] = held
                return held.tracker
        self.misses += 1
        tracker = await super().retrieve(sender_id)
        if tracker is not None and tracker.events.maxlen is None:
            # What was just loaded is what is stored for this session (SQLTrackerStore's count).
            self._out[sender_id] = _Held(tracker, len(tracker.events), None)
        else:
            self._out.pop(sender_id, None)
        return tracker

    async def save(self, tracker: DialogueStateTracker) -> None:
        held = self._out.pop(tracker.sender_id, None)
        if (
            self.event_broker is not None  # streaming events re-reads the stored tracker
            or held is None
            or held.tracker is not tracker
            or len(tracker.events) < held.stored
        ):
            self._cache.pop(tracker.sender_id, None)
            await super().save(tracker)
            return

        new_events = list(tracker.events)[held.stored :]
        last_id = held.last_id
        with self.session_scope() as session:
            rows = [self._row(tracker.sender_id, event) for event in new_events]
            session.add_all(rows)
            session.flush()
            if rows:
                last_id = rows[-1].id
            elif last_id is None:
                last_id = self._newest_id(session, tracker.sender_id)
            session.commit()
        if any(isinstance(event, SessionStarted) for event in new_events):
            # The next load starts at the new session; this tracker still holds the old one.
            self._cache.pop(tracker.sender_id, None)
            return
        self._cache[tracker.sender_id] = _Held(tracker, len(tracker.events), last_id)
        self._cache.move_to_end(tracker.sender_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _row(self, sender_id: Text, event) -> Any:
        """One ``events`` row, exactly as ``SQLTrackerStore.save`` writes it."""
        data = event.as_dict()
        return self.SQLEvent(
            sender_id=sender_id,
            type_name=event.type_name,
            timestamp=data.get("timestamp"),
            intent_name=data.get("parse_data", {}).get("intent", {}).get(INTENT_NAME_KEY),
            action_name=data.get("name"),
            data=json.dumps(data),
        )
