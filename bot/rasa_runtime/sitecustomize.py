"""Loaded at start-up by every Rasa process `xiaozhi` starts (this folder is put on PYTHONPATH).

Rasa 3.6 validates each action-server response with ``jsonschema.validate``, which checks the
(large, constant) schema itself on every call before checking the response: with forms that
is several calls per turn and about a fifth of Rasa's CPU. The same validation runs here with
the schema checked once and its validator reused; an invalid response still raises the same
``ValidationError``.

It also gives ``rasa run`` its API token from the environment (``XIAOZHI_RASA_TOKEN``, or the file
named by ``XIAOZHI_RASA_TOKEN_FILE``) instead of the command line, where every user of the host
could read it (``ps``): ``--auth-token`` is added to this process's own argument list only.
"""

import functools
import json
import os
import sys

import jsonschema
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

_validate = jsonschema.validate


@functools.lru_cache(maxsize=32)
def _validator_for(schema_json: str):
    schema = json.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(instance, schema, cls=None, *args, **kwargs):
    if cls is not None or args or kwargs:
        return _validate(instance, schema, cls, *args, **kwargs)
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):  # not JSON-serialisable: validate the ordinary way
        return _validate(instance, schema)
    error = best_match(_validator_for(key).iter_errors(instance))
    if error is not None:
        raise error


jsonschema.validate = validate


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
