"""Retrieval quality on the labelled development set stays at or above the targets.

A regression gate, not a timing: tests/data/kb_dev.yaml holds 348 colloquial, elderly, typo,
homophone, multi-question and out-of-scope queries (docs/retrieval-quality.md).
"""

import json
import subprocess
import sys

from tests.support import REPO
from knowledge_base.evaluation import DEFAULT_DEV_SET, evaluate, load_dev_set


def test_dev_set_meets_the_retrieval_targets(knowledge_base):
    queries = load_dev_set(DEFAULT_DEV_SET, known_ids=knowledge_base.entries)
    assert len(queries) >= 200
    overall = evaluate(knowledge_base, queries).as_dict()["overall"]
    assert overall["top1"] >= 0.80, overall
    assert overall["top3"] >= 0.90, overall
    assert overall["abstain_precision"] >= 0.90, overall
    assert overall["abstain_recall"] >= 0.80, overall


def test_kb_search_reads_questions_from_stdin_and_prints_json_lines():
    proc = subprocess.run(
        [sys.executable, "-m", "xiaozhi", "kb", "search", "--json", "--k", "3"],
        input="医保码怎么开通\n\n住房公积金怎么提取\n",
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["abstain"] is False and first["results"][0]["topic"] == "e_voucher"
    assert {"id", "topic", "score", "title", "source"} <= first["results"][0].keys()
    assert second["abstain"] is True
