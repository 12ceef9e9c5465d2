"""Chat load ramp: concurrent resident sessions in steps until p95 passes a limit.

Each step opens N chat sessions at once (their first messages spread over one think time), and
every session sends MESSAGES questions, pausing THINK seconds (uniform, seeded) between a reply
and its next question, as people typing do. Per step it prints p50/p95/max latency, throughput
and errors (non-200 answers, empty replies, degraded replies = Rasa not answering, and
transport errors). The ramp stops after the first step whose p95 exceeds --stop-p95-ms.

Against `xiaozhi run` started here on free ports (embedded defaults), or a running hub:

    .venv/bin/python bench/load_chat.py [--steps 10,25,50,100,150] [--messages 4] [--think 5,15]
    .venv/bin/python bench/load_chat.py --url http://127.0.0.1:8000

Requests come from 127.0.0.1, which XIAOZHI_RATE_LIMIT_EXEMPT_NETWORKS exempts by default; against
a remote hub, exempt the load generator's address or every session past the limit gets 429.
Target on the 2-core build machine: 100 concurrent sessions with p95 < 500 ms and no error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_latency import QUESTIONS, percentile, start_stack  # noqa: E402


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


async def resident(client: httpx.AsyncClient, n: int, messages: int, think: tuple[float, float], seed: int,
                   latencies: list[float], errors: list[str]) -> None:
    rng = random.Random(seed * 7919 + n)
    await asyncio.sleep(rng.uniform(0, think[1]))  # residents do not all arrive in the same millisecond
    try:
        r = await client.post("/api/sessions", json={})
        if r.status_code != 201:
            errors.append(f"session {r.status_code} {r.text[:100]}")
            return
        created = r.json()
    except httpx.HTTPError as exc:
        errors.append(f"session {type(exc).__name__}")
        return
    sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    for i in range(messages):
        if i:
            await asyncio.sleep(rng.uniform(*think))
        text = QUESTIONS[(seed * 131 + n * 37 + i) % len(QUESTIONS)]
        t0 = time.perf_counter()
        try:
            r = await client.post(f"/api/sessions/{sid}/messages", json={"text": text}, headers=auth)
        except httpx.HTTPError as exc:
            latencies.append((time.perf_counter() - t0) * 1000)
            errors.append(f"message {type(exc).__name__}")
            continue
        latencies.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200 or not r.json().get("replies"):
            errors.append(f"message {r.status_code} {r.text[:100]}")
        elif r.json()["replies"][0]["meta"].get("degraded"):
            errors.append("degraded reply (Rasa not answering)")


async def step(url: str, sessions: int, messages: int, think: tuple[float, float], seed: int,
               parts: dict[str, list[int]]) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=sessions + 10, max_keepalive_connections=sessions + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        cpu0, t0 = {name: _cpu_seconds(pids) for name, pids in parts.items()}, time.perf_counter()
        await asyncio.gather(*(resident(client, n, messages, think, seed, latencies, errors) for n in range(sessions)))
        wall = time.perf_counter() - t0
        cpu = {name: _cpu_seconds(pids) - cpu0[name] for name, pids in parts.items()}
    per_message = {name: 1000 * seconds / len(latencies) for name, seconds in cpu.items()} if latencies else {}
    return {
        "sessions": sessions,
        "messages": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": percentile(latencies, 0.95) if latencies else float("nan"),
        "max_ms": max(latencies) if latencies else float("nan"),
        "messages_per_s": len(latencies) / wall,
        "cpu_ms_per_message": sum(per_message.values()) if per_message else None,
        "cpu_ms_per_message_by_part": per_message,
    }


def _service_pids(log: Path | None) -> dict[str, list[int]]:
    """The hub, Rasa and action server of a `xiaozhi run` started here (from its log), each with its children."""
    if log is None:
        return {}
    import re

    parts = {}
    for name, pid in re.findall(r"started (.+?) \(pid (\d+)\)", log.read_text()):
        pid = int(pid)
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except FileNotFoundError:
            children = []
        parts[name] = [pid, *children]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="load this running hub instead of starting `xiaozhi run`")
    parser.add_argument("--steps", default="10,25,50,100,150", help="concurrent sessions per step")
    parser.add_argument("--messages", type=int, default=4, help="questions per session")
    parser.add_argument("--think", default="5,15", help="seconds between a reply and the next question (min,max)")
    parser.add_argument("--stop-p95-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    think = tuple(float(x) for x in args.think.split(","))
    steps = [int(x) for x in args.steps.split(",")]

    proc = log = None
    if args.url:
        url = args.url
    else:
        proc, url, cold, log = start_stack()
        print(f"started `xiaozhi run` in {cold:.1f} s at {url}")
    parts = _service_pids(log)
    results = []
    try:
        # warm-up: lazy initialisation in Rasa and the hub is not part of any step
        asyncio.run(step(url, 2, 2, (0.1, 0.2), 99, {}))
        for n in steps:
            result = asyncio.run(step(url, n, args.messages, think, args.seed, parts))
            results.append(result)
            by_part = ", ".join(f"{name} {ms:.0f}" for name, ms in result["cpu_ms_per_message_by_part"].items())
            cpu = f"  CPU {result['cpu_ms_per_message']:.0f} ms/msg ({by_part})" if result["cpu_ms_per_message"] else ""
            print(f"{n:4d} sessions  {result['messages']:4d} msgs  p50 {result['p50_ms']:5.0f} ms  "
                  f"p95 {result['p95_ms']:5.0f} ms  max {result['max_ms']:5.0f} ms  "
                  f"{result['messages_per_s']:5.1f} msg/s  errors {result['errors']}{cpu}", flush=True)
            for sample in result["error_samples"]:
                print(f"      error: {sample}")
            if result["p95_ms"] > args.stop_p95_ms:
                print(f"p95 passed {args.stop_p95_ms:.0f} ms at {n} sessions: stopping the ramp")
                break
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    at_100 = next((r for r in results if r["sessions"] == 100), None)
    print(f"think time {think[0]:g}-{think[1]:g} s, {args.messages} questions per session, {os.cpu_count()} cores")
    if at_100 is not None:
        met = at_100["p95_ms"] < 500 and at_100["errors"] == 0
        print(f"target 100 sessions, p95 < 500 ms, no error: {'met' if met else 'NOT met'} "
              f"(p95 {at_100['p95_ms']:.0f} ms, errors {at_100['errors']})")


if __name__ == "__main__":
    main()
