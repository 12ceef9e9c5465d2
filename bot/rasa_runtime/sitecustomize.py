"""Loaded at start-up by every Rasa process `xiaozhi` starts (this folder is put on PYTHONPATH).

Rasa 3.6 validates each action-server response with ``jsonschema.validate``, which checks the
(large, constant) schema itself on every call before checking the response: with forms that
is several calls per turn and about a fifth of Rasa's CPU. The same validation runs here with
the schema checked once and its validator reused; an invalid response still raises the same
``ValidationError``.
"""

import functools
import json

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
