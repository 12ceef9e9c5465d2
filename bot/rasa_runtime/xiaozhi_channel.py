"""The hub's channel into Rasa: the REST webhook, answering with what Rasa understood as well.

Rasa's plain REST channel returns only the bot's messages, so the hub used to ask for the tracker
afterwards (intent, confidence, slots) in a second request, which made Rasa load and deserialise
the whole conversation once more on every turn (about an eighth of its CPU). This channel takes
the same request and answers ``{"messages": [...], "intent": ..., "confidence": ...,
"slots": {...}, "paused": ...}`` from the tracker Rasa saves at the end of the turn.

Listed in bot/credentials.yml as ``xiaozhi_channel.XiaozhiInput`` (bot/rasa_runtime is on Rasa's
PYTHONPATH); its URL is ``/webhooks/xiaozhi/webhook``.

Only the hub may post: Rasa's ``--auth-token`` guards its HTTP API, not its channels, and this one
answers with the conversation's intent and slots and writes its tracker. Every request must carry
the shared token (``XIAOZHI_RASA_TOKEN``, or the file named by ``XIAOZHI_RASA_TOKEN_FILE``) in the
``X-Xiaozhi-Token`` header; anything else gets 401, and with no token configured every request is
refused (503) rather than served unauthenticated.

Importing it also makes Rasa resolve an event's class from its type name with a table instead of
walking every ``Event`` subclass for every event it deserialises (a tenth of Rasa's CPU here),
and opens the embedded SQLite tracker store in WAL mode with synchronous=NORMAL: a commit then
needs no fsync of its own (another tenth), and a killed Rasa still loses nothing it committed
(only a power cut can drop the last commits). PostgreSQL in production is unaffected.

Custom-action calls carry the events of the current turn only (from the resident's latest message
on), not the whole conversation: the bot's actions read slots, the latest message and the form's
freshly set slots (rasa_sdk's ``slots_to_validate``), all of which that covers. Twenty turns into a
conversation Rasa otherwise serialised ~130 KB per call, several calls a turn, and the action
server parsed it each time.

And Rasa's sessions to the action server encode JSON with ujson (already one of Rasa's
dependencies) instead of the standard library: every custom-action call carries the whole
conversation, and encoding it was about an eighth of Rasa's CPU. Same JSON values, UTF-8 text
instead of ``\\u`` escapes; whatever ujson refuses is encoded by ``json.dumps`` as before.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import os
from asyncio import CancelledError
from typing import Any, Dict, Optional, Text

import rasa
from rasa.core.actions.action import RemoteAction
from rasa.core.channels.channel import CollectingOutputChannel, UserMessage
from rasa.core.channels.rest import RestInput
from rasa.core.processor import MessageProcessor
from rasa.shared.core import events as rasa_events
from rasa.shared.core.trackers import EventVerbosity
from rasa.utils.endpoints import EndpointConfig
from sanic import Blueprint, response
from sanic.request import Request
from sanic.response import HTTPResponse
from sqlalchemy import event
from sqlalchemy.engine import Engine
import ujson

log = logging.getLogger(__name__)

# Set by the webhook for the duration of one turn; the patched save_tracker fills it.
_turn_summary: contextvars.ContextVar[Optional[Dict[Text, Any]]] = contextvars.ContextVar(
    "xiaozhi_turn_summary", default=None
)


def summarise(tracker) -> Dict[Text, Any]:
    latest = tracker.latest_message
    intent = (latest.intent or {}) if latest is not None else {}
    return {
        "intent": intent.get("name"),
        "confidence": intent.get("confidence"),
        "slots": {name: value for name, value in tracker.current_slot_values().items() if value is not None},
        "paused": tracker.is_paused(),
    }


_original_save_tracker = MessageProcessor.save_tracker


async def _save_tracker(self: MessageProcessor, tracker) -> None:
    await _original_save_tracker(self, tracker)
    sink = _turn_summary.get()
    if sink is not None and sink.get("sender_id") == tracker.sender_id:
        sink.update(summarise(tracker))


MessageProcessor.save_tracker = _save_tracker


# -- event class by type name -----------------------------------------------------------------
_original_resolve_by_type = rasa_events.Event.resolve_by_type
_event_classes: Dict[Text, type] = {}


def _resolve_by_type(type_name: Text, default=None):
    cls = _event_classes.get(type_name)
    if cls is None:
        cls = _original_resolve_by_type(type_name, default)
        # Only real, registered classes are remembered (not the caller's default).
        if cls is not None and cls is not default and getattr(cls, "type_name", None) == type_name:
            _event_classes[type_name] = cls
    return cls


rasa_events.Event.resolve_by_type = staticmethod(_resolve_by_type)


@event.listens_for(Engine, "connect")
def _sqlite_wal(dbapi_connection, _record) -> None:
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


# -- JSON to the action server --------------------------------------------------------------------
def dumps(obj: Any) -> str:
    try:
        return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(obj)


_original_session = EndpointConfig.session


def _session(self: EndpointConfig):
    session = _original_session(self)
    session._json_serialize = dumps  # what ClientSession(json_serialize=...) sets
    return session


EndpointConfig.session = _session


# -- what a custom-action call carries ---------------------------------------------------------------
def turn_events(tracker) -> list:
    """The events from the resident's latest message on (all of them when there is none)."""
    events = list(tracker.events)
    for index in range(len(events) - 1, -1, -1):
        if isinstance(events[index], rasa_events.UserUttered):
            return events[index:]
    return events


def _action_call_format(self: RemoteAction, tracker, domain) -> Dict[Text, Any]:
    """``RemoteAction._action_call_format`` of Rasa 3.6, with ``turn_events`` instead of every event."""
    state = tracker.current_state(EventVerbosity.NONE)
    state["events"] = [event.as_dict() for event in turn_events(tracker)]
    result = {"next_action": self._name, "sender_id": tracker.sender_id, "tracker": state,
              "version": rasa.__version__}
    if not self._is_selective_domain_enabled() or domain.does_custom_action_explicitly_need_domain(self.name()):
        result["domain"] = domain.as_dict()
    return result


_original_action_call_format = RemoteAction._action_call_format
RemoteAction._action_call_format = _action_call_format


TOKEN_HEADER = "X-Xiaozhi-Token"


def shared_token() -> Optional[str]:
    """The hub's token: the file named by XIAOZHI_RASA_TOKEN_FILE, else XIAOZHI_RASA_TOKEN; None if neither."""
    path = os.environ.get("XIAOZHI_RASA_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return os.environ.get("XIAOZHI_RASA_TOKEN") or None


def authorised(presented: Optional[str], expected: Optional[str]) -> bool:
    return bool(expected) and presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


class XiaozhiInput(RestInput):
    """``POST /webhooks/xiaozhi/webhook`` with ``{"sender", "message", "metadata"}``."""

    @classmethod
    def name(cls) -> Text:
        return "xiaozhi"

    def blueprint(self, on_new_message) -> Blueprint:
        webhook = Blueprint("xiaozhi_webhook", __name__)
        expected = shared_token()
        if not expected:
            log.error("no XIAOZHI_RASA_TOKEN (or XIAOZHI_RASA_TOKEN_FILE): the xiaozhi channel refuses every request")

        @webhook.route("/", methods=["GET"])
        async def health(_: Request) -> HTTPResponse:
            return response.json({"status": "ok"})

        @webhook.route("/webhook", methods=["POST"])
        async def receive(request: Request) -> HTTPResponse:
            if not expected:
                return response.json({"error": "the channel has no token configured"}, status=503)
            if not authorised(request.headers.get(TOKEN_HEADER), expected):
                log.warning("xiaozhi channel: refused a request without the hub's token from %s", request.ip)
                return response.json({"error": "unauthorised"}, status=401)
            body = request.json if isinstance(request.json, dict) else {}
            sender_id = body.get("sender")
            text = body.get("message")
            if not isinstance(sender_id, str) or not isinstance(text, str):
                return response.json({"error": "sender and message must be strings"}, status=400)
            collector = CollectingOutputChannel()
            summary: Dict[Text, Any] = {"sender_id": sender_id}
            token = _turn_summary.set(summary)
            try:
                await on_new_message(
                    UserMessage(
                        text,
                        collector,
                        sender_id,
                        input_channel=self.name(),
                        metadata=body.get("metadata"),
                    )
                )
            except CancelledError:
                log.error("turn for %s timed out", sender_id)
            except Exception:
                log.exception("turn for %s failed", sender_id)
            finally:
                _turn_summary.reset(token)
            summary.pop("sender_id")
            return response.json({"messages": collector.messages, **summary})

        return webhook
