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

When Rasa builds this channel at start (``from_credentials``) it applies the project's patches to
Rasa (xiaozhi_patches.py: version-guarded, each explained there), among them the one that hands
the channel the tracker Rasa saves at the end of the turn.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from asyncio import CancelledError
from typing import Any, Dict, Optional, Text

from rasa.core.channels.channel import CollectingOutputChannel, InputChannel, UserMessage
from rasa.core.channels.rest import RestInput
from sanic import Blueprint, response
from sanic.request import Request
from sanic.response import HTTPResponse

import xiaozhi_patches

log = logging.getLogger(__name__)


def summarise(tracker) -> Dict[Text, Any]:
    latest = tracker.latest_message
    intent = (latest.intent or {}) if latest is not None else {}
    return {
        "intent": intent.get("name"),
        "confidence": intent.get("confidence"),
        "slots": {name: value for name, value in tracker.current_slot_values().items() if value is not None},
        "paused": tracker.is_paused(),
    }


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


WARM_UP_TEXT = "医保电子凭证怎么激活"  # parsed once at start-up (``warm_up``)


class XiaozhiInput(RestInput):
    """``POST /webhooks/xiaozhi/webhook`` with ``{"sender", "message", "metadata"}``."""

    @classmethod
    def name(cls) -> Text:
        return "xiaozhi"

    @classmethod
    def from_credentials(cls, credentials: Optional[Dict[Text, Any]]) -> InputChannel:
        """Called once by ``rasa run`` as it starts: the one place Rasa is patched (xiaozhi_patches.py)."""
        xiaozhi_patches.apply()
        return super().from_credentials(credentials)

    def blueprint(self, on_new_message) -> Blueprint:
        webhook = Blueprint("xiaozhi_webhook", __name__)
        expected = shared_token()
        if not expected:
            log.error("no XIAOZHI_RASA_TOKEN (or XIAOZHI_RASA_TOKEN_FILE): the xiaozhi channel refuses every request")

        @webhook.listener("after_server_start")
        async def warm_up(app, _loop) -> None:
            """The first parse pays for jieba's dictionary and the classifier's first call (about a
            second here): pay it at start-up, not with the first resident's question. NLU only: no
            conversation is created."""
            agent = getattr(app.ctx, "agent", None)
            if agent is None or not agent.is_ready():
                return
            started = time.perf_counter()
            try:
                await agent.parse_message(WARM_UP_TEXT)
            except Exception:  # noqa: BLE001 — a failed warm-up only means the first turn is slower
                log.warning("xiaozhi channel: warm-up parse failed", exc_info=True)
            else:
                log.info("xiaozhi channel: warmed up (first parse %.0f ms)", (time.perf_counter() - started) * 1000)

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
            summary: Dict[Text, Any] = {}

            def saved(tracker) -> None:
                if tracker.sender_id == sender_id:
                    summary.update(summarise(tracker))

            try:
                with xiaozhi_patches.on_tracker_saved(saved):
                    await on_new_message(
                        UserMessage(text, collector, sender_id, input_channel=self.name(), metadata=body.get("metadata"))
                    )
            except CancelledError:
                log.error("turn for %s timed out", sender_id)
            except Exception:
                log.exception("turn for %s failed", sender_id)
            return response.json({"messages": collector.messages, **summary})

        return webhook
