"""Rasa's runtime besides the patches (tests/dialogue/test_rasa_patches.py): the caching tracker store, on
SQLite and on PostgreSQL, and the API token sitecustomize hands to `rasa run`."""

import subprocess

from tests.support.rasa_venv import run_in_rasa
from xiaozhi.rasa_model import rasa_environment
from xiaozhi.settings import Settings

STORE_CHECK = r"""
import asyncio, json, sys, tempfile
import sqlalchemy
from rasa.core.tracker_store import SQLTrackerStore, create_tracker_store
from rasa.core.brokers.sql import SQLEventBroker
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, SessionStarted, SlotSet, UserUttered
from rasa.utils.endpoints import read_endpoint_config
from xiaozhi_tracker_store import CachedSQLTrackerStore

URL = sys.argv[1] if len(sys.argv) > 1 else ""
domain = Domain.from_yaml('''
version: "3.1"
intents: [greet]
slots:
  region: {type: text, mappings: [{type: custom}]}
''')

if URL:  # PostgreSQL: dialect, host, port, db, username from the URL
    u = sqlalchemy.engine.make_url(URL)
    db = dict(dialect="postgresql", host=u.host, port=u.port, db=u.database, username=u.username, password=u.password)
else:
    db = dict(dialect="sqlite", db=tempfile.mkdtemp() + "/rasa.db")

selects = []
def store(cls=CachedSQLTrackerStore, **kw):
    s = cls(domain=domain, **db, **kw)
    sqlalchemy.event.listen(s.engine, "before_cursor_execute",
                            lambda conn, cur, stmt, *a: selects.append(stmt) if "events.data" in stmt else None)
    return s

def events_of(tracker):
    return [e.as_dict() for e in tracker.events]

async def turn(st, sender, text, region=None):
    tracker = await st.get_or_create_tracker(sender)
    tracker.update(UserUttered(text, {"name": "greet", "confidence": 0.9}))
    if region:
        tracker.update(SlotSet("region", region))
    tracker.update(BotUttered("您好"))
    tracker.update(ActionExecuted("action_listen"))
    await st.save(tracker)
    return tracker

async def main():
    a, b = store(), store()  # two Rasa processes (replicas) on one database
    plain = store(SQLTrackerStore)

    await turn(a, "s1", "你好")  # a new conversation: created, then loaded once by the next turn
    t1 = await turn(a, "s1", "我在杭州", "330100")
    loads = len(selects)
    t3 = await turn(a, "s1", "谢谢")
    assert t3 is t1, "the saved tracker was not kept for the next turn"
    assert len(selects) == loads, "a cached turn still loaded the events"
    # What is stored is exactly what the plain SQL store reads back.
    assert events_of(await plain.retrieve("s1")) == events_of(t3)
    assert (await plain.retrieve("s1")).get_slot("region") == "330100"

    # Another replica answers a turn: the first one's copy is stale and is not used.
    tb = await turn(b, "s1", "再见")
    ta = await a.retrieve("s1")
    assert ta is not t3 and events_of(ta) == events_of(tb) == events_of(await plain.retrieve("s1"))
    await a.save(ta)  # nothing new: no rows written
    assert events_of(await plain.retrieve("s1")) == events_of(tb)

    # A turn that fails before saving leaves nothing behind: the next turn loads what is stored.
    t = await a.retrieve("s1")
    t.update(UserUttered("这句没有保存"))
    again = await a.retrieve("s1")
    assert again is not t and events_of(again) == events_of(tb)
    await a.save(again)

    # The same object saved twice writes its new events once.
    t = await turn(a, "s1", "还有问题")
    await a.save(t)
    assert events_of(await plain.retrieve("s1")) == events_of(t)

    # A new session: the next turn loads from the database (only the new session), like SQLTrackerStore.
    t = await a.retrieve("s1")
    t.update(ActionExecuted("action_session_start"))
    t.update(SessionStarted())
    t.update(ActionExecuted("action_listen"))
    await a.save(t)
    fresh = await a.retrieve("s1")
    assert fresh is not t and events_of(fresh) == events_of(await plain.retrieve("s1"))
    assert len(fresh.events) < len(t.events)
    await a.save(fresh)

    if not URL:  # SQLite: the store's own connections commit in WAL mode without an fsync each
        with a.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        other = sqlalchemy.create_engine("sqlite:///" + tempfile.mkdtemp() + "/other.db")
        with other.connect() as conn:  # and nobody else's engine is touched
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "delete"

    # Least recently used conversations leave the cache.
    small = store(cache_size=2)
    for s in ("x1", "x2", "x3"):
        await turn(small, s, "你好")
        await turn(small, s, "谢谢")
    assert list(small._cache) == ["x2", "x3"]

    # With an event broker, saving streams events by re-reading the store: the cache stays out of it.
    broker = SQLEventBroker(db=tempfile.mkdtemp() + "/events.db") if not URL else None
    if broker is not None:
        streamed = store(event_broker=broker)
        await turn(streamed, "b1", "你好")
        t = await turn(streamed, "b1", "谢谢")
        assert (await streamed.retrieve("b1")) is not t

    # bot/endpoints.yml names this store, and Rasa finds it (a typo would silently mean in-memory).
    cfg = read_endpoint_config("bot/endpoints.yml", "tracker_store")
    made = create_tracker_store(cfg, domain)
    made = getattr(made, "_tracker_store", made)  # unwrap a FailSafeTrackerStore
    assert isinstance(made, CachedSQLTrackerStore), type(made)
    print("ok", a.hits, a.misses)

asyncio.run(main())
"""


def test_the_tracker_store_keeps_each_conversation_between_turns_and_stays_correct_on_sqlite(tmp_path):
    proc = run_in_rasa(STORE_CHECK, env={"XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")})
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


def test_the_tracker_store_stays_correct_with_two_rasa_replicas_on_postgresql(postgres, tmp_path):
    """As deployed (deploy/rasa/endpoints.yml): several Rasa replicas, one PostgreSQL."""
    url = postgres.create_database().replace("postgresql+asyncpg://", "postgresql://")
    proc = run_in_rasa(STORE_CHECK, url, env={"XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")})
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


def test_rasa_run_gets_its_api_token_from_the_environment_not_its_command_line(tmp_path):
    """Issue 19: `--auth-token` on Rasa's command line was readable by every user of the host (ps).
    sitecustomize gives `rasa run` the token from XIAOZHI_RASA_TOKEN or XIAOZHI_RASA_TOKEN_FILE instead,
    inside the process only; other commands and an explicit --auth-token are left alone."""
    import json
    import os

    settings = Settings()
    script = tmp_path / "rasa"  # stands in for .venv-rasa/bin/rasa: same interpreter, same start-up
    script.write_text(f"#!{settings.rasa_venv / 'bin' / 'python'}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")

    def argv(*args: str, **env: str) -> list[str]:
        base = {k: v for k, v in rasa_environment(settings).items() if not k.startswith("XIAOZHI_RASA_TOKEN")}
        proc = subprocess.run([str(script), *args], env={**base, **env}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert argv("run", "--enable-api", XIAOZHI_RASA_TOKEN="tok-1") == ["run", "--enable-api", "--auth-token", "tok-1"]
    assert argv("run", XIAOZHI_RASA_TOKEN_FILE=str(token_file)) == ["run", "--auth-token", "from-a-file"]
    assert argv("run", "--auth-token", "given", XIAOZHI_RASA_TOKEN="tok-1") == ["run", "--auth-token", "given"]
    assert argv("train", XIAOZHI_RASA_TOKEN="tok-1") == ["train"]
    assert argv("run") == ["run"]  # no token anywhere: nothing invented (the channel then refuses every turn)
    assert os.access(script, os.X_OK)
