"""Talks to the Rasa server: sends a resident's turn and turns Rasa's output into bot replies.

Rasa's REST channel returns a message's text and its custom payload as separate items; custom
payloads carry what the hub needs beside the text (spoken form, citations, outcome, steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx

from xiaozhi.log_context import REQUEST_ID_HEADER, request_id

log = logging.getLogger(__name__)

OUTCOMES = ("answered", "clarifying", "abstained", "escalated", "degraded")


class RasaUnavailable(Exception):
    """Rasa did not answer, answered with an error, or answered something unreadable."""


@dataclass
class BotReply:
    text: str
    spoken: str | None = None
    outcome: str = "answered"
    intent: str | None = None
    confidence: float | None = None
    citations: list[dict] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    buttons: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return {
            "spoken": self.spoken or self.text,
            "outcome": self.outcome,
            "intent": self.intent,
            "confidence": self.confidence,
            "citations": self.citations,
            "steps": self.steps,
            "buttons": self.buttons,
            **self.extra,
        }


def replies_from_rasa(items: list[dict]) -> list[BotReply]:
    """Merge Rasa's output items: a custom item without text annotates the reply before it."""
    replies: list[BotReply] = []
    for item in items:
        custom = item.get("custom") if isinstance(item.get("custom"), dict) else None
        if "text" in item and item["text"]:
            replies.append(BotReply(text=item["text"], buttons=item.get("buttons") or []))
        if custom is None:
            continue
        if custom.get("text"):
            replies.append(BotReply(text=custom["text"]))
        if not replies:
            continue
        reply = replies[-1]
        reply.spoken = custom.get("spoken", reply.spoken)
        reply.outcome = custom.get("outcome", reply.outcome)
        reply.citations = custom.get("citations", reply.citations)
        reply.steps = custom.get("steps", reply.steps)
        reply.buttons = custom.get("buttons", reply.buttons)
        for key in ("search", "region", "kb_confidence", "checklist", "answers", "related", "options", "more", "questions", "case"):
            if key in custom:
                reply.extra[key] = custom[key]
    return replies


TOKEN_HEADER = "X-Xiaozhi-Token"  # checked by the channel (bot/rasa_runtime/xiaozhi_channel.py)


class RasaClient:
    def __init__(self, base_url: str, timeout_s: float = 10.0, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # Rasa's HTTP API (/status) takes the token as a query parameter; the channel as a header,
        # which keeps it out of Rasa's access log for every turn.
        self._api_params = {"token": token} if token else None
        headers = {TOKEN_HEADER: token} if token else None
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, headers=headers)

    async def close(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            r = await self._http.get("/status", timeout=2.0, params=self._api_params)
            return r.status_code == 200 and bool(r.json().get("model_file"))
        except (httpx.HTTPError, ValueError):
            return False

    async def send(self, sender: str, text: str, metadata: dict[str, Any]) -> tuple[list[BotReply], dict]:
        """One resident turn: Rasa's replies and what its NLU understood (intent, confidence, slots).

        Rasa answers through the ``xiaozhi`` channel (bot/rasa_runtime/xiaozhi_channel.py) with both
        in one response.
        """
        rid = request_id.get()  # Rasa's side of this turn can be matched with the hub's log lines
        try:
            r = await self._http.post(
                "/webhooks/xiaozhi/webhook", json={"sender": sender, "message": text, "metadata": metadata},
                headers={REQUEST_ID_HEADER: rid} if rid else None,
            )
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RasaUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise RasaUnavailable(f"unexpected webhook answer: {str(body)[:200]}")
        slots = body.get("slots") if isinstance(body.get("slots"), dict) else {}
        understood = {
            "intent": body.get("intent"),
            "confidence": body.get("confidence"),
            "slots": {k: v for k, v in slots.items() if v is not None},
            "paused": bool(body.get("paused", False)),
        }
        replies = replies_from_rasa(body["messages"])
        for reply in replies:
            reply.intent = understood["intent"]
            reply.confidence = understood["confidence"]
        return replies, understood
