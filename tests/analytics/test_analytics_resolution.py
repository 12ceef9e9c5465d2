"""Issue 21: a conversation counts as resolved on evidence that the resident got an answer, not because
nobody escalated it. Classification on constructed transcripts, repeat contact, answer quality per
knowledge entry, the definitions the page shows, and the figures of conversations run through a hub."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from pathlib import Path

import pytest
from tests.support import make_staff, open_session

from xiaozhi.hub.domain import analytics
from xiaozhi.hub.domain.contacts import caller_hash
from xiaozhi.hub.domain.surveys import LOCAL_TZ, Survey
from xiaozhi.hub.infra.store import Conversation, Escalation, Message

T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)
RANGE = analytics.Range.of_days(dt.date(2026, 3, 2), dt.date(2026, 3, 3))


def answer(entry: str, topic: str, conf: float = 0.8, point: str | None = None) -> dict:
    """Meta of an answer-stage reply (knowledge_base/answers.py Reply.as_dict, as Rasa passes it on)."""
    return {
        "outcome": "answered",
        "intent": "ask_kb",
        "confidence": 0.9,
        "kb_confidence": conf,
        "citations": [{"id": entry, "topic": topic, "title": "t"}],
        "answers": [{"unit": point or entry, "kind": "point", "entry": entry, "point": point, "topic": topic,
                     "confidence": conf}],
    }


CLARIFY = {"outcome": "clarifying", "intent": "ask_kb", "options": ["a", "b"], "search": {"confidence": 0.4}}
ABSTAIN = {"outcome": "abstained", "intent": "nlu_fallback", "search": {"confidence": 0.1}}
SMALL_TALK = {"outcome": "answered", "intent": "thanks", "confidence": 0.95}


class Transcript:
    """A closed conversation built turn by turn, as the hub stores it (not through a database)."""

    _ids = iter(range(1, 10**6))

    def __init__(self, name: str, *, channel: str = "web", start: dt.datetime = T0, status: str = "closed",
                 meta: dict | None = None) -> None:
        self.conv = Conversation(id=name, channel=channel, region_code="330100", status=status, meta=meta or {},
                                 created_at=start, closed_at=start + dt.timedelta(minutes=10), contact="")
        self.messages: list[Message] = []
        self.escalations: list[Escalation] = []
        self.survey: Survey | None = None
        self.clock = start

    def _add(self, role: str, text: str, meta: dict | None = None, reply_to: int | None = None,
             status: str = "answered") -> Message:
        self.clock += dt.timedelta(seconds=30)
        m = Message(id=next(self._ids), conversation_id=self.conv.id, seq=len(self.messages) + 1, role=role,
                    text=text, status=status, meta=meta or {}, reply_to=reply_to, created_at=self.clock)
        self.messages.append(m)
        return m

    def turn(self, question: str, reply: dict | None) -> "Transcript":
        q = self._add("resident", question, status="answered" if reply is not None else "received")
        if reply is not None:
            self._add("bot", "回复", reply, reply_to=q.id)
        return self

    def escalate(self, *, claimed: bool = True) -> "Transcript":
        self.escalations.append(Escalation(
            conversation_id=self.conv.id, channel=self.conv.channel, reason="requested", status="closed",
            created_at=self.clock, claimed_at=self.clock + dt.timedelta(seconds=60) if claimed else None,
            closed_at=self.clock + dt.timedelta(minutes=5), disposition="resolved" if claimed else "abandoned"))
        if claimed:
            self._add("agent", "您好，我是坐席")
        return self

    def rate(self, rating: int | None, comment: str = "") -> "Transcript":
        self.survey = Survey(conversation_id=self.conv.id, channel=self.conv.channel, status="answered",
                             rating=rating, comment=comment)
        return self

    def classify(self) -> analytics.Resolution:
        return analytics.classify(self.conv, self.messages, self.escalations, self.survey)


def data_of(*transcripts: Transcript, later: tuple[Transcript, ...] = ()) -> dict:
    return {
        "conversations": [t.conv for t in transcripts],
        "messages": [m for t in transcripts for m in t.messages],
        "escalations": [e for t in transcripts for e in t.escalations],
        "surveys": [t.survey for t in transcripts if t.survey is not None],
        "later": [t.conv for t in later],
        "later_messages": [m for t in later for m in t.messages],
    }


# -- classification of single conversations ---------------------------------------------------------
def test_clarifying_question_then_the_resident_left_is_unresolved() -> None:
    t = Transcript("clarify").turn("报销怎么弄", CLARIFY)
    assert (t.classify().status, t.classify().reason) == ("unresolved", "clarifying")
    t = Transcript("abstain").turn("长护险怎么申请", ABSTAIN)
    assert (t.classify().status, t.classify().reason) == ("unresolved", "abstained")
    # the old definition counted both as contained: the resident wrote and nobody escalated
    f = analytics.compute(data_of(Transcript("c").turn("报销怎么弄", CLARIFY)), RANGE)
    assert f["totals"]["containment_rate"] == 0.0 and f["totals"]["unresolved"] == 1


def test_wrong_answer_then_budui_is_unresolved() -> None:
    t = Transcript("wrong").turn("异地就医怎么备案", answer("e-cross", "cross_region")).turn("不对", ABSTAIN)
    assert (t.classify().status, t.classify().reason) == ("unresolved", "disputed")
    for said in ("没用", "听不懂", "你说的不对啊", "答非所问"):
        t = Transcript("w-" + said).turn("异地就医怎么备案", answer("e-cross", "cross_region")).turn(said, SMALL_TALK)
        assert t.classify().reason == "disputed", said


def test_thanks_or_understood_confirms() -> None:
    for said in ("好的谢谢", "明白了", "知道了，谢谢！", "好"):
        t = Transcript("t-" + said).turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).turn(said, SMALL_TALK)
        assert (t.classify().status, t.classify().reason) == ("confirmed", "thanks"), said
    # thanks followed by a new question is not the end of it
    t = Transcript("more").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher"))
    t.turn("谢谢，那异地就医怎么备案呢？", CLARIFY)
    assert t.classify().status == "unresolved"
    # "不明白" is no thanks although it contains 明白
    t = Transcript("nope").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).turn("不明白", SMALL_TALK)
    assert t.classify().status == "unresolved"


def test_survey_yes_confirms_and_survey_no_unresolves() -> None:
    base = Transcript("yes").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher"))
    assert base.classify().status == "answered"  # no sign either way
    assert base.rate(5).classify().reason == "survey_yes"
    assert Transcript("yes4").turn("报销怎么弄", CLARIFY).rate(4).classify().status == "confirmed"
    no = Transcript("no").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).rate(1)
    assert (no.classify().status, no.classify().reason) == ("unresolved", "survey_no")
    said_no = Transcript("no3").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).rate(3, "还是没解决")
    assert said_no.classify().reason == "survey_no"
    neutral = Transcript("n3").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).rate(3)
    assert neutral.classify().status == "answered"


def test_low_confidence_and_rephrased_are_unresolved_good_answer_is_answered() -> None:
    low = Transcript("low").turn("门诊慢特病怎么报销", answer("e-chronic", "chronic_disease", conf=0.3))
    assert (low.classify().status, low.classify().reason) == ("unresolved", "low_confidence")
    good = Transcript("good").turn("门诊慢特病怎么报销", answer("e-chronic", "chronic_disease", conf=0.8))
    assert good.classify().status == "answered"
    again = Transcript("again").turn("门诊慢特病怎么报销", answer("e-x", "reimbursement", point="p1"))
    again.turn("门诊慢特病要怎么报销啊", answer("e-chronic", "chronic_disease", point="p2"))
    assert (again.classify().status, again.classify().reason) == ("unresolved", "rephrased")
    same = Transcript("same").turn("生育津贴", answer("e-mat", "maternity", point="p9"))
    same.turn("产假的钱哪里领", answer("e-mat", "maternity", point="p9"))  # other words, the same answer again
    assert same.classify().reason == "rephrased"
    follow = Transcript("follow").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher", point="p1"))
    follow.turn("激活以后怎么看病用", answer("e-voucher", "e_voucher", point="p2"))  # a follow-up, answered
    assert follow.classify().status == "answered"
    greeting_only = Transcript("hi").turn("你好", SMALL_TALK)
    assert greeting_only.classify().reason == "no_answer"


def test_escalated_abandoned_open_and_silent() -> None:
    esc = Transcript("esc").turn("报销怎么弄", CLARIFY).turn("转人工", {"outcome": "escalated"}).escalate()
    assert esc.classify().status == "escalated"
    left = Transcript("left").turn("转人工", {"outcome": "escalated"}).escalate(claimed=False)
    assert (left.classify().status, left.classify().reason) == ("abandoned", "left_in_queue")
    unanswered = Transcript("unans").turn("医保卡丢了怎么办", None)
    assert (unanswered.classify().status, unanswered.classify().reason) == ("abandoned", "no_reply")
    assert Transcript("open", status="open").turn("你好", SMALL_TALK).classify().status == "open"
    assert Transcript("silent").classify().status == ""


# -- repeat contact ------------------------------------------------------------------------------------
def test_same_caller_back_about_the_same_topic_within_72_hours() -> None:
    caller = {"caller_hash": "abc123"}
    first = Transcript("first", channel="phone", meta=caller).turn("异地就医怎么备案", answer("e-cross", "cross_region"))
    first.turn("谢谢", SMALL_TALK)
    back = Transcript("back", channel="phone", meta=caller, start=T0 + dt.timedelta(hours=30))
    back.turn("异地备案在哪里办", answer("e-cross2", "cross_region"))
    other_topic = Transcript("other", channel="phone", meta={"caller_hash": "abc123"}, start=T0 + dt.timedelta(hours=1))
    res, marked, identifiable = analytics.resolve_all(data_of(first, back, other_topic))
    assert marked == {"first"} and identifiable == 2  # other_topic asked nothing
    assert (res["first"].status, res["first"].reason) == ("unresolved", "repeat_contact")
    assert res["back"].status == "answered"

    # 80 hours later is another matter; another caller is another person
    late = Transcript("late", channel="phone", meta=caller, start=T0 + dt.timedelta(hours=80))
    late.turn("异地就医怎么备案", answer("e-cross", "cross_region"))
    stranger = Transcript("stranger", channel="phone", meta={"caller_hash": "zzz"}, start=T0 + dt.timedelta(hours=2))
    stranger.turn("异地就医怎么备案", answer("e-cross", "cross_region"))
    first2 = Transcript("first2", channel="phone", meta=caller).turn("异地就医怎么备案", answer("e-cross", "cross_region"))
    res, marked, _ = analytics.resolve_all(data_of(first2, late, stranger))
    assert marked == set() and res["first2"].status == "answered"

    # a widget visitor coming back the next day, after the selected range, about the same question
    v = {"visitor": "v" * 32}
    web = Transcript("web1", meta=v, start=T0 + dt.timedelta(hours=40)).turn("医保电子凭证怎么激活", ABSTAIN)
    web.turn("我要激活医保电子凭证", answer("e-voucher", "e_voucher"))
    web.turn("好的", SMALL_TALK)
    nxt = Transcript("web2", meta=v, start=T0 + dt.timedelta(hours=60)).turn("医保电子凭证激活不了", ABSTAIN)
    f = analytics.compute(data_of(web, later=(nxt,)), RANGE)
    assert f["totals"]["repeat_contacts"] == 1 and f["totals"]["repeat_contact_rate"] == 1.0
    assert f["totals"]["confirmed"] == 0 and f["resolution"]["reasons"] == {"repeat_contact": 1}


def test_caller_hash_is_keyed_stable_and_not_the_number(tmp_path: Path) -> None:
    a = caller_hash("13812345678", tmp_path)
    assert a == caller_hash("+86 138-1234-5678", tmp_path) == caller_hash("8613812345678", tmp_path)
    assert a != caller_hash("13812345679", tmp_path) and "1381234" not in a
    assert a != caller_hash("13812345678", tmp_path / "other")  # another installation, another key
    assert caller_hash("anonymous", tmp_path) == "" and (tmp_path / "contact-hash.key").stat().st_mode & 0o077 == 0


def test_replicas_sharing_the_configured_key_recognise_each_others_callers(tmp_path: Path) -> None:
    from pydantic import ValidationError
    from xiaozhi.settings import Settings

    key = Settings(contact_hash_key="k" * 64).contact_hash_key.get_secret_value()
    one, two = caller_hash("13812345678", tmp_path / "a", key), caller_hash("13812345678", tmp_path / "b", key)
    assert one == two and one != caller_hash("13812345678", tmp_path / "a")  # the key wins over the file
    assert not (tmp_path / "b" / "contact-hash.key").exists()
    assert caller_hash("13812345678", tmp_path, "x" * 64) != one
    with pytest.raises(ValidationError):
        Settings(contact_hash_key="short")  # a guessable key would make the hash reversible


# -- the dashboard's figures -------------------------------------------------------------------------
def test_figures_per_channel_topic_and_entry_quality() -> None:
    ts = [
        Transcript("a").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).turn("谢谢", SMALL_TALK),
        Transcript("b").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")),
        Transcript("c").turn("医保电子凭证怎么弄", answer("e-voucher", "e_voucher")).turn("不对", SMALL_TALK),
        Transcript("d", channel="phone").turn("异地就医怎么备案", answer("e-cross", "cross_region"))
        .turn("异地就医要怎么备案", answer("e-cross", "cross_region", point="p2"))
        .turn("转人工", {"outcome": "escalated"}).escalate(),
        Transcript("e", channel="phone").turn("报销怎么弄", CLARIFY),
        Transcript("f", status="open").turn("医保电子凭证怎么激活", answer("e-voucher", "e_voucher")),
    ]
    f = analytics.compute(data_of(*ts), RANGE)
    t = f["totals"]
    assert t["asked"] == 6 and t["closed_asked"] == 5
    assert (t["confirmed"], t["answered_unconfirmed"], t["unresolved"]) == (1, 1, 2)
    assert t["contained"] == 2 and t["containment_rate"] == 0.4 and t["confirmed_rate"] == 0.2
    r = f["resolution"]
    assert (r["confirmed"], r["answered"], r["unresolved"], r["escalated"], r["abandoned"], r["open"]) == (1, 1, 2, 1, 0, 1)
    assert r["shares"]["unresolved"] == 0.4 and r["labels"]["answered"] == "已答复未确认"
    assert r["by_channel"]["phone"]["escalated"] == 1 and r["by_channel"]["phone"]["unresolved"] == 1
    assert r["by_channel"]["web"]["containment_rate"] == pytest.approx(2 / 3, abs=1e-4)
    topics = {x["topic"]: x for x in r["by_topic"]}
    assert topics["e_voucher"]["closed"] == 3 and topics["e_voucher"]["label"] == "医保电子凭证"
    assert topics[""]["unresolved"] == 1 and topics[""]["label"] == "未归入主题"
    assert f["by_region"][0]["containment_rate"] == 0.4 and f["by_region"][0]["resolution"]["escalated"] == 1
    q = {x["entry"]: x for x in f["entry_quality"]}
    assert q["e-voucher"]["used"] == 4 and q["e-voucher"]["confirmed"] == 1 and q["e-voucher"]["disputed"] == 1
    assert q["e-cross"]["used"] == 2 and q["e-cross"]["rephrased"] == 1 and q["e-cross"]["escalated"] == 2
    assert f["entry_quality"][0]["entry"] == "e-cross"  # the worst first
    assert set(f["definitions"]) >= {"containment_rate", "confirmed_rate", "unresolved_rate", "repeat_contact_rate"}


def test_every_definition_on_the_page_is_in_the_docs() -> None:
    docs = (Path(__file__).parent.parent.parent / "docs" / "analytics.md").read_text(encoding="utf-8")
    for key, text in analytics.DEFINITIONS.items():
        assert text in docs, key
        assert re.search(r"[\u4e00-\u9fff]", text) and "\n" not in text
    assert "自助解决率" in analytics.DEFINITIONS["containment_rate"] and "确认解决" in analytics.DEFINITIONS["containment_rate"]


def test_csv_carries_the_classification_masked() -> None:
    ts = [
        Transcript("a").turn("我手机13812345678，医保电子凭证怎么激活", answer("e-voucher", "e_voucher")).turn("谢谢", SMALL_TALK),
        Transcript("b").turn("报销怎么弄", CLARIFY),
    ]
    body = analytics.conversations_csv(data_of(*ts)).lstrip("\ufeff")
    rows = {r["conversation_id"]: r for r in csv.DictReader(io.StringIO(body))}
    assert (rows["a"]["resolution"], rows["a"]["resolution_reason"], rows["a"]["topic"]) == ("confirmed", "thanks", "e_voucher")
    assert rows["a"]["resolution_label"] == "确认解决：居民致谢/表示明白" and rows["a"]["repeat_contact"] == "no"
    assert rows["b"]["resolution"] == "unresolved" and rows["b"]["resolution_reason"] == "clarifying"
    assert "13812345678" not in body and "138****5678" in body


# -- through a hub ----------------------------------------------------------------------------------
def test_conversations_through_the_hub_give_the_dashboard_figures(hub) -> None:
    """A handful of chats through the hub's API (degraded mode: the answer stage answers), closed as a
    resident closes them, one survey, one visitor coming back: the dashboard and the CSV classify them."""
    threshold = hub.app.state.settings.kb_abstain_threshold

    def chat(lines: list[str], *, visitor: str | None = None, rating: int | None = None) -> tuple[str, list[dict]]:
        sid, auth = open_session(hub, **({"visitor": visitor} if visitor else {}))
        replies = []
        for line in lines:
            r = hub.post(f"/api/sessions/{sid}/messages", json={"text": line}, headers=auth)
            assert r.status_code == 200, r.text
            replies.append(r.json()["replies"][-1]["meta"])
        assert hub.post(f"/api/sessions/{sid}/close", headers=auth).status_code == 200
        if rating is not None:
            assert hub.post(f"/api/sessions/{sid}/survey", json={"rating": rating}, headers=auth).status_code == 200
        return sid, replies

    def good(meta: dict) -> bool:
        conf = analytics.kb_confidence(meta)
        return meta.get("outcome") == "answered" and (conf is None or conf >= threshold)

    thanked, r1 = chat(["医保电子凭证怎么激活", "好的，谢谢"])
    left, r2 = chat(["医保电子凭证怎么激活"])
    disputed, _ = chat(["异地就医怎么备案", "不对"])
    off_topic, r4 = chat(["今天天气怎么样"])
    queued, _ = chat(["转人工"])  # closed while waiting in the queue
    first, _ = chat(["异地就医怎么备案"], visitor="visitor-0001", rating=5)
    again, _ = chat(["异地就医备案怎么办理"], visitor="visitor-0001")
    assert good(r1[0]) and good(r2[0]), (r1, r2)  # the knowledge base answers the e-voucher question
    assert not good(r4[0]), r4
    assert hub.post("/api/sessions", json={"visitor": "x y"}).status_code == 422  # not an id

    lead = make_staff(hub, "lead", "supervisor")
    f = hub.get("/api/staff/analytics", headers=lead).json()
    t, r = f["totals"], f["resolution"]
    assert t["asked"] == 7 and t["closed_asked"] == 7
    assert r["confirmed"] == 1 and r["abandoned"] == 1 and r["escalated"] == 0
    assert r["unresolved"] == 3 and r["answered"] == 2  # disputed, off topic, first (came back); left, again
    assert t["repeat_contacts"] == 1 and t["repeat_identifiable"] == 2 and t["repeat_contact_rate"] == 0.5
    assert t["containment_rate"] == round(3 / 7, 4) and t["confirmed_rate"] == round(1 / 7, 4)
    assert t["containment_rate"] < 1.0  # under the old definition every one of these but the queued one counted
    assert r["by_channel"]["web"]["closed"] == 7
    quality = {q["entry"]: q for q in f["entry_quality"]}
    voucher = r1[0]["answers"][0]["entry"]
    assert quality[voucher]["used"] == 2 and quality[voucher]["confirmed"] == 1
    assert f["definitions"]["containment_rate"].startswith("自助解决率")

    body = hub.get("/api/staff/analytics/export.csv", headers=lead).content.decode("utf-8-sig")
    rows = {row["conversation_id"]: row for row in csv.DictReader(io.StringIO(body))}
    assert rows[thanked]["resolution"] == "confirmed" and rows[left]["resolution"] == "answered"
    assert rows[disputed]["resolution_reason"] == "disputed" and rows[off_topic]["resolution"] == "unresolved"
    assert rows[queued]["resolution"] == "abandoned"
    assert (rows[first]["resolution_reason"], rows[first]["repeat_contact"]) == ("repeat_contact", "yes")
    assert rows[again]["resolution"] == "answered"
