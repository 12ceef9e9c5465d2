"""Loaded at start-up by every Python process of the Rasa venv that `xiaozhi` starts (this folder is
put on PYTHONPATH): only what must happen before Rasa parses its command line.

It gives ``rasa run`` its API token from the environment (``XIAOZHI_RASA_TOKEN``, or the file
named by ``XIAOZHI_RASA_TOKEN_FILE``) instead of the command line, where every user of the host
could read it (``ps``): ``--auth-token`` is added to this process's own argument list only.

Rasa itself is patched elsewhere, later and explicitly: xiaozhi_patches.py, applied when
``rasa run`` builds the hub's channel (xiaozhi_channel.py). Nothing here imports Rasa (or jsonschema),
so the action server and every other process of the venv start without loading them.
"""

import os
import sys


def _token_from_environment(argv: list) -> None:
    if "run" not in argv[1:3] or "--auth-token" in argv or "actions" in argv[1:3]:
        return
    path = os.environ.get("XIAOZHI_RASA_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    else:
        token = os.environ.get("XIAOZHI_RASA_TOKEN", "")
    if token:
        argv.extend(["--auth-token", token])


if os.path.basename(sys.argv[0] if sys.argv else "") == "rasa" or (sys.argv and sys.argv[0].endswith("rasa/__main__.py")):
    _token_from_environment(sys.argv)
