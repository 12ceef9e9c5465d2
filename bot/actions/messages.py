"""Builds the custom payloads the hub reads: text, spoken, outcome, citations, steps, buttons."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .voice import voice_fit


def domain_message(domain: Dict[str, Any], name: str) -> Dict[str, Any]:
    """A domain response as a payload, so actions keep dialogue wording in domain.yml."""
    variants = (domain.get("responses") or {}).get(name) or [{}]
    response = variants[0]
    custom = response.get("custom") or {}
    text = response.get("text") or ""
    return {
        "text": text,
        "spoken": custom.get("spoken") or voice_fit(text),
        "outcome": custom.get("outcome", "answered"),
        "buttons": list(response.get("buttons") or []),
    }


def checklist_payload(
    title: str, text: str, spoken: str, steps: List[str], citations: List[Dict[str, Any]],
    region: Optional[str] = None,
) -> Dict[str, Any]:
    """A procedure's summary: the written steps, a checklist the widget renders, the spoken gist."""
    payload: Dict[str, Any] = {
        "text": text,
        "spoken": voice_fit(spoken),
        "outcome": "answered",
        "steps": steps,
        "checklist": {"title": title, "items": steps},
        "citations": citations,
    }
    if region:
        payload["region"] = region
    return payload


def numbered(header: str, steps: List[str]) -> str:
    return header + "\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
