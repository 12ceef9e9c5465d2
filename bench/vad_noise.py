"""Speech recall and false alarms of the phone VADs on a noisy line (Silero vs energy), per noise kind and SNR.

Ground truth: the 8 Mandarin fixtures (tests/data/asr/) labelled per 20 ms frame by the energy VAD
on the *clean* signal (speech frames), padded with 1 s of silence each side. Each is mixed with
white, pink, mains-hum and babble noise (telephony.noise) at 20, 10 and 5 dB SNR and through µ-law.
Recall = labelled speech frames the VAD marks as speech; false alarms = non-speech frames (the
padding and pauses) it marks as speech. Each VAD starts fresh per fixture.

    .venv/bin/python bench/vad_noise.py [--snr 20,10,5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from telephony.audio import FRAME_SAMPLES, load_wav  # noqa: E402
from telephony.g711 import ulaw_decode, ulaw_encode  # noqa: E402
from telephony.noise import NOISE_KINDS, mix_at_snr, noise  # noqa: E402
from telephony.vad import EnergyVad, SileroVad  # noqa: E402

ASR = REPO / "tests" / "data" / "asr"


def labelled_fixtures() -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for wav in sorted(ASR.glob("*.wav")):
        s = load_wav(wav)
        s = np.concatenate([np.zeros(8000, np.int16), s, np.zeros(8000, np.int16)])
        n = s.size // FRAME_SAMPLES
        frames = s[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float64)
        level = np.sqrt(np.mean(frames**2, axis=1))
        label = level > max(100.0, level.max() * 0.03)  # clean speech: within ~30 dB of the peak
        out.append((s[: n * FRAME_SAMPLES], label))
    return out


def score(vad_cls, signal: np.ndarray, label: np.ndarray) -> tuple[int, int, int, int]:
    vad = vad_cls()
    decided = np.array([vad.is_speech(signal[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]) for i in range(label.size)])
    return int(np.sum(decided & label)), int(label.sum()), int(np.sum(decided & ~label)), int((~label).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", default="20,10,5")
    args = parser.parse_args()
    fixtures = labelled_fixtures()
    voices = [load_wav(w) for w in sorted(ASR.glob("*.wav"))]
    print("| noise | SNR (dB) | Silero recall | Silero false alarms | energy recall | energy false alarms |")
    print("|---|---|---|---|---|---|")
    for kind in NOISE_KINDS:
        for snr in [float(x) for x in args.snr.split(",")]:
            totals = {"silero": np.zeros(4), "energy": np.zeros(4)}
            for i, (clean, label) in enumerate(fixtures):
                others = [v for j, v in enumerate(voices) if j != i]  # babble never contains the speaker's own sentence
                n = noise(kind, clean.size, seed=i, voices=others)
                line = ulaw_decode(ulaw_encode(mix_at_snr(clean, n, snr)))
                totals["silero"] += score(SileroVad, line, label)
                totals["energy"] += score(EnergyVad, line, label)
            s, e = totals["silero"], totals["energy"]
            print(f"| {kind} | {snr:g} | {s[0] / s[1]:.2f} | {s[2] / s[3]:.2f} | {e[0] / e[1]:.2f} | {e[2] / e[3]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
