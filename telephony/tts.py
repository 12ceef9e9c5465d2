"""Speech synthesis for the phone channel: text in, 16-bit mono PCM at 8 kHz out.

* ``Synthesizer`` is the interface; ``make_synthesizer(kind, **options)`` builds one by name so a
  better engine can replace espeak by configuration (``register_synthesizer`` adds kinds).
* ``Pyttsx3Synthesizer`` drives pyttsx3's espeak driver with the ``sit/cmn-latn-pinyin`` voice.
* numbers are read aloud through ``xiaozhi.spoken.spoken_chinese`` (amounts, dates, phone numbers).
* ``PromptCache`` renders the fixed prompts of ``prompts.yaml`` once and plays them from disk.

espeak is a process-wide singleton (one synthesis callback, one current voice), so every espeak
synthesis in the process runs under one lock, and ``synthesize_async`` runs it on one dedicated
worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
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
_ESPEAK_LOCK = threading.RLock()  # espeak has one global state per process: one synthesis at a time
_ENGINE: Any = None
_APPLIED_VOICE: str | None = None
_APPLIED_RATE: int | None = None


def _driver_print_to_log(*args: Any, **_kwargs: Any) -> None:
    log.debug("pyttsx3 espeak driver: %s", " ".join(map(str, args)))


def _quiet_driver_prints() -> None:
    """pyttsx3's espeak driver ``print``s "Audio saved to <file>" from its event callback, sometimes
    after ``runAndWait`` returned (so redirecting stdout around the call missed it): inside that
    module only, ``print`` goes to this module's debug log instead of the process's stdout."""
    import pyttsx3.drivers.espeak as driver

    driver.print = _driver_print_to_log  # a module global shadows the builtin for that module alone


def _release_engine() -> None:
    """At exit, while modules are still loaded: pyttsx3's driver __del__ fails during interpreter teardown."""
    global _ENGINE
    _ENGINE = None
    gc.collect()


def _espeak_engine() -> Any:
    """The process's pyttsx3 espeak engine (created once; espeak cannot be initialised twice)."""
    global _ENGINE
    if _ENGINE is None:
        try:
            import pyttsx3

            _ENGINE = pyttsx3.init("espeak")
            _quiet_driver_prints()
            atexit.register(_release_engine)
        except ImportError as e:
            raise TTSUnavailable(f"pyttsx3 is not installed ({e})") from e
        except (OSError, RuntimeError, AttributeError) as e:
            raise TTSUnavailable(
                f"espeak-ng is not usable ({e}); install it with: apt-get install espeak-ng"
            ) from e
    return _ENGINE


def espeak_available() -> bool:
    try:
        with _ESPEAK_LOCK:
            _espeak_engine()
        return True
    except TTSUnavailable:
        return False


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


class Pyttsx3Synthesizer:
    """Mandarin speech from espeak-ng through pyttsx3, as 8 kHz 16-bit mono PCM.

    Each call renders to a fresh temp WAV (``save_to_file`` + ``runAndWait``), then waits for that
    file to be complete (exists, non-empty, size stable, parseable) instead of trusting that
    ``runAndWait`` returned after the write; an attempt that wrote nothing is repeated (``retries``).
    Voice and rate are set before every call because all instances share espeak's global state.
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
        self.timeout = timeout
        self.retries = retries
        self.engine_calls = 0  # espeak renders actually run (tests and metrics)
        with _ESPEAK_LOCK:
            self.voice_id = self._pick_voice(_espeak_engine(), voice)

    @staticmethod
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
        samples = self._render(spoken)
        if self.trim:
            samples = trim_silence(samples)
        return samples.astype("<i2").tobytes()

    async def synthesize_async(self, text: str) -> bytes:
        return await synthesize_async(self, text)

    def _apply_settings(self, engine: Any) -> None:
        """Set voice, rate and volume in espeak now, before this call's synthesis.

        ``engine.setProperty`` only queues the change, and measured with pyttsx3 2.99 it takes effect
        one ``runAndWait`` late (a rate-300 call came out at the previous call's rate). The espeak
        driver's own ``setProperty`` applies it immediately (espeak_SetVoiceByName/SetParameter), so
        it is used when present, and the rate is read back from espeak to check.
        """
        driver = getattr(getattr(engine, "proxy", None), "_driver", None)
        apply = getattr(driver, "setProperty", None) or engine.setProperty
        global _APPLIED_VOICE
        if _APPLIED_VOICE != self.voice_id:  # a voice change resets espeak's rate: only when needed
            apply("voice", self.voice_id)
            _APPLIED_VOICE = self.voice_id
        apply("rate", self.rate)
        apply("volume", self.volume)
        global _APPLIED_RATE
        if _APPLIED_RATE not in (None, self.rate):
            log.warning("espeak rate changed %s -> %s in one process: measured with espeak-ng's synchronous "
                        "mode, renders after a rate change sometimes keep the old rate; use one rate per "
                        "process", _APPLIED_RATE, self.rate)
        _APPLIED_RATE = self.rate

    def _save(self, engine: Any, text: str, path: Path) -> None:
        engine.save_to_file(text, str(path))
        engine.runAndWait()

    def _render(self, text: str) -> np.ndarray:
        with _ESPEAK_LOCK, tempfile.TemporaryDirectory(prefix="tts-") as tmp:
            engine = _espeak_engine()
            self._apply_settings(engine)
            for attempt in range(1, self.retries + 2):
                path = Path(tmp) / f"out{attempt}.wav"  # a new file each attempt: never a stale one
                self.engine_calls += 1
                started = time.monotonic()
                self._save(engine, text, path)
                # runAndWait normally returns after the write; a missing file gets a short grace
                samples = _read_wav_when_complete(path, timeout=min(0.5, self.timeout))
                if samples is not None and samples.size:
                    log.debug("tts: %d chars -> %.2f s audio in %.3f s", len(text),
                              samples.size / SAMPLE_RATE, time.monotonic() - started)
                    return samples
                log.warning("tts: espeak wrote no audio (attempt %d of %d)", attempt, self.retries + 1)
        raise TTSError(f"espeak wrote no audio for {text[:30]!r} after {self.retries + 1} attempts")


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
