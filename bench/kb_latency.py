"""Knowledge-base query latency of the embedded backend: at the real corpus size and padded to 10,000 entries,
and of the answer stage (knowledge points) on the real corpus.

Padding entries are copies of real entries under new ids with their question variants shuffled
between entries, so BM25 sees a realistic vocabulary; their vectors are real vectors with small
random perturbations (re-encoding 70,000 texts would take minutes and measures nothing more:
kNN cost depends only on the matrix size). Each query is timed end to end: normalisation,
tokenisation, query embedding, three rankers, fusion, region filtering.

    .venv/bin/python bench/kb_latency.py [--sizes 0 10000] [--queries 300]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from knowledge_base.embedded import EmbeddedBackend, encode_corpus, entry_texts  # noqa: E402
from knowledge_base.embedder import Embedder  # noqa: E402
from knowledge_base.loader import Corpus, load_corpus  # noqa: E402
from knowledge_base.search import KnowledgeBase  # noqa: E402
from knowledge_base.text import TextProcessor  # noqa: E402
from xiaozhi.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEV_SET = REPO / "tests" / "data" / "kb_dev.yaml"
FALLBACK_QUERIES = ["医保电子凭证怎么激活", "异地就医怎么备案", "住院了报销需要带什么材料", "一地就依怎么备案",
                    "门诊慢特病怎么申请", "生孩子医保能报多少", "今天天气怎么样", "医保码怎么开通"]


def queries(n: int) -> list[str]:
    pool = FALLBACK_QUERIES
    if DEV_SET.exists():
        pool = [q["q"] for q in yaml.safe_load(DEV_SET.read_text(encoding="utf-8"))]
    rng = random.Random(7)
    return [rng.choice(pool) for _ in range(n)]


def padded(corpus: Corpus, vectors: np.ndarray, owners: np.ndarray, size: int) -> tuple[list, np.ndarray, np.ndarray]:
    """The corpus grown to ``size`` entries, with vectors grouped by entry as the backend expects."""
    rng = np.random.default_rng(7)
    pyrng = random.Random(7)
    entries = list(corpus.entries)
    rows = {pos: np.flatnonzero(owners == pos) for pos in range(len(entries))}
    all_questions = [q for e in corpus.entries for q in e.questions]
    vec_blocks = [vectors[rows[pos]] for pos in range(len(entries))]
    i = 0
    while len(entries) < size:
        src_pos = i % len(corpus.entries)
        src = corpus.entries[src_pos]
        questions = pyrng.sample(all_questions, k=len(src.questions))
        clone = src.model_copy(update={"id": f"pad-{i:05d}", "questions": questions})
        entries.append(clone)
        block = vectors[rows[src_pos]][: len(entry_texts(clone))]
        noisy = block + rng.normal(0, 0.02, block.shape).astype(np.float32)
        vec_blocks.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        i += 1
    out_vectors = np.vstack(vec_blocks).astype(np.float32)
    out_owners = np.concatenate([np.full(len(b), pos, dtype=np.int64) for pos, b in enumerate(vec_blocks)])
    return entries, out_vectors, out_owners


def measure(kb: KnowledgeBase, qs: list[str], region: str | None) -> list[float]:
    for q in qs[:10]:  # warm-up
        kb.search(q, region=region)
    out = []
    for q in qs:
        t0 = time.perf_counter()
        kb.search(q, region=region)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000], help="0 = the real corpus")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()

    settings = get_settings()
    corpus = load_corpus(settings.kb_data_dir)
    text = TextProcessor()
    embedder = Embedder(settings.effective_embedding_model, prefix=settings.embedding_query_prefix, threads=1,
                        backend=settings.embedding_backend)
    vectors, owners, _ = encode_corpus(corpus, embedder, settings.kb_index_dir)
    qs = queries(args.queries)
    print(f"knowledge-base latency, embedded backend, {args.queries} queries, 1 torch thread, {os.cpu_count()} cores")
    for size in args.sizes:
        if size and size > len(corpus.entries):
            entries, vecs, owns = padded(corpus, vectors, owners, size)
        else:
            entries, vecs, owns = corpus.entries, vectors, owners
        t0 = time.perf_counter()
        backend = EmbeddedBackend(entries, text, embedder, vecs, owns)
        build_s = time.perf_counter() - t0
        padded_corpus = Corpus(entries=entries, fingerprint="bench")
        kb = KnowledgeBase(padded_corpus, backend, text)
        for region in (None, "330100"):
            lat = measure(kb, qs, region)
            p95 = sorted(lat)[int(0.95 * (len(lat) - 1))]
            print(f"  {len(entries):>6} entries ({vecs.shape[0]:>6} vectors), region {region or 'national':>8}: "
                  f"p50 {statistics.median(lat):5.1f} ms  p95 {p95:5.1f} ms   (BM25 index built in {build_s:.2f} s)")
    t0 = time.perf_counter()
    for _ in range(50):
        embedder.encode_one("医保电子凭证怎么激活")
    print(f"  of which query embedding alone: {(time.perf_counter() - t0) * 1000 / 50:.1f} ms per query")
    print("  target: p95 < 50 ms at 50,000 indexed texts (questions, knowledge points, passages)")
    answer_stage(len(qs))


def answer_stage(n: int) -> None:
    """The whole answer stage on the real corpus, on residents' real messages (stories included): the
    search (twice for a story), unit scoring, composing."""
    from knowledge_base.answer_eval import load_items
    from knowledge_base.answers import Context
    from knowledge_base.factory import open_knowledge_base

    pool = [i["q"] for i in load_items()]
    rng = random.Random(7)
    qs = [rng.choice(pool) for _ in range(n)]
    kb = open_knowledge_base(get_settings().knowledge_base_config())
    rows = len(kb.answerer.units.layout.texts)
    context = Context(deployment_region="330100")
    lat = []
    for q in qs:
        t0 = time.perf_counter()
        kb.answerer.answer(q, context)
        lat.append((time.perf_counter() - t0) * 1000)
    p95 = sorted(lat)[int(0.95 * (len(lat) - 1))]
    print(f"answer stage (knowledge points), real corpus: {len(kb.corpus.entries)} entries, {len(kb.corpus.points)} "
          f"points, {rows} vectors: p50 {statistics.median(lat):5.1f} ms  p95 {p95:5.1f} ms")


if __name__ == "__main__":
    main()
