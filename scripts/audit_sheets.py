"""A blind audit of the answer set's labels (tests/data/answer_set.yaml, issue 14): judging sheets,
and applying the judgements.

The benchmark's "point" figure counts a reply right when its first answer's knowledge point is one
the item's ``expect`` lists, so a label that misses a point answering the question precisely (or
lists one that answers only a broader question) mismeasures the answer stage. The audit re-judges
every in-scope item of both splits against its candidates, without seeing which of them are
labelled or how the answer stage ranks them. The protocol is in docs/retrieval-quality.md.

    # 1. sheets: per item the message, what it asks, its key facts and city, and its candidates
    #    (the current labels and the answer stage's top distinct points) in a shuffled order
    .venv/bin/python scripts/audit_sheets.py sheets
    # 2. a judge writes bench/answer_set_audit/judgements.txt, one line per item:
    #    <key> y=<letters> n=<letter><reason>,... d=<reason>   # optional note
    #    (a candidate not named yes is a no: for the reason n= gives it, else d=, else q)
    #    reasons: b broader area, q neighbouring question, c another sub-case, r another region's
    #    rule, f the key facts missing, o off the question
    #    o=<letters> (two-question messages): the yes candidate answering each question, in order,
    #    so that expect stays "one per question" first (rerank_fit.labelled_questions pairs them)
    # 3. apply: new expect = the o= ids, then the yes ids, previously labelled ones first in their
    #    old order
    .venv/bin/python scripts/audit_sheets.py apply

The sheets, the letter key and the record (what changed, and why) are written to
bench/answer_set_audit/. The answer set's comments and formatting are kept: only ``expect:`` lines
(and a gap's ``gap: true`` line) are rewritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge_base.answer_eval import ANSWER_SET, load_items  # noqa: E402

OUT = ROOT / "bench" / "answer_set_audit"
JUDGEMENTS = OUT / "judgements.txt"
KEY = OUT / "key.json"
RECORD = OUT / "record.txt"
BEFORE = OUT / "labels-before.json"  # the labels as they were before the audit (not read while judging)
# Knowledge points merged into another after the sheets were written: removed id -> kept id (the
# kept point took the removed one's ways of asking); the labels name the kept one.
MERGED = OUT / "merged.json"
BATCH = 60
TOP = 6  # distinct knowledge points (or entries) per question the answer stage scores highest
REGION = "330100"  # the deployment region of the benchmark (杭州)
REASONS = {"b": "a broader area answer", "q": "a neighbouring question", "c": "another sub-case",
           "r": "another region's rule", "f": "does not state the key facts", "o": "off the question"}
ENTRY_ANSWER_CHARS = 220


def key_of(q: str) -> str:
    return hashlib.sha1(q.encode()).hexdigest()[:8]


def audit_order(items: list[dict]) -> list[dict]:
    """In-scope items of both splits interleaved in proportion (each split in hash order), so that a
    partial audit has covered both splits to the same depth."""
    placed = []
    for split in ("heldout", "dev"):
        part = sorted((i for i in items if i["split"] == split and not i["out_of_scope"]), key=lambda i: key_of(i["q"]))
        placed += [((n + 0.5) / len(part), split != "heldout", i) for n, i in enumerate(part)]
    return [i for _pos, _dev, i in sorted(placed, key=lambda t: (t[0], t[1]))]


def _candidate_ids(kb, item: dict) -> list[str]:
    """The answer stage's top distinct points/entries for each question of the message (as
    knowledge_base/rerank_fit.collect scores them); a passage or entry stands for its entry."""
    from knowledge_base.answers import Context
    from knowledge_base.questions import parse

    answerer = kb.answerer
    parsed = parse(item["q"])
    region, _ = answerer._region_for(parsed, Context(deployment_region=REGION))
    out: list[str] = []
    for question in parsed.questions or [item["q"]]:
        found = answerer.candidates(question, parsed, region)
        taken: list[str] = []
        for c in found.candidates:
            cid = c.unit.point.id if c.unit.point is not None else c.unit.entry.id
            if cid not in taken:
                taken.append(cid)
            if len(taken) == TOP:
                break
        out += [c for c in taken if c not in out]
    return out


def _describe(kb, cid: str) -> dict:
    units = kb.answerer.units.layout.by_id
    unit = units.get(cid)
    if unit is None:
        return {"id": cid, "missing": True}
    entry = unit.entry
    if unit.kind == "point":
        p = unit.point
        return {"id": cid, "kind": "point", "question": p.question, "answer": p.answer,
                "entry": entry.title, "region": p.region.label, "when": dict(p.when),
                "unverified": p.review is not None}
    answer = entry.answer if len(entry.answer) <= ENTRY_ANSWER_CHARS else entry.answer[:ENTRY_ANSWER_CHARS] + "…"
    return {"id": cid, "kind": "entry (whole entry: any of its points would count)", "question": entry.title,
            "answer": answer, "entry": entry.title, "region": getattr(entry.region, "label", ""), "when": {},
            "unverified": entry.review is not None}


def _listing(value) -> str:
    if isinstance(value, list):
        return " | ".join(str(v) for v in value)
    return str(value or "")


def sheets(args) -> int:
    from knowledge_base.factory import open_knowledge_base
    from xiaozhi.settings import get_settings

    kb = open_knowledge_base(get_settings().knowledge_base_config())
    order = audit_order(load_items())
    OUT.mkdir(parents=True, exist_ok=True)
    key: dict[str, dict] = {}
    batches: dict[int, list[str]] = {}
    for n, item in enumerate(order):
        k = key_of(item["q"])
        ids = list(dict.fromkeys(item["expect"]))  # the current labels (a gap item's entry), mixed in unmarked
        ids += [c for c in _candidate_ids(kb, item) if c not in ids]
        random.Random(int(hashlib.sha1(item["q"].encode()).hexdigest(), 16)).shuffle(ids)
        letters = dict(zip(string.ascii_uppercase, ids))
        key[k] = {"split": item["split"], "letters": letters,
                  "points": [cid for cid in ids if _describe(kb, cid).get("kind") == "point"]}
        lines = [f"## {n + 1}. [{k}] {item['split']} topic={item['topic']}",
                 f"q: {item['q']}", f"asks: {_listing(item.get('asks'))}", f"facts: {_listing(item.get('facts'))}"]
        if item.get("city"):
            lines.append(f"city: {item['city']}")
        for letter, cid in letters.items():
            d = _describe(kb, cid)
            if d.get("missing"):
                lines.append(f"  {letter}) {cid}  (no such point or entry in the knowledge base)")
                continue
            tags = [d["region"]] + [f"{s}={v}" for s, v in d["when"].items()] + (["unverified"] if d["unverified"] else [])
            lines.append(f"  {letter}) {cid}  [{', '.join(t for t in tags if t)}]  <{d['entry']}>")
            lines.append(f"     Q: {d['question']}")
            lines.append(f"     A: {d['answer']}")
        batches.setdefault(n // BATCH, []).append("\n".join(lines))
    for b, blocks in batches.items():
        (OUT / f"sheet-{b + 1:02d}.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    KEY.write_text(json.dumps(key, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if not BEFORE.exists():
        before = {key_of(i["q"]): {"expect": i["expect"], "gap": bool(i.get("gap"))} for i in order}
        BEFORE.write_text(json.dumps(before, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(order)} in-scope items in {len(batches)} sheets of {BATCH} in {OUT}")
    return 0


_LINE = re.compile(r"^(?P<key>[0-9a-f]{8})\s+y=(?P<yes>[A-Z]*)\s*(?:n=(?P<no>[A-Z][a-z](?:,[A-Z][a-z])*))?"
                   r"\s*(?:d=(?P<default>[a-z]))?\s*(?:o=(?P<order>[A-Z]+))?\s*(?:#\s*(?P<note>.*))?$")


def read_judgements(path: Path = JUDGEMENTS) -> dict[str, dict]:
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if not m:
            raise SystemExit(f"{path}:{number}: cannot read {line!r}")
        no = dict((t[0], t[1]) for t in (m["no"] or "").split(",") if t)
        out[m["key"]] = {"yes": list(m["yes"]), "no": no, "default": m["default"] or "q",
                          "order": list(m["order"] or ""), "note": (m["note"] or "").strip()}
    return out


def decide(before: dict, judged: dict, letters: dict[str, str], points: list[str]) -> dict:
    """The new labels of one item from its judgement (see the module's text)."""
    if set(judged["yes"]) & set(judged["no"]) or (set(judged["yes"]) | set(judged["no"])) - set(letters):
        raise SystemExit(f"every candidate needs exactly one verdict: {sorted(letters)} vs {judged}")
    # a candidate not named yes or no is a no for the line's default reason
    judged = {**judged, "no": {x: judged["no"].get(x, judged["default"]) for x in letters if x not in judged["yes"]}}
    old, gap = list(before["expect"]), before["gap"]
    yes = list(dict.fromkeys(letters[x] for x in judged["yes"]))  # two letters may name one id
    no_reason = {letters[x]: REASONS[r] for x, r in judged["no"].items()}
    if gap and any(y in points for y in yes):
        yes, gap = [y for y in yes if y in points], False  # a point replaces the broad entry
    if not yes:
        return {"expect": old, "gap": gap, "added": [], "removed": [], "flag": bool(old), "reasons": {}}
    new = [e for e in old if e in yes] + [y for y in yes if y not in old]
    if judged.get("order"):  # a two-question message: the id answering each question, in order, leads
        if not set(judged["order"]) <= set(judged["yes"]):
            raise SystemExit(f"o= names a candidate not judged yes: {judged}")
        lead = list(dict.fromkeys(letters[x] for x in judged["order"]))
        new = lead + [e for e in new if e not in lead]
    return {"expect": new, "gap": gap, "added": [y for y in new if y not in old],
            "removed": [e for e in old if e not in new], "flag": False,
            "reasons": {e: no_reason.get(e, "replaced by a point of its entry") for e in old if e not in new}}


def follow_merges(expect: list[str], asks, merged: dict[str, str]) -> list[str]:
    """Name the kept point for a merged one. An id named twice is kept once, except among the first
    ids of a two-question message (one per question: both questions may have the same answer)."""
    renamed = [merged.get(e, e) for e in expect]
    per_question = len(asks) if isinstance(asks, list) else 1
    head = renamed[:per_question] if per_question > 1 else []
    return head + [e for e in dict.fromkeys(renamed[len(head):]) if e not in head]


def apply(args) -> int:
    key = json.loads(KEY.read_text(encoding="utf-8"))
    merged = json.loads(MERGED.read_text(encoding="utf-8")) if MERGED.exists() else {}
    judgements = read_judgements()
    before = json.loads(BEFORE.read_text(encoding="utf-8"))
    items = {key_of(i["q"]): i for i in load_items()}
    text = ANSWER_SET.read_text(encoding="utf-8")
    blocks = re.split(r"(?m)^(?=- q: )", text)
    import yaml

    block_key = {key_of(yaml.safe_load(b)[0]["q"]): n for n, b in enumerate(blocks) if b.startswith("- q: ")}
    record, totals = [], {"audited": {"dev": 0, "heldout": 0}, "added": 0, "removed": 0, "flagged": 0, "changed": 0}
    for k, judged in judgements.items():
        item = items[k]
        d = decide(before[k], judged, key[k]["letters"], key[k]["points"])
        d["expect"] = follow_merges(d["expect"], item.get("asks"), merged)
        totals["audited"][item["split"]] += 1
        totals["added"] += len(d["added"])
        totals["removed"] += len(d["removed"])
        totals["flagged"] += d["flag"]
        changes = [f"+{a}" for a in d["added"]] + [f"-{r} ({d['reasons'][r]})" for r in d["removed"]]
        if d["gap"] != before[k]["gap"]:
            changes.append("gap resolved: a point answers it")
        if not changes and d["expect"] != before[k]["expect"]:
            changes.append("reordered: one id per question first")
        if d["flag"]:
            changes.append("FLAG for the lead: no candidate judged yes, labels kept")
        note = f"  # {judged['note']}" if judged["note"] else ""
        record.append(f"{k}\t{item['split']}\texpect={','.join(d['expect'])}\t{'; '.join(changes) or 'unchanged'}{note}")
        n = block_key[k]
        block = re.sub(r"(?m)^(  expect: ).*$", lambda m: m[1] + "[" + ", ".join(d["expect"]) + "]", blocks[n], count=1)
        if not d["gap"]:
            block = re.sub(r"(?m)^  gap: true\n", "", block)
        totals["changed"] += block != blocks[n]
        blocks[n] = block
    ANSWER_SET.write_text("".join(blocks), encoding="utf-8")
    RECORD.write_text("# key\tsplit\tnew expect\tchanges (reason for each removal)\n" + "\n".join(record) + "\n",
                      encoding="utf-8")
    print(json.dumps(totals))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sheets", help="write the judging sheets and the letter key")
    sub.add_parser("apply", help="apply bench/answer_set_audit/judgements.txt to the answer set")
    args = parser.parse_args()
    return {"sheets": sheets, "apply": apply}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
