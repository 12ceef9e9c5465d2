"""Speech synthesis for the phone channel: text in, 16-bit mono PCM at 8 kHz out.

* ``Synthesizer`` is the interface; ``make_synthesizer(kind, **options)`` builds one by name so a
  better engine can replace espeak by configuration (``register_synthesizer`` adds kinds).
* ``KokoroSynthesizer`` (the default, ``kokoro``): Kokoro-82M's neural Mandarin voice on onnxruntime
  (telephony/kokoro.py), rendered on a bounded ``RenderPool`` of threads, earliest deadline first.
* ``Pyttsx3Synthesizer`` (``pyttsx3``/``espeak``) drives pyttsx3's espeak driver with the
  ``sit/cmn-latn-pinyin`` voice: a configured engine and the fallback ``phone_synthesizer`` switches
  to, logged, when Kokoro cannot load.
* numbers are read aloud through ``yibao_common.spoken`` (amounts, dates, phone numbers; Kokoro also
  spells Latin letters the Chinese way).
* ``split_clauses`` cuts a reply into clauses; ``speak_clauses`` renders them one after another so the
  first plays while the next renders, cached clauses straight from the ``PromptCache``.
* ``PromptCache`` renders the fixed prompts of ``prompts.yaml`` once and plays them from disk; the
  same content-hashed files hold pre-rendered clauses of knowledge-base answers (``Prerenderer``).

espeak runs in worker processes, one per voice setting (see ``EspeakWorker``): its process-wide,
multi-threaded state cannot take the hub down with it. ``synthesize_async`` waits for a render on
one dedicated thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from yibao_common.spoken import speech_text, spoken_chinese

from .audio import SAMPLE_RATE, load_wav, resample
from .metrics import VoiceMetrics

log = logging.getLogger("telephony.tts")

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")
DEFAULT_RATE = 150  # espeak words/minute; its default 200 is too fast for a phone line
ELDERLY_RATE = 120  # 适老化: slower speech for elderly callers
PREFERRED_VOICE = "cmn-latn-pinyin"
FALLBACK_VOICE = "cmn"
ELDERLY_SPEED = 0.85  # 适老化 preset of the neural voice (its normal speed is 1.0)


class TTSError(RuntimeError):
    """Synthesis failed (the engine wrote no audio, or timed out)."""


class TTSUnavailable(TTSError):
    """The engine cannot run on this machine (e.g. espeak-ng is not installed)."""


# --------------------------------------------------------------------------------------------
# The interface and the factory
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Synthesizer(Protocol):
    """Anything that turns Chinese text into 16-bit little-endian mono PCM at ``sample_rate``."""

    sample_rate: int  # always telephony.audio.SAMPLE_RATE (8000) for the call path

    def synthesize(self, text: str) -> bytes: ...

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        """What determines the sound besides the text (engine, voice, rate...): the prompt-cache key."""
        ...


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
        return _EXECUTOR


async def synthesize_async(synth: Synthesizer, text: str, *, deadline: float | None = None) -> bytes:
    """``synth.synthesize(text)`` off the event loop: on the synthesizer's own ``RenderPool`` when it has
    one (Kokoro; earliest ``deadline`` first, default now), else on the dedicated TTS thread (espeak)."""
    pool = getattr(synth, "pool", None)
    if isinstance(pool, RenderPool):
        return await asyncio.wrap_future(pool.submit(synth.synthesize, text, deadline=deadline))
    return await asyncio.get_running_loop().run_in_executor(_executor(), synth.synthesize, text)


class RenderPool:
    """A bounded pool of render threads that takes the job with the earliest deadline first.

    With ten callers on two cores, a reply's first clause (needed now) must not wait behind clauses
    of other replies that will only be heard seconds later. ``submit`` returns a
    ``concurrent.futures.Future``; cancelling it before a thread takes it drops the job (barge-in).
    ``busy`` counts jobs queued or running (the ``Prerenderer`` waits while it is non-zero).
    """

    def __init__(self, workers: int = 2, name: str = "tts") -> None:
        self.workers = max(1, int(workers))
        self._heap: list[tuple[float, int, Future, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._running = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> int:
        with self._cv:
            return len(self._heap) + self._running

    def submit(self, fn: Callable[..., Any], *args: Any, deadline: float | None = None) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("render pool closed")
            heapq.heappush(self._heap, (time.monotonic() if deadline is None else deadline, next(self._seq), fut, fn, args))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, fut, fn, args = heapq.heappop(self._heap)
                if not fut.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                self._running += 1
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 — handed to whoever waits for it
                fut.set_exception(e)
            finally:
                with self._cv:
                    self._running -= 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, fut, _, _ in self._heap:
                fut.cancel()
            self._heap.clear()
            self._cv.notify_all()


_REGISTRY: dict[str, Callable[..., Synthesizer]] = {}


def register_synthesizer(kind: str, factory: Callable[..., Synthesizer]) -> None:
    """Make ``make_synthesizer(kind, **options)`` build ``factory(**options)``."""
    _REGISTRY[kind.lower()] = factory


def make_synthesizer(kind: str = "pyttsx3", **options: Any) -> Synthesizer:
    """The synthesizer called ``kind`` ("kokoro", "pyttsx3"/"espeak", or a registered one) built with
    ``options``. Every built-in kind takes ``elderly=True`` for its slower 适老化 preset."""
    try:
        factory = _REGISTRY[kind.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown TTS engine {kind!r}; known engines: {known}") from None
    return factory(**options)


# --------------------------------------------------------------------------------------------
# pyttsx3 + espeak-ng
# --------------------------------------------------------------------------------------------
# espeak-ng is initialised by pyttsx3 in AUDIO_OUTPUT_RETRIEVAL mode, which synthesises on
# espeak's own thread while the caller's thread queues text and changes voice and rate. That
# library state is process-wide and racy: a CI run died of a segfault inside espeak_Synth, and a
# rate change inside one process did not always take. So espeak never runs in the hub: each voice
# setting (voice, rate, volume) gets a worker process of its own that renders one text at a time.
# A worker that crashes or hangs is replaced and the text rendered again; the hub and its live
# calls carry on.
_WORKER_START_TIMEOUT_S = 60.0  # spawn + imports + espeak init; far less on a warm machine


def _driver_print_to_log(*args: Any, **_kwargs: Any) -> None:
    log.debug("pyttsx3 espeak driver: %s", " ".join(map(str, args)))


def _espeak_engine() -> Any:
    """The worker's pyttsx3 espeak engine (espeak cannot be initialised twice in a process)."""
    try:
        import pyttsx3
        import pyttsx3.drivers.espeak as driver

        engine = pyttsx3.init("espeak")
    except ImportError as e:
        raise TTSUnavailable(f"pyttsx3 is not installed ({e})") from e
    except (OSError, RuntimeError, AttributeError) as e:
        raise TTSUnavailable(f"espeak-ng is not usable ({e}); install it with: apt-get install espeak-ng") from e
    # The driver prints "Audio saved to <file>" from its callback; this module global shadows the
    # builtin for that module alone, so it goes to the debug log instead of the hub's stdout.
    driver.print = _driver_print_to_log
    return engine


def _pick_voice(engine: Any, wanted: str) -> str:
    voices = engine.getProperty("voices")
    for match in (wanted, FALLBACK_VOICE):
        exact = [v for v in voices if v.id.split("/")[-1] == match]
        loose = [v for v in voices if match in v.id or match in (v.name or "")]
        found = exact or loose
        if found:
            if match != wanted:
                log.warning("espeak voice %r not found; falling back to %r (reads many characters "
                            "as English-spelled pinyin)", wanted, found[0].id)
            return found[0].id
    raise TTSUnavailable(f"no Mandarin espeak-ng voice ({wanted!r} or {FALLBACK_VOICE!r}) installed")


def _read_wav_when_complete(path: Path, *, timeout: float, poll: float = 0.01) -> np.ndarray | None:
    """The samples of ``path`` once it exists, is non-empty, has stopped growing and parses; else None."""
    deadline = time.monotonic() + timeout
    last_size = -1
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = -1
        if size > 44 and size == last_size:
            try:
                with wave.open(str(path), "rb") as w:
                    if w.getsampwidth() == 2 and w.getnframes() > 0:
                        rate, frames = w.getframerate(), w.readframes(w.getnframes())
                        samples = np.frombuffer(frames, dtype="<i2")
                        if w.getnchannels() > 1:
                            samples = samples.reshape(-1, w.getnchannels()).mean(axis=1).astype(np.int16)
                        return resample(samples, rate, SAMPLE_RATE)
            except (wave.Error, EOFError):
                pass  # header not complete yet
        last_size = size
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll)


def trim_silence(samples: np.ndarray, *, threshold: int = 300, keep_lead_s: float = 0.05,
                 keep_tail_s: float = 0.1, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Cut leading/trailing silence, keeping a short margin so word onsets are not clipped."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples[:0]
    start = max(0, loud[0] - int(keep_lead_s * rate))
    end = min(samples.size, loud[-1] + 1 + int(keep_tail_s * rate))
    return samples[start:end]


def _render_in_worker(engine: Any, text: str, retries: int, timeout: float) -> tuple[np.ndarray, int]:
    """``text`` as 8 kHz samples and the number of espeak runs it took (worker process only)."""
    from pyttsx3.drivers import _espeak

    with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
        for attempt in range(1, retries + 2):
            path = Path(tmp) / f"out{attempt}.wav"  # a new file each attempt: never a stale one
            started = time.monotonic()
            engine.save_to_file(text, str(path))
            engine.runAndWait()
            # runAndWait normally returns after the write; a missing file gets a short grace
            samples = _read_wav_when_complete(path, timeout=min(0.5, timeout))
            _espeak.Synchronize()  # espeak's thread is idle before anything else touches espeak
            if samples is not None and samples.size:
                log.debug("tts: %d chars -> %.2f s audio in %.3f s", len(text),
                          samples.size / SAMPLE_RATE, time.monotonic() - started)
                return samples, attempt
            log.warning("tts: espeak wrote no audio (attempt %d of %d)", attempt, retries + 1)
    raise TTSError(f"espeak wrote no audio for {text[:30]!r} after {retries + 1} attempts")


def _worker_main(conn: Any, voice: str, rate: int, volume: float, retries: int, timeout: float) -> None:
    """A TTS worker process: set espeak up once for this voice, then answer render requests.

    Requests are texts (``None`` ends the worker); answers are ``("ok", pcm, espeak_runs)`` or
    ``("error", exception_class_name, message)``. The first message is ``("ready", voice_id)``.
    """
    try:
        engine = _espeak_engine()
        voice_id = _pick_voice(engine, voice)
        # The driver's own setProperty applies at once; engine.setProperty would queue the change
        # until the next runAndWait (measured with pyttsx3 2.99: one render late).
        driver = engine.proxy._driver
        driver.setProperty("voice", voice_id)
        driver.setProperty("rate", rate)
        driver.setProperty("volume", volume)
    except TTSError as e:
        conn.send(("error", type(e).__name__, str(e)))
        return
    conn.send(("ready", voice_id))
    while True:
        try:
            text = conn.recv()
        except (EOFError, OSError):  # the hub has gone
            return
        if text is None:
            return
        try:
            samples, runs = _render_in_worker(engine, text, retries, timeout)
            conn.send(("ok", samples.astype("<i2").tobytes(), runs))
        except Exception as e:  # noqa: BLE001 — reported to the caller, the worker carries on
            conn.send(("error", type(e).__name__, str(e)))


class EspeakWorker:
    """One espeak worker process for one voice setting, restarted when it crashes or hangs.

    ``render`` is thread-safe: callers take turns (espeak renders one text at a time anyway).
    """

    def __init__(self, voice: str, rate: int, volume: float, *, retries: int = 2, timeout: float = 10.0) -> None:
        self.config = (voice, rate, volume, retries, timeout)
        self.timeout = timeout
        self.restarts = 0  # workers replaced after a crash or a hang (tests and metrics)
        self.voice_id = ""
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None
        with self._lock:
            self._start()

    def _start(self) -> None:
        import multiprocessing

        # spawn: a fresh interpreter, never a fork of a process with threads and event loops
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, *self.config), name="xiaozhi-tts", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        reply = self._reply(_WORKER_START_TIMEOUT_S, "starting")
        if reply[0] != "ready":
            self._stop()
            raise TTSUnavailable(reply[2])
        self.voice_id = reply[1]

    def _reply(self, timeout: float, doing: str) -> tuple:
        try:
            if self._conn.poll(timeout):
                return self._conn.recv()
            problem = f"no answer after {timeout:g} s"
        except (EOFError, OSError):
            self._process.join(1)
            problem = f"exit code {self._process.exitcode}"
        self._stop()
        raise _WorkerLost(f"espeak worker died while {doing} ({problem})")

    def _stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)

    def render(self, text: str) -> tuple[bytes, int]:
        """``text`` as 8 kHz PCM and the espeak runs it took; one retry in a new worker if the worker dies."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if not self._process.is_alive():
                        self.restarts += 1
                        self._start()
                    self._conn.send(text)
                    reply = self._reply(self.timeout * 3, f"rendering {text[:20]!r}")
                except (_WorkerLost, OSError) as e:
                    log.error("tts: %s%s", e, "; rendering it again in a new worker" if attempt == 1 else "")
                    if attempt == 2:
                        raise TTSError(f"speech synthesis failed twice: {e}") from None
                    continue
                if reply[0] == "ok":
                    return reply[1], reply[2]
                raise TTSError(f"{reply[1]}: {reply[2]}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(2)
            self._stop()


class _WorkerLost(TTSError):
    """The worker process died or stopped answering (it has been stopped)."""


_WORKERS: dict[tuple, EspeakWorker] = {}
_WORKERS_LOCK = threading.Lock()


def espeak_worker(voice: str = PREFERRED_VOICE, rate: int = DEFAULT_RATE, volume: float = 1.0,
                  **options: Any) -> EspeakWorker:
    """The process's worker for this voice setting (started on first use, shared afterwards)."""
    key = (voice, int(rate), float(volume), tuple(sorted(options.items())))
    with _WORKERS_LOCK:
        worker = _WORKERS.get(key)
        if worker is None:
            worker = _WORKERS[key] = EspeakWorker(voice, int(rate), float(volume), **options)
        return worker


def espeak_available() -> bool:
    """Whether a Mandarin espeak voice can be rendered here (starts the default worker)."""
    try:
        espeak_worker()
        return True
    except TTSUnavailable:
        return False


class Pyttsx3Synthesizer:
    """Mandarin speech from espeak-ng through pyttsx3, as 8 kHz 16-bit mono PCM.

    Rendering happens in this voice setting's worker process (``espeak_worker``). Each text is
    rendered to a fresh temp WAV (``save_to_file`` + ``runAndWait``), then read once the file is
    complete (exists, non-empty, size stable, parseable) instead of trusting that ``runAndWait``
    returned after the write; an attempt that wrote nothing is repeated (``retries``).
    """

    engine_name = "pyttsx3-espeak"

    def __init__(self, *, voice: str = PREFERRED_VOICE, rate: int = DEFAULT_RATE, volume: float = 1.0,
                 normalize_numbers: bool = True, trim: bool = True, timeout: float = 10.0,
                 retries: int = 2) -> None:
        if not 80 <= int(rate) <= 450:
            raise ValueError(f"rate {rate} outside espeak's 80-450 words/minute")
        self.sample_rate = SAMPLE_RATE
        self.rate = int(rate)
        self.volume = float(volume)
        self.normalize_numbers = normalize_numbers
        self.trim = trim
        self.engine_calls = 0  # espeak renders actually run (tests and metrics)
        self.worker = espeak_worker(voice, self.rate, self.volume, retries=retries, timeout=timeout)
        self.voice_id = self.worker.voice_id

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return {"engine": self.engine_name, "voice": self.voice_id, "rate": self.rate,
                "volume": self.volume, "numbers": self.normalize_numbers, "trim": self.trim,
                "sample_rate": self.sample_rate}

    def synthesize(self, text: str) -> bytes:
        """``text`` as 8 kHz 16-bit mono PCM bytes (b"" for text with nothing to say)."""
        spoken = spoken_chinese(text) if self.normalize_numbers else text
        if not re.search(r"\w", spoken):
            return b""
        pcm, runs = self.worker.render(spoken)
        self.engine_calls += runs
        samples = np.frombuffer(pcm, dtype="<i2")
        if self.trim:
            samples = trim_silence(samples)
        return samples.astype("<i2").tobytes()

    async def synthesize_async(self, text: str) -> bytes:
        return await synthesize_async(self, text)


def _espeak(*, elderly: bool = False, rate: int | None = None, **options: Any) -> Pyttsx3Synthesizer:
    return Pyttsx3Synthesizer(rate=rate or (ELDERLY_RATE if elderly else DEFAULT_RATE), **options)


register_synthesizer("pyttsx3", _espeak)
register_synthesizer("espeak", _espeak)


# --------------------------------------------------------------------------------------------
# Kokoro-82M (neural Mandarin voice)
# --------------------------------------------------------------------------------------------
# A reply is spoken clause by clause: sentences, and long sentences cut at commas, so that the
# first clause plays while the next renders. A clause is also the unit of the render cache, so a
# knowledge-base answer pre-rendered alone is found again inside a reply that adds words around it.
_SENTENCE = re.compile(r"[^。！？；!?;\n]*[。！？；!?;\n]+|[^。！？；!?;\n]+")
_COMMA = re.compile(r"[^，：,:]*[，：,:]+|[^，：,:]+")
CLAUSE_MAX_CHARS = 16  # sentences longer than this are cut at commas (a short first clause plays sooner)...
CLAUSE_MIN_CHARS = 6  # ...into pieces no shorter than this (short ones join the next)
SENTENCE_PAUSE_S = 0.3  # silence after a clause that ends a sentence
COMMA_PAUSE_S = 0.15  # after a clause cut at a comma


def split_clauses(text: str) -> list[str]:
    """``text`` as the clauses it is spoken (and cached) in; joined they give ``text`` back, whitespace aside."""
    clauses: list[str] = []
    for sentence in _SENTENCE.findall(text.strip()):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= CLAUSE_MAX_CHARS:
            clauses.append(sentence)
            continue
        piece = ""
        for part in _COMMA.findall(sentence):
            piece += part
            if len(piece) >= CLAUSE_MIN_CHARS:
                clauses.append(piece.strip())
                piece = ""
        if piece.strip():
            if clauses and len(piece) < CLAUSE_MIN_CHARS:
                clauses[-1] += piece.strip()
            else:
                clauses.append(piece.strip())
    return [c for c in clauses if c]


def trim_onset(samples: np.ndarray, *, threshold: int = 200, keep_s: float = 0.005,
               rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` from just before their first sound (``keep_s`` earlier): a reply's first clause keeps
    30 ms of near-silence from trimming Kokoro's edges (cached renders too), which the caller would
    only wait through."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples
    return samples[max(0, loud[0] - int(keep_s * rate)):]


def clause_pause(clause: str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The silence that follows ``clause`` when clauses are played one after another."""
    seconds = SENTENCE_PAUSE_S if re.search(r"[。！？；!?;\n]$", clause) else COMMA_PAUSE_S
    return np.zeros(int(seconds * rate), np.int16)


def _to_8k(audio_24k: np.ndarray) -> np.ndarray:
    """24 kHz float audio -> 8 kHz int16: a polyphase FIR (Kaiser window) low-pass at 4 kHz, then 1 in 3."""
    from scipy.signal import resample_poly

    if audio_24k.size == 0:
        return np.zeros(0, np.int16)
    y = resample_poly(audio_24k.astype(np.float64), 1, 3)
    return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


class KokoroSynthesizer:
    """Mandarin speech from Kokoro-82M v1.0 (int8 ONNX), as 8 kHz 16-bit mono PCM.

    ``synthesize(text)`` renders clause by clause (each at most ~120 characters, so the model's
    510-token context is never exceeded) and joins them with short pauses. The model, vocabulary
    and G2P are loaded once per process (``telephony.kokoro.kokoro_voice``) and shared; renders run
    on ``pool`` (``workers`` threads, 1 onnxruntime thread each) when called through
    ``synthesize_async``/``speak_clauses``. Raises ``TTSUnavailable`` when something is missing.

    Args:
        voice: a vendored voice name (zf_xiaobei, zm_yunxi) or the path of a kokoro-js voice file.
        speed: 1.0 is Kokoro's normal pace; unset, ``elderly=True`` gives the slower 0.85.
    """

    engine_name = "kokoro-82m-v1.0-int8"

    def __init__(self, *, voice: str | Path = "zf_xiaobei", speed: float | None = None, elderly: bool = False,
                 workers: int = 2, threads: int = 1, cache_dir: str | Path | None = None, **_ignored: Any) -> None:
        from .kokoro import KokoroUnavailable, kokoro_voice, load_voice

        if speed is None:
            speed = ELDERLY_SPEED if elderly else 1.0
        if not 0.5 <= float(speed) <= 2.0:
            raise ValueError(f"Kokoro speed {speed} outside 0.5-2.0")
        self.sample_rate = SAMPLE_RATE
        self.speed = float(speed)
        self.voice = str(voice)
        try:
            self.styles = load_voice(voice)
            self.engine = kokoro_voice(cache_dir, threads)
        except KokoroUnavailable as e:
            raise TTSUnavailable(str(e)) from None
        self.pool = _kokoro_pool(workers)
        self.voice_digest = hashlib.sha256(self.styles.tobytes()).hexdigest()[:16]
        self.on_fallback: Callable[[], None] | None = None  # told of each clause espeak speaks instead (metrics)

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return {"engine": self.engine_name, "voice": self.voice_digest, "speed": self.speed,
                "sample_rate": self.sample_rate, "text": "speech_text-1"}

    def synthesize_clause(self, clause: str) -> np.ndarray:
        """One clause (any text) as 8 kHz int16 samples, edges trimmed, no pause added."""
        spoken = speech_text(clause)
        if not re.search(r"\w", spoken):
            return np.zeros(0, np.int16)
        try:
            return _to_8k(self.engine.render(spoken, self.styles, self.speed))
        except Exception:  # noqa: BLE001 — onnxruntime's own errors: the caller still hears the clause
            log.exception("tts: Kokoro failed on %r; this clause is spoken by espeak-ng", clause[:20])
            if self.on_fallback is not None:
                self.on_fallback()
            fallback = make_synthesizer("pyttsx3", elderly=self.speed < 1.0)
            return np.frombuffer(fallback.synthesize(clause), dtype="<i2")

    def synthesize(self, text: str) -> bytes:
        """``text`` as 8 kHz 16-bit mono PCM bytes (b"" for text with nothing to say)."""
        parts = []
        clauses = split_clauses(text)
        for i, clause in enumerate(clauses):
            samples = self.synthesize_clause(clause)
            if samples.size:
                parts.append(samples)
                if i < len(clauses) - 1:
                    parts.append(clause_pause(clause))
        return np.concatenate(parts).astype("<i2").tobytes() if parts else b""

    async def synthesize_async(self, text: str) -> bytes:
        return await synthesize_async(self, text)


_POOLS: dict[int, RenderPool] = {}
_POOLS_LOCK = threading.Lock()


def _kokoro_pool(workers: int) -> RenderPool:
    """One render pool per process and size: every Kokoro synthesizer (normal, elderly) shares the cores."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = RenderPool(workers, name="kokoro")
        return _POOLS[workers]


register_synthesizer("kokoro", KokoroSynthesizer)


def phone_synthesizer(kind: str = "kokoro", **options: Any) -> Synthesizer:
    """``make_synthesizer(kind, **options)``, or espeak when that engine cannot load here (logged):
    the hotline always has a voice. Raises only if espeak cannot run either."""
    if kind.lower() not in _REGISTRY:
        return make_synthesizer(kind, **options)  # a misspelt engine is a configuration error: ValueError
    try:
        return make_synthesizer(kind, **options)
    except (TTSError, ImportError, OSError, ValueError) as e:
        if kind.lower() in ("pyttsx3", "espeak"):
            raise
        log.error("tts: the %s voice cannot load (%s); the phone line speaks with espeak-ng instead", kind, e)
        return make_synthesizer("pyttsx3", elderly=bool(options.get("elderly")))


# --------------------------------------------------------------------------------------------
# Reading numbers aloud
# --------------------------------------------------------------------------------------------
def load_prompts(path: str | Path = PROMPTS_FILE) -> dict[str, str]:
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    prompts = data.get("prompts", data)
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: expected a mapping 'prompts: {{name: text}}'")
    return dict(prompts)


def cache_key(identity: Mapping[str, Any], text: str) -> str:
    blob = json.dumps({"identity": dict(identity), "text": text}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


class PromptCache:
    """The fixed prompts as 8 kHz PCM: rendered once into ``cache_dir`` and read from disk afterwards.

    A file is named ``<prompt>-<hash>.wav`` where the hash covers the engine identity (engine, voice,
    rate...) and the text, so editing a prompt or changing the voice renders it again. Loaded prompts
    are also kept in memory. ``get(name)`` works for the names in ``prompts.yaml``; ``get_text`` caches
    any fixed text the same way.
    """

    def __init__(self, synthesizer: Synthesizer, cache_dir: str | Path,
                 prompts: Mapping[str, str] | str | Path | None = None, *, metrics: VoiceMetrics | None = None) -> None:
        self.synthesizer = synthesizer
        # each render the cache cannot spare is timed by engine (telephony.metrics; None: not measured)
        self._synthesize = synthesizer.synthesize if metrics is None else metrics.timed_tts(synthesizer)
        self.cache_dir = Path(cache_dir)
        self.prompts = dict(prompts) if isinstance(prompts, Mapping) else load_prompts(prompts or PROMPTS_FILE)
        self._memory: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.renders = 0  # prompts rendered by the engine (not read from disk)

    def path_for(self, text: str, name: str = "text") -> Path:
        return self.cache_dir / f"{name}-{cache_key(self.synthesizer.cache_identity, text)}.wav"

    def get(self, name: str) -> bytes:
        try:
            text = self.prompts[name]
        except KeyError:
            raise KeyError(f"unknown prompt {name!r}; known: {', '.join(sorted(self.prompts))}") from None
        return self.get_text(text, name=name)

    def lookup(self, text: str, *, name: str = "text") -> bytes | None:
        """The cached rendering of ``text`` (memory or disk; a render another process wrote is found too),
        or None: never renders."""
        path = self.path_for(text, name)
        if (pcm := self._memory.get(str(path))) is not None:
            return pcm
        try:
            return load_wav(path).astype("<i2").tobytes()
        except FileNotFoundError:
            return None
        except (wave.Error, EOFError, ValueError) as e:
            log.warning("prompt cache: %s unreadable (%s); rendering again", path.name, e)
            return None

    def get_text(self, text: str, *, name: str = "text", remember: bool = True) -> bytes:
        """``text`` rendered once and read from the cache afterwards; ``remember=False`` keeps it on disk only
        (clauses of answers: too many to hold in memory)."""
        path = self.path_for(text, name)
        with self._lock:
            pcm = self.lookup(text, name=name)
        if pcm is None:
            pcm = self._synthesize(text)  # outside the lock: renders of different texts run in parallel
            with self._lock:
                self.renders += 1
                self._write(path, pcm)
        if remember:
            with self._lock:
                self._memory[str(path)] = pcm
        return pcm

    async def get_async(self, name: str) -> bytes:
        """``get(name)`` off the event loop (on the synthesizer's render pool when it has one)."""
        pool = getattr(self.synthesizer, "pool", None)
        if isinstance(pool, RenderPool):
            return await asyncio.wrap_future(pool.submit(self.get, name))
        return await asyncio.get_running_loop().run_in_executor(_executor(), self.get, name)

    def warm(self) -> dict[str, float]:
        """Render (or load) every prompt; returns each prompt's duration in seconds."""
        return {name: len(self.get(name)) / 2 / SAMPLE_RATE for name in self.prompts}

    def _write(self, path: Path, pcm: bytes) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".wav")
        try:
            with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(SAMPLE_RATE)
                w.writeframes(pcm)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


CLAUSE_CACHE_NAME = "clause"  # file-name prefix of cached clauses (prompts use their own names)
_SECONDS_PER_CHAR = 0.22  # Kokoro's Mandarin at speed 1: an estimate of when a clause will be needed


async def speak_clauses(synth: Synthesizer, clauses: list[str], cache: PromptCache | None = None, *,
                        lookahead: int = 2) -> AsyncIterator[tuple[int, np.ndarray]]:
    """Yields ``(index, samples)`` for each clause in order, each followed by its pause (the last without).

    Cached clauses (pre-rendered answers, earlier replies) come from ``cache``; the others are rendered
    on the synthesizer's pool, at most ``lookahead`` clauses ahead of the one being played, each with
    the deadline at which it will be heard (so a first clause of another call goes first). Rendered
    clauses are stored in the cache. Closing the generator (barge-in cancels its task) cancels the
    renders not yet started.
    """
    loop = asyncio.get_running_loop()
    pool = getattr(synth, "pool", None)
    started = time.monotonic()
    due = 0.0  # seconds of speech before the next clause to start, from ``started``

    def render(clause: str) -> bytes:
        if cache is None:
            return synth.synthesize(clause)
        return cache.get_text(clause, name=CLAUSE_CACHE_NAME, remember=False)

    def start(clause: str) -> asyncio.Future:
        nonlocal due
        deadline = started + due
        due += len(clause) * _SECONDS_PER_CHAR
        pcm = cache.lookup(clause, name=CLAUSE_CACHE_NAME) if cache is not None else None
        if pcm is not None:
            done = loop.create_future()
            done.set_result(pcm)
            return done
        if isinstance(pool, RenderPool):
            return asyncio.wrap_future(pool.submit(render, clause, deadline=deadline))
        return loop.run_in_executor(_executor(), render, clause)

    queued: collections.deque[asyncio.Future] = collections.deque()
    following = iter(enumerate(clauses))
    try:
        for _, clause in itertools.islice(following, max(1, lookahead)):
            queued.append(start(clause))
        index = 0
        while queued:
            pcm = await queued.popleft()
            if (nxt := next(following, None)) is not None:
                queued.append(start(nxt[1]))
            samples = np.frombuffer(pcm, dtype="<i2")
            if samples.size:
                if index == 0:  # the answer starts with its first sound, not the render's quiet lead-in
                    samples = trim_onset(samples)
                if index < len(clauses) - 1:
                    samples = np.concatenate([samples, clause_pause(clauses[index])])
                yield index, samples
            index += 1
    finally:
        for fut in queued:
            fut.cancel()


def spoken_texts(corpus: Any) -> list[str]:
    """Every spoken answer of a loaded knowledge base (``knowledge_base.loader.load_corpus``): its
    entries' and knowledge points' ``spoken`` fields, as the phone line would say them."""
    texts = []
    for item in [*getattr(corpus, "entries", []), *getattr(corpus, "points", [])]:
        spoken = getattr(item, "spoken", None)
        if spoken:
            texts.append(spoken_chinese(spoken))
    return list(dict.fromkeys(texts))


class Prerenderer:
    """Renders fixed prompts and spoken answers into the cache in the background, one clause at a time.

    A thread of its own at the lowest CPU priority (nice 19), which also waits while live renders are
    queued or running on the synthesizer's pool: callers never wait behind it. Texts already cached
    cost a file check. ``submit`` adds texts (the hub calls it at start-up and after each re-index);
    ``idle`` is set when everything submitted has been rendered.
    """

    def __init__(self, cache: PromptCache, *, name: str = "tts-prerender") -> None:
        self.cache = cache
        self.rendered = 0  # clauses rendered (not found in the cache)
        self.failed = 0
        self.idle = threading.Event()
        self.idle.set()
        self._queue: collections.deque[tuple[str | None, Any]] = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit_prompts(self) -> None:
        self._add((name, text) for name, text in self.cache.prompts.items())

    def submit(self, texts: Iterable[str]) -> None:
        self._add((CLAUSE_CACHE_NAME, clause) for text in texts for clause in split_clauses(text))

    def submit_from(self, texts: Callable[[], Iterable[str]]) -> None:
        """Like ``submit(texts())``, with ``texts()`` called on the pre-render thread (loading a corpus
        must not delay start-up either)."""
        self._add([(None, texts)])

    def _add(self, jobs: Iterable[tuple[str, str]]) -> None:
        with self._cv:
            self._queue.extend(jobs)
            if self._queue:
                self.idle.clear()
            self._cv.notify()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # lowest priority for this thread alone (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        pool = getattr(self.cache.synthesizer, "pool", None)
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self.idle.set()
                    self._cv.wait()
                if self._stopped:
                    return
                name, text = self._queue.popleft()
            if name is None:  # a loader of texts
                try:
                    self.submit(text())
                except Exception:  # noqa: BLE001 — a broken corpus: the prompts are still rendered
                    log.exception("tts: cannot list the texts to pre-render")
                continue
            while isinstance(pool, RenderPool) and pool.busy and not self._stopped:
                time.sleep(0.05)  # a caller is waiting for a render: let it have the cores
            try:
                if self.cache.lookup(text, name=name) is None:
                    self.cache.get_text(text, name=name, remember=False)
                    self.rendered += 1
            except Exception:  # noqa: BLE001 — one bad text must not stop the rest
                self.failed += 1
                log.exception("tts: pre-rendering %r failed", text[:20])

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    """``python -m telephony.tts [--rate N] [--out x.wav] TEXT`` or ``--warm DIR`` (render all prompts)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("text", nargs="?")
    p.add_argument("--engine", default="pyttsx3")
    p.add_argument("--rate", type=int, default=DEFAULT_RATE)
    p.add_argument("--out", default="tts.wav")
    p.add_argument("--warm", metavar="CACHE_DIR")
    a = p.parse_args(argv)
    synth = make_synthesizer(a.engine, rate=a.rate)
    if a.warm:
        for name, secs in PromptCache(synth, a.warm).warm().items():
            print(f"{name:18s} {secs:5.2f} s")
        return 0
    if not a.text:
        p.error("TEXT or --warm required")
    t = time.perf_counter()
    pcm = synth.synthesize(a.text)
    took = time.perf_counter() - t
    with wave.open(a.out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE), w.writeframes(pcm)
    secs = len(pcm) / 2 / SAMPLE_RATE
    print(f"{spoken_chinese(a.text)}\n{secs:.2f} s audio in {took:.3f} s (RTF {took / max(secs, 1e-9):.4f}) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
