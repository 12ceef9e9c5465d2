"""`xiaozhi kb index` and `xiaozhi kb eval` open the knowledge base the way the hub does: the CLI makes the
knowledge base's own config from the settings (knowledge_base imports nothing of the hub, issue 16)."""

from __future__ import annotations

import json
import os
import subprocess

import yaml

from knowledge_base.loader import load_corpus
from tests.support import REPO
from xiaozhi.settings import Settings

XIAOZHI = REPO / ".venv" / "bin" / "xiaozhi"


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XIAOZHI_VAR_DIR": str(tmp_path / "var")}
    return subprocess.run([str(XIAOZHI), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_kb_index_and_eval_run_from_the_command_line(tmp_path) -> None:
    entry = load_corpus(Settings().kb_data_dir).entries[0]
    dev_set = tmp_path / "dev.yaml"
    dev_set.write_text(yaml.safe_dump([
        {"q": entry.questions[0], "expect": [entry.id], "kind": "clean"},
        {"q": "今天的足球比分是多少", "expect": "abstain", "kind": "out_of_scope"},
    ], allow_unicode=True), encoding="utf-8")

    index = _run("kb", "index", tmp_path=tmp_path)
    assert index.returncode == 0, index.stdout[-2000:] + index.stderr[-2000:]
    assert "knowledge base indexed" in index.stdout + index.stderr

    run = _run("kb", "eval", str(dev_set), "--json", tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    overall = report["overall"]
    assert (overall["n"], overall["answerable"], overall["should_abstain"]) == (2, 1, 1), overall
    assert overall["top1"] in (0.0, 1.0) and overall["abstain_recall"] in (0.0, 1.0), overall  # scored, not skipped
