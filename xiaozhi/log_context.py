"""Request and conversation ids on every log line, so one resident can be followed across the services.

- ``RequestIdMiddleware`` (installed outermost in the hub) takes the caller's ``X-Request-ID`` when it
  is a plain token (at most 64 characters of ``[A-Za-z0-9._-]`` that the log mask leaves alone), else
  makes one (uuid4 hex); it holds it in a context variable while the request (or WebSocket) is handled
  and returns it as a response header. The hub passes it on to Rasa (xiaozhi/hub/infra/rasa_client.py).
- ``bind_conversation`` / ``conversation_scope`` name the conversation being handled (chat turn, phone
  turn, video session, desk action on a conversation).
- ``LogContextFilter`` (on the log handler, see xiaozhi/logs.py ``configure_logging``) copies both
  onto each record as ``request_id`` and ``conversation_id`` when they are set.

Context variables follow asyncio tasks (a task started while handling a request inherits them) and
``asyncio.to_thread``; they are reset when the request ends.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from yibao_common.masking import mask_log_text

REQUEST_ID_HEADER = "X-Request-ID"
request_id: ContextVar[str | None] = ContextVar("xiaozhi_request_id", default=None)
conversation_id: ContextVar[str | None] = ContextVar("xiaozhi_conversation_id", default=None)

_ACCEPTABLE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_request_id() -> str:
    """A uuid4 in hex, one the log mask leaves whole (a run of digits in it could look like a phone number)."""
    while True:
        rid = uuid.uuid4().hex
        if mask_log_text(rid) == rid:
            return rid


def accepted_request_id(value: str | None) -> str:
    """The caller's id when it is a plain token of at most 64 characters; otherwise a new one.

    A value the mask would change (a phone or card number sent as the id) is replaced too: the id must
    read the same in the log and in the response header, and must never carry personal numbers.
    """
    if value is not None and _ACCEPTABLE.fullmatch(value) and mask_log_text(value) == value:
        return value
    return new_request_id()


def bind_conversation(conversation: str | None) -> None:
    """Name the conversation this request (or task) is handling, until the request ends."""
    conversation_id.set(conversation)


@contextmanager
def conversation_scope(conversation: str) -> Iterator[None]:
    """Name the conversation for the duration of a block (a phone turn, a background task's work)."""
    token = conversation_id.set(conversation)
    try:
        yield
    finally:
        conversation_id.reset(token)


class RequestIdMiddleware:
    """Pure ASGI: an id for each HTTP request and WebSocket, in a context variable and a response header."""

    _SENT_WITH_HEADERS = ("http.response.start", "websocket.accept", "websocket.http.response.start")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        rid = accepted_request_id(given)
        header = (b"x-request-id", rid.encode("ascii"))

        async def send_with_id(message) -> None:
            if message["type"] in self._SENT_WITH_HEADERS:
                message = {**message, "headers": [*(message.get("headers") or ()), header]}
            await send(message)

        request_token = request_id.set(rid)
        conversation_token = conversation_id.set(None)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            conversation_id.reset(conversation_token)
            request_id.reset(request_token)


class LogContextFilter(logging.Filter):
    """Puts ``request_id`` and ``conversation_id`` on the record when they are known."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid, conv = request_id.get(), conversation_id.get()
        if rid is not None:
            record.request_id = rid
        if conv is not None:
            record.conversation_id = conv
        return True
