"""What the hub's metrics cost (issue 17, item 4): a scrape, the HTTP timing middleware per request, and
the background count of the queue gauges, on a hub with real conversations in its database.

Starts the hub in-process (SQLite in a temporary directory, Rasa away: degraded mode answers from the
knowledge base), fills it with CONVERSATIONS chat conversations (a question each; every fifth escalated,
half of those closed), then prints medians of:

- a scrape of /metrics through the ASGI stack (and the number of SQL statements it ran: 0);
- the middleware alone: the same trivial ASGI app called with and without ``HttpMetricsMiddleware``;
- one count of the queue and survey gauges (``HubMetrics.refresh``), the only database work metrics do.

    .venv/bin/python bench/metrics_cost.py [--conversations 300] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def middleware_cost(repeat: int) -> tuple[float, float]:
    from fastapi import FastAPI

    from xiaozhi.hub.metrics import HttpMetricsMiddleware, HubMetrics

    app = FastAPI()

    @app.get("/api/things/{thing_id}")
    async def thing(thing_id: str) -> dict:
        return {"id": thing_id}

    timed = HttpMetricsMiddleware(app, HubMetrics(), app)
    scope = {"type": "http", "method": "GET", "path": "/api/things/42", "raw_path": b"/api/things/42",
             "root_path": "", "headers": [], "query_string": b"", "scheme": "http", "server": ("t", 80),
             "client": ("c", 1), "http_version": "1.1", "app": app}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def once(target) -> float:
        started = time.perf_counter()
        await target(dict(scope), receive, send)
        return time.perf_counter() - started

    bare, with_metrics = [], []
    for _ in range(50):  # warm-up
        await once(app)
        await once(timed)
    for _ in range(repeat):
        bare.append(await once(app))
        with_metrics.append(await once(timed))
    return median_us(bare), median_us(with_metrics)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    import httpx
    from sqlalchemy import event

    from knowledge_base.factory import open_knowledge_base
    from xiaozhi.hub.app import create_app
    from xiaozhi.settings import Settings

    var = Path(tempfile.mkdtemp(prefix="metrics-cost-"))
    settings = Settings(var_dir=var, rasa_url="http://127.0.0.1:9", sip_enabled=False, kb_reload_interval_s=0,
                        survey_poll_interval_s=0)
    kb = open_knowledge_base(settings.knowledge_base_config())
    app = create_app(settings, knowledge_base=kb)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub")
        started = time.perf_counter()
        for i in range(args.conversations):
            created = (await client.post("/api/sessions", json={})).json()
            auth = {"Authorization": f"Bearer {created['token']}"}
            text = "转人工" if i % 5 == 0 else "医保电子凭证怎么激活"
            await client.post(f"/api/sessions/{created['session_id']}/messages", json={"text": text}, headers=auth)
            if i % 10 == 0:
                await client.post(f"/api/sessions/{created['session_id']}/close", headers=auth)
        print(f"filled {args.conversations} conversations in {time.perf_counter() - started:.1f} s")
        await asyncio.sleep(2)  # the gauges counted after the last change

        statements: list[str] = []
        engine = app.state.store.engine.sync_engine
        listener = lambda *a: statements.append(a[2])  # noqa: E731
        scrapes = []
        event.listen(engine, "before_cursor_execute", listener)
        for _ in range(args.repeat):
            t = time.perf_counter()
            text = (await client.get("/metrics")).text
            scrapes.append(time.perf_counter() - t)
        event.remove(engine, "before_cursor_execute", listener)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        print(f"scrape: median {median_us(scrapes) / 1000:.2f} ms for {series} samples, "
              f"{len(text) / 1024:.0f} KiB; SQL statements in {args.repeat} scrapes: {len(statements)}")

        refreshes = []
        for _ in range(min(args.repeat, 50)):
            t = time.perf_counter()
            await app.state.metrics.refresh(app.state.store)
            refreshes.append(time.perf_counter() - t)
        print(f"background count of the queue and survey gauges: median {median_us(refreshes) / 1000:.2f} ms "
              f"(once every 15 s, or after a queue change)")
        await client.aclose()

    bare, timed = await middleware_cost(args.repeat * 10)
    print(f"HTTP timing middleware: median {bare:.0f} us per request without, {timed:.0f} us with "
          f"(+{timed - bare:.0f} us)")


if __name__ == "__main__":
    asyncio.run(main())
