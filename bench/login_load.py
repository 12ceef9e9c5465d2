"""Chat latency while staff log in (issue 17): 0, 10 and 20 logins running at once.

Starts `xiaozhi run` (hub + Rasa + action server, real argon2 cost) on free ports, then for each
login load sends paced chat messages (10 residents, 0.5-2 s think time, questions of the labelled
development set, as bench/chat_latency.py) while that many staff logins run back to back, each
from an address of its own (X-Forwarded-For from a trusted local proxy), so neither the lockout
nor the per-address rate limit cuts them short. Prints chat p50/p95/max per load and how many
logins completed per second. Before issue 17 argon2 ran on the hub's event loop and every login
froze chat for 0.1-0.25 s.

    .venv/bin/python bench/login_load.py [--messages 150] [--sessions 10] [--loads 0,10,20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_latency import QUESTIONS, Questions, percentile, running_stack, session_worker  # noqa: E402

POOL = Questions(QUESTIONS)  # every run of this process takes new questions (no answer-cache hits)

PASSWORD = "bench-admin-password-17"


async def log_in_forever(client: httpx.AsyncClient, addresses, done: list[float], failed: list[str]) -> None:
    while True:
        t0 = time.perf_counter()
        r = await client.post("/api/staff/login", json={"username": "admin", "password": PASSWORD},
                              headers={"X-Forwarded-For": next(addresses)})
        if r.status_code == 200:
            done.append(time.perf_counter() - t0)
        else:
            failed.append(f"{r.status_code} {r.text[:100]}")


async def chat_with_logins(url: str, logins: int, messages: int, sessions: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    login_times: list[float] = []
    login_errors: list[str] = []
    addresses = (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}" for n in itertools.count(1 + logins * 100_000))
    async with httpx.AsyncClient(base_url=url, timeout=60) as chat, \
            httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=logins + 1)) as staff:
        await session_worker(chat, POOL.take(3), 0, [], [])  # warm-up
        batches = POOL.deal(messages, sessions)
        loggers = [asyncio.create_task(log_in_forever(staff, addresses, login_times, login_errors))
                   for _ in range(logins)]
        t0 = time.perf_counter()
        try:
            # A resident whose session could not be opened (a 500 from the old code's "database is
            # locked") is counted as an error, not allowed to end the run.
            outcomes = await asyncio.gather(*(session_worker(chat, texts, logins * 50 + i, latencies, errors, paced=True)
                                              for i, texts in enumerate(batches)), return_exceptions=True)
            errors += [f"resident gave up: {o!r}" for o in outcomes if isinstance(o, Exception)]
        finally:
            wall = time.perf_counter() - t0
            for task in loggers:
                task.cancel()
            await asyncio.gather(*loggers, return_exceptions=True)
    return {
        "messages": len(latencies), "errors": len(errors), "error_samples": errors[:3],
        "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95), "max": max(latencies),
        "logins_per_s": len(login_times) / wall, "login_p50": statistics.median(login_times) * 1000 if login_times else 0,
        "login_failures": len(login_errors), "login_errors": login_errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=150, help="chat messages per login load")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--loads", default="0,10,20", help="concurrent logins, comma-separated")
    parser.add_argument("--url", help="a running hub whose admin password is " + PASSWORD +
                        " and which trusts X-Forwarded-For from this machine (FORWARDED_ALLOW_IPS)")
    args = parser.parse_args()
    loads = [int(n) for n in args.loads.split(",")]

    env = {
        "XIAOZHI_ADMIN_PASSWORD": PASSWORD, "FORWARDED_ALLOW_IPS": "127.0.0.1",
        "XIAOZHI_RATE_LIMIT_SESSIONS": "1000/minute",  # the bench opens sessions faster than residents do
    }
    with running_stack(args.url, env) as (url, _cold, _log):
        results = {n: asyncio.run(chat_with_logins(url, n, args.messages, args.sessions)) for n in loads}
    print(f"chat latency while staff log in: {args.messages} paced messages over {args.sessions} sessions per load "
          f"(hub + Rasa + action server, argon2 defaults, {os.cpu_count()} cores)")
    for n, r in results.items():
        print(f"  {n:2d} logins at once: chat p50 {r['p50']:5.0f} ms  p95 {r['p95']:5.0f} ms  max {r['max']:5.0f} ms  "
              f"errors {r['errors']}   logins {r['logins_per_s']:4.1f}/s, p50 {r['login_p50']:5.0f} ms, "
              f"failed {r['login_failures']}")
        for sample in r["error_samples"] + r["login_errors"]:
            print(f"    error: {sample}")


if __name__ == "__main__":
    main()
