"""The log output of every xiaozhi process: one masking handler on the root logger, text or JSON lines.

The masking itself (which numbers are personal, credentials in URLs, the ``MaskingFilter`` every record
goes through) is ``yibao_common.masking``; this module adds the formatters (JSON lines need
python-json-logger, which the Rasa venv does not have) and ``configure_logging``.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter as JsonLineFormatter

from xiaozhi.log_context import LogContextFilter
from xiaozhi.settings import get_settings
from yibao_common.masking import MaskingFilter


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``; inside a request or a conversation's turn the ids come before
    the colon: ``time LEVEL logger [req=… conv=…]: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        ids = [f"{label}={getattr(record, name)}" for label, name in (("req", "request_id"), ("conv", "conversation_id"))
               if getattr(record, name, None)]
        return self._fmt % {**record.__dict__, "context": f" [{' '.join(ids)}]" if ids else ""}


class JsonFormatter(JsonLineFormatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id and
    conversation_id when known, exception (the traceback), stack, and any ``extra=`` fields.

    Everything in it has been through ``MaskingFilter``: the traceback written is the record's
    masked ``exc_text``, never a fresh, unmasked formatting of ``exc_info``.
    """

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception", "stack_info": "stack"},
            timestamp="time",
            json_ensure_ascii=False,
        )

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        exc_info, record.exc_info = record.exc_info, None
        try:
            return super().format(record)
        finally:
            record.exc_info = exc_info

    def process_log_record(self, log_data: dict) -> dict:
        return {"time": log_data.pop("time"), **log_data}  # time first: lines read in order


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Every record goes through one masking handler on the root logger, as text or JSON lines.

    ``fmt``: ``text`` or ``json``; by default the ``log_format`` setting (XIAOZHI_LOG_FORMAT), so every
    process that logs through here (the hub, with or without the SIP line, and ``xiaozhi db``) writes the
    same format.

    uvicorn's own logging config (used when uvicorn is started with its default ``log_config``,
    e.g. ``uvicorn --factory``) gives its loggers their own unmasked handlers and stops them
    propagating; access lines with residents' questions in the query string would bypass the mask.
    """
    if fmt is None:
        fmt = get_settings().log_format
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(MaskingFilter())
    handler.addFilter(LogContextFilter())  # after masking: the ids are plain tokens (xiaozhi/log_context.py)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.disabled = False
        logger.setLevel(logging.NOTSET)  # the root's level decides: a uvicorn started earlier at "warning" left
        # its loggers at WARNING, and the access lines vanished
