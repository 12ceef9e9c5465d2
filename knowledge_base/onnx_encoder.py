"""The embedding model run by onnxruntime: the same vectors as sentence-transformers, in half the time.

Every resident's question is encoded before it is answered (knowledge_base/embedder.py). With
sentence-transformers on torch that took about 40 ms of one core for e5-small on a short question
(docs/performance.md): most of it eager-mode overhead on small tensors, not arithmetic. The same
graph run by onnxruntime takes about 15-20 ms and gives the same vectors (largest difference in a
hidden state about 1e-6, checked on every export).

* ``ensure_onnx_export(model_dir)`` exports a sentence-transformers directory's transformer once,
  at setup (``xiaozhi prepare``), to ``<model_dir>/onnx/model.onnx``. The export needs torch and the
  ``onnx`` package; it is checked against sentence-transformers on a few sentences before it is put
  in place, and its marker records which build of the model it came from, so a rebuilt or re-tuned
  model is exported again rather than served stale.
* ``OnnxSentenceEncoder`` serves it with onnxruntime and the ``tokenizers`` library alone (neither
  torch nor transformers is imported in the serving path): the model's own ``tokenizer.json``, the
  transformer's hidden states, mean pooling over the attention mask and L2 normalisation, which is
  what the directory's ``modules.json`` says sentence-transformers does.
* The weights are written beside the graph (``model.onnx.data``), which onnxruntime maps rather than
  copies: a hub holds about 100 MB for the model, where sentence-transformers held the whole 470 MB
  and onnxruntime reading one file briefly held it twice. The page cache shares the mapping between
  the hub and its knowledge-base build worker.
  A directory whose pipeline is anything else (CLS pooling, a dense layer...) is not exported and is
  served by sentence-transformers as before.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the weights, outside the graph so onnxruntime can map them
ONNX_MARKER = ".complete"
EXPORT_FORMAT = 2  # 2: weights in model.onnx.data, mapped
OPSET = 17
# The pipeline this encoder reproduces: a transformer, mean pooling, L2 normalisation.
_SUPPORTED_MODULES = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)
# Sentences the export is checked on: short and long, a question told as a story, symbols.
_CHECK_SENTENCES = (
    "亲情账户可以绑定几个人？",
    "我爸在老家县里交的职工医保，现在跟我们住在市里，医保卡在这边能用吗？",
    "异地就医备案",
    "辞职以后医保断了，怎么重新接上？住院花了3万多，能报多少？",
)
# Smallest cosine between the exported and the original vectors accepted (they agree to ~1e-7).
_MIN_COSINE = 0.99999


class OnnxUnavailable(RuntimeError):
    """No usable export for this model directory: sentence-transformers serves it instead."""


def _model_stamp(model_dir: Path) -> str:
    """Which build of the model directory an export came from (its own marker, else its weights)."""
    marker = model_dir / ".complete"
    if marker.exists():
        return marker.read_text()
    weights = model_dir / "model.safetensors"
    if weights.exists():
        stat = weights.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    raise OnnxUnavailable(f"{model_dir} has neither a .complete marker nor model.safetensors")


def _pipeline_supported(model_dir: Path) -> str | None:
    """None when the directory is transformer -> mean pooling -> normalise; else why not."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        types = tuple(m["type"] for m in sorted(modules, key=lambda m: m["idx"]))
        if types != _SUPPORTED_MODULES:
            return f"modules {types} are not transformer, pooling, normalize"
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = json.loads((model_dir / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        return f"cannot read its sentence-transformers layout: {exc}"
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    if modes != {"pooling_mode_mean_tokens"}:
        return f"pooling {sorted(modes)} is not mean pooling"
    if not pooling.get("include_prompt", True):
        return "its pooling leaves the prompt out"
    return None


def export_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / ONNX_DIR / ONNX_MARKER).read_text())
    except (OSError, ValueError):
        return None


def export_is_current(model_dir: Path) -> bool:
    marker = export_marker(model_dir)
    try:
        return bool(marker) and marker.get("format") == EXPORT_FORMAT and marker.get("model_stamp") == _model_stamp(model_dir)
    except OnnxUnavailable:
        return False


def ensure_onnx_export(model_dir: Path, *, prefix: str = "query: ") -> Path:
    """Export ``model_dir`` once (no-op when its export is current); returns the ONNX file.

    Raises OnnxUnavailable when the directory's pipeline is not one this encoder reproduces or the
    export does not give the original vectors.
    """
    model_dir = Path(model_dir)
    target = model_dir / ONNX_DIR
    if export_is_current(model_dir):
        return target / ONNX_FILE
    why = _pipeline_supported(model_dir)
    if why:
        raise OnnxUnavailable(f"{model_dir}: {why}")
    with open(model_dir / ".onnx.lock", "a") as lock:  # two setups at once export once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if export_is_current(model_dir):
            return target / ONNX_FILE
        tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=model_dir))
        try:
            try:
                _export(model_dir, tmp / ONNX_FILE)
                cosine = _check(model_dir, tmp / ONNX_FILE, prefix)
            except OnnxUnavailable:
                raise
            except Exception as exc:  # an exporter or onnxruntime failure: serve with sentence-transformers
                raise OnnxUnavailable(f"{model_dir}: the export failed: {type(exc).__name__}: {exc}") from exc
            if cosine < _MIN_COSINE:
                raise OnnxUnavailable(f"{model_dir}: the export's vectors differ from sentence-transformers' "
                                      f"(smallest cosine {cosine:.6f})")
            import onnx
            import torch

            (tmp / ONNX_MARKER).write_text(json.dumps({
                "format": EXPORT_FORMAT, "model_stamp": _model_stamp(model_dir), "opset": OPSET,
                "torch": torch.__version__, "onnx": onnx.__version__, "min_cosine": cosine,
            }, indent=2))
            for path in [tmp, *tmp.iterdir()]:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s for onnxruntime (%.0f MB)", model_dir, (target / ONNX_DATA).stat().st_size / 2**20)
    return target / ONNX_FILE


def _export(model_dir: Path, out: Path) -> None:
    try:
        import onnx  # torch's exporter needs it too
    except ImportError as exc:
        raise OnnxUnavailable("the onnx package is not installed (it is in requirements/app.lock.txt)") from exc
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # Eager attention: the exported graph is plain matrix products and softmax, whatever the
    # installed transformers would pick for torch.
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager").eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = tokenizer([_CHECK_SENTENCES[1]], return_tensors="pt")
    dynamic = {0: "batch", 1: "tokens"}
    single = out.with_name("single.onnx")
    with torch.inference_mode():
        torch.onnx.export(
            _Hidden(model), (sample["input_ids"], sample["attention_mask"]), str(single),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "last_hidden_state": dynamic},
            opset_version=OPSET, dynamo=False,  # the TorchScript exporter: no onnxscript needed
        )
    graph = onnx.load(str(single))
    onnx.save_model(graph, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA, size_threshold=1024)
    single.unlink()


def _check(model_dir: Path, onnx_file: Path, prefix: str) -> float:
    """Smallest cosine between the export's vectors and sentence-transformers' on the check sentences."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True).encode(
        list(_CHECK_SENTENCES), prompt=prefix, normalize_embeddings=True, convert_to_numpy=True)
    exported = OnnxSentenceEncoder(model_dir, onnx_file=onnx_file).encode(
        [prefix + s for s in _CHECK_SENTENCES], batch_size=2)  # padded batches checked too
    return float(np.min(np.sum(reference * exported, axis=1)))


def _max_length(model_dir: Path) -> int:
    """sentence-transformers' truncation: its own max_seq_length, else the tokenizer's limit."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((model_dir / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if value:
            return int(value)
    return 512


def _pad_token(model_dir: Path) -> str:
    try:
        pad = json.loads((model_dir / "tokenizer_config.json").read_text()).get("pad_token")
    except (OSError, ValueError):
        pad = None
    if isinstance(pad, dict):  # {"content": "<pad>", ...}
        pad = pad.get("content")
    return pad or "<pad>"


class OnnxSentenceEncoder:
    """Unit vectors for texts (the caller adds any prefix), from an exported model directory."""

    def __init__(self, model_dir: Path, *, threads: int | None = None, onnx_file: Path | None = None) -> None:
        model_dir = Path(model_dir)
        if onnx_file is None:
            if not export_is_current(model_dir):
                raise OnnxUnavailable(f"{model_dir} has no current onnx export (run `xiaozhi prepare`)")
            onnx_file = model_dir / ONNX_DIR / ONNX_FILE
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.max_length = _max_length(model_dir)
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a missing file
            raise OnnxUnavailable(f"cannot read {model_dir / 'tokenizer.json'}: {exc}") from exc
        self.tokenizer.enable_truncation(self.max_length)
        pad = _pad_token(model_dir)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad), pad_token=pad)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (one per core)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # With more than one thread, onnxruntime's workers spin between runs by default, burning a
        # core the hub's other requests and Rasa need (numpy's OpenBLAS did the same: hub/infra/cpu.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged or partial file: refused, not a hub that cannot start
            raise OnnxUnavailable(f"onnxruntime cannot load {onnx_file}: {exc}") from exc
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress=None) -> np.ndarray:
        """float32 unit vectors, one row per text; batches of similar length (less padding)."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = np.array([b.ids for b in batch], dtype=np.int64)
            mask = np.array([b.attention_mask for b in batch], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[rows] = pooled
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
        return out


def export_for_serving(model: str, backend: str = "auto") -> str:
    """What setup does for the configured backend (``xiaozhi prepare``, the tests' knowledge base).

    Exports a local model directory once; returns a line saying which backend will serve it.
    ``backend="onnx"`` makes a missing or failed export an error, ``auto`` falls back to
    sentence-transformers and says why.
    """
    if backend == "torch":
        return "embedding backend: sentence-transformers (XIAOZHI_EMBEDDING_BACKEND=torch)"
    path = Path(model)
    try:
        if not path.is_dir():
            raise OnnxUnavailable(f"{model} is not a local model directory")
        return f"Embedding model for onnxruntime: {ensure_onnx_export(path)}"
    except OnnxUnavailable as exc:
        if backend == "onnx":
            raise
        log.warning("the embedding model will be served by sentence-transformers: %s", exc)
        return f"embedding backend: sentence-transformers ({exc})"
