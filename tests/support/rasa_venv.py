"""Running code in the Rasa venv (Python 3.10) with the environment `xiaozhi` gives every Rasa process."""

from __future__ import annotations

import subprocess

from tests.support import REPO


def run_in_rasa(code: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -c code args...`` in .venv-rasa, from the repository, with bot/rasa_runtime on PYTHONPATH."""
    from xiaozhi.rasa_model import rasa_environment
    from xiaozhi.settings import Settings

    settings = Settings()
    return subprocess.run(
        [str(settings.rasa_venv / "bin" / "python"), "-c", code, *args],
        cwd=REPO, env={**rasa_environment(settings), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )
