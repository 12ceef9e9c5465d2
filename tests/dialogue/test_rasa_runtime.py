"""The Rasa processes' jsonschema speed-up validates exactly like jsonschema itself."""

import subprocess

from tests.support import REPO
from xiaozhi.rasa_model import rasa_environment
from xiaozhi.settings import Settings

CHECK = """
import jsonschema, sitecustomize
assert jsonschema.validate is sitecustomize.validate
from rasa.core.actions.action import RemoteAction
from rasa.utils.endpoints import EndpointConfig
action = RemoteAction("action_answer_from_kb", EndpointConfig("http://127.0.0.1:1"))
assert action._validate_action_result({"events": [], "responses": [{"text": "好的"}]})
for bad in ({"events": "not a list"}, {"responses": [{"text": 1}], "events": [{"event": 3}]}):
    try:
        action._validate_action_result(bad)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError(f"accepted {bad}")
print("ok")
"""


def test_rasa_validates_action_results_with_the_cached_validator():
    settings = Settings()
    proc = subprocess.run(
        [str(settings.rasa_venv / "bin" / "python"), "-c", CHECK],
        cwd=REPO, env=rasa_environment(settings), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


CHANNEL_CHECK = """
import sqlalchemy
from rasa.shared.core import events
from rasa.shared.core.domain import Domain
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.shared.utils.common import all_subclasses
import xiaozhi_channel

# Every event type resolves to the same class as Rasa's own lookup, twice (second time cached).
for _ in range(2):
    for cls in all_subclasses(events.Event):
        assert events.Event.resolve_by_type(cls.type_name) is xiaozhi_channel._original_resolve_by_type(cls.type_name)
assert events.Event.resolve_by_type("no_such_event", events.ActionExecuted) is events.ActionExecuted
try:
    events.Event.resolve_by_type("no_such_event")
except ValueError:
    pass
else:
    raise AssertionError("an unknown event type resolved")
evts = events.deserialise_events([{"event": "slot", "name": "region", "value": "330100"},
                                  {"event": "user", "text": "你好", "parse_data": {"intent": {"name": "greet", "confidence": 0.97}}}])
assert [type(e) for e in evts] == [events.SlotSet, events.UserUttered]

domain = Domain.from_yaml('''
version: "3.1"
intents: [greet]
slots:
  region: {type: text, mappings: [{type: custom}]}
''')
tracker = DialogueStateTracker.from_events("s1", evts, slots=domain.slots)
assert xiaozhi_channel.summarise(tracker) == {"intent": "greet", "confidence": 0.97, "slots": {"region": "330100"}, "paused": False}

engine = sqlalchemy.create_engine("sqlite:///" + __import__("tempfile").mkdtemp() + "/t.db")
with engine.connect() as conn:
    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
print("ok")
"""


def test_the_hub_channel_resolves_events_summarises_turns_and_opens_sqlite_in_wal_mode():
    settings = Settings()
    proc = subprocess.run(
        [str(settings.rasa_venv / "bin" / "python"), "-c", CHANNEL_CHECK],
        cwd=REPO, env=rasa_environment(settings), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


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


def _run_in_rasa(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    settings = Settings()
    return subprocess.run(
        [str(settings.rasa_venv / "bin" / "python"), "-c", code, *args],
        cwd=REPO, env={**rasa_environment(settings), **(env or {})}, capture_output=True, text=True, timeout=180,
    )


def test_the_tracker_store_keeps_each_conversation_between_turns_and_stays_correct_on_sqlite(tmp_path):
    proc = _run_in_rasa(STORE_CHECK, env={"XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")})
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


ACTION_JSON_CHECK = """
import asyncio, json
import xiaozhi_channel
from rasa.utils.endpoints import EndpointConfig

async def main():
    session = EndpointConfig("http://127.0.0.1:1").session()
    try:
        assert session.json_serialize is xiaozhi_channel.dumps
    finally:
        await session.close()
    state = {"sender_id": "s1", "slots": {"region": "330100"}, "latest_message": {"text": "异地就医/备案", "intent": {"confidence": 0.93}},
             "events": [{"event": "user", "timestamp": 1700000000.123456, "text": "你好"}], "n": None, "ok": True}
    text = xiaozhi_channel.dumps(state)
    assert json.loads(text) == state and "异地就医/备案" in text
    assert xiaozhi_channel.dumps(float("nan")) == "NaN"
    try:
        xiaozhi_channel.dumps({"bad": {1, 2}})
    except TypeError:
        pass
    else:
        raise AssertionError("a set was encoded")
    print("ok")

asyncio.run(main())
"""


def test_action_calls_are_encoded_with_ujson_to_the_same_json():
    proc = _run_in_rasa(ACTION_JSON_CHECK)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_tracker_store_stays_correct_with_two_rasa_replicas_on_postgresql(postgres, tmp_path):
    """As deployed (deploy/rasa/endpoints.yml): several Rasa replicas, one PostgreSQL."""
    url = postgres.create_database().replace("postgresql+asyncpg://", "postgresql://")
    proc = _run_in_rasa(STORE_CHECK, url, env={"XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")})
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


ACTION_CALL_CHECK = """
import xiaozhi_channel
from rasa.core.actions.action import RemoteAction
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.utils.endpoints import EndpointConfig

domain = Domain.from_yaml('''
version: "3.1"
intents: [greet, ask_e_voucher]
slots:
  region: {type: text, mappings: [{type: custom}]}
''')
events = [ActionExecuted("action_listen")]
for i in range(30):  # a long conversation
    events += [UserUttered(f"第{i}个问题", {"name": "greet", "confidence": 0.9}), BotUttered("您好" * 50),
               ActionExecuted("action_listen")]
events += [UserUttered("医保电子凭证怎么激活", {"name": "ask_e_voucher", "confidence": 0.95}),
           SlotSet("region", "330100"), ActionExecuted("ev_form")]
tracker = DialogueStateTracker.from_events("s1", events, slots=domain.slots)
action = RemoteAction("action_answer_from_kb", EndpointConfig("http://127.0.0.1:1"))
sent = RemoteAction._action_call_format(action, tracker, domain)
full = xiaozhi_channel._original_action_call_format(action, tracker, domain)
# Everything but the events is what Rasa sends; the events are the current turn's, in order.
assert {k: v for k, v in sent.items() if k != "tracker"} == {k: v for k, v in full.items() if k != "tracker"}
assert {k: v for k, v in sent["tracker"].items() if k != "events"} == {k: v for k, v in full["tracker"].items() if k != "events"}
assert sent["tracker"]["events"] == full["tracker"]["events"][-3:]
assert [e["event"] for e in sent["tracker"]["events"]] == ["user", "slot", "action"]
assert sent["tracker"]["latest_message"]["text"] == "医保电子凭证怎么激活" and sent["tracker"]["slots"]["region"] == "330100"
# What the SDK reads from it: the latest intent and the freshly set slots.
from rasa_sdk import Tracker
sdk = Tracker.from_dict(sent["tracker"])
assert sdk.latest_message["intent"]["name"] == "ask_e_voucher" and sdk.get_slot("region") == "330100"
form_turn = DialogueStateTracker.from_events("s3", events[:-1], slots=domain.slots)  # ends with a slot candidate
assert Tracker.from_dict(RemoteAction._action_call_format(action, form_turn, domain)["tracker"]).slots_to_validate() == {"region": "330100"}
# No resident message yet (a session start): everything is sent.
start = DialogueStateTracker.from_events("s2", [ActionExecuted("action_session_start")], slots=domain.slots)
assert RemoteAction._action_call_format(action, start, domain)["tracker"]["events"] == \\
    xiaozhi_channel._original_action_call_format(action, start, domain)["tracker"]["events"]
print("ok", len(str(full)), len(str(sent)))
"""


def test_action_calls_carry_the_current_turn_and_everything_else_rasa_sends():
    proc = _run_in_rasa(ACTION_CALL_CHECK)
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
