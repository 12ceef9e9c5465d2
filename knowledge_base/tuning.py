"""Fit the embedding model to this knowledge base: the ways of asking one question drawn together,
a neighbouring question's pushed apart.

The default embedding model (multilingual-e5-small, rebuilt offline from a registry package by
knowledge_base/embedding_model.py) was trained on general text. It places "亲情账户最多绑几个人" and
"给16岁以上的家人加亲情账户要本人刷脸吗" almost on top of each other: same words, different
questions. Residents' questions mostly land on the right *area* and then on the wrong knowledge
point of it (docs/retrieval-quality.md). Every knowledge point already carries six to eight ways of
asking written the way residents ask, so the model can be taught what this corpus means by "the
same question":

* each way of asking is an anchor; another way of asking the same unit is its positive;
* a way of asking a sibling unit (another point of the same entry, else of the same topic) is its
  hard negative; the other units of the batch are further negatives (multiple-negatives ranking
  loss, sentence-transformers' own);
* the word-embedding matrix (250k tokens, most of the parameters) stays frozen: the transformer
  layers learn the distinctions, the vocabulary keeps its general meaning, and one epoch takes
  minutes on two cores.

Only the knowledge base's own texts are used, never the answer-quality set (tests/data/answer_set.yaml),
so that set stays a fair measure. The result is a SentenceTransformer directory like the base one,
written beside it once (``xiaozhi prepare`` / ``xiaozhi kb tune-model``) and reused: its
``.complete`` marker records the base model, the training settings and a hash of the corpus it
learnt from. A corpus edited since is still served well (the model learnt the domain, not the ids);
``xiaozhi kb tune-model --force`` refits it after large changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from knowledge_base.embedding_model import COMPLETE_MARKER, install_model_dir, read_marker
from knowledge_base.loader import Corpus
from knowledge_base.units import layout

log = logging.getLogger(__name__)

TUNE_FORMAT = 1


@dataclass(frozen=True)
class TuneSettings:
    epochs: float = 1.0
    batch: int = 32
    learning_rate: float = 3e-5
    seed: int = 0
    max_seq_length: int = 64
    prefix: str = "query: "


@dataclass(frozen=True)
class Example:
    unit: int  # no two examples of one unit share a batch (they would be each other's false negatives)
    anchor: str
    positive: str
    negative: str


def training_examples(corpus: Corpus, seed: int = 0) -> list[Example]:
    """One example per way of asking of every entry and knowledge point with at least two."""
    rng = random.Random(seed)
    rows = layout(corpus)
    groups: list[tuple[int, str, str, list[str]]] = []
    for index, unit in enumerate(rows.units):
        if unit.kind == "passage":
            continue
        texts = [t for t in dict.fromkeys(unit.texts) if t.strip()]
        if len(texts) >= 2:
            groups.append((index, unit.entry.id, unit.entry.topic, texts))
    by_entry: dict[str, list] = {}
    by_topic: dict[str, list] = {}
    for group in groups:
        by_entry.setdefault(group[1], []).append(group)
        by_topic.setdefault(group[2], []).append(group)
    examples = []
    for index, entry_id, topic, texts in groups:
        siblings = [g for g in by_entry[entry_id] if g[0] != index] or [g for g in by_topic[topic] if g[0] != index]
        own = set(texts)
        # A sibling's way of asking that this unit also lists (the same words under two points) is
        # no negative of it.
        negatives = [t for g in siblings for t in g[3] if t not in own] or [
            t for g in groups if g[0] != index for t in g[3] if t not in own]
        for anchor in texts:
            positive = rng.choice([t for t in texts if t != anchor])
            examples.append(Example(index, anchor, positive, rng.choice(negatives)))
    return examples


def corpus_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.unit}\x1f{e.anchor}\x1f{e.positive}\x1f{e.negative}\x1e".encode())
    return digest.hexdigest()[:16]


def batches(examples: list[Example], size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches in which every unit appears at most once."""
    pending = list(examples)
    rng.shuffle(pending)
    out: list[list[Example]] = []
    while pending:
        batch, seen, rest = [], set(), []
        for e in pending:
            if e.unit in seen or len(batch) == size:
                rest.append(e)
            else:
                batch.append(e)
                seen.add(e.unit)
        if len(batch) < 2:  # a lone example has no in-batch negative to learn from
            break
        out.append(batch)
        pending = rest
    return out


def tuned_marker(out_dir: Path) -> dict | None:
    """What a tuned model was fitted on, or None when there is no complete one."""
    return read_marker(Path(out_dir))


def tune_embedding_model(
    base_dir: Path,
    out_dir: Path,
    corpus: Corpus,
    *,
    settings: TuneSettings = TuneSettings(),
    force: bool = False,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Fine-tune ``base_dir`` on ``corpus`` into ``out_dir`` (idempotent unless ``force``).

    Written into a temporary directory and renamed into place with its marker last, like the base
    model, so a reader never loads a half-written model.
    """
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    base_stamp = (base_dir / COMPLETE_MARKER).read_text(encoding="utf-8") if (base_dir / COMPLETE_MARKER).exists() else str(base_dir)
    wanted = {
        "tune_format": TUNE_FORMAT,
        "base": hashlib.sha256(base_stamp.encode()).hexdigest()[:16],
        "settings": asdict(settings),
    }
    marker = read_marker(out_dir)
    if not force and marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
        return out_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer, losses

    examples = training_examples(corpus, settings.seed)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    model = SentenceTransformer(str(base_dir), device="cpu", local_files_only=True)
    served_length = model.max_seq_length  # training cuts texts shorter; serving must not
    model.max_seq_length = settings.max_seq_length
    model[0].auto_model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = losses.MultipleNegativesRankingLoss(model)
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.01)
    plan: list[list[Example]] = []
    while len(plan) < max(1, round(settings.epochs * len(examples) / settings.batch)):
        plan.extend(batches(examples, settings.batch, rng))
    plan = plan[: max(1, round(settings.epochs * len(examples) / settings.batch))]
    warmup = max(1, len(plan) // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / len(plan))
    )
    say(f"tuning the embedding model on {len(examples)} ways of asking ({len(plan)} steps)")
    started = time.perf_counter()
    model.train()
    for step, batch in enumerate(plan, 1):
        features = [
            model.preprocess([settings.prefix + getattr(e, side) for e in batch]) for side in ("anchor", "positive", "negative")
        ]
        value = loss(features, None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        if step % 25 == 0 or step == len(plan):
            say(f"  step {step}/{len(plan)}: loss {float(value.detach()):.3f}, {time.perf_counter() - started:.0f} s")
    model.eval()
    model.max_seq_length = served_length

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-tune-", dir=out_dir.parent))
    try:
        model.save(str(tmp))
        record = {**wanted, "corpus": corpus_hash(examples), "examples": len(examples), "steps": len(plan),
                  "seconds": round(time.perf_counter() - started, 1), "tuned_at": time.time()}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
        install_model_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"tuned embedding model: {out_dir} ({time.perf_counter() - started:.0f} s)")
    return out_dir
