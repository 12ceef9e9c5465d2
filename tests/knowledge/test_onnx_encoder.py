"""The embedding model served by onnxruntime (knowledge_base/onnx_encoder.py): same vectors, refused when not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from knowledge_base import onnx_encoder
from knowledge_base.embedder import Embedder
from knowledge_base.onnx_encoder import OnnxUnavailable, ensure_onnx_export, export_for_serving, export_is_current

TEXTS = [
    "亲情账户可以绑定几个人？",
    "我爸在老家县里交的职工医保，现在跟我们住在市里，医保卡在这边能用吗？",
    "医保",
    "异地就医备案怎么办理？需要带什么材料。住院押金能不能少交？出院以后多久能报下来？",
    "体温38.5°C能报销吗",  # the tokenizer panics on °: encoded without the symbol, as before
    "How do I activate my medical insurance e-voucher? 医保码怎么激活",
    "我" * 700,  # longer than the model's 512 tokens: truncated the same way
]


@pytest.fixture(scope="module")
def model_dir(knowledge_base, settings) -> Path:
    """The default model, built and exported by the session's setup (conftest's knowledge_base)."""
    return Path(settings.effective_embedding_model)


def test_export_gives_sentence_transformers_vectors(model_dir: Path) -> None:
    served = Embedder(str(model_dir), threads=1)
    reference = Embedder(str(model_dir), threads=1, backend="torch")
    assert (served.backend, reference.backend) == ("onnx", "torch")
    assert served.fingerprint == reference.fingerprint  # cached corpus vectors stay valid
    batch = served.encode(TEXTS, batch_size=3)  # padded batches of mixed length
    expected = reference.encode(TEXTS)
    assert batch.shape == expected.shape == (len(TEXTS), 384)
    assert np.min(np.sum(batch * expected, axis=1)) > 0.99999
    one = np.stack([served.encode([t])[0] for t in TEXTS])
    assert np.min(np.sum(one * expected, axis=1)) > 0.99999
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_auto_serves_the_export_and_names_it_in_setup(model_dir: Path) -> None:
    assert export_is_current(model_dir)
    assert "onnxruntime" in export_for_serving(str(model_dir), "auto")
    assert "sentence-transformers" in export_for_serving(str(model_dir), "torch")


def _layout_copy(model_dir: Path, target: Path) -> Path:
    """A model directory with the real one's sentence-transformers layout files (not its weights)."""
    target.mkdir()
    for name in ("modules.json", ".complete", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, target / name)
    shutil.copytree(model_dir / "1_Pooling", target / "1_Pooling")
    return target


def test_an_export_of_another_build_is_not_served(model_dir: Path, tmp_path: Path) -> None:
    copy = _layout_copy(model_dir, tmp_path / "model")
    (copy / "onnx").mkdir()
    marker = json.loads((model_dir / "onnx" / ".complete").read_text())
    (copy / "onnx" / ".complete").write_text(json.dumps(marker))
    assert export_is_current(copy)  # same build stamp
    (copy / ".complete").write_text('{"rebuilt": true}')  # the model was rebuilt or re-tuned since
    assert not export_is_current(copy)
    with pytest.raises(OnnxUnavailable, match="no current onnx export"):
        onnx_encoder.OnnxSentenceEncoder(copy)


def test_a_pipeline_the_export_does_not_reproduce_stays_on_sentence_transformers(model_dir: Path, tmp_path: Path) -> None:
    copy = _layout_copy(model_dir, tmp_path / "model")
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)  # bge-style CLS pooling
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    line = export_for_serving(str(copy), "auto")
    assert "sentence-transformers" in line and "cls" in line
    assert not (copy / "onnx").exists()
    with pytest.raises(OnnxUnavailable, match="not mean pooling"):
        export_for_serving(str(copy), "onnx")
    assert "not a local model directory" in export_for_serving("BAAI/bge-small-zh-v1.5", "auto")


def test_an_export_that_changes_the_vectors_is_refused(model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _layout_copy(model_dir, tmp_path / "model")
    monkeypatch.setattr(onnx_encoder, "_export", lambda _dir, out: out.write_bytes(b"not a model"))
    monkeypatch.setattr(onnx_encoder, "_check", lambda *_: 0.97)
    with pytest.raises(OnnxUnavailable, match="differ from sentence-transformers"):
        ensure_onnx_export(copy)
    assert not (copy / "onnx").exists()
    assert not list(copy.glob(".onnx-*"))  # its scratch directory is gone too
    assert "sentence-transformers" in export_for_serving(str(copy), "auto")


def test_a_damaged_export_or_a_failing_exporter_is_refused_not_fatal(model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _layout_copy(model_dir, tmp_path / "model")
    (copy / "onnx").mkdir()
    shutil.copy(model_dir / "onnx" / ".complete", copy / "onnx" / ".complete")  # marked current ...
    (copy / "onnx" / "model.onnx").write_bytes(b"\x00" * 64)  # ... but the file is damaged
    with pytest.raises(OnnxUnavailable, match="onnxruntime cannot load"):
        onnx_encoder.OnnxSentenceEncoder(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(OnnxUnavailable, match="cannot read .*tokenizer.json"):
        onnx_encoder.OnnxSentenceEncoder(copy)

    other = _layout_copy(model_dir, tmp_path / "other")

    def broken_exporter(_dir, _out):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_encoder, "_export", broken_exporter)
    assert "the export failed: RuntimeError: exporter crashed" in export_for_serving(str(other), "auto")
    assert not (other / "onnx").exists()


def test_unknown_backend_is_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="auto, onnx, torch"):
        Embedder(str(model_dir), backend="tensorrt")


def test_serving_needs_neither_torch_nor_transformers(model_dir: Path) -> None:
    """The hub's encoder maps the weights and imports neither library (about 100 MB, not 470 MB + torch)."""
    import subprocess
    import sys

    code = (
        "import sys; from knowledge_base.embedder import Embedder; "
        f"e = Embedder({str(model_dir)!r}, threads=1); v = e.encode(['亲情账户可以绑定几个人？']); "
        "print(e.backend, v.shape, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("onnx (1, 384) False False"), out.stdout + out.stderr
