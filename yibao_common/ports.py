"""The RTP port range of the phone line as configured: ``XIAOZHI_SIP_RTP_PORTS`` or ``--rtp-ports``.

Checked where the setting is read (xiaozhi/settings.py, so a bad range stops start-up) and by the SIP
demo's command line (``python -m telephony.sip``); telephony's ``UserAgentConfig`` takes the parsed
pair. Here, below both, because neither may import the other's package.
"""

from __future__ import annotations


def parse_port_range(text: str) -> tuple[int, int] | None:
    """``"10000-20000"`` -> (10000, 20000); ``""`` or ``"auto"`` -> None (any free port).

    Raises ``ValueError`` saying what is wrong: a range needs two ports, low <= high, 1024-65535,
    and room for at least one even (RTP) port.
    """
    text = text.strip()
    if text in ("", "auto"):
        return None
    lo, dash, hi = text.partition("-")
    if not dash or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"RTP port range {text!r} is not LOW-HIGH (e.g. 10000-20000), '' or 'auto'")
    low, high = int(lo), int(hi)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"RTP port range {text!r} must lie within 1024-65535 with LOW <= HIGH")
    if low == high and low % 2:
        raise ValueError(f"RTP port range {text!r} holds no even port (RTP uses even ports)")
    return low, high
