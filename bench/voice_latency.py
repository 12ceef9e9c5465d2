"""Phone voice latency: end of the caller's speech -> the bot's first RTP packet with sound.

Places CALLS calls one after another to the hotline (in-process hub, see bench/voice_common.py);
each asks one of the 8 Mandarin fixtures. Prints p50/p95 and each stage's median share:
end-of-turn (the silence hangover), ASR, dialogue (hub + Rasa or degraded knowledge-base search),
TTS; the remainder is playout (queue to the 20 ms pacer and the network). Also the character error
rate of the recogniser on these 8 kHz calls.

ASR is the time from the end of turn to the transcript. Recognition starts at a pause
(--early-asr-ms of silence) while the turn may go on; when the caller has in fact finished, that
decode is used and only its remainder counts as ASR (the "early" count says how often). When its
words are a complete question the turn ends there (after 250 ms of silence at least) instead of
after the --end-of-turn-ms hangover: "answered before the hangover" counts those turns.

Targets (2-core machine, Kokoro, issue 15): p50 <= 0.6 s, p95 <= 1.2 s.

    .venv/bin/python bench/voice_latency.py [--calls 24] [--rasa-url http://127.0.0.1:5005]
        [--end-of-turn-ms 600] [--early-asr-ms 100] [--window speech|30s]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from voice_common import FIXTURES, hotline, one_call, summarise


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--rasa-url", default=None, help="a running Rasa (default: none, degraded mode)")
    parser.add_argument("--end-of-turn-ms", type=int, default=600)
    parser.add_argument("--early-asr-ms", type=int, default=100, help="0: recognition only at end of turn")
    parser.add_argument("--window", choices=["speech", "30s"], default="speech", help="Whisper encoder window")
    parser.add_argument("--tts", default="kokoro", help="TTS engine (kokoro, pyttsx3)")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up call per question: every answer is synthesised live (else they are "
                             "cached first, as the hub's background pre-rendering leaves them)")
    args = parser.parse_args()

    async with hotline(args.rasa_url, phone_end_of_turn_ms=args.end_of_turn_ms,
                       phone_early_asr_ms=args.early_asr_ms, asr_window=args.window, tts_kind=args.tts) as app:
        if not args.cold:  # the answers get rendered (and cached) the way pre-rendering would leave them
            for name, expected in FIXTURES:
                await one_call(app, name, expected, whole_reply=True)
        results = []
        cpu0, wall0 = time.process_time(), time.monotonic()
        for i in range(args.calls):
            name, expected = FIXTURES[i % len(FIXTURES)]
            r = await one_call(app, name, expected)
            results.append(r)
            print(f"call {i + 1:2d} {name:20s} latency {r.latency_s if r.latency_s is not None else float('nan'):.2f} s"
                  f"  (eot {r.end_of_turn_s:.2f} asr {r.asr_s:.2f}{' early' if r.early else ''}"
                  f" dialogue {r.dialogue_s:.2f} tts {r.tts_s:.2f})"
                  f"  heard: {r.text}", flush=True)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    s = summarise(results)
    total = s["p50_s"]
    print(f"\n{s['answered']}/{s['calls']} calls answered; cores: {os.cpu_count()}; "
          f"load avg {os.getloadavg()[0]:.2f}; {cpu:.1f} CPU-s in {wall:.0f} s")
    print(f"latency p50 {s['p50_s']:.2f} s   p95 {s['p95_s']:.2f} s   max {s['max_s']:.2f} s"
          f"   (targets: p50 <= 0.6 s, p95 <= 1.2 s)")
    import statistics

    playout = statistics.median(r.latency_s - r.end_of_turn_s - r.asr_s - r.dialogue_s - r.tts_s
                                for r in results if r.latency_s is not None)
    for stage, value in (("end of turn", s["end_of_turn_s"]), ("ASR", s["asr_s"]), ("dialogue", s["dialogue_s"]),
                         ("TTS", s["tts_s"]), ("playout", playout)):
        print(f"  {stage:12s} median {value:.3f} s  ({100 * value / total:.0f} % of p50)")
    print("  (playout: from handing the reply to the RTP pacer to its first packet at the caller)")
    print(f"  recognition started early and used in {s['early']}/{s['answered']} calls")
    before = sum(r.latency_s is not None and r.end_of_turn_s < args.end_of_turn_ms / 1000 - 0.01 for r in results)
    print(f"  answered before the {args.end_of_turn_ms} ms hangover (the words were a complete question): "
          f"{before}/{s['answered']} calls")
    print(f"CER of the recogniser on these calls: {s['cer']:.3f}")
    print(f"TTS {args.tts} ({'live synthesis' if args.cold else 'answers cached'}): gaps between clauses "
          f"p95 {s['gap_p95_s'] * 1000:.0f} ms over {len(s['gaps'])} joins")


if __name__ == "__main__":
    asyncio.run(main())
