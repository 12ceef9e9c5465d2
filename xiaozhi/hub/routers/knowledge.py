"""Knowledge-base search over HTTP: used by the Rasa action server, the agent console and anyone curious."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from xiaozhi.hub.deps import KnowledgeBase, MaybeKnowledgeBase
from xiaozhi.hub.infra.errors import ApiError

router = APIRouter(prefix="/api/kb", tags=["knowledge base"])


class AnswerRequest(BaseModel):
    """A resident's whole message, as they wrote or said it, and what the dialogue knows."""

    text: str = Field(max_length=4000, description="The message; stories and two questions included")
    region: str | None = Field(None, pattern=r"^\d{6}$", description="The resident's region, once known")
    last_outcome: str | None = Field(None, max_length=20, description="The bot's previous outcome (clarifying...)")


@router.post("/answer")
async def answer(body: AnswerRequest, kb: KnowledgeBase) -> dict:
    """The answer to the question asked: the knowledge point first, related questions, citation, spoken form.

    What the Rasa action server calls for every informational question (knowledge_base/answers.py).
    """
    from knowledge_base.answers import Context

    if kb.answerer is None:
        raise ApiError(503, "kb_loading", "知识库正在加载，请稍后再试。")
    context = Context(region=body.region, last_outcome=body.last_outcome, deployment_region=kb.default_region)
    # answer_shared: the hub usually started this answer while Rasa parsed the message (conversation.py)
    reply = await asyncio.to_thread(kb.answerer.answer_shared, body.text, context)
    return reply.as_dict()


@router.get("/more/{entry_id}")
async def more(
    kb: KnowledgeBase,
    entry_id: str,
    region: Annotated[str | None, Query(pattern=r"^\d{6}$")] = None,
) -> dict:
    """The whole entry behind a precise answer ("详细说说"): its full answer, steps and citation."""
    reply = kb.answerer.more(entry_id, region) if kb.answerer is not None else None
    if reply is None:
        raise ApiError(404, "entry_not_found", "没有找到这条政策。")
    return reply.as_dict()


@router.get("/search")
async def search(
    kb: KnowledgeBase,
    q: Annotated[str, Query(min_length=1, max_length=500, description="The question")],
    region: Annotated[str | None, Query(pattern=r"^\d{6}$")] = None,
    k: Annotated[int, Query(ge=1, le=20)] = 5,
) -> dict:
    result = await asyncio.to_thread(kb.search, q, region=region, k=k)
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
    kb: MaybeKnowledgeBase,
    entry_id: str,
    region: Annotated[str | None, Query(pattern=r"^\d{6}$", description="Return the local entry that applies")] = None,
) -> dict:
    found = kb.entry(entry_id, region) if kb is not None else None
    if found is None:
        raise ApiError(404, "entry_not_found", "没有找到这条政策。")
    return {**found.model_dump(mode="json"), "citation": found.citation()}
