"""Speech synthesis: pyttsx3 + espeak-ng to 8 kHz PCM, number reading, the prompt cache."""

from __future__ import annotations

import asyncio
import threading
import time
import wave

import numpy as np
import pytest

from telephony.audio import SAMPLE_RATE, rms
from telephony.tts import (
    PromptCache,
    Pyttsx3Synthesizer,
    Synthesizer,
    espeak_available,
    load_prompts,
    make_synthesizer,
)
from yibao_common.spoken import cardinal, spoken_chinese

needs_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng (libespeak-ng) or pyttsx3 not installed: apt-get install espeak-ng"
)

SENTENCE = "您好，这里是医保小智，请问有什么可以帮您？"


def assert_speech(pcm: bytes, *, min_s: float = 0.5, max_s: float = 15.0) -> None:
    assert isinstance(pcm, bytes) and len(pcm) % 2 == 0
    seconds = len(pcm) / 2 / SAMPLE_RATE
    assert min_s <= seconds <= max_s, f"{seconds:.2f} s of audio"
    assert rms(pcm) > 500, f"RMS {rms(pcm):.0f}: (nearly) silent"


# --- number reading ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, spoken",
    [
        ("请拨打12393咨询", "请拨打幺二三九三咨询"),
        ("12393", "幺二三九三"),
        ("报销1200元", "报销一千二百元"),
        ("1,200元", "一千二百元"),
        ("2024年1月1日起", "二〇二四年一月一日起"),
        ("2024-01-01", "二〇二四年一月一日"),
        ("2024/1/15", "二〇二四年一月十五日"),
        ("报销比例80%", "报销比例百分之八十"),
        ("7.5%", "百分之七点五"),
        ("１２３９３", "幺二三九三"),
        ("3.5元", "三点五元"),
        ("0.5元", "零点五元"),
        ("起付线1500元，封顶线30万元", "起付线一千五百元，封顶线三十万元"),
        ("100000元", "十万元"),
        ("2000元", "两千元"),
        ("第2次", "第二次"),
        ("12个月", "十二个月"),
        ("满60岁", "满六十岁"),
        ("13812345678", "幺三八幺二三四五六七八"),
        ("拨打110", "拨打幺幺零"),
        ("尾号1234", "尾号幺二三四"),
        ("0571-88889999", "零五七幺，八八八八九九九九"),
        ("2-3天", "二到三天"),
        ("5~10个工作日", "五到十个工作日"),
        ("10:30", "十点三十分"),
        ("8:05", "八点零五分"),
        ("按1咨询医保电子凭证，按0转人工", "按一咨询医保电子凭证，按零转人工"),
        ("没有数字的句子。", "没有数字的句子。"),
    ],
)
def test_spoken_chinese(text: str, spoken: str) -> None:
    assert spoken_chinese(text) == spoken


@pytest.mark.parametrize(
    "n, spoken",
    [(0, "零"), (5, "五"), (10, "十"), (12, "十二"), (20, "二十"), (112, "一百一十二"), (1005, "一千零五"),
     (1200, "一千二百"), (10010, "一万零一十"), (120000, "十二万"), (100010000, "一亿零一万"),
     (2000, "两千"), (200, "二百")],
)
def test_cardinal(n: int, spoken: str) -> None:
    assert cardinal(n) == spoken


# --- the factory ------------------------------------------------------------------------------
def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown TTS engine 'festival'.*pyttsx3"):
        make_synthesizer("festival")


def test_prompts_file_has_the_fixed_prompts() -> None:
    prompts = load_prompts()
    assert prompts["greeting"] == "您好，这里是医保小智，本次通话可能会被录音以提升服务质量。请问有什么可以帮您？"
    assert prompts["menu"].startswith("按1咨询医保电子凭证，按2咨询异地就医，按3咨询报销，按0转人工")
    for name in ("reprompt_silence", "goodbye_silence", "hold", "not_heard", "goodbye"):
        assert prompts[name].strip()


# --- synthesis --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth() -> Pyttsx3Synthesizer:
    if not espeak_available():
        pytest.skip("espeak-ng (libespeak-ng) or pyttsx3 not installed: apt-get install espeak-ng")
    return make_synthesizer("pyttsx3")


@needs_espeak
def test_synthesizes_non_silent_8khz_pcm(synth: Pyttsx3Synthesizer) -> None:
    assert isinstance(synth, Synthesizer)
    assert synth.sample_rate == SAMPLE_RATE == 8000
    assert "cmn-latn-pinyin" in synth.voice_id
    assert_speech(synth.synthesize(SENTENCE))


SPEAK_AND_LINGER = """
import time
from telephony.tts import make_synthesizer
make_synthesizer("pyttsx3").synthesize("您好")
time.sleep(0.3)  # the driver's callback may run after runAndWait returned
"""


@needs_espeak
def test_the_espeak_driver_prints_nothing_to_stdout() -> None:
    # pyttsx3's driver prints "Audio saved to <file>" from a callback; the hub's stdout is a log.
    # A real process, because the print happens in its TTS worker process, which shares its stdout.
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", SPEAK_AND_LINGER], capture_output=True, text=True, check=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent.parent)
    assert out.stdout == ""


@needs_espeak
def test_two_consecutive_syntheses_both_produce_audio(synth: Pyttsx3Synthesizer) -> None:
    first = synth.synthesize("报销比例是百分之八十。")
    second = synth.synthesize("请拨打12393咨询。")
    assert_speech(first)
    assert_speech(second)
    assert first != second  # the second file is not a stale copy of the first


@needs_espeak
def test_slower_rate_gives_longer_audio_in_one_process(synth: Pyttsx3Synthesizer) -> None:
    # each rate has its own worker process: a rate change inside one espeak process did not always take
    slow, fast = Pyttsx3Synthesizer(rate=110), Pyttsx3Synthesizer(rate=200)
    for _ in range(2):  # and alternating between them changes nothing
        assert len(slow.synthesize(SENTENCE)) > 1.2 * len(fast.synthesize(SENTENCE))
        assert len(synth.synthesize(SENTENCE)) > 1.1 * len(fast.synthesize(SENTENCE))


@needs_espeak
def test_a_crashed_espeak_worker_is_replaced_and_the_text_still_spoken() -> None:
    import os
    import signal

    synth = Pyttsx3Synthesizer(volume=0.9)  # a voice setting of its own: its own worker
    worker = synth.worker
    assert_speech(synth.synthesize("先说一句。"))
    first = worker._process.pid
    os.kill(first, signal.SIGSEGV)  # what espeak did to a CI run's test process
    worker._process.join(5)
    assert_speech(synth.synthesize(SENTENCE))  # this process is still here, and so is the sentence
    assert worker.restarts == 1 and worker._process.pid != first

    # killed in the middle of a render: the render is done again in a new worker
    done: list[bytes] = []
    talker = threading.Thread(target=lambda: done.append(synth.synthesize(SENTENCE * 8)))
    talker.start()
    time.sleep(0.02)
    os.kill(worker._process.pid, signal.SIGKILL)
    talker.join(60)
    assert_speech(done[0], max_s=120)
    assert worker.restarts == 2


@needs_espeak
def test_a_hung_espeak_worker_is_killed_and_the_text_rendered_again(caplog) -> None:
    import os
    import signal

    synth = Pyttsx3Synthesizer(volume=0.8, timeout=1.0)  # a hung render is given up after 3 s
    hung = synth.worker._process.pid
    os.kill(hung, signal.SIGSTOP)
    started = time.monotonic()
    assert_speech(synth.synthesize(SENTENCE))
    assert 2.5 < time.monotonic() - started < 30
    assert synth.worker.restarts == 1
    assert "no answer after 3 s" in caplog.text
    with pytest.raises(ProcessLookupError):  # the hung one was killed, not left behind
        for _ in range(50):
            os.kill(hung, 0)
            time.sleep(0.1)


@needs_espeak
def test_silence_is_trimmed(synth: Pyttsx3Synthesizer) -> None:
    samples = np.frombuffer(synth.synthesize(SENTENCE), dtype="<i2")
    lead = np.flatnonzero(np.abs(samples) > 300)[0]
    assert lead <= 0.06 * SAMPLE_RATE
    assert synth.synthesize("，。？") == b""


@needs_espeak
def test_concurrent_calls_from_threads(synth: Pyttsx3Synthesizer) -> None:
    texts = [f"第{i}位参保人，您的报销比例是百分之{50 + i}。" for i in range(8)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = synth.synthesize(texts[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results) == list(range(len(texts)))
    for i in range(len(texts)):
        assert_speech(results[i])
    # each thread got its own sentence, not a neighbour's (espeak output varies by a few samples
    # from run to run, so compare lengths with a sequential render)
    for i in (0, 3, 7):
        alone = len(synth.synthesize(texts[i]))
        assert abs(len(results[i]) - alone) < 0.05 * alone


@needs_espeak
def test_synthesize_async_does_not_block_the_loop(synth: Pyttsx3Synthesizer) -> None:
    async def main() -> list[bytes]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        out = await asyncio.gather(*(synth.synthesize_async(f"请按{i}号键。") for i in range(4)))
        t.cancel()
        assert ticks > 1
        return out

    for pcm in asyncio.run(main()):
        assert_speech(pcm, min_s=0.3)


# --- the prompt cache -------------------------------------------------------------------------
class CountingSynth:
    """Wraps a synthesizer and counts engine calls."""

    def __init__(self, inner: Synthesizer, identity: dict | None = None) -> None:
        self.inner = inner
        self.identity = identity
        self.sample_rate = inner.sample_rate
        self.calls = 0

    @property
    def cache_identity(self):
        return self.identity or self.inner.cache_identity

    def synthesize(self, text: str) -> bytes:
        self.calls += 1
        return self.inner.synthesize(text)


@needs_espeak
def test_prompt_cache_renders_once_then_reads_disk(synth: Pyttsx3Synthesizer, tmp_path) -> None:
    counting = CountingSynth(synth)
    cache = PromptCache(counting, tmp_path)
    greeting = cache.get("greeting")
    assert counting.calls == 1
    assert_speech(greeting)
    files = list(tmp_path.glob("greeting-*.wav"))
    assert len(files) == 1
    with wave.open(str(files[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)

    assert cache.get("greeting") == greeting  # same instance: memory
    fresh = PromptCache(counting, tmp_path)  # new process, same directory: disk
    assert fresh.get("greeting") == greeting
    assert counting.calls == 1 and fresh.renders == 0

    with pytest.raises(KeyError, match="unknown prompt"):
        cache.get("no_such_prompt")


@needs_espeak
def test_prompt_cache_key_covers_voice_settings_and_text(synth: Pyttsx3Synthesizer, tmp_path) -> None:
    prompts = {"menu": "按1咨询医保电子凭证，按0转人工。"}
    normal = PromptCache(synth, tmp_path, prompts)
    slow = PromptCache(CountingSynth(synth, {**synth.cache_identity, "rate": 120}), tmp_path, prompts)
    edited = PromptCache(synth, tmp_path, {"menu": "按1咨询医保电子凭证，按2咨询异地就医，按0转人工。"})
    paths = {normal.path_for(prompts["menu"], "menu"), slow.path_for(prompts["menu"], "menu"),
             edited.path_for(edited.prompts["menu"], "menu")}
    assert len(paths) == 3


@needs_espeak
def test_warm_renders_every_prompt(synth: Pyttsx3Synthesizer, tmp_path) -> None:
    counting = CountingSynth(synth)
    cache = PromptCache(counting, tmp_path)
    durations = cache.warm()
    assert set(durations) == set(load_prompts())
    assert all(0.5 < s < 20 for s in durations.values()), durations
    assert counting.calls == len(durations)
    PromptCache(counting, tmp_path).warm()
    assert counting.calls == len(durations)  # second warm: all from disk
