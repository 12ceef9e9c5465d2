"""The hub's knowledge base over HTTP (the KB needs Python 3.11 and torch; actions run on 3.10)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import aiohttp

log = logging.getLogger(__name__)

HUB_URL = os.environ.get("XIAOZHI_HUB_URL", "http://127.0.0.1:8000").rstrip("/")
KB_TIMEOUT = aiohttp.ClientTimeout(total=float(os.environ.get("XIAOZHI_ACTIONS_KB_TIMEOUT_S", "5")))


async def _get(path: str, params: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    try:
        async with aiohttp.ClientSession(timeout=KB_TIMEOUT) as session:
            async with session.get(f"{HUB_URL}{path}", params=params) as response:
                if response.status != 200:
                    log.error("knowledge base %s answered HTTP %s", path, response.status)
                    return None
                return await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.error("knowledge base %s failed: %s", path, exc)
        return None


async def search_knowledge_base(question: str, region: Optional[str], k: int = 3) -> Optional[Dict[str, Any]]:
    params = {"q": question[:500], "k": str(k)}
    if region:
        params["region"] = region
    return await _get("/api/kb/search", params)


async def get_entry(entry_id: str, region: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A policy entry by id; with a region, the local entry that overrides it there (the hub resolves it)."""
    return await _get(f"/api/kb/entries/{entry_id}", {"region": region} if region else None)
