"""The on-disk vector cache (knowledge_base/embedded.encode_corpus): an edited pack re-encodes only the
texts it changed. Before, any edit gave the corpus a new fingerprint and every one of its 12k texts was
encoded again (about 10 minutes on two cores), in `xiaozhi kb search`, the tests' fixture and setup."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml

from knowledge_base.embedded import TEXTS_FILE, encode_corpus, previous_vectors
from knowledge_base.loader import load_corpus
from knowledge_base.units import layout
from tests.support.knowledge import small_corpus


class CountingEmbedder:
    """A deterministic stand-in for the model (a vector from each text's hash) that counts what it encodes:
    what is measured here is which texts reach the model, not what the model makes of them."""

    dimension = 8

    def __init__(self, name: str = "counting") -> None:
        self.fingerprint = hashlib.sha256(name.encode()).hexdigest()[:12]
        self.model_name = name
        self.encoded: list[str] = []

    def encode(self, texts: list[str], **_kw) -> np.ndarray:
        self.encoded.extend(texts)
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8) for t in texts]
        return np.asarray(rows, dtype=np.float32) / 255.0


def edit_one_answer(tmp_path: Path) -> str:
    path = tmp_path / "data" / "national" / "points" / "e_voucher.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["points"][0]["answer"] = doc["points"][0]["answer"] + "另外，可以拨打12393咨询。"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return doc["points"][0]["answer"]


def test_an_edited_pack_encodes_only_its_changed_texts(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path)
    index_dir = tmp_path / "index"
    model = CountingEmbedder()
    first, _, first_dir = encode_corpus(corpus, model, index_dir)
    assert len(model.encoded) == len(set(layout(corpus).texts))

    changed = edit_one_answer(tmp_path)
    edited = load_corpus(tmp_path / "data")
    assert edited.fingerprint != corpus.fingerprint
    model.encoded.clear()
    vectors, _, target = encode_corpus(edited, model, index_dir)

    assert target != first_dir
    new_texts = set(layout(edited).texts) - set(layout(corpus).texts)
    assert new_texts and all(changed in t or t in changed for t in new_texts)
    assert sorted(model.encoded) == sorted(new_texts)
    # Each row holds the vector of its own text, reused or new: the same as encoding from nothing.
    fresh = CountingEmbedder()
    assert np.array_equal(vectors, fresh.encode(layout(edited).texts))


def test_a_newer_cache_of_another_corpus_does_not_hide_the_packs_vectors(tmp_path: Path) -> None:
    """A test or a script that encodes a few entries into the same cache directory writes the newest cache;
    the packs' next edit must still find the vectors of its unchanged texts."""
    corpus = small_corpus(tmp_path)
    index_dir = tmp_path / "index"
    model = CountingEmbedder()
    encode_corpus(corpus, model, index_dir)
    encode_corpus(small_corpus(tmp_path / "few", entries=1), model, index_dir)  # the newest cache now
    edit_one_answer(tmp_path)
    edited = load_corpus(tmp_path / "data")
    model.encoded.clear()
    encode_corpus(edited, model, index_dir)
    assert sorted(model.encoded) == sorted(set(layout(edited).texts) - set(layout(corpus).texts))


def test_another_model_never_reuses_the_vectors(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path)
    index_dir = tmp_path / "index"
    encode_corpus(corpus, CountingEmbedder("model-a"), index_dir)
    other = CountingEmbedder("model-b")
    assert previous_vectors(index_dir, other) == {}
    encode_corpus(corpus, other, index_dir)
    assert len(other.encoded) == len(set(layout(corpus).texts))


def test_a_damaged_cache_is_not_reused(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path)
    index_dir = tmp_path / "index"
    model = CountingEmbedder()
    _, _, target = encode_corpus(corpus, model, index_dir)
    (target / TEXTS_FILE).write_text('["only one text"]', encoding="utf-8")  # rows and texts disagree
    assert previous_vectors(index_dir, model) == {}
    (target / TEXTS_FILE).write_text("{not json", encoding="utf-8")
    assert previous_vectors(index_dir, model) == {}
    edit_one_answer(tmp_path)
    model.encoded.clear()
    encode_corpus(load_corpus(tmp_path / "data"), model, index_dir)
    assert len(model.encoded) == len(set(layout(load_corpus(tmp_path / "data")).texts))


class SlowEmbedder(CountingEmbedder):
    """Counts into a file (it runs in another process) and takes its time, as the real model does."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    def encode(self, texts: list[str], **_kw) -> np.ndarray:
        import time

        time.sleep(0.05)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(f"{len(texts)}\n")
        return super().encode(texts)


def _encode_in_child(data_dir: str, index_dir: str, log: str) -> None:
    encode_corpus(load_corpus(Path(data_dir)), SlowEmbedder(Path(log)), Path(index_dir), batch=4)


def test_two_processes_needing_the_same_cache_encode_it_once(tmp_path: Path) -> None:
    """Replicas starting after a publication, or setup beside a running hub, need the same new cache at
    the same moment. Before, each encoded the whole corpus (12k texts, ~10 min on two cores) into one
    shared temporary directory that the other could delete under it; now one encodes and the other
    waits for it and reads the result."""
    import multiprocessing
    import time

    corpus = small_corpus(tmp_path)
    index_dir = tmp_path / "index"
    log = tmp_path / "encoded.log"
    context = multiprocessing.get_context("fork")
    first = context.Process(target=_encode_in_child,
                            args=(str(tmp_path / "data"), str(index_dir), str(log)))
    first.start()
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:  # the first is encoding
        time.sleep(0.01)
    second = context.Process(target=_encode_in_child,
                             args=(str(tmp_path / "data"), str(index_dir), str(log)))
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    encoded = sum(int(n) for n in log.read_text().split())
    assert encoded == len(set(layout(corpus).texts))
    caches = [d for d in index_dir.iterdir() if d.is_dir()]
    assert len(caches) == 1 and (caches[0] / "manifest.json").exists()
    vectors, _, _ = encode_corpus(corpus, CountingEmbedder(), index_dir)
    assert np.array_equal(vectors, CountingEmbedder().encode(layout(corpus).texts))
