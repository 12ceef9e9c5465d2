"""The corpus loads clean, and the validator catches what would make an answer untrustworthy."""

import datetime as dt
import textwrap
from pathlib import Path

from knowledge_base.loader import load_corpus
from knowledge_base.schema import LOCAL_RULE_NOTICE, TOPICS

ENTRY = """
  - id: {id}
    topic: reimbursement
    title: 住院怎么报销
    questions: [住院怎么报销, 住院的钱怎么报]
    spoken: 出院时直接结算，个人只付自己那部分。
    answer: {answer}
    source: {{title: 示例来源, url: "https://www.nhsa.gov.cn/"}}
    effective_date: {date}
    local_figure: {local}
"""


def write(root: Path, name: str, region: str, *entries: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"region: {region}\nentries:\n" + "".join(entries), encoding="utf-8")


def entry(id="re-a", answer="出院结算时直接报销，无需垫付全部费用。", date="2023-01-01", local="false", **extra):
    text = ENTRY.format(id=id, answer=answer, date=date, local=local)
    for key, value in extra.items():
        text += f"    {key}: {value}\n"
    return text


NATIONAL = '{level: national, code: "100000", name: 全国}'
HANGZHOU = '{level: city, code: "330100", name: 杭州市, parent: "330000"}'


def test_shipped_corpus_has_no_errors_and_covers_every_topic():
    corpus = load_corpus()
    assert not corpus.errors, "\n".join(map(str, corpus.errors))
    assert len(corpus.entries) >= 30
    topics = {e.topic_name for e in corpus.entries}
    assert topics == set(TOPICS)
    for core in ("e_voucher", "cross_region", "reimbursement"):
        assert sum(e.topic_name == core for e in corpus.entries) >= 10, core


def test_every_entry_cites_source_region_and_date():
    for e in load_corpus().entries:
        cite = e.citation()
        assert cite["source"]["url"].startswith("http"), e.id
        assert cite["region"] and cite["effective_date"], e.id


def test_no_shipped_source_cites_a_site_root_and_every_uncheckable_one_says_why():
    # Issue 14: a citation names the page that states the rule, never a bureau's home page; a source
    # still without a document number or date is under review, and its note says what is missing.
    corpus = load_corpus()
    cited = [*corpus.entries, *corpus.points]
    assert [x.id for x in cited if x.source.is_site_root] == []
    assert [x.id for x in cited if x.source.problems() and x.review is None] == []


def test_local_figures_carry_the_local_rule_notice():
    for e in load_corpus().entries:
        if e.local_figure:
            assert LOCAL_RULE_NOTICE in e.answer + e.spoken, e.id


def test_duplicate_ids_are_reported(tmp_path):
    write(tmp_path, "national/a.yaml", NATIONAL, entry(id="re-a"))
    write(tmp_path, "national/b.yaml", NATIONAL, entry(id="re-a"))
    problems = [str(p) for p in load_corpus(tmp_path).errors]
    assert any("duplicate id" in p for p in problems)


def test_missing_source_is_an_error(tmp_path):
    broken = entry().replace('    source: {title: 示例来源, url: "https://www.nhsa.gov.cn/"}\n', "")
    write(tmp_path, "national/a.yaml", NATIONAL, broken)
    assert any("source" in str(p) for p in load_corpus(tmp_path).errors)


def test_local_figure_without_notice_is_an_error(tmp_path):
    write(tmp_path, "national/a.yaml", NATIONAL, entry(local="true", answer="起付线是800元，报销比例90%。"))
    assert any(LOCAL_RULE_NOTICE in str(p) for p in load_corpus(tmp_path).errors)


def test_stale_and_future_dates_are_warnings(tmp_path):
    write(tmp_path, "national/a.yaml", NATIONAL, entry(id="re-old", date="2010-01-01"), entry(id="re-new", date="2999-01-01"))
    corpus = load_corpus(tmp_path, today=dt.date(2026, 11, 1))
    warnings = [str(p) for p in corpus.problems if p.severity == "warning"]
    assert any("re-old" in w and "older" in w for w in warnings)
    assert any("re-new" in w and "future" in w for w in warnings)
    assert not corpus.errors


def test_two_entries_of_one_region_overriding_the_same_entry_conflict(tmp_path):
    write(tmp_path, "national/a.yaml", NATIONAL, entry(id="re-a"))
    write(tmp_path, "regions/hz/a.yaml", HANGZHOU, entry(id="hz-1", overrides="re-a"), entry(id="hz-2", overrides="re-a"))
    assert any("region conflict" in str(p) for p in load_corpus(tmp_path).errors)


def test_override_of_unknown_entry_is_an_error(tmp_path):
    write(tmp_path, "regions/hz/a.yaml", HANGZHOU, entry(id="hz-1", overrides="re-missing"))
    assert any("unknown entry" in str(p) for p in load_corpus(tmp_path).errors)


def test_folded_yaml_lines_do_not_leave_spaces_inside_chinese(tmp_path):
    folded = textwrap.indent(">-\n  第一行说明，\n  第二行说明。", "    ").lstrip()
    write(tmp_path, "national/a.yaml", NATIONAL, entry(answer=folded))
    (e,) = load_corpus(tmp_path).entries
    assert e.answer == "第一行说明，第二行说明。"


def test_entries_under_review_are_flagged_in_their_citation_and_by_the_validator(tmp_path):
    write(tmp_path, "national/a.yaml", NATIONAL, entry(review='"no dated official document found"'))
    corpus = load_corpus(tmp_path)
    (e,) = corpus.entries
    assert e.citation()["verified"] is False
    assert any("needs review" in str(p) and p.severity == "warning" for p in corpus.problems)
    assert all(x.citation()["verified"] == (x.review is None) for x in load_corpus().entries)


def test_a_space_between_two_numbers_or_latin_words_stays_a_separator(tmp_path):
    # A resident's full-width digits are numbers, not Chinese: "２０２５ ７００元" joined would read 2025700.
    write(tmp_path, "national/a.yaml", NATIONAL, entry())
    point = textwrap.dedent("""\
        region: {level: national, code: "100000", name: 全国}
        points:
          - id: re-a.subsidy
            entry: re-a
            question: 居民医保财政补助 ２０２５ 多少钱？
            asks: ["补助标准 ２０２５ ７００元", "ＤＲＧ ＤＩＰ 付费", "长期护理保险 定义", "标准2025 700元"]
            answer: 出院结算时直接报销，无需垫付全部费用。
            spoken: 出院时直接结算。
            source: {title: 示例来源, url: "https://www.nhsa.gov.cn/"}
        """)
    (tmp_path / "national/points").mkdir(parents=True)
    (tmp_path / "national/points/a.yaml").write_text(point, encoding="utf-8")
    (p,) = load_corpus(tmp_path).points
    assert p.asks == ["补助标准 ２０２５ ７００元", "ＤＲＧ ＤＩＰ 付费", "长期护理保险定义", "标准2025 700元"]
    assert p.question == "居民医保财政补助 ２０２５ 多少钱？"
