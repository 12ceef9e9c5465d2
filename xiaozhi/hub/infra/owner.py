"""A live video session or phone call is held by one hub replica: requests for it go there.

Media (WebRTC peers, RTP legs) cannot move between processes, so the replica that accepted the
resident's video offer, or the media worker that answered the call, owns the session and writes
its own address (``XIAOZHI_REPLICA_URL``) into the conversation's ``meta["owner"]``. An agent's
offer or a hang-up that the load balancer sends to another replica is checked there (the caller
must be allowed) and then forwarded, with the caller's credentials, to the owner, which checks
again and answers. One hop at most: a forwarded request is never forwarded again.
"""

from __future__ import annotations

import logging

import httpx
from fastapi import Request, Response

from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.store import Conversation

log = logging.getLogger(__name__)

FORWARDED = "x-xiaozhi-forwarded"
FORWARD_TIMEOUT_S = 20.0  # an agent's offer waits for the owner's ICE gathering


def owner_meta(settings) -> dict:
    """What to merge into the conversation's meta when this replica takes the session."""
    return {"owner": settings.effective_replica_url} if settings.replica_url else {}


def elsewhere(settings, conv: Conversation) -> str:
    """The owning replica's address when it is not this one ('' when it is, or with one hub)."""
    owner = (conv.meta or {}).get("owner") or ""
    if not settings.replica_url or not owner or owner == settings.effective_replica_url:
        return ""
    return owner


async def forward(request: Request, owner: str) -> Response:
    """Send this request to the owning replica and answer with its answer."""
    if request.headers.get(FORWARDED):
        log.error("request for %s forwarded to a replica that does not hold it", request.url.path)
        raise ApiError(409, "session_moved", "通话已不在这个服务节点上，请刷新页面后重试。")
    settings = request.app.state.settings
    headers = {name: value for name in ("authorization", "content-type") if (value := request.headers.get(name))}
    headers[FORWARDED] = settings.effective_replica_url
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S) as client:
            answer = await client.request(
                request.method, owner.rstrip("/") + request.url.path,
                params=request.query_params, content=await request.body(), headers=headers,
            )
    except httpx.HTTPError as exc:
        log.warning("owner replica %s of %s unreachable: %s", owner, request.url.path, exc)
        raise ApiError(503, "owner_unreachable", "通话所在的服务节点暂时连不上，请稍后再试。") from None
    log.info("%s %s forwarded to its owner %s -> %d", request.method, request.url.path, owner, answer.status_code)
    return Response(answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))
