"""The neural phone voice (Kokoro-82M on onnxruntime): real renders, recognised by the real Whisper;
clause-by-clause speech on the bounded render pool; the pre-render cache; the espeak fallback."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from telephony.g711 import ulaw_decode, ulaw_encode
from telephony.kokoro import MODEL_SHA256, KokoroUnavailable, ensure_kokoro_model, load_voice
from telephony.tts import (
    KokoroSynthesizer,
    Prerenderer,
    PromptCache,
    Pyttsx3Synthesizer,
    RenderPool,
    _to_8k,
    make_synthesizer,
    phone_synthesizer,
    speak_clauses,
    split_clauses,
)
from yibao_common.spoken import spell_letters, speech_text


@pytest.fixture(scope="module")
def kokoro() -> KokoroSynthesizer:
    return make_synthesizer("kokoro")


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


# -- text ---------------------------------------------------------------------------------------------
def test_letters_money_and_numbers_are_read_the_chinese_way() -> None:
    assert spell_letters("浙里办APP") == "浙里办诶批批"
    assert speech_text("用ID登录") == "用艾迪登录"
    assert speech_text("¥1,200") == "一千二百元"
    assert speech_text("￥35.5元") == "三十五点五元"
    assert speech_text("拨打12393") == "拨打幺二三九三"
    assert speech_text("2024-01-01起报销80%") == "二〇二四年一月一日起报销百分之八十"


def test_replies_are_cut_into_clauses_that_join_back() -> None:
    text = "异地就医备案后，在就医地定点医疗机构住院，可以直接结算，出院时只需要支付个人负担的部分。请问还有什么可以帮您？"
    clauses = split_clauses(text)
    assert "".join(clauses) == text
    assert clauses[-1] == "请问还有什么可以帮您？" and len(clauses) >= 3
    assert all(len(c) >= 6 for c in clauses)
    # a list with 、 is never cut; a short sentence stays whole
    assert split_clauses("可以在微信、支付宝或者国家医保服务平台里激活。") == ["可以在微信、支付宝或者国家医保服务平台里激活。"]
    assert split_clauses("  ") == []


# -- the voice ----------------------------------------------------------------------------------------
def test_model_is_joined_once_and_checked(tmp_path: Path) -> None:
    first = ensure_kokoro_model(tmp_path)
    assert first.stat().st_size == 92_361_271
    inode = first.stat().st_ino
    assert ensure_kokoro_model(tmp_path).stat().st_ino == inode  # not joined again
    (tmp_path / "kokoro-v1.0-int8" / "model.onnx.sha256").write_text("0" * 64)
    ensure_kokoro_model(tmp_path)  # a damaged stamp: joined and verified again
    assert (tmp_path / "kokoro-v1.0-int8" / "model.onnx.sha256").read_text().strip() == MODEL_SHA256


def test_voices_are_checked(tmp_path: Path) -> None:
    assert load_voice("zf_xiaobei").shape == (510, 256)
    with pytest.raises(KokoroUnavailable, match="zf_xiaobei"):
        load_voice("zf_nobody")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(KokoroUnavailable, match="not a Kokoro voice"):
        load_voice(bad)


def test_kokoro_speaks_8k_audio_without_the_models_long_silences(kokoro: KokoroSynthesizer) -> None:
    audio = samples(kokoro.synthesize("您好，请讲。"))
    assert 0.6 < audio.size / 8000 < 2.5
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > 600)
    assert loud[0] < 0.1 * 8000 and audio.size - loud[-1] < 0.25 * 8000  # Kokoro adds ~0.4 s / ~1 s
    assert kokoro.synthesize("。，") == b""
    assert kokoro.cache_identity["voice"] != make_synthesizer("kokoro", voice="zm_yunxi").cache_identity["voice"]


def test_the_elderly_preset_speaks_slower(kokoro: KokoroSynthesizer) -> None:
    elderly = make_synthesizer("kokoro", elderly=True)
    assert elderly.speed == 0.85 and elderly.cache_identity != kokoro.cache_identity
    text = "请带上医保卡和发票。"
    assert samples(elderly.synthesize(text)).size > 1.1 * samples(kokoro.synthesize(text)).size


def test_the_anti_alias_filter_removes_what_8k_cannot_carry() -> None:
    t = np.arange(24000) / 24000
    above = _to_8k((0.5 * np.sin(2 * np.pi * 5000 * t)).astype(np.float32))  # would alias to 3 kHz
    below = _to_8k((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    rms = lambda x: float(np.sqrt(np.mean(x[400:-400].astype(np.float64) ** 2)))  # noqa: E731
    assert below.size == 8000 and rms(below) > 10000
    assert rms(above) < rms(below) / 100  # more than 40 dB down


@pytest.mark.slow
def test_a_caller_can_follow_kokoro_through_mu_law(kokoro: KokoroSynthesizer) -> None:
    """What issue 15 measured: espeak's sentence came back empty; Kokoro's is recognised."""
    from telephony.asr import character_errors, make_recognizer

    recognizer = make_recognizer("whisper", workers=1)
    for text in ("医保电子凭证可以在微信、支付宝或者国家医保服务平台里激活。", "门诊报销需要带上医保卡和发票。"):
        heard = ulaw_decode(ulaw_encode(samples(kokoro.synthesize(text))))
        hyp = recognizer.transcribe(heard.astype("<i2").tobytes()).text
        errors, length = character_errors(text, hyp)
        assert errors / length < 0.3, hyp


# -- render pool, clause by clause, cache ---------------------------------------------------------------
def test_the_pool_renders_the_earliest_deadline_first_and_drops_cancelled_jobs() -> None:
    pool = RenderPool(1, name="test-pool")
    gate = threading.Event()
    order: list[str] = []
    blocker = pool.submit(gate.wait)  # holds the only worker
    later = pool.submit(order.append, "later", deadline=time.monotonic() + 5)
    dropped = pool.submit(order.append, "dropped", deadline=time.monotonic() + 1)
    now = pool.submit(order.append, "now", deadline=time.monotonic())
    assert dropped.cancel()
    gate.set()
    for f in (blocker, later, now):
        f.result(timeout=5)
    assert order == ["now", "later"] and pool.busy == 0
    pool.close()
    with pytest.raises(RuntimeError):
        pool.submit(order.append, "x")


def test_clauses_play_in_order_and_cached_clauses_are_not_rendered_again(kokoro, tmp_path: Path) -> None:
    cache = PromptCache(kokoro, tmp_path, prompts={"greeting": "您好，请讲。"})
    text = "您好，我是医保小智。医保卡丢失以后，请尽快办理挂失。"
    clauses = split_clauses(text)
    pre = Prerenderer(cache)
    pre.submit_prompts()
    pre.submit([text])
    assert pre.idle.wait(120)
    pre.stop()
    assert pre.rendered == len(clauses) + 1 and pre.failed == 0
    assert cache.lookup("您好，请讲。", name="greeting") is not None  # a prompt pre-rendered under its name

    async def speak() -> list[tuple[int, np.ndarray]]:
        return [item async for item in speak_clauses(kokoro, clauses, cache)]

    renders = cache.renders
    said = asyncio.run(speak())
    assert cache.renders == renders, "every clause came from the cache"
    assert [i for i, _ in said] == list(range(len(clauses)))
    assert said[0][1].size > samples(cache.lookup(clauses[0], name="clause")).size  # + the pause after it
    assert said[-1][1].size == samples(cache.lookup(clauses[-1], name="clause")).size  # the last has none


def test_a_reply_starts_with_its_first_sound(kokoro, tmp_path: Path) -> None:
    # the render's quiet lead-in (30 ms kept when Kokoro's edges are trimmed) is not played before an answer
    cache = PromptCache(kokoro, tmp_path, prompts={})
    clauses = split_clauses("医保电子凭证可以在微信里激活。激活以后就能看病买药。")
    cache.get_text(clauses[0], name="clause", remember=False)

    async def first() -> np.ndarray:
        async for _, audio in speak_clauses(kokoro, clauses[:1], cache):
            return audio

    def onset_ms(x: np.ndarray) -> float:
        return np.flatnonzero(np.abs(x.astype(np.int32)) > 200)[0] / 8

    cached = samples(cache.lookup(clauses[0], name="clause"))
    said = asyncio.run(first())
    assert onset_ms(cached) >= 15 and onset_ms(said) <= 5, (onset_ms(cached), onset_ms(said))
    assert np.array_equal(said[-1000:], cached[-1000:])  # the rest is the cached clause, untouched


def test_stopping_a_reply_cancels_the_clauses_not_yet_rendered(kokoro, tmp_path: Path) -> None:
    cache = PromptCache(kokoro, tmp_path, prompts={})
    clauses = split_clauses("参保人员住院治疗，需要先支付起付线以下的费用，超过的部分按比例报销，"
                            "每年有最高支付限额，超过限额的部分可以申请大病保险。")
    assert len(clauses) >= 4

    async def first_clause_then_barge_in() -> None:
        stream = speak_clauses(kokoro, clauses, cache, lookahead=2)
        await stream.__anext__()
        await stream.aclose()  # what cancelling the speech task does on barge-in

    asyncio.run(first_clause_then_barge_in())
    deadline = time.monotonic() + 30
    while kokoro.pool.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    rendered = [c for c in clauses if cache.lookup(c, name="clause") is not None]
    assert len(rendered) <= 3, "only the clause heard and the lookahead were rendered"
    assert clauses[-1] not in rendered


def test_the_phone_falls_back_to_espeak_when_kokoro_cannot_load(caplog, tmp_path: Path) -> None:
    with caplog.at_level(logging.ERROR, logger="telephony.tts"):
        synth = phone_synthesizer("kokoro", voice=str(tmp_path / "missing.bin"))
    assert isinstance(synth, Pyttsx3Synthesizer)
    assert "espeak" in caplog.text and "missing.bin" in caplog.text
    assert samples(synth.synthesize("您好")).size > 1000  # the caller is not left in silence
    with pytest.raises(ValueError, match="unknown TTS engine"):
        phone_synthesizer("festival")


def test_a_clause_kokoro_fails_on_is_spoken_by_espeak_and_counted(tmp_path: Path, caplog) -> None:
    """A voice damaged in memory (half of each style row gone) makes every render fail in Kokoro: the
    caller still hears the clause (espeak-ng), and the metrics count the fallback and time the render."""
    from prometheus_client import CollectorRegistry

    from telephony.metrics import VoiceMetrics

    registry = CollectorRegistry()
    synth = make_synthesizer("kokoro")  # its own: the module's synthesizer stays whole
    cache = PromptCache(synth, tmp_path, prompts={}, metrics=VoiceMetrics(registry))
    synth.styles = np.ascontiguousarray(synth.styles[:, :128])
    with caplog.at_level(logging.ERROR, logger="telephony.tts"):
        pcm = cache.get_text("您好，请讲。")
    assert samples(pcm).size > 1000 and "spoken by espeak-ng" in caplog.text
    engine = {"engine": synth.engine_name}
    assert registry.get_sample_value("xiaozhi_tts_fallbacks_total", engine) == 1
    assert registry.get_sample_value("xiaozhi_tts_duration_seconds_count", engine) == 1
    assert registry.get_sample_value("xiaozhi_tts_failures_total", engine) == 0
