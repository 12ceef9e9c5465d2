"""The Rasa training data is consistent (domain, rules, stories, NLU) as Rasa 3.6 itself checks it."""

import subprocess

import pytest

from tests.support import REPO
from xiaozhi.rasa_model import rasa_environment
from xiaozhi.settings import Settings

pytestmark = pytest.mark.slow


def test_rasa_data_validate_is_clean():
    settings = Settings()
    proc = subprocess.run(
        [str(settings.rasa_venv / "bin" / "rasa"), "data", "validate", "--fail-on-warnings",
         "--data", "nlu_data", "--domain", "bot/domain.yml", "--config", "bot/config.yml"],
        cwd=REPO, env=rasa_environment(settings), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
