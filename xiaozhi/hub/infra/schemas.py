"""Request fields shared by several routers, and the one cleaning every stored text goes through."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator

REPLACEMENT = "\ufffd"
# A str decoded from JSON can hold what no database or UTF-8 encoder accepts: NUL (PostgreSQL refuses
# it in text) and lone surrogates ("\ud800": not encodable at all; pairs are joined by the decoder).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_EDGES = re.compile("^[\\s\u200b-\u200d\u2060\ufeff]+|[\\s\u200b-\u200d\u2060\ufeff]+$")


def clean_stored(value: str) -> str:
    """``value`` with NUL and lone surrogates as U+FFFD, otherwise unchanged."""
    return _UNSTORABLE.sub(REPLACEMENT, value) if _UNSTORABLE.search(value) else value


def clean_text(value: str) -> str:
    """``value`` as it can be stored and sent on: NUL and lone surrogates become U+FFFD (nothing else
    the resident wrote is dropped), surrounding whitespace and zero-width characters removed."""
    return _EDGES.sub("", clean_stored(value))


def has_content(value: str) -> bool:
    """Whether a text says anything: not only whitespace, zero-width/format or control characters."""
    return any(
        not (ch.isspace() or ch == REPLACEMENT or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"))
        for ch in value
    )


def _message(value: str) -> str:
    value = clean_text(value)
    if not has_content(value):
        raise ValueError("消息不能为空")
    return value


def message_problem(value: Any) -> tuple[str, str] | None:
    """Why a WebSocket frame's ``text`` is unusable, as (error code, 中文说明); None when it is fine."""
    if not isinstance(value, str):
        return "invalid_message", "消息必须是文字。"
    if not has_content(clean_text(value)):
        return "empty_message", "消息不能为空。"
    return None


# A chat message from a resident or an agent: cleaned (``clean_text``), never empty or invisible.
MessageText = Annotated[str, AfterValidator(_message)]
