"""Health and readiness for orchestrators and load balancers: /healthz (the process is up) and /readyz."""

from __future__ import annotations

import math

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from xiaozhi.hub.deps import MaybeKnowledgeBase, Services

router = APIRouter(tags=["operations"])
NEARLY_FULL = 0.9  # share of the hotline's call slots at which /readyz reports it nearly full


def hotline_slots(in_use: int, capacity: int) -> dict:
    """The hotline's call slots as /readyz reports them."""
    return {"calls": in_use, "max_calls": capacity, "free": max(0, capacity - in_use),
            "nearly_full": in_use >= max(1, math.ceil(NEARLY_FULL * capacity))}


@router.get("/healthz")
async def healthz() -> dict:
    """The hub process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(hub: Services, kb: MaybeKnowledgeBase) -> JSONResponse:
    """Ready to answer: knowledge base loaded; reports whether Rasa answers (degraded mode if not) and,
    where the hotline runs, how many of its call slots are taken (``nearly_full`` from 90 %)."""
    rasa_ready = await hub.rasa.healthy()
    body = {"knowledge_base": kb is not None, "rasa": rasa_ready, "degraded": not rasa_ready}
    user_agent = hub.phone.user_agent if hub.phone is not None else None
    if user_agent is not None:
        body["phone"] = hotline_slots(user_agent.slots_in_use, user_agent.config.max_calls)
    return JSONResponse(body, status_code=200 if kb is not None else 503)
