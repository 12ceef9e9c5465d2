"""Masking of personal numbers in logs, analytics and exports: 身份证号, phone, bank and insurance cards.

Only what looks like a real number is masked: an 18-digit ID must pass its GB 11643 checksum and a
bank card the Luhn check, so policy figures such as "300000元" stay readable.
"""

from __future__ import annotations

import logging
import re

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_RE_ID = re.compile(r"(?<![0-9A-Za-z])(\d{17}[\dXx])(?![0-9A-Za-z])")
_RE_MOBILE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?(1[3-9]\d)[- ]?(\d{4})[- ]?(\d{4})(?!\d)")
_RE_LANDLINE = re.compile(r"(?<!\d)(0\d{2,3})[- ]?(\d{7,8})(?!\d)")
_RE_CARD = re.compile(r"(?<!\d)(\d[\d ]{11,22}\d)(?!\d)")
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
    digits = raw.replace(" ", "")
    if not 13 <= len(digits) <= 19 or not luhn_is_valid(digits):
        return raw
    return digits[:4] + "*" * (len(digits) - 8) + digits[-4:]


def mask_pii(text: str) -> str:
    """Mask every personal number found in ``text``; everything else is left as it was."""
    if not text:
        return text
    text = _RE_ID.sub(_mask_id, text)
    text = _RE_MOBILE.sub(lambda m: f"{m.group(1)}****{m.group(3)}", text)
    text = _RE_CARD.sub(_mask_card, text)
    text = _RE_LANDLINE.sub(lambda m: f"{m.group(1)}-****{m.group(2)[-2:]}", text)
    text = _RE_SSC.sub(lambda m: m.group(1)[:2] + "*" * (len(m.group(1)) - 4) + m.group(1)[-2:], text)
    return text


class MaskingFilter(logging.Filter):
    """Applied to every handler, so no log line ever holds a resident's numbers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                record.msg = record.getMessage()
            except Exception:  # a malformed log call must not lose the record
                record.msg = f"{record.msg} {record.args!r}"
            record.args = None
        record.msg = mask_pii(str(record.msg))
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
