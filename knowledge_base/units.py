"""What retrieval can answer with: a broad entry, one of its knowledge points, or a passage of its answer.

Backends rank *entries* (the area a question is about). Every text that can stand for an entry gets
one vector row: the entry's title and question variants, each knowledge point's question and its
other ways of asking, and each sentence (passage) of a longer answer. The rows of one entry are
contiguous, so a backend can take an entry's best row, and the answer stage (knowledge_base/answers.py)
can score the units of the best entries against the question: the point or passage that answers it,
not the area.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from knowledge_base.loader import Corpus
from knowledge_base.schema import Entry, KnowledgePoint

# Passages are sentences of answers at least this long; shorter answers are their own passage.
PASSAGE_MIN_ANSWER = 80
PASSAGE_MIN_CHARS = 14
_SENTENCE_END = re.compile(r"(?<=[。；！？!?])|\n+")


@dataclass(frozen=True)
class Unit:
    """One answerable unit. ``texts`` are embedded (one row each); ``answer``/``spoken`` are what it says."""

    id: str
    kind: str  # "entry" | "point" | "passage"
    entry: Entry
    point: KnowledgePoint | None
    texts: tuple[str, ...]
    answer: str
    spoken: str
    question: str
    when: dict = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return (self.point.review is None) if self.point is not None else (self.entry.review is None)

    @property
    def source(self):
        return self.point.source if self.point is not None else self.entry.source

    def citation(self) -> dict:
        """The entry's citation, narrowed to the point's own source, id and date where it has them."""
        out = self.entry.citation()
        if self.point is not None:
            source = self.point.source
            out.update(
                point=self.point.id,
                question=self.point.question,
                source=source.as_citation(),
                region=self.point.region.label,
                region_code=self.point.region.code,
                effective_date=(source.date or self.entry.effective_date).isoformat(),
                verified=self.point.review is None,
            )
        return out


def passages(entry: Entry) -> list[str]:
    """The sentences of a longer answer that can answer a question on their own."""
    if len(entry.answer) < PASSAGE_MIN_ANSWER:
        return []
    out = []
    for sentence in _SENTENCE_END.split(entry.answer):
        sentence = sentence.strip()
        if len(sentence) >= PASSAGE_MIN_CHARS:
            out.append(sentence)
    return out


def entry_units(entry: Entry, points: list[KnowledgePoint]) -> list[Unit]:
    """An entry's units in row order: the entry itself, its knowledge points, its passages."""
    units = [
        Unit(
            id=entry.id, kind="entry", entry=entry, point=None,
            texts=(entry.title, *entry.questions), answer=entry.answer, spoken=entry.spoken,
            question=entry.title,
        )
    ]
    for p in points:
        units.append(
            Unit(
                id=p.id, kind="point", entry=entry, point=p, texts=(p.question, *p.asks),
                answer=p.answer, spoken=p.spoken, question=p.question, when=dict(p.when),
            )
        )
    for i, sentence in enumerate(passages(entry), 1):
        units.append(
            Unit(
                id=f"{entry.id}#s{i}", kind="passage", entry=entry, point=None, texts=(sentence,),
                answer=sentence, spoken=sentence, question=entry.title,
            )
        )
    return units


@dataclass
class Layout:
    """Every unit of a corpus and the vector rows they own, grouped by entry in corpus order."""

    units: list[Unit]
    texts: list[str]  # one per row
    row_unit: list[int]  # row -> index into units
    row_entry: list[int]  # row -> entry position in corpus.entries
    row_is_question: list[bool]  # False for passages and answers: they refine an answer, they do not rank entries
    row_is_answer: list[bool]  # a knowledge point's answer: how well it answers, beside how alike it is asked
    by_entry: dict[str, list[int]]  # entry id -> indexes of its units

    @property
    def by_id(self) -> dict[str, Unit]:
        return {u.id: u for u in self.units}


def layout(corpus: Corpus) -> Layout:
    points = corpus.points_of()
    out = Layout([], [], [], [], [], [], {})
    for pos, entry in enumerate(corpus.entries):
        for unit in entry_units(entry, points.get(entry.id, [])):
            index = len(out.units)
            out.units.append(unit)
            out.by_entry.setdefault(entry.id, []).append(index)
            rows = [(text, unit.kind != "passage", False) for text in unit.texts]
            if unit.kind == "point":
                rows.append((unit.answer, False, True))
            for text, is_question, is_answer in rows:
                out.texts.append(text)
                out.row_unit.append(index)
                out.row_entry.append(pos)
                out.row_is_question.append(is_question)
                out.row_is_answer.append(is_answer)
    return out
