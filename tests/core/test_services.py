"""The composition root (xiaozhi/hub/services.py) without FastAPI: what it registers, in which order, and
that one close runs every hook it registered (desk, surveys, metrics, video)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from tests.support.video_clients import an_offer
from xiaozhi.hub.infra.store import Escalation
from xiaozhi.hub.services import HubServices


def run_isolated(coro):
    """A fresh loop in its own thread: a session-wide Playwright may hold the main thread's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _owner(hook) -> str:
    hook = getattr(hook, "func", hook)  # functools.partial
    return type(hook.__self__).__name__


def test_a_close_runs_the_desk_surveys_metrics_and_video_hooks_the_root_registered_in_that_order(
        hub_settings, knowledge_base):
    offer = an_offer()
    settings = hub_settings.model_copy(update={"survey_poll_interval_s": 0})

    async def scenario() -> dict:
        services = HubServices(settings, knowledge_base=knowledge_base)
        await services.start()
        try:
            core = services.conversations
            order = [_owner(hook) for hook in core.closed_hooks]
            observers = [_owner(observer) for observer in core.turn_observers]
            conv, _ = await services.store.create_conversation("web", "330100")
            await core.handle(conv, "医保卡丢了怎么补办")  # Rasa is away here: answered in degraded mode
            await core.escalate(conv, "requested")  # through the desk's queue (use_queue)
            await services.video.resident_offer(conv, offer, "offer", consent=False, client="127.0.0.1")
            live_before = services.video.get(conv.id) is not None
            closed = await core.close(conv, "resident_ended")
            async with services.store.sessions() as s:
                item = (await s.execute(select(Escalation).where(Escalation.conversation_id == conv.id))).scalar_one()
            survey = await services.surveys.for_conversation(conv.id)
            sample = services.metrics.registry.get_sample_value
            return {
                "order": order,
                "observers": observers,
                "closed": closed,
                "live_before": live_before,
                "video_after": services.video.get(conv.id),
                "item": (item.status, item.disposition),
                "survey": survey.status if survey else None,
                "closes": sample("xiaozhi_conversations_closed_total", {"channel": "video", "reason": "resident_ended"}),
                "turns": sample("xiaozhi_turns_total", {"channel": "web"}),
            }
        finally:
            await services.stop()

    out = run_isolated(scenario())
    assert out["order"] == ["AgentDesk", "SurveyService", "HubMetrics", "VideoChannel"]
    assert out["observers"] == ["HubMetrics"]
    assert out["closed"] and out["live_before"]
    assert out["item"] == ("closed", "abandoned")  # desk: the waiting item was abandoned
    assert out["survey"] == "offered"  # surveys: offered in the conversation
    assert out["closes"] == 1.0 and out["turns"] == 1.0  # metrics: the turn and the close counted
    assert out["video_after"] is None  # video: the session hung up


def test_a_started_hub_keeps_numpy_to_one_blas_thread(hub_settings, knowledge_base):
    """OpenBLAS's extra threads spin on the core chat needs after every product (xiaozhi/hub/infra/cpu.py):
    a started hub has one."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    async def scenario() -> set[int]:
        services = HubServices(hub_settings, knowledge_base=knowledge_base)
        await services.start()
        try:
            return blas_threads()
        finally:
            await services.stop()

    threadpool_limits(2, user_api="blas")  # as numpy starts on this two-core machine
    assert blas_threads() == {2}
    assert run_isolated(scenario()) == {1}
