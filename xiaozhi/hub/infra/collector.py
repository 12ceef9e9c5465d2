"""The hub and CPython's cyclic garbage collector: what it may walk, and when.

A full (generation 2) collection walks every object the collector tracks, holding the GIL. A hub holds
millions of them for years: its models, G2P dictionaries and above all the knowledge base (the answer
stage's word sets of every text, the layout's units, the corpus). Two stalls came from that:

- mid-call, a full collection walked what start-up loaded (365-380 ms), and the calls' 20 ms RTP senders
  skipped frames: the hotline freezes what start-up loaded (``freeze_long_lived``);
- during a publication, opening the new knowledge base allocates millions of objects, which set off full
  collections walking both bases (1.7-2.1 s each at 10,000 points): the worst chat answer of each
  publication. A knowledge base is now opened with the collector paused (``collector_paused``) and what
  it allocated is frozen, so no later collection walks it either.

Frozen objects are still freed by reference counting; only reference cycles among them are never
collected. So a retired knowledge base must not be a cycle (``KnowledgeBase.retire``), and the garbage
is collected before each pause (cheap once the long-lived objects are frozen), so little is frozen with it.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_paused = 0  # how many collector_paused() blocks are open (two threads may open one each)
_was_enabled = True


def freeze_long_lived() -> int:
    """Collect, then take every object now tracked out of the collector's reach (``gc.freeze``); answers how
    many are frozen. Blocking: the one collection here costs the pause a later one would have cost."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def collector_paused():
    """While a knowledge base is built or opened in this process: the garbage collected first, then no
    cyclic collection until the block ends, when everything tracked (the new base with it) is frozen.

    Reference counting frees as usual meanwhile; only new reference cycles wait, and those made inside the
    block (a few hundred small objects per build: the standard library's recursive closures) stay frozen.
    """
    global _paused, _was_enabled
    with _lock:
        if _paused == 0:
            gc.collect()
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    built = False
    try:
        yield
        built = True
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0:
                if built:  # a failed build's leftovers are garbage to collect, not a base to keep
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
