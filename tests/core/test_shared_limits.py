"""Rate limits shared by hub replicas through Redis (XIAOZHI_RATE_LIMIT_REDIS_URL), on a real redis-server.

Behind the deployment's load balancer one client's requests reach every replica: with per-replica
buckets the allowance was multiplied by the number of replicas.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from tests.support import client_from
from fastapi.testclient import TestClient

from xiaozhi.hub.app import create_app
from xiaozhi.hub.infra.security import Rate, RateLimiter, SharedRateLimiter


@pytest.fixture
def redis():
    from tests.support.redis_server import RedisUnavailable, redis_server

    try:
        with redis_server() as server:
            yield server
    except RedisUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def replicas(hub_settings, knowledge_base, redis, tmp_path):
    settings = hub_settings.model_copy(update={"rate_limit_redis_url": redis.url, "rate_limit_sessions": "3/minute",
                                               "rate_limit_kb_search": "2/minute"})
    other = settings.model_copy(update={"var_dir": tmp_path / "b"})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as a:
        with TestClient(create_app(other, knowledge_base=knowledge_base)) as b:
            yield a, b


def test_the_token_bucket_in_redis_bursts_then_refills_and_expires(redis):
    async def scenario():
        limiter = SharedRateLimiter(redis.url, RateLimiter())
        rate = Rate(5, 1.0)  # a burst of 5, then 5 a second
        try:
            waits = [await limiter.hit("t", "client", rate) for _ in range(6)]
            await asyncio.sleep(0.25)
            after = await limiter.hit("t", "client", rate)
            other = await limiter.hit("t", "someone-else", rate)
            ttl = await limiter._client.ttl("xiaozhi:rate:t:client")
            return waits, after, other, ttl, limiter.redis_ok
        finally:
            await limiter.close()

    waits, after, other, ttl, shared = asyncio.run(scenario())
    assert waits[:5] == [0.0] * 5 and 0 < waits[5] <= 0.2
    assert after == 0.0 and other == 0.0
    assert 0 < ttl <= 2, "an idle bucket goes once it would be full again"
    assert shared


def test_two_replicas_draw_on_one_allowance_per_client(replicas):
    a, b = replicas
    for client in (a, b, a):
        assert client.post("/api/sessions", json={}).status_code == 201
    for client in (b, a):  # the fourth, whichever replica it reaches
        refused = client.post("/api/sessions", json={})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert client_from(b, "203.0.113.9").post("/api/sessions", json={}).status_code == 201  # another client
    assert a.get("/api/kb/search", params={"q": "异地就医"}).status_code == 200
    assert b.get("/api/kb/search", params={"q": "异地就医"}).status_code == 200
    assert a.get("/api/kb/search", params={"q": "异地就医"}).status_code == 429


def test_a_redis_outage_leaves_each_replica_limiting_on_its_own_until_redis_returns(replicas, redis, caplog):
    a, b = replicas
    caplog.set_level(logging.INFO)
    assert a.post("/api/sessions", json={}).status_code == 201  # shared: 1 of 3 used
    redis.stop()
    # Residents are still served: each replica falls back to its own buckets (3 each here).
    assert [a.post("/api/sessions", json={}).status_code for _ in range(4)] == [201, 201, 201, 429]
    assert b.post("/api/sessions", json={}).status_code == 201
    assert "Redis is not answering" in caplog.text
    assert "xiaozhi_rate_limits_shared 0.0" in a.get("/metrics").text  # for an alert: Redis is away
    redis.start()
    for app_client in (a, b):
        app_client.app.state.limits.shared.retry_s = 0.0
        app_client.app.state.limits.shared._down_until = 0.0
    for client in (b, a):  # Redis again (a fresh server: a full bucket)
        assert client.post("/api/sessions", json={}).status_code == 201
    assert "Redis answers again" in caplog.text
    assert all(client.app.state.limits.shared.redis_ok for client in (a, b))
    assert "xiaozhi_rate_limits_shared 1.0" in a.get("/metrics").text
