"""Prometheus /metrics (xiaozhi/hub/metrics.py, telephony/metrics.py) read from real scrapes of a hub:
process and GC collectors, HTTP duration by route template, turns and containment, gauges that cost no
query per scrape, one real phone call for the speech and RTP figures, and the Grafana dashboard's
PromQL against the names a scrape really has (deploy/grafana/xiaozhi.json)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from tests.support import DATABASES, make_staff, open_session
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from telephony.media_stream import MediaStream
from telephony.g711 import G711Codec

DASHBOARD = Path(__file__).resolve().parent.parent.parent / "deploy" / "grafana" / "xiaozhi.json"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """A scrape as {(sample name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def eventually(client, predicate, timeout: float = 10.0) -> str:
    """Scrape until ``predicate(text)`` holds (the database-backed gauges are counted in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        if predicate(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


class SqlCounter:
    """Every statement the hub's database engine runs, via SQLAlchemy's ``before_cursor_execute``."""

    def __init__(self, app: FastAPI) -> None:
        self.engine = app.state.store.engine.sync_engine
        self.statements: list[str] = []

    def _seen(self, conn, cursor, statement, *args) -> None:
        self.statements.append(statement)

    def __enter__(self) -> SqlCounter:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """The queue and containment tests run on SQLite and PostgreSQL (conftest.py); the others say sqlite."""
    return request.param


@pytest.mark.parametrize("database_backend", ["sqlite"])  # nothing here depends on the database
def test_a_scrape_has_process_gc_and_platform_collectors(hub) -> None:
    text = hub.get("/metrics").text
    have = names(text)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_gc_collections_total", "python_gc_objects_collected_total", "python_info"):
        assert name in have, name
    assert value(text, "process_resident_memory_bytes") > 50e6  # a hub with its knowledge base loaded


@pytest.mark.parametrize("database_backend", ["sqlite"])  # nothing here depends on the database
def test_http_requests_are_timed_by_route_template_and_status_class(hub_settings, knowledge_base) -> None:
    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings, knowledge_base=knowledge_base)

    @app.get("/api/test-only/{thing_id}/boom")
    async def boom(thing_id: str) -> None:
        raise RuntimeError("a bug in a route")

    with TestClient(app, raise_server_exceptions=False) as client:
        sid, auth = open_session(client)
        for _ in range(2):
            assert client.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"},
                               headers=auth).status_code == 200
        assert client.get(f"/api/sessions/{sid}/messages", headers=auth).status_code == 200
        assert client.get("/api/sessions/abc123-no-such-session/messages", headers=auth).status_code == 403
        assert client.get("/no/such/page/secret-token-1234").status_code == 404
        assert client.get("/static/no-such-file.css").status_code == 404
        assert client.get("/api/test-only/42/boom").status_code == 500
        text = client.get("/metrics").text
    count = "xiaozhi_http_request_duration_seconds_count"
    template = "/api/sessions/{session_id}/messages"
    assert value(text, count, method="POST", route=template, status="2xx") == 2
    assert value(text, count, method="GET", route=template, status="2xx") == 1
    assert value(text, count, method="GET", route=template, status="4xx") == 1
    assert value(text, count, method="POST", route="/api/sessions", status="2xx") == 1
    assert value(text, count, method="GET", route="unmatched", status="4xx") == 1
    assert value(text, count, method="GET", route="/static", status="4xx") == 1
    assert value(text, count, method="GET", route="/api/test-only/{thing_id}/boom", status="5xx") == 1
    # no id, token or raw path ever becomes a label
    assert sid not in text and "secret-token" not in text and "abc123" not in text and "/42/" not in text


@pytest.mark.parametrize("database_backend", ["sqlite"])  # nothing here depends on the database
def test_a_request_refused_before_routing_is_timed_as_unmatched(hub_settings, knowledge_base) -> None:
    """The body limit answers 413 before any route runs: counted, under the one label for no route."""
    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings.model_copy(update={"max_body_bytes": 1000}), knowledge_base=knowledge_base)
    with TestClient(app) as client:
        sid, auth = open_session(client)
        refused = client.post(f"/api/sessions/{sid}/messages", content=b"{" + b" " * 5000 + b"}",
                              headers={**auth, "content-type": "application/json"})
        assert refused.status_code == 413
        text = client.get("/metrics").text
    assert value(text, "xiaozhi_http_request_duration_seconds_count", method="POST",
                 route="unmatched", status="4xx") == 1
    assert sid not in text


def test_turns_outcomes_and_containment_are_counted(hub) -> None:
    sid, auth = open_session(hub)
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "好的，谢谢"}, headers=auth)
    hub.post(f"/api/sessions/{sid}/close", headers=auth)
    other, auth2 = open_session(hub)
    hub.post(f"/api/sessions/{other}/messages", json={"text": "转人工"}, headers=auth2)
    hub.post(f"/api/sessions/{other}/close", headers=auth2)
    silent, auth3 = open_session(hub)  # nothing asked: not in the containment figures
    hub.post(f"/api/sessions/{silent}/close", headers=auth3)
    text = hub.get("/metrics").text
    assert value(text, "xiaozhi_turns_total", channel="web") == 3
    assert value(text, "xiaozhi_bot_outcomes_total", channel="web", outcome="escalated") == 1
    assert value(text, "xiaozhi_turn_latency_seconds_count", channel="web") == 3
    assert value(text, "xiaozhi_conversations_closed_total", channel="web", reason="resident_ended") == 3
    resolved = {dict(labels)["resolution"]: v for (name, labels), v in samples(text).items()
                if name == "xiaozhi_conversations_resolved_total"}
    # thanked after the answer: confirmed; left in the queue: abandoned (as 精准分析 classifies them)
    assert resolved == {"confirmed": 1.0, "abandoned": 1.0}, resolved


def test_gauges_follow_the_queue_and_a_scrape_runs_no_sql(hub_settings, knowledge_base) -> None:
    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings, knowledge_base=knowledge_base)
    app.state.metrics.refresh_s = 3600  # only events trigger a count here: nothing runs behind the scrapes
    with TestClient(app) as client:
        agent = make_staff(client, "zhang", "agent")
        sid, auth = open_session(client)
        with SqlCounter(app) as sql:
            client.post(f"/api/sessions/{sid}/messages", json={"text": "转人工"}, headers=auth)
        assert sql.statements, "the counter sees the hub's queries"
        text = eventually(client, lambda t: value(t, "xiaozhi_escalation_queue_length") == 1)
        assert value(text, "xiaozhi_escalation_queue_length") == 1
        # a scrape reads the cached values: not one statement, however often Prometheus comes
        with SqlCounter(app) as sql:
            for _ in range(5):
                assert value(client.get("/metrics").text, "xiaozhi_escalation_queue_length") == 1
        assert sql.statements == []
        assert value(text, "xiaozhi_escalation_oldest_wait_seconds") >= 0
        assert value(text, "xiaozhi_metrics_gauges_refreshed_timestamp_seconds") > time.time() - 60
        # an agent takes it: the queue empties and the wait is observed once
        [item] = client.get("/api/agent/queue", headers=agent).json()["items"]
        assert client.post(f"/api/agent/queue/{item['id']}/claim", headers=agent).status_code == 200
        text = eventually(client, lambda t: value(t, "xiaozhi_escalation_queue_length") == 0)
        assert value(text, "xiaozhi_escalation_queue_length") == 0
        assert value(text, "xiaozhi_queue_wait_seconds_count", channel="web") == 1
        # a second resident leaves while waiting; both conversations close: each is offered a survey
        other, auth2 = open_session(client)
        client.post(f"/api/sessions/{other}/messages", json={"text": "转人工"}, headers=auth2)
        eventually(client, lambda t: value(t, "xiaozhi_escalation_queue_length") == 1)
        client.post(f"/api/sessions/{other}/close", headers=auth2)
        client.post(f"/api/agent/queue/{item['id']}/close", json={"disposition": "resolved"}, headers=agent)
        client.post(f"/api/sessions/{sid}/close", headers=auth)
        text = eventually(client, lambda t: value(t, "xiaozhi_escalation_queue_length") == 0
                          and value(t, "xiaozhi_surveys_open", status="offered") == 2)
        assert value(text, "xiaozhi_escalation_queue_length") == 0
        assert value(text, "xiaozhi_escalation_oldest_wait_seconds") == 0
        assert value(text, "xiaozhi_surveys_open", status="offered") == 2, text
        assert value(text, "xiaozhi_queue_wait_seconds_count", channel="web") == 1  # the abandoned wait is not
        assert value(text, "xiaozhi_active_calls") == 0 and value(text, "xiaozhi_active_video_sessions") == 0


def test_live_conversations_are_counted_by_channel_and_status_and_closed_ones_leave(hub_settings, knowledge_base) -> None:
    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings, knowledge_base=knowledge_base)
    app.state.metrics.refresh_s = 3600  # counted only when the test says so

    def live(client) -> dict[tuple[str, str], float]:
        client.portal.call(app.state.metrics.refresh, app.state.store)
        return {(dict(labels)["channel"], dict(labels)["status"]): v for (name, labels), v
                in samples(client.get("/metrics").text).items() if name == "xiaozhi_conversations_live" and v}

    with TestClient(app) as client:
        quiet, auth = open_session(client)
        waiting, auth2 = open_session(client)
        client.post(f"/api/sessions/{waiting}/messages", json={"text": "转人工"}, headers=auth2)
        assert live(client) == {("web", "open"): 1, ("web", "escalated"): 1}
        client.post(f"/api/sessions/{waiting}/close", headers=auth2)
        assert live(client) == {("web", "open"): 1}
        client.post(f"/api/sessions/{quiet}/close", headers=auth)
        assert live(client) == {}  # back to 0, not stuck at the last count


def test_rtp_jitter_follows_rfc_3550() -> None:
    """J += (|D| - J)/16: packets 20 ms apart in RTP time arriving alternately 10 and 30 ms apart
    converge on 10 ms; evenly spaced ones keep it at 0; a clock jump is not jitter."""
    stream = MediaStream(codec=G711Codec("PCMU"), dtmf_payload_type=None, remote=None,
                         on_audio=lambda f: None, on_dtmf=lambda d: None)
    now, ts = 100.0, 0xFFFFFF00  # the RTP timestamp wraps mid-way
    for _ in range(50):
        stream._jitter(now, ts & 0xFFFFFFFF)
        now, ts = now + 0.020, ts + 160
    assert stream.stats.jitter_s < 1e-9
    for i in range(400):
        stream._jitter(now, ts & 0xFFFFFFFF)
        now, ts = now + (0.010 if i % 2 else 0.030), ts + 160
    assert stream.stats.jitter_s == pytest.approx(0.010, abs=5e-4)
    stream._jitter(now + 5.0, ts & 0xFFFFFFFF)  # 5 s of arrival for 20 ms of audio: a restart, skipped
    assert stream.stats.max_jitter_s == pytest.approx(0.010, abs=5e-4)


# -- the Grafana dashboard --------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, label matchers, grouping and ranges removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    tokens = [m.group() for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
              if not expr[m.end():].lstrip().startswith("(")]  # a function's name
    return {t for t in tokens if t.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d.*", t)}


def test_the_dashboard_parses_and_has_the_panels_on_call_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for needed in ("turn latency", "自助解决率", "queue wait", "5xx", "ASR", "TTS", "active calls", "video",
                   "RTP loss", "jitter", "CPU", "memory"):
        assert needed.lower() in titles.lower(), (needed, titles)
    exprs = dashboard_exprs()
    assert len(exprs) >= 12 and all(metric_names(e) for e in exprs)
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(xiaozhi_x_bucket{channel="web"}[5m])))') \
        == {"xiaozhi_x_bucket"}


# -- one real phone call: speech recognition, synthesis, RTP, turn latency ---------------------------
needs_whisper = pytest.mark.skipif(
    __import__("importlib").util.find_spec("faster_whisper") is None, reason="faster-whisper not installed")


@needs_whisper
@pytest.mark.parametrize("database_backend", ["sqlite"])  # one call
async def test_a_phone_call_fills_the_speech_and_rtp_metrics_and_the_dashboard_reads_only_real_names(
        settings, hub_settings, knowledge_base, tmp_path) -> None:
    from tests.support.phone import phone_hub, placed_call, transcript_then_hang_up, trimmed, until_heard, until_quiet

    from telephony.noise import BadLine

    cache = tmp_path / "cache"  # an empty TTS cache: the prompts and the answer are rendered in this test
    cache.mkdir()
    (cache / "models").symlink_to(settings.cache_dir / "models")
    # espeak: quick to render every prompt into the empty cache (Kokoro is timed the same way, by engine)
    local = hub_settings.model_copy(update={"cache_dir": cache, "tts_kind": "pyttsx3"})
    line = BadLine(loss=0.03, seed=3)
    async with phone_hub(local, knowledge_base) as app:
        scrape = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub")
        async with placed_call(app) as (peer, call, rtp):
            assert value((await scrape.get("/metrics")).text, "xiaozhi_active_calls") == 1
            rtp.line = line
            await until_quiet(rtp)
            sent = await rtp.say(trimmed("02_yidi_beian"))
            assert await until_heard(rtp, sent)
            await until_quiet(rtp)
            rtp.line = None
            await rtp.pause(0.2)  # packets after the last loss: the receiver gives up waiting for it
            session = next(iter(app.state.phone.bot.sessions.values()))
            stats = session.call.media.stats
            live = (await scrape.get("/metrics")).text  # the call's loss is visible before it ends
            assert value(live, "xiaozhi_rtp_live_loss_ratio") == pytest.approx(
                stats.lost / (stats.lost + stats.audio_received)) and stats.lost > 0
            assert value(live, "xiaozhi_rtp_live_jitter_seconds") == pytest.approx(stats.jitter_s, abs=0.005)
            await transcript_then_hang_up(app, peer, call)
        await until_no_calls(app)
        # a chat turn too, so every family the dashboard reads has samples
        created = (await scrape.post("/api/sessions", json={})).json()
        await scrape.post(f"/api/sessions/{created['session_id']}/messages", json={"text": "异地就医怎么备案"},
                          headers={"Authorization": f"Bearer {created['token']}"})
        text = (await scrape.get("/metrics")).text
        await scrape.aclose()
    assert value(text, "xiaozhi_active_calls") == 0 and value(text, "xiaozhi_rtp_live_loss_ratio") == 0
    assert value(text, "xiaozhi_asr_duration_seconds_count", engine="whisper") >= 1
    assert value(text, "xiaozhi_asr_duration_seconds_sum", engine="whisper") > 0
    assert value(text, "xiaozhi_tts_duration_seconds_count", engine="pyttsx3-espeak") >= 2  # prompts + answer
    assert value(text, "xiaozhi_phone_turn_latency_seconds_count") == 1
    assert 0.2 < value(text, "xiaozhi_phone_turn_latency_seconds_sum") < 30
    # the one call's loss as the line caused it (the reorder buffer's count), and some jitter
    assert value(text, "xiaozhi_rtp_loss_ratio_count") == 1
    assert line.lost > 0 and stats.lost == line.lost, (stats.lost, line.lost)
    assert value(text, "xiaozhi_rtp_loss_ratio_sum") == pytest.approx(line.lost / (stats.audio_received + line.lost))
    assert value(text, "xiaozhi_rtp_jitter_seconds_count") == 1
    assert 0 < value(text, "xiaozhi_rtp_jitter_seconds_sum") < 0.2
    assert value(text, "xiaozhi_turns_total", channel="phone") == 1
    # every metric the dashboard's PromQL reads is in this scrape: a renamed metric fails here
    have = names(text)
    missing = {(name, expr) for expr in dashboard_exprs() for name in metric_names(expr) if name not in have}
    assert not missing, missing


async def until_no_calls(app, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while app.state.phone.live_conversations() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not app.state.phone.live_conversations()

