"""How well a listener can follow the phone voice: each engine's speech, through 8 kHz µ-law, recognised.

Renders SENTENCES (typical bot sentences: numbers, dates, money, app names, long sentences) with
every engine side by side in one run, sends each rendering through a G.711 µ-law round trip (what a
caller hears), and recognises it with the bundled Whisper-base exactly as the phone line does
(domain prompt, homophone correction). A recogniser is harsher than a person, but a voice it cannot
follow is one many callers will not follow either.

Prints per engine: character error rate (mean, median; reference and transcript both put in spoken
form first, so 12393 and 幺二三九三 count as the same words), sentences not recognised at all,
real-time factor of the synthesis (CPU time of the rendering thread / audio seconds), and the
resident memory of the process doing the synthesis (Kokoro: this process's growth while loading
and rendering; espeak: its worker process).

    flock /tmp/xiaozhi-heavy.lock .venv/bin/python bench/tts_intelligibility.py \
        [--engines kokoro,espeak] [--voice zf_xiaobei] [--speed 1.0] [--wav-dir docs/voice-samples]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from telephony.asr import character_errors, make_recognizer  # noqa: E402
from telephony.g711 import ulaw_decode, ulaw_encode  # noqa: E402
from telephony.tts import make_synthesizer  # noqa: E402
from yibao_common.spoken import speech_text  # noqa: E402

SENTENCES = [
    # the sentences of issue 15's first measurement
    "医保电子凭证可以在微信、支付宝或者国家医保服务平台里激活。",
    "异地就医备案以后，可以在就医地直接结算。",
    "门诊报销需要带上医保卡和发票。",
    "您好，我是医保小智，请问有什么可以帮您？",
    "请问您是在职职工还是退休人员？",
    "正在为您转接人工客服，请稍候。",
    "参保人员住院治疗，需要先支付起付线以下的费用。",
    "医保卡丢失以后，请尽快办理挂失和补卡。",
    "灵活就业人员可以按月缴纳医保费用。",
    "抱歉，我没有听清楚，请您再说一遍。",
    "按1咨询医保电子凭证，按2咨询异地就医，按0转人工。",
    "感谢您的来电，再见。",
    # numbers, dates, money, phone numbers
    "请拨打医保服务热线12393咨询。",
    "2024年1月1日起，职工医保的起付线调整为800元。",
    "住院费用超过起付线的部分，报销比例是85%。",
    "城乡居民医保每人每年缴费380元。",
    "您的个人账户余额是1,256.50元。",
    "门诊慢特病的年度限额是3万元。",
    "备案有效期是6个月，到期以后需要重新办理。",
    "窗口办公时间是上午8:30到下午5:00。",
    "材料齐全的，一般在15个工作日内到账。",
    "转诊备案请在出院后30天内补办。",
    "请把材料寄到杭州市上城区解放路138号。",
    "如有疑问，也可以拨打0571-87654321。",
    "退休人员的报销比例比在职职工高5个百分点。",
    # apps and letters
    "您可以下载浙里办APP，搜索医保服务。",
    "在国家医保服务平台APP里也可以办理异地就医备案。",
    "请在支付宝里搜索医保电子凭证，点击激活。",
    "请打开微信小程序，输入您的身份证号码。",
    "扫描二维码以后，按页面提示完成人脸识别。",
    # long sentences
    "异地长期居住人员、常驻异地工作人员，可以通过国家医保服务平台办理备案，备案以后在就医地定点医疗机构住院，可以直接结算。",
    "如果您已经出院了，可以带上身份证、医保卡、出院小结和费用清单，到参保地医保经办机构申请手工报销。",
    "新生儿出生后三个月内参保缴费的，从出生之日起享受医保待遇，超过三个月的，从缴费次月起享受。",
    "亲情账户绑定以后，家人可以用您的医保个人账户支付门诊和药店的费用，但是不能用于住院。",
]

_PUNCT = re.compile(r"[\s\W_]+")


def comparable(text: str) -> str:
    """Both sides in spoken form, punctuation off: 12393 == 幺二三九三, APP == 诶批批."""
    return _PUNCT.sub("", speech_text(text))


def cer(reference: str, hypothesis: str) -> float:
    errors, length = character_errors(comparable(reference), comparable(hypothesis))
    return errors / max(1, length)


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def render_all(engine: str, voice: str, speed: float) -> tuple[list[np.ndarray], float, float, float]:
    """(8 kHz renderings, CPU seconds, audio seconds, RSS MB of the synthesis process)."""
    before = rss_mb()
    if engine == "kokoro":
        synth = make_synthesizer("kokoro", voice=voice, speed=speed)
    else:
        synth = make_synthesizer("pyttsx3")
    synth.synthesize("您好")  # warm-up: first-render costs are not per-sentence costs
    out, cpu = [], 0.0
    for text in SENTENCES:
        c0 = time.thread_time() if engine == "kokoro" else time.perf_counter()
        pcm = synth.synthesize(text)
        cpu += (time.thread_time() if engine == "kokoro" else time.perf_counter()) - c0
        out.append(np.frombuffer(pcm, dtype="<i2").copy())
    audio_s = sum(a.size for a in out) / 8000
    if engine == "kokoro":
        rss = rss_mb() - before
    else:  # espeak renders in its worker process; its wall time there is its CPU time (one thread)
        rss = rss_mb(synth.worker._process.pid)
    return out, cpu, audio_s, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="kokoro,espeak")
    parser.add_argument("--voice", default="zf_xiaobei")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--wav-dir", type=Path, default=None, help="write a few renderings here (8 kHz WAV)")
    parser.add_argument("--verbose", action="store_true", help="print every transcript")
    args = parser.parse_args()

    renders = {}
    for engine in args.engines.split(","):
        audio, cpu, secs, rss = render_all(engine, args.voice, args.speed)
        renders[engine] = (audio, cpu, secs, rss)
        print(f"{engine}: {len(audio)} sentences, {secs:.0f} s of audio in {cpu:.1f} CPU-s "
              f"(RTF {cpu / secs:.3f}), RSS {rss:.0f} MB", flush=True)

    recognizer = make_recognizer("whisper", workers=1, cpu_threads=2)
    rows = []
    for engine, (audio, cpu, secs, rss) in renders.items():
        cers, empty = [], 0
        for text, samples in zip(SENTENCES, audio):
            heard = ulaw_decode(ulaw_encode(samples))  # what the caller's handset gets
            hyp = recognizer.transcribe(heard.astype("<i2").tobytes()).text
            empty += not hyp.strip()
            cers.append(cer(text, hyp))
            if args.verbose:
                print(f"  {engine:7s} {cers[-1]:.2f}  {text}  ->  {hyp}")
        rows.append((engine, statistics.mean(cers), statistics.median(cers), empty, cpu / secs, rss))
        if args.wav_dir is not None:
            args.wav_dir.mkdir(parents=True, exist_ok=True)
            for i in (0, 13, 25):
                with wave.open(str(args.wav_dir / f"{engine}-{i + 1:02d}.wav"), "wb") as w:
                    w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
                    w.writeframes(ulaw_decode(ulaw_encode(audio[i])).astype("<i2").tobytes())

    print(f"\n{len(SENTENCES)} sentences, 8 kHz µ-law, Whisper-base (domain prompt); cores {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("| engine | CER mean | CER median | not recognised | RTF | RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for engine, mean, median, empty, rtf, rss in rows:
        print(f"| {engine} | {mean:.2f} | {median:.2f} | {empty}/{len(SENTENCES)} | {rtf:.3f} | {rss:.0f} |")
    by = {r[0]: r[1] for r in rows}
    if "kokoro" in by and "espeak" in by:
        print(f"kokoro / espeak CER: {by['kokoro'] / max(by['espeak'], 1e-9):.2f} (target <= 0.33; kokoro <= 0.25)")


if __name__ == "__main__":
    main()
