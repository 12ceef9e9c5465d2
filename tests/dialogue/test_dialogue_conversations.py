"""Development conversations through the real stack (hub + Rasa + action server + knowledge base).

Each conversation has a goal: a finished procedure's checklist, or an answered question. The
share reaching its goal without a person is the dialogue's headline number (docs/dialogue.md).
Escalation paths are checked separately: there a person *is* the goal.

    .venv/bin/python tests/dialogue/test_dialogue_conversations.py --url http://127.0.0.1:8100   # a running stack
"""

from __future__ import annotations

import argparse
import re
import sys

import httpx
import pytest



def checklist(title_part: str):
    def goal(reply: dict) -> bool:
        meta = reply["meta"]
        return meta["outcome"] == "answered" and bool(meta["steps"]) and title_part in reply["text"]
    return goal


def answered(topic: str):
    def goal(reply: dict) -> bool:
        meta = reply["meta"]
        return meta["outcome"] == "answered" and any(c.get("topic") == topic for c in meta["citations"])
    return goal


# (name, resident turns, goal on the last reply)
def answered_any(*topics: str):
    def goal(reply: dict) -> bool:
        meta = reply["meta"]
        return meta["outcome"] == "answered" and any(c.get("topic") in topics for c in meta["citations"])
    return goal


GUIDE = "一步步带我办"  # what the answer's button sends; procedures start only on request

# (name, resident turns, goal on the last reply)
CONVERSATIONS = [
    ("ev: asked step by step", ["医保电子凭证怎么激活", GUIDE, "给我自己", "微信"], checklist("微信")),
    ("ev: all given early, answered", ["帮我妈用支付宝开通医保码"], answered("e_voucher")),
    ("ev: all given early, then walked through", ["帮我妈用支付宝开通医保码", GUIDE], checklist("亲情账户")),
    ("ev: asr noise", ["医保评证怎么激活", GUIDE, "我自己", "支付包"], checklist("支付宝")),
    ("ev: child, app", ["给孩子绑定医保码"], answered("e_voucher")),
    ("ev: side question then back", ["医保码怎么弄", GUIDE, "医保热线是多少", "给我自己", "用手机银行"], checklist("银行")),
    ("ev: guidance named outright", ["带我一步步激活医保电子凭证", "给我自己", "微信"], checklist("微信")),
    ("cr: retiree to shanghai", ["异地就医怎么备案", GUIDE, "退休了跟着女儿住", "上海"], checklist("上海")),
    ("cr: asr noise, all early", ["我退休了要去海南长住，一地就依怎么备案"], answered("cross_region")),
    ("cr: all early, walked through", ["我退休了要去海南长住，一地就依怎么备案", GUIDE], checklist("海南")),
    ("cr: referral", ["转诊到北京的医院怎么备案"], answered_any("cross_region", "referral")),
    ("cr: emergency", ["在外地看病怎么备案", GUIDE, "急诊", "广州"], checklist("广州")),
    ("cr: travel with switch", ["去外地看病要先办什么", GUIDE, "报销比例是多少", "出差", "成都"], checklist("成都")),
    ("cr: worker", ["在外地工作看病怎么备案", GUIDE, "深圳"], checklist("深圳")),
    ("re: inpatient early", ["住院了报销需要带什么材料"], answered("reimbursement")),
    ("re: outpatient + type", ["看病的钱怎么报", GUIDE, "门诊", "城乡居民医保"], checklist("门诊")),
    ("re: out of region", ["在外地看病自费了回来怎么报"], answered_any("reimbursement", "cross_region")),
    ("re: emergency noise", ["急诊的费用怎么报消", GUIDE], checklist("急诊")),
    ("re: chronic", ["慢性病拿药的钱怎么报"], answered_any("chronic_disease", "reimbursement")),
    ("faq: chronic", ["高血压能办慢病吗"], answered("chronic_disease")),
    ("faq: card lost", ["社保卡丢了怎么补办"], answered("card")),
    ("faq: personal account", ["个人账户的钱能给家人用吗"], answered("personal_account")),
    ("faq: memory of region", ["我是杭州参保的", "医保业务去哪个窗口办"], answered("service_info")),
    ("faq: precise, then more", ["医保码亲情账户最多能绑几个人", "详细说说"], checklist("亲情")),
]

ESCALATIONS = [
    ("explicit", ["转人工"]),
    ("complaint", ["你们这什么服务态度，我要投诉"]),
    ("complaint about this service that asks", ["你们客服怎么回事，打了三次电话都没人接？"]),
    ("urgent mid-procedure", ["医保怎么报销", "我爸正在抢救，医保刷不了怎么办"]),
    ("two failures", ["那个东西咋整", "就那个嘛上回说的"]),
    ("a person, asked as a question", ["医保小智能转人工吗"]),
]


# Questions DIET misreads as out of scope, a complaint, an emergency, a no, a goodbye, a greeting, a request
# for a person or "am I talking to a machine?" (its guesses on the current model): each is a question the
# knowledge base answers, and is answered instead of declined, handed over or said goodbye to.
MISREAD_QUESTIONS = [
    ("out of scope", "老人怎么更换医疗卡号"),
    ("complaint that asks where", "医院不合理收费应该去哪里投诉？卫健委还是医保局？"),
    ("urgent, a locked card", "我爸记不清医保卡密码，在药店连续输错了三次，现在卡被锁了刷不了，要去哪里解锁？"),
    ("a no, a long question", "我自己已经交了今年重庆的居民医保，宝宝今年刚出生，是不是宝宝当年不用另外交钱，跟着我就能参保？"),
    ("urgent, only in a hurry", "急急急！医保卡丢了怎么补办"),
    ("a goodbye", "俺孙子上大学了，他的医保在哪交"),
    ("a greeting", "不会激活医保码，晚上有人教吗"),
    ("a complaint that is a question", "我在休产假，发现单位这两个月没给我交医保，这对吗"),
    ("asking whether a machine speaks", "限定支付范围是什么"),
    ("asking for a person", "我下了浙里办，找半天找不到医保在哪"),
]


def talk(client: httpx.Client, turns: list[str]) -> list[dict]:
    created = client.post("/api/sessions", json={}).json()
    sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    last = []
    for text in turns:
        r = client.post(f"/api/sessions/{sid}/messages", json={"text": text}, headers=auth)
        r.raise_for_status()
        last = r.json()["replies"]
    return last


def goal_share(client: httpx.Client, verbose: bool = False) -> tuple[float, list[str]]:
    missed = []
    for name, turns, goal in CONVERSATIONS:
        replies = talk(client, turns)
        ok = bool(replies) and goal(replies[-1]) and all(r["meta"]["outcome"] != "escalated" for r in replies)
        if not ok:
            missed.append(f"{name}: {replies[-1]['meta']['outcome'] if replies else '-'} {replies[-1]['text'][:80] if replies else ''}")
        if verbose:
            print(("OK   " if ok else "MISS ") + name)
    return 1 - len(missed) / len(CONVERSATIONS), missed


@pytest.fixture(scope="module")
def stack_url(stack):
    return stack["url"]


@pytest.mark.slow
def test_development_conversations_reach_their_goal(stack_url):
    with httpx.Client(base_url=stack_url, timeout=60) as client:
        share, missed = goal_share(client)
    assert share >= 0.85, missed


@pytest.mark.slow
@pytest.mark.parametrize("name,turns", ESCALATIONS, ids=[e[0] for e in ESCALATIONS])
def test_escalation_paths_end_with_a_person(stack_url, name, turns):
    with httpx.Client(base_url=stack_url, timeout=60) as client:
        replies = talk(client, turns)
    assert replies[-1]["meta"]["outcome"] == "escalated", replies


@pytest.mark.slow
@pytest.mark.parametrize("name,text", MISREAD_QUESTIONS, ids=[m[0] for m in MISREAD_QUESTIONS])
def test_a_question_the_intent_classifier_misreads_is_answered(stack_url, name, text):
    with httpx.Client(base_url=stack_url, timeout=60) as client:
        reply = talk(client, [text])[-1]
    assert reply["meta"]["outcome"] == "answered" and reply["meta"]["citations"], reply
    if "hurry" in name or "a person" in name:  # answered at once, and a person is one tap away
        assert [b["title"] for b in reply["meta"]["buttons"]][:1] == ["转人工"], reply


@pytest.mark.slow
def test_asked_whether_a_machine_speaks_the_assistant_says_what_it_is(stack_url):
    with httpx.Client(base_url=stack_url, timeout=60) as client:
        reply = talk(client, ["医保小智是机器人吗"])[-1]
    assert "智能助手" in reply["text"] and not reply["meta"]["citations"], reply


@pytest.mark.slow
def test_procedure_summary_is_a_checklist_with_sources(stack_url):
    with httpx.Client(base_url=stack_url, timeout=60) as client:
        reply = talk(client, ["帮我爸用微信开通医保码"])[-1]
    meta = reply["meta"]
    assert meta["steps"] and meta["citations"] and meta["outcome"] == "answered"
    spoken = meta["spoken"]
    assert not re.search(r"\d", spoken) and all(len(s) <= 40 for s in re.split(r"[。！？；]", spoken))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=60) as client:
        share, missed = goal_share(client, verbose=True)
        print(f"goal reached without a person: {share:.0%} of {len(CONVERSATIONS)}")
        for m in missed:
            print("  missed:", m)
        for name, turns in ESCALATIONS:
            print(f"escalation {name}: {talk(client, turns)[-1]['meta']['outcome']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
