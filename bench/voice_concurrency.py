"""Phone voice latency and CPU under simultaneous calls: 1, 5, 10, 20 callers asking at once.

For each level N, N calls are placed together (in-process hub, see bench/voice_common.py); each
waits out the greeting and asks one fixture question, the questions staggered over 2 s (callers do
not finish speaking in the same 20 ms). Prints p50/p95 latency (end of speech -> first bot RTP
packet with sound) and CPU-seconds per call (the whole process: SIP, media, VAD, ASR threads,
dialogue, TTS). One recogniser serves all calls with XIAOZHI_ASR_WORKERS (2) decodes at a time, so
past a few callers finishing together, ASR queueing dominates.

Target: 10 simultaneous calls with p95 <= 2.5 s.

    .venv/bin/python bench/voice_concurrency.py [--levels 1,5,10,20] [--rasa-url URL]

The figures in docs/telephony.md were taken with Rasa answering: start it with
`XIAOZHI_SIP_ENABLED=false XIAOZHI_HUB_PORT=8199 XIAOZHI_RASA_PORT=5105 XIAOZHI_ACTIONS_PORT=5155
.venv/bin/xiaozhi run` and pass --rasa-url http://127.0.0.1:5105 (without it the hub answers in
degraded mode from the knowledge base).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from voice_common import FIXTURES, hotline, one_call, summarise


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,5,10,20")
    parser.add_argument("--rasa-url", default=None)
    parser.add_argument("--stagger-s", type=float, default=2.0)
    parser.add_argument("--tts", default="kokoro")
    parser.add_argument("--cold", action="store_true", help="answers synthesised live (no warm-up call per question)")
    parser.add_argument("--early-asr-ms", type=int, default=100,
                        help="silence before recognition starts while the turn may go on (0: off; 300: before)")
    args = parser.parse_args()

    rows = []
    async with hotline(args.rasa_url, tts_kind=args.tts, phone_early_asr_ms=args.early_asr_ms) as app:
        if not args.cold:  # answers cached, as the hub's background pre-rendering leaves them
            for name, expected in FIXTURES:
                await one_call(app, name, expected, whole_reply=True)
        for n in [int(x) for x in args.levels.split(",")]:
            cpu0, wall0 = time.process_time(), time.monotonic()
            results = await asyncio.gather(*[
                one_call(app, FIXTURES[i % len(FIXTURES)][0], FIXTURES[i % len(FIXTURES)][1],
                         start_delay=args.stagger_s * i / max(1, n), whole_reply=True)
                for i in range(n)
            ])
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            s = summarise(list(results))
            rows.append((n, s, cpu, wall))
            print(f"{n:2d} calls: {s['answered']}/{n} answered, p50 {s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s, "
                  f"max {s['max_s']:.2f} s; median ASR {s['asr_s']:.2f} s; {cpu / n:.2f} CPU-s per call "
                  f"({cpu:.1f} CPU-s in {wall:.0f} s wall); clause gaps p95 {s['gap_p95_s'] * 1000:.0f} ms; "
                  f"load avg {os.getloadavg()[0]:.2f}", flush=True)
            await asyncio.sleep(2)
    print("\n| calls | p50 (s) | p95 (s) | max (s) | median ASR (s) | clause gaps p95 (ms) | CPU-s per call |")
    print("|---|---|---|---|---|---|---|")
    for n, s, cpu, _ in rows:
        print(f"| {n} | {s['p50_s']:.2f} | {s['p95_s']:.2f} | {s['max_s']:.2f} | {s['asr_s']:.2f} | "
              f"{s['gap_p95_s'] * 1000:.0f} | {cpu / n:.2f} |")
    print("target: 10 calls p95 <= 2.5 s")


if __name__ == "__main__":
    asyncio.run(main())
