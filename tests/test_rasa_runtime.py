"""The Rasa processes' jsonschema speed-up validates exactly like jsonschema itself."""

import subprocess

from conftest import REPO
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
