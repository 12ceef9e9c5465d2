"""Request fields shared by several routers."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("消息不能为空")
    return value


# A chat message from a resident or an agent: surrounding whitespace removed, never empty.
MessageText = Annotated[str, AfterValidator(_not_blank)]
