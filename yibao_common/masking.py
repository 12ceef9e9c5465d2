"""Masking of personal numbers in logs, analytics and exports: 身份证号, phone, bank and insurance cards.

Only what looks like a real number is masked: an 18-digit ID must pass its GB 11643 checksum and a
bank card the Luhn check, so policy figures such as "300000元" stay readable.

Numbers spoken to the phone recogniser come out as Chinese numerals (一三八一二三四五六七八, 幺, 零/〇)
or full-width digits: such runs are read as digits, checked by the same rules and masked in place.
Log lines get more (``mask_log_text``): credentials in query strings (``?token=``) are hidden and
percent-encoded URLs are masked in their decoded form. ``MaskingFilter`` applies both to every
record a ``logging`` handler writes; the hub's formatters and ``configure_logging`` are in xiaozhi/logs.py.

Standard library only (yibao_common's rule): the Rasa venv's action server may mask with it too.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, unquote_plus

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_RE_ID = re.compile(r"(?<![0-9A-Za-z])(\d{17}[\dXx])(?![0-9A-Za-z])")
_RE_MOBILE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?(1[3-9]\d)[- ]?(\d{4})[- ]?(\d{4})(?!\d)")
_RE_LANDLINE = re.compile(r"(?<!\d)(0\d{2,3})[- ]?(\d{7,8})(?!\d)")
# 13-19 digits, optionally grouped by single spaces or hyphens (6222 0212 3456 7890 128, 6222-0212-...).
_RE_CARD = re.compile(r"(?<!\d)(\d(?:[ -]?\d){12,18})(?!\d)")
# First-generation (15-digit) identity number: region, YYMMDD, sequence; no checksum, so the region
# and the date must be plausible.
_RE_ID15 = re.compile(r"(?<![0-9A-Za-z])([1-8]\d{5}\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3})(?![0-9A-Za-z])")

# Digits as a speech recogniser or a full-width keyboard writes them.
_SPOKEN_DIGITS = {
    **{c: "0" for c in "零〇○０"},
    **{c: "1" for c in "一幺壹１"},
    **{c: "2" for c in "二两贰２"},
    **{c: "3" for c in "三叁３"},
    **{c: "4" for c in "四肆４"},
    **{c: "5" for c in "五伍５"},
    **{c: "6" for c in "六陆６"},
    **{c: "7" for c in "七柒７"},
    **{c: "8" for c in "八捌８"},
    **{c: "9" for c in "九玖９"},
}
_DIGIT_CLASS = "[0-9" + "".join(_SPOKEN_DIGITS) + "]"
# A run of digits of any spelling, single spaces or hyphens between them, an ID's final X allowed.
# Place-value characters (十百千万亿) end a run, so amounts such as 一千五百元 are never digits here.
_RE_DIGIT_RUN = re.compile(rf"{_DIGIT_CLASS}(?:[ \-]?{_DIGIT_CLASS})*[XxＸｘ]?")
# Social-security / medical-insurance card numbers: a letter prefix and 8+ digits (e.g. A12345678).
_RE_SSC = re.compile(r"(?<![0-9A-Za-z])([A-Za-z]{1,2}\d{8,12})(?![0-9A-Za-z])")


def id_number_is_valid(number: str) -> bool:
    """GB 11643-1999 checksum of an 18-character resident identity number."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_is_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_id(m: re.Match) -> str:
    number = m.group(1)
    if not id_number_is_valid(number):
        return number
    return number[:6] + "*" * 8 + number[14:]  # keeps the region code and the last 4 for support


def _mask_card(m: re.Match) -> str:
    raw = m.group(1)
    digits = raw.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or not luhn_is_valid(digits):
        return raw
    return digits[:4] + "*" * (len(digits) - 8) + digits[-4:]


def _mask_spoken_run(m: re.Match) -> str:
    run = m.group(0)
    if run.isascii():
        return run  # plain ASCII digits: the ordinary rules see them as they are
    digits = "".join(_SPOKEN_DIGITS.get(c, c) for c in run if c not in " -")
    digits = digits.replace("Ｘ", "X").replace("ｘ", "x")
    if sum(c.isdigit() for c in digits) < 7:  # 一二三, 二〇二四: too short for any personal number
        return run
    masked = _mask_digits(digits)
    return run if masked == digits else masked


def _mask_digits(text: str) -> str:
    text = _RE_ID.sub(_mask_id, text)
    text = _RE_ID15.sub(lambda m: m.group(1)[:6] + "*" * 6 + m.group(1)[12:], text)
    text = _RE_MOBILE.sub(lambda m: f"{m.group(1)}****{m.group(3)}", text)
    text = _RE_CARD.sub(_mask_card, text)
    text = _RE_LANDLINE.sub(lambda m: f"{m.group(1)}-****{m.group(2)[-2:]}", text)
    return text


def mask_pii(text: str) -> str:
    """Mask every personal number found in ``text``; everything else is left as it was."""
    if not text:
        return text
    text = _RE_DIGIT_RUN.sub(_mask_spoken_run, text)
    text = _mask_digits(text)
    text = _RE_SSC.sub(lambda m: m.group(1)[:2] + "*" * (len(m.group(1)) - 4) + m.group(1)[-2:], text)
    return text


# Query parameters and headers that carry a credential: their values never reach a log.
_SECRET_NAMES = (
    "token|access_token|refresh_token|id_token|session_token|auth|authorization|api_key|apikey|"
    "password|passwd|secret|client_secret|credential|credentials|signature|sig"
)
_RE_SECRET_PARAM = re.compile(rf"(?i)((?:^|[?&;\s])(?:{_SECRET_NAMES})=)([^&;\s\"'#]+)")
_RE_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
# The password of a URL: postgresql+asyncpg://user:PASSWORD@host/db, redis://:PASSWORD@host:6379/2.
_RE_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@", re.IGNORECASE)
# Something percent-encoded: a path or query as an access log writes it.
_RE_URLISH = re.compile(r"[^\s\"'<>]*%[0-9A-Fa-f]{2}[^\s\"'<>]*")
_URL_SAFE = "/?&=:;,@!$'()*+~#"


def mask_secrets(text: str) -> str:
    """``?token=abc`` → ``?token=***``, ``Bearer abc`` → ``Bearer ***``, ``://user:pw@`` → ``://user:***@``."""
    text = _RE_SECRET_PARAM.sub(lambda m: m.group(1) + "***", text)
    text = _RE_URL_PASSWORD.sub(lambda m: m.group(1) + "***@", text)
    return _RE_BEARER.sub(lambda m: m.group(1) + "***", text)


def _mask_url(m: re.Match) -> str:
    raw = m.group(0)
    decoded = unquote_plus(raw, errors="replace")
    masked = mask_secrets(mask_pii(decoded))
    if masked == decoded:
        return raw
    return quote(masked, safe=_URL_SAFE)  # still one token, as the access log wrote it


def mask_log_text(text: str) -> str:
    """``mask_pii`` plus what only logs hold: credentials, and numbers hidden by percent-encoding."""
    if not text:
        return text
    text = _RE_URLISH.sub(_mask_url, text)
    return mask_pii(mask_secrets(text))


_TRACEBACKS = logging.Formatter()
# What every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _masked_value(value):
    """Strings inside an ``extra=`` value, masked; dicts and lists are walked, other values kept."""
    if isinstance(value, str):
        return mask_log_text(value)
    if isinstance(value, dict):
        return {key: _masked_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked_value(item) for item in value]
    return value


class MaskingFilter(logging.Filter):
    """Applied to every handler, so no log line ever holds a resident's numbers or a credential.

    The message, the formatted traceback (``log.exception``), ``stack_info`` and the values of
    ``extra=`` fields (which JSON lines carry) are all masked.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                record.msg = record.getMessage()
            except Exception:  # a malformed log call must not lose the record
                record.msg = f"{record.msg} {record.args!r}"
            record.args = None
        record.msg = mask_log_text(str(record.msg))
        record.__dict__.pop("color_message", None)  # uvicorn's unmasked copy for its own formatter
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the masked text is what gets written.
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_log_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_log_text(record.stack_info)
        for key in record.__dict__.keys() - _RECORD_ATTRIBUTES:
            record.__dict__[key] = _masked_value(record.__dict__[key])
        return True
