"""Phone numbers in telephony logs: callers' numbers are personal data, so logs show them masked."""

from __future__ import annotations

import re

_LONG_NUMBER = re.compile(r"\+?\d{7,}")


def mask_number(number: str) -> str:
    """Keep the first three and last two digits of a number of 7+ digits (13812345678 -> 138******78).

    Short service numbers (12393, 110) are not personal and stay readable.
    """
    return _LONG_NUMBER.sub(lambda m: m.group(0)[:3] + "*" * (len(m.group(0)) - 5) + m.group(0)[-2:], number)


def mask_sip_text(text: str) -> str:
    """A SIP message or URI with every long digit run masked, for debug logs."""
    return mask_number(text)
