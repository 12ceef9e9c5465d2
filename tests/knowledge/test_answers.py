"""The answer stage on the real corpus and embedding model: the question inside a story, the knowledge
point that answers it, the clarification rule, other cities' rules, other agencies, bad input."""

from __future__ import annotations

import pytest

from knowledge_base.answer_eval import fact_present
from knowledge_base.answers import (
    Candidate,
    Context,
    UNVERIFIED_SPOKEN,
    UNVERIFIED_TEXT,
    QuestionAnswer,
    bigrams,
    number_fit,
)
from knowledge_base.questions import core_question, extract_questions, other_agency, parse, read_case, read_places
from knowledge_base.schema import Source, states_figure
from yibao_common.places import find_place

HANGZHOU = Context(deployment_region="330100")


# -- reading the message ------------------------------------------------------------------------------
def test_a_story_is_one_question_with_its_story():
    text = "我爸在老家县里交的职工医保，现在跟我们住在市里，医保卡在这边能用吗？"
    assert extract_questions(text) == [text.rstrip("？") + "？"]
    assert core_question(text) == "医保卡在这边能用吗？"


def test_two_questions_are_two_and_a_short_tail_stays_with_its_question():
    assert extract_questions("补一张社保卡要几天，补卡收钱吗") == ["补一张社保卡要几天", "补卡收钱吗"]
    assert extract_questions("异地备案怎么办，急吗") == ["异地备案怎么办，急吗"]


def test_a_space_parts_two_numbers_but_not_two_chinese_words():
    assert "57" not in bigrams("补助标准2025 700元") and {"20", "25", "70", "00"} <= bigrams("补助标准2025 700元")
    assert "险定" in bigrams("长期护理保险 定义") and "GD" not in bigrams("DRG DIP")
    assert bigrams("医") == {"医"} and bigrams("") == set()


def test_greetings_and_emoji_are_not_questions():
    assert parse("您好，请问，异地就医怎么备案").questions == ["异地就医怎么备案"]
    assert parse("😀😀👍").questions == []
    assert parse("\u200b\u200b").questions == []


def test_the_later_stage_of_a_story_decides_its_case():
    case = read_case("我妈在老家住院了，没办备案，现在出院了，钱怎么报？")
    assert case["stage"] == "已出院" and case["filed"] == "未备案"
    assert read_case("我在外省住院，还没出来，单位交的医保")["insurance"] == "职工"


def test_the_short_names_of_the_two_insurances_are_read():
    assert read_case("城职退休住院报销比例")["insurance"] == "职工"
    assert read_case("农村医疗保险转院异地就医怎么报销")["insurance"] == "居民"
    assert read_case("老家的农村医保在外地能用吗")["insurance"] == "居民"


def test_places_know_insured_from_destination():
    places = {p.name: p.role for p in read_places("我是广州参保的，想去上海看病")}
    assert places == {"广州": "insured", "上海": "destination"}


def test_the_insured_place_is_read_from_the_words_before_it_and_not_from_the_next_clause():
    def roles(text):
        return [(p.name, p.role) for p in read_places(text)]
    # "参保" after a comma belongs to the next clause; "参保在杭州" names the insured place before it.
    assert roles("我常住上海，参保在杭州，看病能在上海直接报吗") == [
        ("上海", "mentioned"), ("杭州", "insured"), ("上海", "destination")]
    assert roles("我爸的新农合在河南，来杭州看病住院") == [("河南", "insured"), ("杭州", "destination")]
    assert roles("我们在临汾参加的职工医保，退休后去秦皇岛") == [("临汾", "insured"), ("秦皇岛", "destination")]
    assert roles("我一直在佛山交医保") == [("佛山", "insured")]
    # ... but where the insurance is used is where care happens
    assert roles("杭州的医保在河南能用吗") == [("杭州", "insured"), ("河南", "destination")]
    assert roles("用医保在杭州看病") == [("杭州", "destination")]


def test_a_word_that_holds_a_city_name_is_no_place():
    assert read_places("小区门口的诊所是不是医保定点的？") == []  # 保定
    assert read_places("莆田系医院能刷医保吗") == []
    assert find_place("医保定点药店能买什么") is None
    assert [p.name for p in read_places("我在保定住院")] == ["保定"]


def test_the_insured_place_decides_the_region_before_a_place_only_mentioned(knowledge_base):
    answerer = knowledge_base.answerer
    region, foreign = answerer._region_for(parse("上海和杭州医保是不是互通的？我常住上海，参保在杭州"), HANGZHOU)
    assert (region, foreign) == ("330100", None)
    region, foreign = answerer._region_for(parse("我爸的新农合在河南，来杭州看病住院，出院能直接报吗"), HANGZHOU)
    assert region == "410000" and foreign.name == "河南"
    # A designated pharmacy question names no city: no "保定's rules decide" sentence.
    reply = answerer.answer("小区门口的诊所是不是医保定点的？能不能刷医保？", HANGZHOU)
    assert "保定的" not in reply.text and reply.meta["region_used"] == "330100"


def test_every_prefecture_is_a_place_but_a_city_name_that_is_also_a_word_needs_its_suffix():
    # Cities the hand table lacked, named in residents' real questions.
    places = [(p.name, p.code, p.role) for p in read_places("我在东营参保的，现在去南通住院，通辽的亲戚也问过")]
    assert places == [("东营", "370500", "insured"), ("南通", "320600", "destination"), ("通辽", "150500", "mentioned")]
    assert [p.code for p in read_places("泉州、连云港、镇江、吉安")] == ["350500", "320700", "321100", "360800"]
    assert read_places("中山医院能刷医保吗") == []  # a hospital, not the city of 中山
    assert [(p.name, p.code) for p in read_places("中山市的医保")] == [("中山市", "442000")]
    # The longest name wins at one position: 吉林市 is the city, 吉林 alone the province.
    assert [p.code for p in read_places("去吉林市看病")] == ["220200"]
    assert [p.code for p in read_places("吉林省的医保")] == ["220000"]


def test_other_agencies_are_recognised_but_not_medical_insurance_questions():
    assert other_agency("公积金怎么提取").name == "公积金"
    assert other_agency("单位不给认定工伤，让我走医保报销可以吗").name == "工伤"
    assert other_agency("退休人员医保个人账户每月划多少") is None
    assert other_agency("养老保险和医保断缴了一起补，医保怎么补") is None


def test_a_question_for_a_figure_prefers_a_unit_that_states_one(knowledge_base):
    units = {u.id: u for u in knowledge_base.answerer.units.layout.units}
    with_number = next(u for u in units.values() if u.kind == "point" and states_figure(u.answer))
    without = next(u for u in units.values() if u.kind == "point" and not states_figure(u.answer))
    assert number_fit("亲情账户最多能绑几个人", with_number) == 1.0
    assert number_fit("亲情账户最多能绑几个人", without) == -1.0
    assert number_fit("亲情账户怎么绑", without) == 0.0


# -- answering ---------------------------------------------------------------------------------------
def test_the_family_account_count_question_gets_the_number(knowledge_base):
    reply = knowledge_base.answerer.answer("医保码的亲情账户最多可以绑定几个人？", HANGZHOU)
    assert reply.outcome == "answered"
    assert reply.answers[0]["entry"] == "ev-family-add" and reply.answers[0]["kind"] == "point"
    assert "5" in reply.text and ("5" in reply.spoken or "五" in reply.spoken)
    assert reply.citations[0]["point"] == reply.answers[0]["point"]
    assert reply.citations[0]["source"]["url"].startswith("http")


@pytest.mark.parametrize("question, point", [
    ("打12393要不要加区号", "si-12393.area-code"),
    ("社保卡过期了还能看病用吗？卡没坏就是到期了", "ca-apply.expired-still-works"),
    # its figure is local, but it states none: only that the local rule decides
    ("医保卡补办费用是多少？", "ca-apply.fee"),
])
def test_a_national_point_is_answered_where_a_local_entry_replaces_its_entry(knowledge_base, question, point):
    """Hangzhou's packs replace the national 12393 and card entries; their national points that state no
    local figure still answer a Hangzhou resident (before, they were never found there)."""
    reply = knowledge_base.answerer.answer(question, HANGZHOU)
    assert reply.outcome == "answered", reply.text
    assert reply.answers[0]["point"] == point


@pytest.mark.parametrize("context", [Context(), HANGZHOU], ids=["no deployment region", "hangzhou"])
def test_reimbursement_materials_are_not_the_service_halls(knowledge_base, context):
    """A top question with the shipped classifier and reranker: "what to bring for a hospital bill's
    reimbursement" is the reimbursement materials list, not the service hall's "what to bring to the
    window" (which the first unit classifier preferred when no deployment region was set)."""
    reply = knowledge_base.answerer.answer("住院了报销需要带什么材料", context)
    assert reply.outcome == "answered"
    assert reply.answers[0]["entry"] == "re-manual-materials", reply.answers[0]
    assert "发票" in reply.text or "收费票据" in reply.text


def test_a_story_gets_the_sub_case_it_told(knowledge_base):
    reply = knowledge_base.answerer.answer("我妈在老家住院了，没办备案，现在出院了，钱怎么报？", Context())
    assert reply.outcome == "answered"
    assert reply.meta["case"] == {"stage": "已出院", "filed": "未备案"} and reply.meta["relation"] == "父母"
    assert "手工报销" in reply.text or "补办" in reply.text
    unit = knowledge_base.answerer.units.by_id[reply.answers[0]["unit"]]
    assert unit.when.get("stage") != "住院中"  # never "file now, while still in hospital"


def test_another_citys_rules_get_the_national_rule_and_who_decides(knowledge_base):
    reply = knowledge_base.answerer.answer("广州的职工医保住院起付线是多少？", HANGZHOU)
    assert reply.outcome == "answered"
    assert all(c["region_code"] == "100000" for c in reply.citations)  # never Hangzhou's figures
    assert "广州" in reply.text and "为准" in reply.text and "12393" in reply.text
    assert "广州" in reply.spoken


def test_a_city_point_filed_under_a_national_entry_answers_only_in_that_city(knowledge_base):
    """杭州's own newborn point hangs under the national newborn entry: a 上海 or 温州 question never gets it."""
    answerer = knowledge_base.answerer
    hangzhou_points = {u.id for u in answerer.units.layout.units
                       if u.point is not None and u.point.region.code == "330100" and u.entry.id == "en-newborn"}
    assert hangzhou_points  # the case this guards exists
    for message, region in (("上海新生儿医保怎么办理", None), ("宝宝刚出生医保在哪里办", "330300")):
        parsed = parse(message)
        where, _ = answerer._region_for(parsed, Context(region=region, deployment_region="330100"))
        found = answerer.candidates(parsed.questions[0], parsed, where)
        assert found.candidates and not hangzhou_points & {c.unit.id for c in found.candidates}
    parsed = parse("杭州新生儿医保怎么办")
    found = answerer.candidates(parsed.questions[0], parsed, "330100")
    assert hangzhou_points & {c.unit.id for c in found.candidates}  # at home it is a candidate


def test_a_destination_city_is_not_a_foreign_rule(knowledge_base):
    reply = knowledge_base.answerer.answer("我是杭州参保的，要去上海长住，异地就医怎么备案？", HANGZHOU)
    assert reply.outcome == "answered" and reply.meta["foreign_region"] is None


def test_two_questions_get_two_answers(knowledge_base):
    reply = knowledge_base.answerer.answer("异地就医备案有效期多久？另外医保码的亲情账户怎么添加家人？", Context())
    assert reply.outcome == "answered" and len(reply.answers) == 2
    assert {a["topic"] for a in reply.answers} == {"cross_region", "e_voucher"}
    assert reply.text.count("关于“") == 2


@pytest.mark.parametrize("message, topic", [
    # alone, "直接打会转到哪里" was answered with who issues a referral
    ("打12393要不要加区号，直接打会转到哪里", "service_info"),
    # alone, "符合哪些条件才能办理？" was answered with who gets 医疗救助
    ("慢性病卡该如何办理？符合哪些条件才能办理？", "chronic_disease"),
    # alone, "需要父母本人去吗？" was answered with adding a family member over 16 to the e-voucher
    ("给新生儿办医保，能不能在网上办？需要父母本人去吗？", "enrollment"),
])
def test_a_follow_up_that_names_nothing_is_read_with_the_question_before_it(knowledge_base, message, topic):
    reply = knowledge_base.answerer.answer(message, HANGZHOU)
    assert reply.outcome == "answered"
    assert {a["topic"] for a in reply.answers} == {topic}, reply.text


@pytest.mark.parametrize("text", ["住房公积金怎么提取", "今天杭州天气怎么样", "驾照扣分怎么查"])
def test_out_of_scope_is_declined_politely_with_who_answers(knowledge_base, text):
    reply = knowledge_base.answerer.answer(text, HANGZHOU)
    assert reply.outcome == "abstained" and not reply.citations
    assert "医保" in reply.text and ("123" in reply.text or "咨询" in reply.text)


@pytest.mark.xfail(strict=True, reason="known since the search-box ways of asking (session 14): a question shaped "
                   "like a real one about an impossible place reaches search confidence 0.41, above the answer "
                   "stage's 0.25, and is answered; raising the threshold declines real questions on the dev split")
def test_a_question_about_nowhere_is_declined(knowledge_base):
    assert knowledge_base.answerer.answer("火星上的医保怎么报", HANGZHOU).outcome == "abstained"


@pytest.mark.parametrize("text", ["", "   ", "😀😀😀", "\u200b", "医保" * 500, "医保card怎么activate？", "？？？"])
def test_bad_input_gets_a_clear_reply(knowledge_base, text):
    reply = knowledge_base.answerer.answer(text, HANGZHOU)
    assert reply.outcome in ("answered", "abstained", "clarifying")
    assert reply.text and reply.spoken


def test_an_unverified_figure_is_never_stated_on_its_own(knowledge_base):
    answerer = knowledge_base.answerer
    point = next(u for u in answerer.units.layout.units
                 if u.kind == "point" and not u.verified and states_figure(u.answer))
    reply = answerer._compose(
        [QuestionAnswer(point.question, None, [Candidate(point, {}, 1.0, 1.0)], 0.9, False)], None, {})
    assert "核实" in reply.text and "为准" in reply.spoken


@pytest.mark.parametrize("text, figure", [
    ("最多可以添加5名家人", True), ("超过12000元的部分", True), ("出生后90天内参保", True), ("断缴三个月以内", True),
    ("2025年起执行", True), ("每年可以申请一次", True),
    ("拨打12393医保服务热线", False), ("在掌上12333APP申请", False), ("可以一次性支取", False),
    ("情况紧急的先打120", False), ("向当地医保局反映", False), ("问杭州医保拨0571-12393", False),
    ("拨057112393", False), ("区号后面7位数", True),
])
def test_a_figure_is_an_amount_count_or_deadline_not_a_hotline(text, figure):
    assert states_figure(text) is figure


def test_an_unverified_answer_that_only_names_a_hotline_gets_no_figure_caveat(knowledge_base):
    """"打12393查询" is no figure to check: the caveat would tell the resident a number is unconfirmed
    where none was stated, and cost the phone answer seconds."""
    answerer = knowledge_base.answerer
    point = next(u for u in answerer.units.layout.units
                 if u.kind == "point" and not u.verified and "12393" in u.answer and not states_figure(u.answer))
    reply = answerer._compose(
        [QuestionAnswer(point.question, None, [Candidate(point, {}, 1.0, 1.0)], 0.9, False)], None, {})
    assert UNVERIFIED_TEXT not in reply.text and UNVERIFIED_SPOKEN not in reply.spoken


def unsure_between_two_areas(answerer, monkeypatch) -> None:
    """Every question finds two points of different entries and neither stands out: a clarifying reply."""
    units = answerer.units.layout.units
    a = next(u for u in units if u.kind == "point" and u.entry.id == "ev-family-add")
    b = next(u for u in units if u.kind == "point" and u.entry.id.startswith("cr-"))
    unsure = answerer.clarify_share * 0.8

    def candidates(question, parsed, region):
        return QuestionAnswer(question, None, [Candidate(a, {}, 1.0, unsure), Candidate(b, {}, 0.9, unsure * 0.9)],
                              0.7, False)

    monkeypatch.setattr(answerer, "candidates", candidates)


def test_never_clarify_twice_in_a_row(knowledge_base, monkeypatch):
    answerer = knowledge_base.answerer
    unsure_between_two_areas(answerer, monkeypatch)
    first = answerer.answer("那个绑定的事", Context())
    assert first.outcome == "clarifying"
    again = answerer.answer("就是那个绑定的事", Context(last_outcome="clarifying"))
    assert again.outcome == "abstained" and again.meta["reason"] == "unsure_after_clarifying"
    assert any(b["payload"] == "/request_human" for b in again.buttons)


def test_the_same_question_asked_twice_at_once_is_answered_once(knowledge_base, monkeypatch):
    """The hub starts an answer while Rasa parses the message; the action's request for the same
    message and region joins it: one computation, the same reply as answer()."""
    import threading

    answerer = knowledge_base.answerer
    calls: list[str] = []
    started, release = threading.Event(), threading.Event()
    decide = answerer._decide

    def slow_decide(message, region, deployment_region):
        calls.append(message)
        started.set()
        release.wait(10)
        return decide(message, region, deployment_region)

    monkeypatch.setattr(answerer, "_decide", slow_decide)
    text = "亲情账户最多可以绑定几个人（并发测试）"
    context = Context(region="330100", deployment_region="330100")
    ahead = threading.Thread(target=answerer.answer_shared, args=(text, context))
    ahead.start()
    assert started.wait(10)
    joined: list = []
    asker = threading.Thread(target=lambda: joined.append(answerer.answer_shared(text, context)))
    asker.start()
    release.set()
    ahead.join(10)
    asker.join(10)
    assert calls == [text]  # computed once, by the prefetch
    other_region = answerer.answer_shared(text, Context(region="440100", deployment_region="330100"))
    assert len(calls) == 2 and other_region is not joined[0]  # another region is another answer
    assert joined[0].as_dict() == answerer.answer(text, context).as_dict()  # answer() computes afresh: same reply


def test_a_failed_shared_answer_is_not_kept(knowledge_base, monkeypatch):
    answerer = knowledge_base.answerer
    decide = answerer._decide
    failures = [RuntimeError("index being replaced")]

    def flaky(message, region, deployment_region):
        if failures:
            raise failures.pop()
        return decide(message, region, deployment_region)

    monkeypatch.setattr(answerer, "_decide", flaky)
    text = "异地就医备案以后多久生效（失败测试）"
    with pytest.raises(RuntimeError):
        answerer.answer_shared(text, HANGZHOU)
    assert answerer.answer_shared(text, HANGZHOU).outcome in ("answered", "clarifying", "abstained")


def test_an_answerer_is_handed_over_without_its_kept_answers(knowledge_base):
    """The build worker pickles the base it built (build_worker.py; tests/knowledge/test_kb_publish_process.py
    pickles a real one): the kept answers and their lock stay behind, and the copy keeps its own."""
    from knowledge_base.answers import Answerer

    answerer = knowledge_base.answerer
    text = "医保电子凭证怎么激活（交接测试）"
    kept = answerer.answer_shared(text, HANGZHOU)
    state = answerer.__getstate__()
    assert "_shared" not in state and "_shared_lock" not in state
    clone = Answerer.__new__(Answerer)
    clone.__setstate__(state)
    assert not clone._shared
    assert clone.answer_shared(text, HANGZHOU).as_dict() == kept.as_dict()


def test_never_clarify_twice_in_a_row_holds_for_a_shared_answer(knowledge_base, monkeypatch):
    """The kept answer does not depend on the last turn: the never-twice rule is applied per request."""
    answerer = knowledge_base.answerer
    unsure_between_two_areas(answerer, monkeypatch)
    text = "那个绑定的事（共享测试）"
    assert answerer.answer_shared(text, Context()).outcome == "clarifying"
    again = answerer.answer_shared(text, Context(last_outcome="clarifying"))
    assert again.outcome == "abstained" and again.meta["reason"] == "unsure_after_clarifying"
    assert "options" not in again.meta
    assert answerer.answer_shared(text, Context()).outcome == "clarifying"  # the kept reply is unchanged


def test_clarify_only_between_genuinely_different_questions(knowledge_base):
    answerer = knowledge_base.answerer
    units = answerer.units.layout.units
    unsure = answerer.clarify_share * 0.8  # below the fitted threshold: nothing stands out
    same_entry = [u for u in units if u.kind == "point" and u.entry.id == "ev-family-add"][:2]
    close = QuestionAnswer("q", None, [Candidate(same_entry[0], {}, 1.0, unsure), Candidate(same_entry[1], {}, 0.9, unsure * 0.9)],
                           0.7, False)
    assert answerer._clarify_options(close) == []  # one area asked two ways: answer, do not ask
    other = next(u for u in units if u.kind == "point" and u.entry.id.startswith("cr-"))
    distinct = QuestionAnswer("q", None, [Candidate(same_entry[0], {}, 1.0, unsure), Candidate(other, {}, 0.9, unsure * 0.9)],
                              0.7, False)
    options = answerer._clarify_options(distinct)
    assert [o.unit.id for o in options] == [same_entry[0].id, other.id]
    sure = QuestionAnswer("q", None, [Candidate(same_entry[0], {}, 1.0, 0.9), Candidate(other, {}, 0.9, 0.05)],
                          0.9, False)
    assert answerer._clarify_options(sure) == []
    reply = answerer._clarify(options, {})
    assert reply.outcome == "clarifying" and [b["title"] for b in reply.buttons[:2]] == [
        same_entry[0].point.question if same_entry[0].point.question.endswith("？") else same_entry[0].point.question + "？",
        other.point.question if other.point.question.endswith("？") else other.point.question + "？"]


def test_quick_replies_follow_the_ranking_and_keep_a_sibling(knowledge_base):
    """A misread question's right point is most often the runner-up, from any entry: it is offered."""
    answerer = knowledge_base.answerer
    units = answerer.units.layout.units
    family = [u for u in units if u.kind == "point" and u.entry.id == "ev-family-add"][:3]
    filing = [u for u in units if u.kind == "point" and u.entry.id.startswith("cr-")][:3]

    def related(*ranked):
        found = QuestionAnswer("q", None, [Candidate(u, {}, 10.0 - i) for i, u in enumerate(ranked)], 0.9, False)
        return [r["id"] for r in answerer._related(found)]

    # the runner-up of another entry comes first, then the ranking goes on
    assert related(family[0], filing[0], family[1], family[2]) == [filing[0].id, family[1].id, family[2].id]
    # three runners-up of other entries: the best sibling takes the last place
    assert related(family[0], *filing, family[1]) == [filing[0].id, filing[1].id, family[1].id]
    # an entry (not a point) and the answer itself are never offered
    entry = next(u for u in units if u.kind == "entry")
    assert related(family[0], entry, family[0], family[1]) == [family[1].id]


def test_phone_answers_stay_short(knowledge_base):
    for text in ("异地就医怎么备案", "医保电子凭证怎么激活", "住院报销要带什么材料"):
        reply = knowledge_base.answerer.answer(text, HANGZHOU)
        assert len(reply.spoken) <= 75, reply.spoken  # ~15 s at the phone voice's pace, offer included


# -- sources -----------------------------------------------------------------------------------------
def test_a_site_root_or_a_source_without_document_and_date_is_refused():
    root = Source(title="某医保局", url="https://ybj.example.gov.cn/")
    assert any("site root" in p for p in root.problems())
    assert any("document" in p for p in root.problems()) and any("date" in p for p in root.problems())
    deep = Source(title="通知", url="https://www.nhsa.gov.cn/art/2022/7/26/art_104_8629.html",
                  document="医保发〔2022〕22号", date="2022-06-30")
    assert deep.problems() == []


def test_every_shipped_record_cites_a_checkable_source(settings):
    """`xiaozhi kb validate` exits 0 on the packs: no site root, no source without a document or a date."""
    from knowledge_base.loader import load_corpus

    corpus = load_corpus(settings.kb_data_dir)
    assert not corpus.errors and [str(p) for p in corpus.refused] == []


def test_fact_matching_reads_numbers_either_way():
    assert fact_present("5名", "最多可以添加五名家庭成员")
    assert not fact_present("6个月", "有效期一般不少于3个月")
