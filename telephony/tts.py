"""Speech synthesis for the phone channel: text in, 16-bit mono PCM at 8 kHz out.

* ``Synthesizer`` is the interface; ``make_synthesizer(kind, **options)`` builds one by name so a
  better engine can replace espeak by configuration (``register_synthesizer`` adds kinds).
* ``Pyttsx3Synthesizer`` drives pyttsx3's espeak driver with the ``sit/cmn-latn-pinyin`` voice.
* numbers are read aloud through ``xiaozhi.spoken.spoken_chinese`` (amounts, dates, phone numbers).
* ``PromptCache`` renders the fixed prompts of ``prompts.yaml`` once and plays them from disk.

espeak runs in worker processes, one per voice setting (see ``EspeakWorker``): its process-wide,
multi-threaded state cannot take the hub down with it. ``synthesize_async`` waits for a render on
one dedicated thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xiaozhi.spoken import spoken_chinese

from .audio import SAMPLE_RATE, load_wav, resample

log = logging.getLogger("telephony.tts")

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")
DEFAULT_RATE = 150  # espeak words/minute; its default 200 is too fast for a phone line
ELDERLY_RATE = 120  # 适老化: slower speech for elderly callers
PREFERRED_VOICE = "cmn-latn-pinyin"
FALLBACK_VOICE = "cmn"


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


async def synthesize_async(synth: Synthesizer, text: str) -> bytes:
    """Run ``synth.synthesize`` on the dedicated TTS worker thread without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), synth.synthesize, text)


_REGISTRY: dict[str, Callable[..., Synthesizer]] = {}


def register_synthesizer(kind: str, factory: Callable[..., Synthesizer]) -> None:
    """Make ``make_synthesizer(kind, **options)`` build ``factory(**options)``."""
    _REGISTRY[kind.lower()] = factory


def make_synthesizer(kind: str = "pyttsx3", **options: Any) -> Synthesizer:
    """The synthesizer called ``kind`` ("pyttsx3"/"espeak", or a registered one) built with ``options``."""
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


register_synthesizer("pyttsx3", Pyttsx3Synthesizer)
register_synthesizer("espeak", Pyttsx3Synthesizer)


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
                 prompts: Mapping[str, str] | str | Path | None = None) -> None:
        self.synthesizer = synthesizer
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

    def get_text(self, text: str, *, name: str = "text") -> bytes:
        path = self.path_for(text, name)
        with self._lock:
            if (pcm := self._memory.get(str(path))) is not None:
                return pcm
            if path.exists():
                try:
                    pcm = load_wav(path).astype("<i2").tobytes()
                except (wave.Error, EOFError, ValueError) as e:
                    log.warning("prompt cache: %s unreadable (%s); rendering again", path.name, e)
                    pcm = None
            if pcm is None:
                pcm = self.synthesizer.synthesize(text)
                self.renders += 1
                self._write(path, pcm)
            self._memory[str(path)] = pcm
            return pcm

    async def get_async(self, name: str) -> bytes:
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
