"""Contract tests of the Elasticsearch backend, run against an ES-8-API stand-in: NOT a real Elasticsearch.

No Elasticsearch server can be installed on this machine, so these tests start ``noida-db`` (PyPI,
0.2.3), a small local binary that imitates the Elasticsearch 8.x REST API: index mappings with
``_meta``, ``dense_vector`` and ``knn`` with ``knn.filter``, ``_bulk``, ``_msearch``, aliases and
``_aliases`` swaps. It is not Elasticsearch: it has only the ``cjk``/``standard``/``whitespace``
analysers (no IK or smartcn plugins), its BM25 scores differ from Lucene's, it scans every
document, and it ignores credentials. These tests therefore check the *protocol* the backend speaks
(requests accepted, documents stored, filters applied, alias moved, errors explained) and the
ranking on a ~12-entry fixture, not Elasticsearch's relevance or performance on a real cluster;
docs/deploy-elasticsearch.md says how to verify a real one.

The module is skipped when noida-db is not installed (``pip install noida-db==0.2.3``, part of the
lock that setup installs); the offline embedding model is the configured one (conftest builds it).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.util
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if importlib.util.find_spec("noida_db") is None:
    pytest.skip(
        "noida-db (the ES-8-API stand-in these contract tests run against) is not installed: "
        "pip install noida-db==0.2.3",
        allow_module_level=True,
    )

from knowledge_base.elasticsearch_backend import ElasticsearchBackend, KnowledgeBaseUnavailable  # noqa: E402
from knowledge_base.embedded import lexical_documents, entry_texts  # noqa: E402
from knowledge_base.loader import Corpus, load_corpus  # noqa: E402
from knowledge_base.search import KnowledgeBase  # noqa: E402
from knowledge_base.text import TextProcessor  # noqa: E402
from knowledge_base.config import KnowledgeBaseConfig  # noqa: E402
from xiaozhi.settings import Settings  # noqa: E402


# Real entries: e-voucher and cross-region questions, plus Hangzhou entries that replace national ones.
FIXTURE_IDS = (
    "ev-activate",
    "ev-activate-wechat",
    "ev-activate-alipay",
    "ev-password",
    "ev-free",
    "ev-no-card-night",
    "hz-ev-night",
    "cr-file-online",
    "cr-file-offline",
    "hz-filing",
    "ev-nationwide",
    "ev-offline",
)


# -- the stand-in server ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noida_binary() -> Path:
    """The real server binary inside the package: the ``noida-db`` console script only wraps it
    in a Python process, and killing that wrapper would leave the server running."""
    from importlib.resources import files

    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        pytest.skip(f"noida-db is installed but its binary is missing at {path}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="session")
def es_url(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("noida")
    port = _free_port()
    log_path = work / "noida.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_noida_binary()), "start", "--only", "elasticsearch", "--host", "127.0.0.1",
             "--elasticsearch-port", str(port), "--data-dir", str(work / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of pytest reaches us, not the server; teardown stops it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"noida-db exited with {proc.returncode}: {log_path.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(url + "/", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"noida-db did not answer on {url} within 30 s: {log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- shared pieces ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def embedder(knowledge_base):
    """The real offline model, as configured (conftest builds it when setup has not)."""
    return knowledge_base.embedder


@pytest.fixture(scope="session")
def text() -> TextProcessor:
    return TextProcessor()


def _subset(corpus: Corpus, ids) -> Corpus:
    by_id = corpus.by_id()
    entries = [by_id[i] for i in ids]
    digest = hashlib.sha256((corpus.fingerprint + "|" + ",".join(ids)).encode()).hexdigest()[:16]
    return Corpus(entries=entries, fingerprint=digest)


@pytest.fixture(scope="session")
def full_corpus() -> Corpus:
    corpus = load_corpus()
    assert not corpus.errors, corpus.errors
    return corpus


@pytest.fixture(scope="session")
def corpus(full_corpus) -> Corpus:
    return _subset(full_corpus, FIXTURE_IDS)


def _config(es_url: str, alias: str, tmp_path: Path, **extra) -> KnowledgeBaseConfig:
    return Settings(
        kb_backend="elasticsearch",
        es_url=es_url,
        es_index=alias,
        es_analyzer=extra.pop("es_analyzer", "cjk"),
        cache_dir=tmp_path / "cache",
        **extra,
    ).knowledge_base_config()


@pytest.fixture(scope="module")
def backend(es_url, corpus, text, embedder, tmp_path_factory) -> ElasticsearchBackend:
    config = _config(es_url, "kb-contract", tmp_path_factory.mktemp("kb"))
    return ElasticsearchBackend.from_config(config, corpus, text, embedder)


def _variant_count(corpus: Corpus) -> int:
    return sum(len(entry_texts(e)) for e in corpus.entries)


# -- mapping and indexing -----------------------------------------------------------------------------
def test_mapping_has_dense_vector_analyser_and_meta(backend, corpus, embedder):
    [index] = backend.current_indices()
    assert index.startswith("kb-contract-")
    mapping = backend.client.indices.get_mapping(index=index).body[index]["mappings"]
    props = mapping["properties"]
    vector = props["vector"]
    assert vector["type"] == "dense_vector"
    assert vector["dims"] == embedder.dimension == 384
    assert vector["similarity"] == "cosine" and vector["index"] is True
    assert vector["index_options"]["type"] == "hnsw"  # float vectors: raw cosines for calibration
    for field in ("title", "questions", "answer"):
        assert props[field] == {"type": "text", "analyzer": "cjk"}
    for field in ("words", "chars", "pinyin", "answer_words"):
        assert props[field]["analyzer"] == "whitespace"
    for field in ("entry_id", "topic", "region_code"):
        assert props[field]["type"] == "keyword"
    meta = mapping["_meta"]
    assert meta["corpus_fingerprint"] == corpus.fingerprint
    assert meta["embedding_model"] == embedder.model_name
    assert meta["embedding_fingerprint"] == embedder.fingerprint


def test_ik_analyser_searches_with_ik_smart(corpus, text, embedder):
    backend = ElasticsearchBackend(None, "x", corpus, text, embedder, analyzer="ik_max_word")  # type: ignore[arg-type]
    title = backend.mapping()["properties"]["title"]
    assert title == {"type": "text", "analyzer": "ik_max_word", "search_analyzer": "ik_smart"}


def test_bulk_index_holds_one_document_per_variant(backend, corpus, text):
    client = backend.client
    assert client.count(index=backend.alias)["count"] == _variant_count(corpus)
    assert client.count(index=backend.alias, query={"term": {"kind": "entry"}})["count"] == len(corpus.entries)
    entry = corpus.by_id()["ev-activate"]
    doc = client.get(index=backend.alias, id="ev-activate~0")["_source"]
    lexical = lexical_documents(entry, text)  # the embedded backend's token streams
    assert doc["words"] == lexical["words"] and doc["chars"] == lexical["chars"]
    assert doc["pinyin"] == lexical["pinyin"] and doc["answer_words"] == lexical["answer"]
    assert doc["title"] == entry.title and doc["topic"] == "e_voucher" and doc["region_code"] == "100000"
    variant = client.get(index=backend.alias, id=f"ev-activate~{len(entry.questions)}")["_source"]
    assert variant["kind"] == "variant" and variant["variant_text"] == entry.questions[-1]
    assert "words" not in variant  # variants carry no text fields: BM25 statistics stay per entry
    # The whitespace fields keep TextProcessor's tokens as they are.
    tokens = client.indices.analyze(index=backend.current_indices()[0], field="words", text=lexical["words"])
    assert [t["token"] for t in tokens["tokens"]] == lexical["words"].split()


# -- ranking ------------------------------------------------------------------------------------------
def _prepare(text: TextProcessor, corpus: Corpus, question: str):
    return KnowledgeBase(corpus, backend=None, text=text).prepare(question)  # type: ignore[arg-type]


def test_rank_returns_separate_rankings_restricted_to_allowed(backend, corpus, text):
    query = _prepare(text, corpus, "医保电子凭证怎么激活")
    all_ids = {e.id for e in corpus.entries}

    everything = backend.rank(query, all_ids, depth=10)
    assert everything.lexical and everything.pinyin and everything.dense
    assert everything.lexical[0][0] == everything.dense[0][0] == "ev-activate"
    for ranking in (everything.lexical, everything.pinyin, everything.dense):
        ids = [eid for eid, _ in ranking]
        assert len(ids) == len(set(ids))  # variants collapsed to entries
        scores = [s for _, s in ranking]
        assert scores == sorted(scores, reverse=True)

    # Few allowed ids: a positive terms filter.
    few = {"ev-password", "ev-free", "cr-file-online"}
    restricted = backend.rank(query, few, depth=10)
    for ranking in (restricted.lexical, restricted.pinyin, restricted.dense):
        assert ranking and {eid for eid, _ in ranking} <= few
    assert {eid for eid, _ in restricted.dense} == few
    # The filter runs inside kNN: at depth 1, k covers only the variants of one entry, and the k
    # nearest documents overall are all ev-activate's; filtering after kNN would leave nothing.
    assert backend.searches(query, few, 1)["dense"]["knn"]["filter"] == {"terms": {"entry_id": sorted(few)}}
    assert len(backend.rank(query, few, depth=1).dense) == 1

    # All but one: the filter excludes the best entry, in every ranker.
    most = all_ids - {"ev-activate"}
    without = backend.rank(query, most, depth=10)
    for ranking in (without.lexical, without.pinyin, without.dense):
        assert ranking and "ev-activate" not in {eid for eid, _ in ranking}

    assert backend.rank(query, set(), depth=10).dense == []
    assert len(backend.rank(query, all_ids, depth=3).dense) == 3


def test_dense_scores_are_cosines_of_the_best_variant(backend, corpus, text, embedder):
    query = _prepare(text, corpus, "医保码密码忘了怎么办")
    dense = dict(backend.rank(query, {e.id for e in corpus.entries}, depth=20).dense)
    assert len(dense) == len(corpus.entries)
    qv = embedder.encode_one(query.normalised)
    for entry in corpus.entries:
        expected = float(np.max(embedder.encode(entry_texts(entry)) @ qv))
        assert dense[entry.id] == pytest.approx(expected, abs=2e-3), entry.id


def test_knowledge_base_over_elasticsearch_answers(backend, corpus, text):
    kb = KnowledgeBase(corpus, backend, text)
    result = kb.search("医保电子凭证怎么激活")
    assert not result.abstain
    assert result.best.entry.topic_name == "e_voucher"
    assert result.best.entry.id == "ev-activate"
    # A Hangzhou resident gets the Hangzhou entry, never the national one it replaces.
    hz = kb.search("半夜急诊没带医保卡怎么用医保", region="330100")
    ids = [h.entry.id for h in hz.hits]
    assert "hz-ev-night" in ids and "ev-no-card-night" not in ids
    national = kb.search("半夜急诊没带医保卡怎么用医保", region="")
    assert "hz-ev-night" not in [h.entry.id for h in national.hits]


def test_analysed_fields_can_join_the_lexical_ranker(backend, corpus, text, embedder):
    weighted = ElasticsearchBackend(
        backend.client, backend.alias, corpus, text, embedder, analysed_weight=0.3, url=backend.url
    )
    ranking = weighted.rank(_prepare(text, corpus, "医保电子凭证怎么激活"), {e.id for e in corpus.entries}, 5)
    assert ranking.lexical[0][0] == "ev-activate"


# -- alias lifecycle ----------------------------------------------------------------------------------
def test_reindex_swaps_alias_while_searches_keep_answering(es_url, corpus, full_corpus, text, embedder, tmp_path):
    backend = ElasticsearchBackend.from_config(_config(es_url, "kb-swap", tmp_path), corpus, text, embedder)
    [old] = backend.current_indices()
    query = _prepare(text, corpus, "医保电子凭证怎么激活")
    allowed = {e.id for e in corpus.entries}

    stop = threading.Event()
    answers: list[str] = []
    failures: list[BaseException] = []

    def keep_searching() -> None:
        while not stop.is_set():
            try:
                answers.append(backend.rank(query, allowed, depth=5).lexical[0][0])
            except BaseException as exc:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(exc)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        time.sleep(0.3)
        before = len(answers)
        reader = ElasticsearchBackend(backend.client, "kb-swap", corpus, text, embedder)  # a second hub
        bigger = _subset(full_corpus, FIXTURE_IDS + ("cr-why-filing", "ev-elderly"))
        new = reader.reindex(bigger)
        time.sleep(0.3)
    finally:
        stop.set()
        searcher.join(timeout=30)
    assert not failures, failures[:3]
    assert len(answers) > before > 0
    assert set(answers) == {"ev-activate"}

    assert new != old and new.startswith("kb-swap-")
    assert backend.current_indices() == [new]
    assert not backend.client.indices.exists(index=old)  # the old index is gone
    assert backend.index_meta(new)["corpus_fingerprint"] == bigger.fingerprint
    assert backend.client.count(index="kb-swap")["count"] == _variant_count(bigger)
    kb = KnowledgeBase(bigger, reader, text)
    assert kb.search("老人没有智能手机怎么用医保码").best.entry.id == "ev-elderly"


def test_reopen_with_same_fingerprint_does_not_reindex(es_url, corpus, full_corpus, text, embedder, tmp_path, monkeypatch):
    config = _config(es_url, "kb-reopen", tmp_path)
    first = ElasticsearchBackend.from_config(config, corpus, text, embedder)
    [index] = first.current_indices()
    # The hub's reload marker names the live index, written after the alias moved; vectors are
    # cached apart from the embedded backend's generations.
    assert (config.index_dir / "CURRENT").read_text() == index
    assert any((config.index_dir / "es-vectors").iterdir())

    calls: list[str] = []
    original = ElasticsearchBackend.reindex

    def counting(self, *args, **kwargs):
        calls.append(self.alias)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ElasticsearchBackend, "reindex", counting)
    second = ElasticsearchBackend.from_config(config, corpus, text, embedder)
    assert calls == [] and second.current_indices() == [index]

    changed = _subset(full_corpus, FIXTURE_IDS[:-1])  # different data: a new fingerprint
    third = ElasticsearchBackend.from_config(config, changed, text, embedder)
    assert calls == ["kb-reopen"] and third.current_indices() != [index]
    assert (config.index_dir / "CURRENT").read_text() == third.current_indices()[0]
    assert not third.client.indices.exists(index=index)


# -- errors -------------------------------------------------------------------------------------------
def test_unreachable_cluster_gives_a_clear_error(corpus, text, embedder, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(KnowledgeBaseUnavailable) as info:
        ElasticsearchBackend.from_config(_config(url, "kb-none", tmp_path), corpus, text, embedder)
    message = str(info.value)
    assert f"cannot reach Elasticsearch at {url}" in message
    assert "XIAOZHI_ES_URL" in message and "XIAOZHI_KB_BACKEND=embedded" in message
    assert time.monotonic() - started < 15


def test_missing_analyser_plugin_is_explained_and_leaves_nothing_behind(es_url, corpus, text, embedder, tmp_path):
    config = _config(es_url, "kb-ik", tmp_path, es_analyzer="ik_max_word")  # the stand-in has no IK
    with pytest.raises(KnowledgeBaseUnavailable) as info:
        ElasticsearchBackend.from_config(config, corpus, text, embedder)
    assert "analysis-ik" in str(info.value) and "XIAOZHI_ES_ANALYZER=cjk" in str(info.value)
    probe = ElasticsearchBackend.make_client(es_url)
    assert not probe.indices.exists_alias(name="kb-ik")
    assert not [name for name in probe.indices.get(index="*").body if name.startswith("kb-ik")]


def test_concrete_index_with_the_alias_name_is_explained(es_url, corpus, text, embedder, tmp_path):
    client = ElasticsearchBackend.make_client(es_url)
    client.indices.create(index="kb-squatted")
    try:
        with pytest.raises(KnowledgeBaseUnavailable, match="is a concrete index, not an alias"):
            ElasticsearchBackend.from_config(_config(es_url, "kb-squatted", tmp_path), corpus, text, embedder)
    finally:
        client.indices.delete(index="kb-squatted")


def test_search_on_a_missing_alias_says_to_build_it(es_url, corpus, text, embedder):
    backend = ElasticsearchBackend(
        ElasticsearchBackend.make_client(es_url), "kb-never-built", corpus, text, embedder, url=es_url
    )
    with pytest.raises(KnowledgeBaseUnavailable, match="xiaozhi kb index"):
        backend.rank(_prepare(text, corpus, "医保码"), {e.id for e in corpus.entries}, 5)


class _Reject401(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._reject()

    def do_HEAD(self):  # noqa: N802
        self._reject()

    def _reject(self):
        type(self).seen.append(self.headers.get("Authorization", ""))
        body = b'{"error":{"type":"security_exception","reason":"unable to authenticate"},"status":401}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_credentials_come_from_settings_and_rejection_is_explained(corpus, text, embedder, tmp_path):
    """The stand-in ignores credentials, so a tiny local server that answers 401 plays the secured cluster."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Reject401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        config = _config(url, "kb-auth", tmp_path, es_username="xiaozhi_kb", es_password="s3cret")
        with pytest.raises(KnowledgeBaseUnavailable, match="rejected the credentials"):
            ElasticsearchBackend.from_config(config, corpus, text, embedder)
    finally:
        server.shutdown()
        server.server_close()
    expected = "Basic " + base64.b64encode(b"xiaozhi_kb:s3cret").decode()
    assert _Reject401.seen and set(_Reject401.seen) == {expected}


def test_a_publication_from_the_console_reindexes_and_moves_the_alias(es_url, full_corpus, text, embedder, tmp_path):
    """The knowledge console's publish path with XIAOZHI_KB_BACKEND=elasticsearch (issue 18), on the
    stand-in: the published records become a new concrete index, the alias moves to it, the old index goes,
    and the answer stage answers with the edited text. (A thread builds it: Elasticsearch indexes on its
    server, so the publisher's worker process is for the embedded backend only.)"""
    import asyncio

    from knowledge_base.answers import Context
    from knowledge_base.factory import open_knowledge_base
    from knowledge_base.records import corpus_from_records, record_of
    from xiaozhi.hub import migrations
    from xiaozhi.hub.domain.accounts import Role, StaffUser
    from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher
    from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
    from xiaozhi.hub.infra.store import Store

    ids = set(FIXTURE_IDS)
    entries = [record_of(e) for e in full_corpus.entries if e.id in ids]
    points = [record_of(p) for p in full_corpus.points if p.entry in ids]
    assert points, "the fixture's entries have knowledge points"
    config = _config(es_url, "kb-publish", tmp_path)
    admin = StaffUser(username="adm", role=Role.admin.value, display_name="adm", password_hash="-")
    point = next(p for p in points if p["entry"] == "ev-activate")
    edited = {**point, "answer": point["answer"][:380] + "（2099年起另有规定）"}

    async def scenario():
        store = Store(f"sqlite+aiosqlite:///{tmp_path / 'kb.db'}")
        await migrations.prepare(store)
        try:
            records = KnowledgeStore(store)
            await records.import_packs(entries, points)
            first = await asyncio.to_thread(open_knowledge_base, config, embedder=embedder,
                                            corpus=corpus_from_records(entries, points), text=text)
            holder = {"kb": first}
            publisher = KnowledgePublisher(records, config, lambda: holder["kb"], lambda kb: holder.__setitem__("kb", kb))
            assert not publisher.builds_in_process(10_000)
            [old_index] = first.backend.current_indices()
            await records.save(admin, "point", edited, reason="测试")
            await records.transition(admin, "point", point["id"], "published")
            result = await publisher.publish(admin)
            return first, holder["kb"], old_index, result
        finally:
            await store.close()

    first, kb, old_index, result = asyncio.run(scenario())
    assert result["points"] == len(points) and kb is not first
    [new_index] = kb.backend.current_indices()
    assert new_index != old_index and new_index.startswith("kb-publish-")
    assert not kb.backend.client.indices.exists(index=old_index)
    assert kb.backend.index_meta(new_index)["corpus_fingerprint"] == kb.corpus.fingerprint != first.corpus.fingerprint
    reply = kb.answerer.answer(point["question"], Context())
    assert "2099年起另有规定" in reply.text, reply.text
    assert kb.search("医保电子凭证怎么激活").best.entry.id == "ev-activate"
