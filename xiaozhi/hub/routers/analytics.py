"""精准分析 for staff (supervisor and up): figures as JSON, a CSV export (masked), the dashboard page,
and Prometheus /metrics for operations."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response

from xiaozhi.hub.deps import Bearer, ClientAddress, HubStore, MaybeKnowledgeBase, Services, SupervisorUser
from xiaozhi.hub.domain import analytics
from xiaozhi.hub.domain.surveys import LOCAL_TZ
from xiaozhi.hub.infra.errors import ApiError

log = logging.getLogger(__name__)
router = APIRouter(tags=["analytics"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "analytics.html"


def _range(date_from: str | None, date_to: str | None) -> analytics.Range:
    today = dt.datetime.now(LOCAL_TZ).date()
    try:
        last = dt.date.fromisoformat(date_to) if date_to else today
        first = dt.date.fromisoformat(date_from) if date_from else last - dt.timedelta(days=6)
        return analytics.Range.of_days(first, last)
    except ValueError as exc:
        msg = str(exc) if any("\u4e00" <= ch <= "\u9fff" for ch in str(exc)) else "日期格式应为 YYYY-MM-DD。"
        raise ApiError(422, "invalid_date_range", msg) from None


DateFrom = Annotated[str | None, Query(alias="from", description="First day, YYYY-MM-DD (Asia/Shanghai)")]
DateTo = Annotated[str | None, Query(alias="to", description="Last day, YYYY-MM-DD (inclusive)")]
RegionQ = Annotated[str | None, Query(pattern=r"^\d{6}$")]
ChannelQ = Annotated[str | None, Query(pattern=r"^(web|phone|video)$")]


class Selection:
    """The date range, region and channel every analytics request filters by, with the data it selects."""

    def __init__(
        self,
        store: HubStore,
        date_from: DateFrom = None,
        date_to: DateTo = None,
        region: RegionQ = None,
        channel: ChannelQ = None,
    ) -> None:
        self.store = store
        self.range = _range(date_from, date_to)
        self.region = region
        self.channel = channel

    async def load(self) -> dict:
        return await analytics.load(self.store, self.range, region=self.region, channel=self.channel)


@router.get("/api/staff/analytics")
async def summary(hub: Services, user: SupervisorUser, selection: Annotated[Selection, Depends()]) -> dict:
    data = await selection.load()
    return await asyncio.to_thread(
        analytics.compute,
        data,
        selection.range,
        low_confidence=hub.settings.kb_abstain_threshold,
        knowledge_base=hub.knowledge_base,
    )


@router.get("/api/staff/analytics/regions")
async def regions(store: HubStore, kb: MaybeKnowledgeBase, user: SupervisorUser) -> dict:
    """The regions the region filter offers (knowledge-base regions and regions conversations came
    from), each with its GB/T 2260 code and Chinese name."""
    items = await analytics.region_options(store, kb)
    return {"regions": items}


@router.get(
    "/api/staff/analytics/export.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "Masked conversations, one row each (UTF-8 with BOM)."}},
)
async def export_csv(hub: Services, user: SupervisorUser, selection: Annotated[Selection, Depends()],
                     client: ClientAddress) -> Response:
    data = await selection.load()
    rng, region, channel = selection.range, selection.region, selection.channel
    await hub.accounts.audit(
        user,
        "analytics.export",
        f"{rng.first_day}..{rng.last_day}",
        {"region": region, "channel": channel, "rows": len(data["conversations"])},
        client=client,
    )
    name = f"xiaozhi-conversations-{rng.first_day}-{rng.last_day}.csv"
    return Response(
        analytics.conversations_csv(data, low_confidence=hub.settings.kb_abstain_threshold),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/staff/analytics", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8")


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
async def metrics(hub: Services, token: Bearer) -> Response:
    """Prometheus text format: HTTP, turns, outcomes, latency, queue, speech, RTP, process (docs/operations.md).

    With ``XIAOZHI_METRICS_TOKEN`` set, only a scraper presenting it as a bearer token gets them."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    expected = hub.settings.metrics_token
    expected = expected.get_secret_value() if expected is not None else ""
    if expected:
        given = token or ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            log.info("/metrics refused: no or wrong bearer token")
            raise ApiError(401, "metrics_token_required", "需要监控令牌。")

    # no database query here: the gauges are cached (xiaozhi/hub/metrics.py)
    return Response(generate_latest(hub.metrics.registry), media_type=CONTENT_TYPE_LATEST)
