"""The Rasa processes' jsonschema speed-up validates exactly like jsonschema itself."""

import subprocess

from conftest import REPO
from xiaozhi.rasa_model import rasa_environment
from xiaozhi.settings import Settings

CHECK = """
import jsonschema, sitecustomize
assert jsonschema.validate is sitecustomize.validate
from rasa.core.actions.action import RemoteAction
from rasa.utils.endpoints import EndpointConfig
action = RemoteAction("action_answer_from_kb", EndpointConfig("http://127.0.0.1:1"))
assert action._validate_action_result({"events": [], "responses": [{"text": "好的"}]})
for bad in ({"events": "not a list"}, {"responses": [{"text": 1}], "events": [{"event": 3}]}):
    try:
        action._validate_action_result(bad)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError(f"accepted {bad}")
print("ok")
"""


def test_rasa_validates_action_results_with_the_cached_validator():
    settings = Settings()
    proc = subprocess.run(
        [str(settings.rasa_venv / "bin" / "python"), "-c", CHECK],
        cwd=REPO, env=rasa_environment(settings), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
