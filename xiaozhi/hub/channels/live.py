"""A conversation's live events forwarded to a socket: subscribe, pump, unsubscribe, written once.

Used by every WebSocket that follows a conversation: the resident's chat socket, the video page's event
socket, and the agent desk's socket (one ``Following`` per conversation the agent holds).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class Following:
    """``send(event)`` for each live event of ``conversation_id`` from ``start()`` until ``stop()``.

    Also an async context manager. A send that fails (the socket has gone) ends the forwarding; the
    socket's own receive loop notices the disconnection and ends the connection."""

    def __init__(self, conversations, conversation_id: str, send: Callable[[dict], Awaitable[None]]) -> None:
        self.conversations = conversations
        self.conversation_id = conversation_id
        self.send = send
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> "Following":
        self._queue = self.conversations.subscribe(self.conversation_id)
        self._task = asyncio.create_task(self._pump(), name=f"live-{self.conversation_id[:8]}")
        return self

    async def _pump(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            try:
                await self.send(event)
            except Exception as exc:  # the socket went away under us: its receive loop ends the connection
                log.debug("live events of %s no longer deliverable: %r", self.conversation_id, exc)
                return

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._queue is not None:
            self.conversations.unsubscribe(self.conversation_id, self._queue)
            self._queue = None

    async def __aenter__(self) -> "Following":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        self.stop()
