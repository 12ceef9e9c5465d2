"""Long spoken questions on the hotline (issue 20): recognition and answer time by length of the turn.

Places one call per fixture to the in-process hotline (bench/voice_common.py: real Whisper-base,
Silero VAD, Kokoro, the conversation core; Rasa only with --rasa-url, else the hub's degraded mode
answers from the knowledge base): the 8 short questions of tests/data/asr/ and the long stories of
tests/data/asr/long/ (clean, and the first --noisy of them with pink noise at 10 dB, mixed from a
fixed seed). Prints, by length bucket of the caller's speech (< 5 s, 5-10 s, 10-25 s):

* CER of what the hotline recognised (the turn's transcript against the fixture's text);
* end of the caller's speech -> the bot's first RTP packet with sound, p50/p95 (for a turn the bot
  confirms, that is "我确认一下，" and the question clause follows: its gap is printed too);
* how the long stories were handled: answered with the right topic, confirmed ("您是想问…，对吗？",
  naming the right topic or not), or answered wrongly without a check (the target is none).

Targets: CER <= 0.25 for 10-25 s turns and <= 0.12 for short ones; latency for 10-25 s turns
p50 <= 1.0 s, p95 <= 1.5 s.

    flock /tmp/xiaozhi-heavy.lock .venv/bin/python bench/long_turns.py [--noisy 10] [--limit N] [--every N]
        [--no-segments] [--rasa-url http://127.0.0.1:5005] [--early-asr-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from voice_common import ASR, FIXTURES, after_greeting, cer, hotline, percentile, reply_latency, trim, trimmed

from telephony.g711 import ulaw_decode
from telephony.noise import mix_at_snr, noise
from telephony.testing import RtpCaller, SipPeer

LONG = ASR / "long"
BUCKETS = (("< 5 s", 0.0, 5.0), ("5-10 s", 5.0, 10.0), ("10-25 s", 10.0, 25.5))


@dataclass
class Turn:
    name: str
    expected_text: str
    expected_entry: str = ""
    speech_s: float = 0.0
    latency_s: float | None = None
    heard: str = ""
    confirmed: bool = False
    confirm_unit: str = ""
    cited: list[str] = field(default_factory=list)
    second_clause_s: float | None = None  # end of speech -> the question clause of a confirmation
    asr_s: float = 0.0
    dialogue_s: float = 0.0
    tts_s: float = 0.0
    pieces: int = 0


def fixtures(noisy: int, limit: int | None, every: int = 1) -> list[tuple[Turn, np.ndarray]]:
    out = [(Turn(name, text), trimmed(name)) for name, text in FIXTURES]
    with (LONG / "stories.tsv").open(encoding="utf-8") as f:
        stories = list(csv.DictReader(f, delimiter="\t"))[::every][:limit]
    for i, row in enumerate(stories):
        pcm = ulaw_decode((LONG / f"{row['name']}.ul").read_bytes())
        out.append((Turn(row["name"], row["text"], row["entry"]), trim(pcm)))
        if i < noisy:
            mixed = mix_at_snr(pcm, noise("pink", pcm.size, seed=i), 10.0)
            out.append((Turn(row["name"] + "+10dB", row["text"], row["entry"]), trim(mixed)))
    return out


async def one_call(app, turn: Turn, samples: np.ndarray) -> Turn:
    phone = app.state.phone
    peer = SipPeer(phone.user_agent.port)
    try:
        call, ok = await peer.answered_call(dialled="12393")
        rtp = RtpCaller(peer, ok)
        try:
            await after_greeting(rtp)
            session = phone.bot.sessions.get(call.call_id)
            turn.speech_s = samples.size / 8000
            spoke_until = await rtp.say(samples)
            turn.latency_s = await reply_latency(rtp, spoke_until)
            # let the reply (or the confirmation's question clause) play out: its gaps are measured
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and rtp.bot_audio(time.monotonic() - 1.0):
                await rtp.pause(0.1)
            if session is not None and session.timings:
                t = session.timings[0]
                turn.heard, turn.asr_s, turn.dialogue_s, turn.tts_s = t.text, t.asr_s, t.dialogue_s, t.tts_s
                if t.gaps and turn.latency_s is not None:
                    turn.second_clause_s = turn.latency_s + t.gaps[0]
                conv = session.call.metadata.get("conversation")
                for m in await app.state.store.transcript(conv.id) if conv is not None else []:
                    meta = m.meta or {}
                    if m.role == "bot" and meta.get("confirming") and meta.get("unit"):
                        turn.confirmed, turn.confirm_unit = True, meta["unit"]
                    if m.role == "bot":
                        turn.cited += [c.get("id", "") for c in meta.get("citations") or []]
            peer.in_dialog("BYE", call)
            await peer.expect(200, timeout=5)
        finally:
            rtp.close()
    finally:
        peer.close()
    return turn


def report(turns: list[Turn], args, cpu: float, wall: float) -> None:
    print(f"\n{len(turns)} calls; cores {os.cpu_count()}; load avg {os.getloadavg()[0]:.2f}; "
          f"{cpu:.0f} CPU-s in {wall:.0f} s; segments {'off' if args.no_segments else 'on'}")
    print(f"{'bucket':8s} {'turns':>5s} {'CER':>6s} {'p50 s':>6s} {'p95 s':>6s} {'asr':>5s} {'dlg':>5s} {'tts':>5s}"
          f" {'2nd clause p50':>15s}")
    for label, lo, hi in BUCKETS:
        group = [t for t in turns if lo <= t.speech_s < hi]
        if not group:
            continue
        lat = [t.latency_s for t in group if t.latency_s is not None]
        errors = sum(cer(t.expected_text, t.heard) * len(t.expected_text) for t in group)
        chars = sum(len(t.expected_text) for t in group)
        second = [t.second_clause_s for t in group if t.confirmed and t.second_clause_s is not None]
        print(f"{label:8s} {len(group):5d} {errors / chars:6.3f} {percentile(lat, 50):6.2f} {percentile(lat, 95):6.2f}"
              f" {statistics.median(t.asr_s for t in group):5.2f} {statistics.median(t.dialogue_s for t in group):5.2f}"
              f" {statistics.median(t.tts_s for t in group):5.2f} {percentile(second, 50) if second else float('nan'):15.2f}")
    print("  (CER: character errors / characters over the bucket; targets: 10-25 s <= 0.25, < 5 s <= 0.12;"
          " latency 10-25 s p50 <= 1.0 s, p95 <= 1.5 s)")
    stories = [t for t in turns if t.expected_entry]
    if stories:
        right = [t for t in stories if not t.confirmed and t.cited and t.cited[0] == t.expected_entry]
        wrong = [t for t in stories if not t.confirmed and t.cited and t.cited[0] != t.expected_entry]
        confirmed = [t for t in stories if t.confirmed]
        named = [t for t in confirmed if t.confirm_unit.split(".")[0] == t.expected_entry]
        other = len(stories) - len(right) - len(wrong) - len(confirmed)
        print(f"long stories: {len(stories)}; answered at once with the right topic {len(right)}; confirmed first "
              f"{len(confirmed)} (naming the right topic {len(named)}); answered wrongly without a check {len(wrong)}"
              f"{' ' + str([t.name for t in wrong]) if wrong else ''}; other replies (declined, asked again) {other}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noisy", type=int, default=10, help="long stories also sent with noise at 10 dB")
    parser.add_argument("--limit", type=int, default=None, help="only the first N long stories")
    parser.add_argument("--every", type=int, default=1, help="every Nth long story (a quicker run)")
    parser.add_argument("--no-segments", action="store_true", help="decode each turn whole at its end (as before)")
    parser.add_argument("--rasa-url", default=None, help="a running Rasa (default: none, degraded mode)")
    parser.add_argument("--early-asr-ms", type=int, default=100,
                        help="silence before recognition starts while the turn may go on (0: off; 300: before)")
    args = parser.parse_args()
    work = fixtures(args.noisy, args.limit, args.every)
    async with hotline(args.rasa_url, phone_early_asr_ms=args.early_asr_ms) as app:
        if args.no_segments:
            app.state.phone.bot.config.segments = False
        # warm-up: the prompts and the confirmation's first clause are rendered and cached once, as
        # the hub's pre-rendering leaves them; a short question's answer too
        for turn, samples in (work[0], work[len(FIXTURES)]):
            await one_call(app, Turn(turn.name, turn.expected_text, turn.expected_entry), samples)
        turns = []
        cpu0, wall0 = time.process_time(), time.monotonic()
        for turn, samples in work:
            t = await one_call(app, turn, samples)
            turns.append(t)
            lat = t.latency_s if t.latency_s is not None else float("nan")
            print(f"{t.name:32s} {t.speech_s:5.1f} s  latency {lat:.2f} s  CER {cer(t.expected_text, t.heard):.2f}"
                  f"  {'confirm ' + t.confirm_unit if t.confirmed else 'cites ' + ','.join(t.cited[:1])}"
                  f"  heard: {t.heard}", flush=True)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    report(turns, args, cpu, wall)


if __name__ == "__main__":
    asyncio.run(main())
