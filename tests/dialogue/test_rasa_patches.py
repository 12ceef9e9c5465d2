"""Why each patch of bot/rasa_runtime/xiaozhi_patches.py exists, and its guards.

Each patch's check runs in the Rasa venv and first shows the problem in Rasa 3.6.21 as installed
(before ``apply()``), then that the patch removes it and changes nothing else. Without the patch the
second half fails; if a future Rasa fixes the problem, the first half fails and says the patch can go.
"""

import ast
import re

import pytest

from tests.support import REPO
from tests.support.rasa_venv import run_in_rasa

PATCHES_PY = REPO / "bot" / "rasa_runtime" / "xiaozhi_patches.py"


def _ok(proc) -> None:
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_patches_are_written_for_the_rasa_the_lock_file_pins():
    pinned = re.search(r"^rasa==([^\s\\]+)", (REPO / "requirements" / "rasa.lock.txt").read_text(), re.M).group(1)
    constants = {
        node.targets[0].id: node.value.value
        for node in ast.parse(PATCHES_PY.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
    }
    assert constants["RASA_VERSION"] == pinned


GUARDS = r"""
import inspect, rasa
from rasa.core.actions.action import RemoteAction
from rasa.core.processor import MessageProcessor
from rasa.shared.core.events import Event
import xiaozhi_patches as patches

def refused(*words):
    try:
        patches.apply()
    except patches.PatchRefused as exc:
        message = str(exc)
        assert all(w in message for w in words), message
    else:
        raise AssertionError("applied")
    assert patches.installed() == []  # refused before anything changed

# Another Rasa: refused, naming both versions.
rasa.__version__ = "3.7.0"
refused("3.7.0", "3.6.21")
rasa.__version__ = "3.6.21"

# A patched function gone from Rasa.
save = MessageProcessor.save_tracker
del MessageProcessor.save_tracker
refused("MessageProcessor.save_tracker", "does not exist")
MessageProcessor.save_tracker = save

# Its parameters changed.
call_format = RemoteAction._action_call_format
def changed(self, tracker, domain, include_events=True):
    return call_format(self, tracker, domain)
RemoteAction._action_call_format = changed
refused("RemoteAction._action_call_format", "include_events")
RemoteAction._action_call_format = call_format

# The pinned Rasa: every patch applied, once, however often apply() is called.
assert patches.apply() == [p.name for p in patches.PATCHES]
assert patches.installed() == [p.name for p in patches.PATCHES]
first = {p.name: inspect.getattr_static(patches._owner(p.owner), p.attribute) for p in patches.PATCHES}
assert patches.apply() == [p.name for p in patches.PATCHES]
assert first == {p.name: inspect.getattr_static(patches._owner(p.owner), p.attribute) for p in patches.PATCHES}
assert Event.resolve_by_type("slot").type_name == "slot"
assert RemoteAction._action_call_format.__wrapped__ is call_format
assert isinstance(inspect.getattr_static(Event, "resolve_by_type"), staticmethod)
print("ok")
"""


def test_apply_refuses_another_rasa_a_missing_function_or_changed_parameters_and_patches_once():
    _ok(run_in_rasa(GUARDS))


ENTRY = r"""
import xiaozhi_patches as patches
import xiaozhi_channel  # importing the channel changes nothing in Rasa

assert patches.installed() == []
channel = xiaozhi_channel.XiaozhiInput.from_credentials(None)  # what `rasa run` calls at start
assert isinstance(channel, xiaozhi_channel.XiaozhiInput)
assert patches.installed() == [p.name for p in patches.PATCHES], patches.installed()
print("ok")
"""


def test_rasa_is_patched_when_it_builds_the_hub_channel_not_when_the_channel_is_imported():
    _ok(run_in_rasa(ENTRY))


REFUSED_AT_START = r"""
import sys, rasa
rasa.__version__ = "3.7.0"  # stands in for another installed Rasa; the real command line from here on
sys.argv = ["rasa", "run", "--model", sys.argv[1], "--credentials", "bot/credentials.yml",
            "--endpoints", "bot/endpoints.yml", "--port", "0"]
from rasa.__main__ import main
main()
print("started")
"""


def test_rasa_run_on_another_rasa_version_exits_naming_both_versions(tmp_path):
    """The real ``rasa run`` command line stops when it builds the channel, before loading any model."""
    model = tmp_path / "model.tar.gz"  # never opened: the refusal comes first
    model.write_bytes(b"")
    proc = run_in_rasa(REFUSED_AT_START, str(model),
                       env={"XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "started" not in proc.stdout
    assert re.search(r"PatchRefused: .*Rasa 3\.6\.21 .*but Rasa 3\.7\.0 is installed", proc.stdout + proc.stderr), proc.stderr[-3000:]


VALIDATE = r"""
import jsonschema
from jsonschema.validators import validator_for
from rasa.core.actions.action import RemoteAction
from rasa.utils.endpoints import EndpointConfig
import xiaozhi_patches

action = RemoteAction("action_answer_from_kb", EndpointConfig("http://127.0.0.1:1"))
cls = validator_for(action.action_response_format_spec())
checks = []
check_schema = cls.check_schema
def counting(schema, *args, **kwargs):
    checks.append(1)
    return check_schema(schema, *args, **kwargs)
cls.check_schema = counting

BAD = ({"events": "not a list"}, {"responses": [{"text": 1}], "events": [{"event": 3}]}, {"events": [{"event": "slot"}]})

def five_results():
    del checks[:]
    for _ in range(5):
        assert action._validate_action_result({"events": [{"event": "slot", "name": "region", "value": "330100"}],
                                               "responses": [{"text": "好的"}]})
    messages = []
    for bad in BAD:
        try:
            action._validate_action_result(bad)
        except jsonschema.ValidationError as exc:
            assert "Failed to validate Action server response" in exc.message
            messages.append((exc.message, list(exc.path), list(exc.schema_path)))
        else:
            raise AssertionError(f"accepted {bad}")
    return len(checks), messages

checked, rasa_errors = five_results()
assert checked == 5 + len(BAD), checked  # Rasa 3.6.21: the constant schema is checked for every response
xiaozhi_patches.apply()
five_results()
checked, errors = five_results()
assert checked == 0, checked  # checked once (the first call after apply), then reused
assert errors == rasa_errors, (errors, rasa_errors)  # the same errors, the same best match
print("ok")
"""


def test_action_results_are_validated_without_checking_rasas_schema_each_time():
    _ok(run_in_rasa(VALIDATE))


SAVED = r"""
import asyncio
from rasa.core.processor import MessageProcessor
from rasa.core.tracker_store import InMemoryTrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker
import xiaozhi_channel, xiaozhi_patches

domain = Domain.from_yaml('''
version: "3.1"
intents: [greet]
slots:
  region: {type: text, mappings: [{type: custom}]}
''')
# Rasa's own processor; only the model loading of its __init__ is skipped (save_tracker needs none).
processor = MessageProcessor.__new__(MessageProcessor)
processor.tracker_store = InMemoryTrackerStore(domain)

async def turn(sender):
    # What the channel answers when a turn ends with Rasa's save_tracker (MessageProcessor.handle_message).
    summary = {}
    def saved(tracker):
        if tracker.sender_id == sender:
            summary.update(xiaozhi_channel.summarise(tracker))
    tracker = DialogueStateTracker.from_events(
        sender, [UserUttered("我在杭州", {"name": "greet", "confidence": 0.97}), SlotSet("region", "330100")],
        slots=domain.slots)
    with xiaozhi_patches.on_tracker_saved(saved):
        await processor.save_tracker(tracker)
    assert (await processor.tracker_store.retrieve(sender)).get_slot("region") == "330100"  # saved as before
    return summary

assert asyncio.run(turn("s1")) == {}  # Rasa 3.6.21: the channel never sees what was understood
xiaozhi_patches.apply()
assert asyncio.run(turn("s2")) == {"intent": "greet", "confidence": 0.97, "slots": {"region": "330100"}, "paused": False}
asyncio.run(processor.save_tracker(DialogueStateTracker("s3", domain.slots)))  # outside a channel's turn: just saved
print("ok")
"""


def test_the_channel_learns_what_rasa_understood_from_the_tracker_saved_at_the_end_of_the_turn():
    _ok(run_in_rasa(SAVED))


RESOLVE = r"""
import rasa.shared.utils.common as common
from rasa.shared.core import events
from rasa.shared.utils.common import all_subclasses
import xiaozhi_patches

walks = []
walk = common.all_subclasses
def counting(cls):
    if cls is events.Event:  # not its own recursive calls
        walks.append(cls)
    return walk(cls)
common.all_subclasses = counting  # what Event.resolve_by_type calls

STORED = [{"event": "slot", "name": "region", "value": "330100"},
          {"event": "user", "text": "你好", "parse_data": {"intent": {"name": "greet", "confidence": 0.97}}},
          {"event": "action", "name": "action_listen"}] * 20

def load():
    del walks[:]
    loaded = events.deserialise_events(STORED)
    assert [type(e) for e in loaded] == [events.SlotSet, events.UserUttered, events.ActionExecuted] * 20
    return len(walks)

assert load() == 60  # Rasa 3.6.21: one walk of every Event subclass per stored event, every turn
original = events.Event.resolve_by_type
xiaozhi_patches.apply()
load()
assert load() == 0
# Every event type resolves to Rasa's own class, twice (the second time from the table).
for _ in range(2):
    for cls in all_subclasses(events.Event):
        assert events.Event.resolve_by_type(cls.type_name) is original(cls.type_name)
assert events.Event.resolve_by_type("no_such_event", events.ActionExecuted) is events.ActionExecuted
assert events.Event.resolve_by_type("no_such_event", events.SlotSet) is events.SlotSet  # a default is not remembered
try:
    events.Event.resolve_by_type("no_such_event")
except ValueError:
    pass
else:
    raise AssertionError("an unknown event type resolved")
print("ok")
"""


def test_stored_events_find_their_class_without_walking_every_event_class():
    _ok(run_in_rasa(RESOLVE))


UJSON = r"""
import asyncio, json
from rasa.utils.endpoints import EndpointConfig
import xiaozhi_patches

STATE = {"sender_id": "s1", "slots": {"region": "330100"},
         "latest_message": {"text": "异地就医/备案", "intent": {"confidence": 0.93}},
         "events": [{"event": "user", "timestamp": 1700000000.123456, "text": "你好"}], "n": None, "ok": True}

async def body():
    session = EndpointConfig("http://127.0.0.1:1").session()  # what RemoteAction posts with
    try:
        return session._json_serialize(STATE)
    finally:
        await session.close()

before = asyncio.run(body())
assert "\\u5f02" in before and json.loads(before) == STATE  # Rasa 3.6.21: json.dumps, every Chinese character escaped
xiaozhi_patches.apply()
after = asyncio.run(body())
assert json.loads(after) == STATE and "异地就医/备案" in after and len(after.encode()) < len(before.encode())
assert xiaozhi_patches.dumps(float("nan")) == "NaN"
try:
    xiaozhi_patches.dumps({"bad": {1, 2}})
except TypeError:
    pass
else:
    raise AssertionError("a set was encoded")
print("ok")
"""


def test_action_calls_are_encoded_with_ujson_to_the_same_json():
    _ok(run_in_rasa(UJSON))


ACTION_CALL = r"""
from rasa.core.actions.action import RemoteAction
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.utils.endpoints import EndpointConfig
from rasa_sdk import Tracker
import xiaozhi_patches

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
start = DialogueStateTracker.from_events("s2", [ActionExecuted("action_session_start")], slots=domain.slots)
form_turn = DialogueStateTracker.from_events("s3", events[:-1], slots=domain.slots)  # ends with a slot candidate

full = action._action_call_format(tracker, domain)
assert len(full["tracker"]["events"]) == len(events) == 94  # Rasa 3.6.21: the whole conversation, every call
full_start = action._action_call_format(start, domain)
xiaozhi_patches.apply()
sent = action._action_call_format(tracker, domain)
# Everything but the events is what Rasa sends; the events are the current turn's, in order.
assert {k: v for k, v in sent.items() if k != "tracker"} == {k: v for k, v in full.items() if k != "tracker"}
assert {k: v for k, v in sent["tracker"].items() if k != "events"} == {k: v for k, v in full["tracker"].items() if k != "events"}
assert sent["tracker"]["events"] == full["tracker"]["events"][-3:]
assert [e["event"] for e in sent["tracker"]["events"]] == ["user", "slot", "action"]
# What the SDK reads from it: the latest intent, the slots and the form's freshly set slots.
sdk = Tracker.from_dict(sent["tracker"])
assert sdk.latest_message["intent"]["name"] == "ask_e_voucher" and sdk.get_slot("region") == "330100"
assert Tracker.from_dict(action._action_call_format(form_turn, domain)["tracker"]).slots_to_validate() == {"region": "330100"}
# No resident message yet (a session start): everything is sent.
assert action._action_call_format(start, domain)["tracker"]["events"] == full_start["tracker"]["events"]
print("ok", len(str(full)), len(str(sent)))
"""


def test_action_calls_carry_the_current_turn_and_everything_else_rasa_sends():
    proc = run_in_rasa(ACTION_CALL)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


@pytest.mark.slow
def test_rasa_run_patches_itself_once_and_the_channel_answers_with_what_it_understood(tmp_path):
    """The real server with the trained model: the patches are applied once, at start, and logged;
    a turn through the hub's channel comes back with its intent (``report_saved_turns``)."""
    import os
    import subprocess
    import time

    import httpx

    from tests.support import free_port
    from xiaozhi.rasa_model import ensure_trained, rasa_environment
    from xiaozhi.settings import Settings

    settings = Settings()
    model = ensure_trained(settings)
    port = free_port()
    log_path = tmp_path / "rasa.log"
    env = {**rasa_environment(settings), "XIAOZHI_RASA_TOKEN": "t16-token",
           "XIAOZHI_RASA_TRACKER_DB": str(tmp_path / "rasa.db")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(settings.rasa_venv / "bin" / "rasa"), "run", "--model", str(model), "--endpoints", "bot/endpoints.yml",
             "--credentials", "bot/credentials.yml", "--interface", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/webhooks/xiaozhi"
    try:
        deadline = time.monotonic() + settings.rasa_startup_timeout_s
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                # Rasa listens once the model is loaded (its before_server_start listener).
                if httpx.get(f"{url}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # A thanks is answered by a domain response: no action server runs here (a greeting now goes
        # through action_greet, which answers a question DIET heard as a greeting).
        answer = httpx.post(f"{url}/webhook", json={"sender": "t16", "message": "谢谢"},
                            headers={"X-Xiaozhi-Token": "t16-token"}, timeout=60).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
    assert answer["intent"] == "thanks" and answer["confidence"] > 0.5 and answer["messages"], answer
    logged = log_path.read_text()
    for target in ("jsonschema.validate", "MessageProcessor.save_tracker", "Event.resolve_by_type",
                   "EndpointConfig.session", "RemoteAction._action_call_format"):
        assert logged.count(f"{target} (") == 1, logged[-3000:]  # applied once, and said so
