"""An end of turn that listens to the words: a complete question is answered at the first pause.

Unit level (the rule and the detector's early finish) and a call through the real hotline (Whisper,
Kokoro, the conversation core) where the fixture question is answered before the 600 ms hangover.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from telephony.audio import FRAME_BYTES, load_wav
from telephony.vad import SileroVad, TurnDetector
from telephony.voice import is_complete_turn

ASR = Path(__file__).parent.parent / "data" / "asr"


def test_questions_that_end_like_questions_are_complete() -> None:
    for text in ("医保电子凭证怎么激活？", "异地就医怎么备案", "住院报销需要什么材料", "门诊费用可以报销吗",
                 "今年的起付线是多少", "医保局在哪里", "能不能报销", "我要转人工。"):
        assert is_complete_turn(text), text
    for text in ("我想问一下", "异地就医的话", "医保卡丢了怎么", "我的医保卡", "", "，。"):
        assert not is_complete_turn(text), text


def test_a_short_answer_is_complete_only_when_the_bot_asked_something() -> None:
    for text in ("是的", "不用了", "杭州", "一"):
        assert not is_complete_turn(text)
        assert is_complete_turn(text, expecting_answer=True)
    assert not is_complete_turn("我想问一下异地就医的事情", expecting_answer=True)  # not short: wait


def test_the_detector_can_end_a_turn_at_its_pause_with_the_pause_audio() -> None:
    q = load_wav(ASR / "02_yidi_beian.wav")
    pcm = np.concatenate([q, np.zeros(8000, np.int16)]).astype("<i2").tobytes()
    detector, vad = TurnDetector(end_silence_ms=600, pause_ms=300), SileroVad()
    pause = None
    for i in range(0, len(pcm) - FRAME_BYTES, FRAME_BYTES):
        frame = pcm[i:i + FRAME_BYTES]
        event = detector.feed(frame, vad.is_speech(frame))
        if event is not None and event.kind == "pause":
            pause = event
            break
    assert pause is not None and detector.in_turn and detector.silent_ms >= 300
    end = detector.finish()
    assert end.kind == "end" and end.audio == pause.audio and not detector.in_turn
    assert detector.finish() is None
