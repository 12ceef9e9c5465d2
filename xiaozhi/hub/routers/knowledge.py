"""Knowledge-base search over HTTP: used by the Rasa action server, the agent console and anyone curious."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request

from xiaozhi.hub.errors import ApiError

router = APIRouter(prefix="/api/kb", tags=["knowledge base"])


async def search_loaded(request: Request, q: str, region: str | None, k: int):
    """The hub's knowledge base searched off the event loop; 503 while it is still loading."""
    kb = request.app.state.knowledge_base
    if kb is None:
        raise ApiError(503, "kb_loading", "知识库正在加载，请稍后再试。")
    return await asyncio.to_thread(kb.search, q, region=region, k=k)


@router.get("/search")
async def search(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=500, description="The question")],
    region: Annotated[str | None, Query(pattern=r"^\d{6}$")] = None,
    k: Annotated[int, Query(ge=1, le=20)] = 5,
) -> dict:
    result = await search_loaded(request, q, region, k)
    out = result.as_dict()
    if result.best is not None:
        entry = result.best.entry
        out["answer"] = {
            "id": entry.id,
            "title": entry.title,
            "spoken": entry.spoken,
            "answer": entry.answer,
            "steps": entry.steps,
            "citation": entry.citation(),
        }
    return out


@router.get("/entries/{entry_id}")
async def entry(
    request: Request,
    entry_id: str,
    region: Annotated[str | None, Query(pattern=r"^\d{6}$", description="Return the local entry that applies")] = None,
) -> dict:
    kb = request.app.state.knowledge_base
    found = kb.entry(entry_id, region) if kb is not None else None
    if found is None:
        raise ApiError(404, "entry_not_found", "没有找到这条政策。")
    return {**found.model_dump(mode="json"), "citation": found.citation()}
