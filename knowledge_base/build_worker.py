"""Build a knowledge base from records in another process, so the serving process keeps its GIL for chat.

A publication (xiaozhi/hub/domain/knowledge_publish.py) validates 10,000 records, lays out 95,000 texts,
cuts them into words, n-grams and pinyin and builds the answer stage's word index: seconds of pure Python.
In a thread of the serving process that holds the GIL the chat's answers wait for; here it runs in a
worker process (``concurrent.futures.ProcessPoolExecutor`` with the spawn context, one worker kept for
the next publication) which keeps its own model, its own memoised text processor and the vectors of its
last build, so a published change re-encodes and re-cuts only the texts it changed, as in-process.

``build`` writes what it built into a new directory (``save``) and answers only its path and each file's size:
the vectors as a ``.npy`` and the tantivy index, which the serving process maps and opens (``load``: nothing
rebuilt, nothing big through the pipe), and the rest pickled without what the serving process already has:
its model, its text processor, its answer stage's classifier (``attach`` puts the serving process's own
back). Until then the whole knowledge base came back pickled (345 MB at 10,000 points) and the serving
process re-added every document to an in-RAM index: 2.3 s in one call holding the GIL chat needs.
Only the embedded backend is built here; Elasticsearch indexes on its server, so a thread suffices for it.

``warm_up`` starts a new worker before it is needed (a hub's start on a large published base, a worker that
died): it builds what the hub serves, keeps the model, the memo and the vectors, and sends nothing back. It
runs in a thread of the worker at the lowest priority (nice 19; on Linux a thread's niceness is its own),
so it takes only the CPU nothing else wants; a publication's ``build`` runs at the worker's nice 10.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knowledge_base.config import KnowledgeBaseConfig

log = logging.getLogger(__name__)

_state: dict = {}  # in the worker process: "embedder", "text", "reuse" (text -> vector of the last build)
NICENESS = 10  # the worker yields the cores to the serving process's chat when both want them
WARM_NICENESS = 19  # the lowest priority: a warm-up is for later, nobody waits for it
STATE_FILE = "knowledge_base.pickle"  # beside the backend's vectors and lexical index (``save``)


def lower_priority() -> None:
    """The worker process's initializer: a build is background work beside the chat it must not slow."""
    try:
        os.nice(NICENESS)
    except OSError:  # not permitted here: the build still runs, at normal priority
        log.warning("could not lower the knowledge-base build worker's priority")


class BuildResultError(RuntimeError):
    """What a worker wrote cannot be served (a file missing, cut short or unreadable): the old base stays."""


def build(config: KnowledgeBaseConfig, entries: list[dict], points: list[dict], *, today: dt.date, out: Path,
          stale_after_years: int = 5, seed: tuple[Sequence[str], np.ndarray] | None = None) -> dict:
    """Build the knowledge base of these published records and write it into ``out`` (run in the worker
    process); answers its small description for ``load``. ``seed``: the texts and vectors the serving process
    knows, for a worker that has none of its own yet."""
    return save(_build(config, entries, points, today=today, stale_after_years=stale_after_years, seed=seed), out)


def _build(config: KnowledgeBaseConfig, entries: list[dict], points: list[dict], *, today: dt.date,
           stale_after_years: int = 5, seed: tuple[Sequence[str], np.ndarray] | None = None):
    from knowledge_base.embedder import Embedder
    from knowledge_base.factory import open_knowledge_base
    from knowledge_base.records import corpus_from_records
    from knowledge_base.text import TextProcessor

    if "embedder" not in _state:
        _state["embedder"] = Embedder.from_config(config)
        _state["text"] = TextProcessor()
    reuse = _state.get("reuse") or {}
    if seed is not None:
        reuse = {**dict(zip(seed[0], seed[1])), **reuse}
    memo = _state["text"]._words_memo
    misses = memo.cache_info().misses
    corpus = corpus_from_records(entries, points, stale_after_years=stale_after_years, today=today)
    kb = open_knowledge_base(config, embedder=_state["embedder"], corpus=corpus, reuse=reuse, text=_state["text"])
    units = kb.answerer.units
    _state["reuse"] = dict(zip(units.layout.texts, units.vectors))
    # what this build cost the worker: texts it had to cut (not in its memo) and to encode (no vector known)
    kb.build_info = {"pid": os.getpid(), "texts": len(units.layout.texts),
                     "cut": memo.cache_info().misses - misses, "encoded": sum(t not in reuse for t in units.layout.texts)}
    return kb


def save(kb, out: Path) -> dict:
    """Write a knowledge base built here into the new directory ``out``: the embedded backend's vectors (one
    ``.npy``, also the answer stage's: the same rows) and its tantivy index, and the rest pickled without the
    model, the text processor and the classifier. Answers what ``load`` needs: the path and each file's size."""
    kb.backend.save(out)
    units = kb.answerer.units
    if units.vectors.shape != kb.backend._vectors.shape:
        raise ValueError(f"the answer stage has {units.vectors.shape} vectors, the backend {kb.backend._vectors.shape}")
    detach(kb)
    units.vectors = None  # the backend's, mapped from the same file on arrival
    with open(out / STATE_FILE, "wb") as f:
        pickle.dump(kb, f, protocol=pickle.HIGHEST_PROTOCOL)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"path": str(out), "files": files, "build_info": kb.build_info}


def load(built: dict, *, embedder, text, classifier):
    """The knowledge base a worker wrote (``built``: what ``build`` answered), with the serving process's model,
    text processor and classifier; run in a thread of the serving process. The vectors are mapped and the
    tantivy index opened, nothing rebuilt; the rest is unpickled from a reader that lets chat's threads take
    the GIL between its frames. BuildResultError (logged) when a file is missing, cut short or unreadable."""
    out = Path(built["path"])
    try:
        for name, size in built["files"].items():
            try:
                found = (out / name).stat().st_size
            except FileNotFoundError:
                raise BuildResultError(f"{out / name} is missing") from None
            if found != size:
                raise BuildResultError(f"{out / name} has {found} bytes, the worker wrote {size}")
        with open(out / STATE_FILE, "rb") as f:
            kb = pickle.load(_Yielding(f))  # EmbeddedBackend.__setstate__ maps the vectors, opens the index
        kb.answerer.units.vectors = kb.backend._vectors
    except BuildResultError as exc:
        log.error("the knowledge base built by the worker in %s cannot be served: %s", out, exc)
        raise
    except Exception as exc:  # a corrupt file: unpickling, numpy or tantivy refused it
        log.error("the knowledge base built by the worker in %s cannot be served: %s: %s", out,
                  type(exc).__name__, exc)
        raise BuildResultError(f"{out}: {type(exc).__name__}: {exc}") from exc
    return attach(kb, embedder=embedder, text=text, classifier=classifier)


class _Yielding:
    """A file for ``pickle.load`` whose reads are Python calls: the unpickler asks for one frame (64 KB) at a
    time, and each call is a point where the interpreter hands the GIL to a thread that waits for it (chat),
    instead of unpickling a whole knowledge base (a second or more) in one C call that holds it throughout."""

    def __init__(self, f) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, buffer) -> int:
        return self._f.readinto(buffer)

    def readline(self) -> bytes:
        return self._f.readline()


def warm_up(config: KnowledgeBaseConfig, entries: list[dict], points: list[dict], *, today: dt.date,
            stale_after_years: int = 5, seed: tuple[Sequence[str], np.ndarray] | None = None) -> dict:
    """Build these records once at the lowest priority so the next ``build`` finds the model loaded and every
    text cut and encoded; answers what it cost (run in the worker process, nothing big sent back)."""
    done: dict = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, WARM_NICENESS)  # this thread only (Linux)
        except OSError:
            log.warning("could not lower the knowledge-base warm-up's priority")
        started = time.perf_counter()
        try:
            kb = _build(config, entries, points, today=today, stale_after_years=stale_after_years, seed=seed)
            done.update(kb.build_info, seconds=round(time.perf_counter() - started, 1),
                        niceness=os.getpriority(os.PRIO_PROCESS, 0))
        except BaseException as exc:  # re-raised in the worker's own thread, so the hub sees it
            done["error"] = exc

    thread = threading.Thread(target=run, name="kb-warm-up")
    thread.start()
    thread.join()
    if "error" in done:
        raise done["error"]
    return done


def alive() -> int:
    """Answers the worker's process id: the hub's check that its worker still runs."""
    return os.getpid()


def detach(kb):
    """The knowledge base without its model, text processor and classifier (``attach`` adds them back)."""
    kb.embedder = kb.text = None
    kb.backend.embedder = None  # the embedded backend pickles its lexical documents, not its text processor
    kb.answerer.units.text = None
    kb.answerer.classifier = None
    return kb


def attach(kb, *, embedder, text, classifier):
    """Give a knowledge base built in the worker the serving process's model, text processor, classifier."""
    kb.embedder = kb.backend.embedder = embedder
    kb.text = kb.backend.text = kb.answerer.units.text = text
    kb.answerer.classifier = classifier
    return kb

