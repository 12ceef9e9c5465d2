"""The hub's knowledge base over HTTP (the KB needs Python 3.11 and torch; actions run on 3.10)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import aiohttp

log = logging.getLogger(__name__)

HUB_URL = os.environ.get("XIAOZHI_HUB_URL", "http://127.0.0.1:8000").rstrip("/")
KB_TIMEOUT = aiohttp.ClientTimeout(total=float(os.environ.get("XIAOZHI_ACTIONS_KB_TIMEOUT_S", "5")))


async def _request(method: str, path: str, **kwargs: Any) -> Optional[Dict[str, Any]]:
    try:
        async with aiohttp.ClientSession(timeout=KB_TIMEOUT) as session:
            async with session.request(method, f"{HUB_URL}{path}", **kwargs) as response:
                if response.status != 200:
                    log.error("knowledge base %s answered HTTP %s", path, response.status)
                    return None
                return await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.error("knowledge base %s failed: %s", path, exc)
        return None


async def _get(path: str, params: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    return await _request("GET", path, params=params)


async def _post(path: str, body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return await _request("POST", path, json=body)


async def answer_question(text: str, region: Optional[str], last_outcome: Optional[str]) -> Optional[Dict[str, Any]]:
    """The hub's answer stage: the knowledge point that answers the question(s) in a message."""
    body: Dict[str, Any] = {"text": text[:4000]}
    if region:
        body["region"] = region
    if last_outcome:
        body["last_outcome"] = last_outcome
    return await _post("/api/kb/answer", body)


async def more_about(entry_id: str, region: Optional[str]) -> Optional[Dict[str, Any]]:
    """The whole entry behind a precise answer, for "详细说说"."""
    return await _get(f"/api/kb/more/{entry_id}", {"region": region} if region else None)


async def get_entry(entry_id: str, region: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A policy entry by id; with a region, the local entry that overrides it there (the hub resolves it)."""
    return await _get(f"/api/kb/entries/{entry_id}", {"region": region} if region else None)
