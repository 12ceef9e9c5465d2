"""Every change this project makes to Rasa's own code, in one place, for one Rasa version.

Each patch below is a function that takes Rasa's original attribute and returns its replacement; its
docstring says what Rasa (or a library it calls) does wrong for us, and where. ``apply()`` installs
them all, once, and is called from exactly one place: ``XiaozhiInput.from_credentials`` in
xiaozhi_channel.py, which ``rasa run`` calls when it builds its input channels (bot/credentials.yml
lists only that channel), before it loads the model, the tracker store or the action endpoint.
That is the one point every serving Rasa passes through (``xiaozhi run``, compose, Kubernetes);
``rasa train``, ``rasa test`` and the action server never serve the channel and stay unpatched.

Guards, checked before anything is changed (all patches or none):

- the running Rasa must be ``RASA_VERSION``, the version requirements/rasa.lock.txt pins (a test
  checks the two agree); any other version is refused with :class:`PatchRefused`, a
  ``RasaException`` that Rasa's command line prints before exiting with status 1;
- every patched attribute must exist with the parameters the replacement was written for.

The patches change how fast Rasa does things, never what it answers, except ``report_saved_turns``,
which lets the channel answer with what Rasa understood.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Text, Tuple

from rasa.shared.exceptions import RasaException

log = logging.getLogger(__name__)

# The one Rasa these patches were written against and checked on: requirements/rasa.lock.txt's pin
# (tests/dialogue/test_rasa_patches.py fails when the two differ).
RASA_VERSION = "3.6.21"


class PatchRefused(RasaException):
    """Rasa is not the version the patches were written for, or an attribute they replace changed."""


# -- the patches -------------------------------------------------------------------------------------
def validate_with_a_checked_schema(original: Callable) -> Callable:
    """Validate the action server's answers without re-checking Rasa's constant schema every time.

    ``RemoteAction._validate_action_result``
    (https://github.com/RasaHQ/rasa/blob/3.6.21/rasa/core/actions/action.py#L699) calls
    ``jsonschema.validate(result, schema)`` for every custom-action response, and
    ``jsonschema.validate`` first checks the (large, constant) schema against its meta-schema, then
    builds a throw-away validator. With forms that is several calls per turn and about a fifth of
    Rasa's CPU. jsonschema's documentation recommends checking a schema once and reusing its
    validator; this does that, keyed by the schema's JSON text. The same errors are raised (best
    match first, as ``jsonschema.validate`` does); calls with a validator class or other arguments,
    or a schema that is not JSON, go to the original unchanged.
    """
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    @functools.lru_cache(maxsize=32)
    def checked(schema_json: str):
        schema = json.loads(schema_json)
        cls = validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)

    def validate(instance, schema, cls=None, *args, **kwargs):
        if cls is not None or args or kwargs:
            return original(instance, schema, cls, *args, **kwargs)
        try:
            key = json.dumps(schema, sort_keys=True)
        except (TypeError, ValueError):
            return original(instance, schema)
        error = best_match(checked(key).iter_errors(instance))
        if error is not None:
            raise error

    return validate


# Set by the channel for the duration of one turn (see ``on_tracker_saved``).
_tracker_saved: contextvars.ContextVar[Optional[Callable[[Any], None]]] = contextvars.ContextVar(
    "xiaozhi_tracker_saved", default=None
)


@contextlib.contextmanager
def on_tracker_saved(callback: Callable[[Any], None]) -> Iterator[None]:
    """Within the block, ``callback(tracker)`` runs after Rasa saves a tracker (``report_saved_turns``)."""
    token = _tracker_saved.set(callback)
    try:
        yield
    finally:
        _tracker_saved.reset(token)


def report_saved_turns(original: Callable) -> Callable:
    """Tell the channel what Rasa understood in the turn it just saved.

    Rasa's channels get only the bot's messages (``CollectingOutputChannel``); the intent, its
    confidence and the slots stay in the tracker, which ``MessageProcessor.handle_message`` saves
    at the end of the turn (``save_tracker``,
    https://github.com/RasaHQ/rasa/blob/3.6.21/rasa/core/processor.py#L1089) and drops. The hub
    needs them for every turn; asking for the tracker afterwards made Rasa load and deserialise the
    whole conversation once more per turn (about an eighth of its CPU). After the original save,
    this hands the saved tracker to the callback the channel set for the turn
    (``on_tracker_saved``); outside a channel's turn nothing changes.
    """

    async def save_tracker(self, tracker) -> None:
        await original(self, tracker)
        callback = _tracker_saved.get()
        if callback is not None:
            callback(tracker)

    return save_tracker


def resolve_events_from_a_table(original: Callable) -> Callable:
    """Find an event's class by its type name in a table instead of walking every ``Event`` subclass.

    ``Event.resolve_by_type``
    (https://github.com/RasaHQ/rasa/blob/3.6.21/rasa/shared/core/events.py#L375) calls ``all_subclasses(Event)``
    (a recursive walk of the class tree, dozens of classes) for every event Rasa deserialises,
    and it deserialised the conversation from the tracker store on every turn: a tenth of Rasa's
    CPU here. The class found the first time is remembered; only real, registered classes are (not
    the caller's default), and unknown names still go to the original (default, or ValueError).
    """
    classes: Dict[Text, type] = {}

    def resolve_by_type(type_name: Text, default=None):
        cls = classes.get(type_name)
        if cls is None:
            cls = original(type_name, default)
            if cls is not None and cls is not default and getattr(cls, "type_name", None) == type_name:
                classes[type_name] = cls
        return cls

    return resolve_by_type


def dumps(obj: Any) -> str:
    """JSON text with ujson (UTF-8, no ``\\u`` escapes); whatever ujson refuses, as ``json.dumps`` does."""
    import ujson

    try:
        return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(obj)


def encode_action_calls_with_ujson(original: Callable) -> Callable:
    """Encode the JSON Rasa posts to the action server with ujson.

    ``EndpointConfig.session``
    (https://github.com/RasaHQ/rasa/blob/3.6.21/rasa/utils/endpoints.py#L105) makes an aiohttp session with the
    standard library's ``json.dumps``, which escapes every Chinese character (``\\u5f02``, six bytes
    for three) and is slow: encoding the custom-action calls was about an eighth of Rasa's CPU.
    ujson is already one of Rasa's dependencies. Same JSON values; what ujson refuses (a set, say)
    is encoded, or refused, by ``json.dumps`` as before.
    """

    def session(self):
        made = original(self)
        made._json_serialize = dumps  # what ClientSession(json_serialize=...) sets
        return made

    return session


def turn_events(tracker) -> list:
    """The events from the resident's latest message on (all of them when there is none)."""
    from rasa.shared.core.events import UserUttered

    events = list(tracker.events)
    for index in range(len(events) - 1, -1, -1):
        if isinstance(events[index], UserUttered):
            return events[index:]
    return events


def send_the_current_turn_only(original: Callable) -> Callable:
    """Send the action server the current turn's events, not the whole conversation.

    ``RemoteAction._action_call_format``
    (https://github.com/RasaHQ/rasa/blob/3.6.21/rasa/core/actions/action.py#L651) puts every event of the
    conversation into every custom-action call (RasaHQ/rasa#6334): twenty turns in, ~130 KB per
    call, several calls a turn, serialised by Rasa and parsed by the action server each time. The
    bot's actions read slots, the latest message and the form's freshly set slots (rasa_sdk's
    ``slots_to_validate``), all of which the events from the resident's latest message on cover.
    Everything else is built as Rasa 3.6.21 builds it (this is its body with ``turn_events``).
    """
    import rasa
    from rasa.shared.core.trackers import EventVerbosity

    def _action_call_format(self, tracker, domain) -> Dict[Text, Any]:
        state = tracker.current_state(EventVerbosity.NONE)
        state["events"] = [event.as_dict() for event in turn_events(tracker)]
        result = {"next_action": self._name, "sender_id": tracker.sender_id, "tracker": state,
                  "version": rasa.__version__}
        if not self._is_selective_domain_enabled() or domain.does_custom_action_explicitly_need_domain(self.name()):
            result["domain"] = domain.as_dict()
        return result

    return _action_call_format


# -- what is patched, and the guards ----------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    replace: Callable[[Callable], Callable]  # original -> replacement
    owner: str  # "module" or "module:Class"
    attribute: str
    parameters: Tuple[str, ...]  # the original's parameter names the replacement was written for

    @property
    def name(self) -> str:
        return self.replace.__name__

    @property
    def target(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.attribute}"


PATCHES: Tuple[Patch, ...] = (
    Patch(validate_with_a_checked_schema, "jsonschema", "validate", ("instance", "schema", "cls", "args", "kwargs")),
    Patch(report_saved_turns, "rasa.core.processor:MessageProcessor", "save_tracker", ("self", "tracker")),
    Patch(resolve_events_from_a_table, "rasa.shared.core.events:Event", "resolve_by_type", ("type_name", "default")),
    Patch(encode_action_calls_with_ujson, "rasa.utils.endpoints:EndpointConfig", "session", ("self",)),
    Patch(send_the_current_turn_only, "rasa.core.actions.action:RemoteAction", "_action_call_format",
          ("self", "tracker", "domain")),
)

_MARK = "__xiaozhi_patch__"


def _owner(path: str) -> Any:
    module, _, cls = path.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, cls) if cls else owner


def _function(stored: Any) -> Any:
    """The function behind a class attribute as stored (a staticmethod or classmethod unwrapped)."""
    return stored.__func__ if isinstance(stored, (staticmethod, classmethod)) else stored


def check_version(found: str) -> None:
    if found != RASA_VERSION:
        raise PatchRefused(
            f"bot/rasa_runtime/xiaozhi_patches.py is written for Rasa {RASA_VERSION} (requirements/rasa.lock.txt), "
            f"but Rasa {found} is installed: refusing to start. Install rasa=={RASA_VERSION} "
            f"(scripts/setup.sh), or check every patch against Rasa {found} and update RASA_VERSION."
        )


def _resolve(patch: Patch) -> Tuple[Any, Any, Callable]:
    """The owner, the attribute as stored on it, and the plain function; refused if it changed."""
    try:
        owner = _owner(patch.owner)
    except (ImportError, AttributeError) as exc:
        raise PatchRefused(f"patch {patch.name}: {patch.owner} cannot be imported ({exc}): nothing patched") from None
    stored = inspect.getattr_static(owner, patch.attribute, None)
    function = _function(stored)
    if not callable(function):
        raise PatchRefused(f"patch {patch.name}: {patch.target} does not exist (or is not a function): nothing patched")
    try:
        found = tuple(inspect.signature(function).parameters)  # Rasa's own, if already patched (__wrapped__)
    except (TypeError, ValueError):
        found = None
    if found != patch.parameters:
        raise PatchRefused(
            f"patch {patch.name}: {patch.target} takes {found}, the patch was written for "
            f"{patch.parameters}: nothing patched"
        )
    return owner, stored, function


def apply() -> List[str]:
    """Install every patch, once; returns their names. Refuses (PatchRefused) before changing anything.

    Each replacement keeps Rasa's original as ``__wrapped__`` and is marked, so a second call (or a
    second copy of this module imported under another name) patches nothing twice.
    """
    import rasa

    check_version(rasa.__version__)
    resolved = [(patch, *_resolve(patch)) for patch in PATCHES]
    for patch, owner, stored, function in resolved:
        if getattr(function, _MARK, False):
            continue
        replacement = patch.replace(function)
        replacement.__wrapped__ = function
        setattr(replacement, _MARK, True)
        setattr(owner, patch.attribute, staticmethod(replacement) if isinstance(stored, staticmethod) else replacement)
        log.info("Rasa %s patched: %s (%s)", RASA_VERSION, patch.target, patch.name)
    return [patch.name for patch in PATCHES]


def installed() -> List[str]:
    """The patches now in place in this process (read from Rasa's attributes, not from this module)."""
    names = []
    for patch in PATCHES:
        if getattr(_function(inspect.getattr_static(_owner(patch.owner), patch.attribute, None)), _MARK, False):
            names.append(patch.name)
    return names
