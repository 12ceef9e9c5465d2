"""The phone checks what it heard before answering (issue 20, part 3): "您是想问…，对吗？".

The yes/no reading, the check on the real knowledge base's answer stage, and the dialogue through
the real hotline (the hub's conversation core, degraded mode without Rasa): yes -> the answer,
no -> asked to say it briefly or press 0, keys 1/2 -> the same at once. Chat never confirms.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.phone import needs_whisper, phone_hub, placed_call, until_heard, until_quiet, wait_until
from xiaozhi.hub.channels.phone.confirm import (
    CONFIRM_SPOKEN, REPHRASE_SPOKEN, PhoneConfirmation, confirmation_texts, yes_or_no,
)

# What the recogniser made of a 10 dB story about giving birth away from home (the words around the
# question half lost): the answer stage still finds a point, but not one to answer without asking.
MISHEARD = "我老婆是在杭州交的一包今年回老家生的孩子在县医院住了五天出院的时候全是自己付的钱现在回来了想问一下这个"


def test_yes_and_no_in_the_ways_callers_say_them() -> None:
    for text in ("是", "是的", "对", "对对对", "嗯", "嗯嗯", "对，没错", "是的是的", "没错", "对的。"):
        assert yes_or_no(text) == ("yes", ""), text
    for text in ("不是", "不对", "不是的", "错了", "不", "不对不对"):
        assert yes_or_no(text) == ("no", ""), text
    verdict, rest = yes_or_no("不是，我想问门诊慢特病怎么申请")
    assert verdict == "no" and rest.startswith("我想问门诊慢特病")
    assert yes_or_no("")[0] is None


def test_a_question_that_begins_like_yes_or_no_is_not_taken_for_one() -> None:
    for text in ("是不是要先去备案才能报销", "对了我还想问一下医保卡丢了怎么挂失", "好几年没交医保了还能补交吗"):
        assert yes_or_no(text) == (None, text)


@pytest.fixture(scope="module")
def confirmation(knowledge_base) -> PhoneConfirmation:
    return PhoneConfirmation(lambda: knowledge_base.answerer)


async def test_a_short_question_heard_well_is_answered_without_a_check(confirmation) -> None:
    assert await confirmation.check("异地就医怎么备案", 0.85, None) is None
    assert await confirmation.check("是的", 0.2, None) is None  # a reply to the bot is never held up
    assert await confirmation.check("我要转人工，我说了好几遍了，你们听不懂", 0.2, None) is None


async def test_a_question_heard_unsurely_is_confirmed_with_the_point_it_would_answer(confirmation) -> None:
    ask = await confirmation.check("异地就医怎么备案", 0.3, None)
    assert ask is not None and "备案" in ask.question and not ask.question.endswith("？")


async def test_a_misheard_story_is_confirmed_not_answered(confirmation) -> None:
    ask = await confirmation.check(MISHEARD, 0.6, None)
    assert ask is not None and ask.heard == MISHEARD
    assert len(CONFIRM_SPOKEN.format(question=ask.question)) <= 45  # one short sentence


async def test_every_confirmation_the_line_says_is_among_those_prerendered(confirmation, knowledge_base) -> None:
    """The hotline pre-renders confirmation_texts(corpus) with the spoken answers; what check() makes the
    bot say must be one of them, or its question clause is rendered while the caller waits."""
    prerendered = set(confirmation_texts(knowledge_base.corpus))
    assert len(prerendered) >= len(knowledge_base.corpus.points)
    for text, confidence in (("异地就医怎么备案", 0.3), (MISHEARD, 0.6), ("亲情账户最多能绑几个人", 0.3)):
        ask = await confirmation.check(text, confidence, None)
        assert ask is not None and CONFIRM_SPOKEN.format(question=ask.question) in prerendered, text


async def test_a_story_heard_well_and_retrieved_surely_is_answered_at_once(confirmation) -> None:
    story = "我在外地的工地上打工，老家交的新农合，干活的时候手受伤了去医院缝了几针，这种在外地打工看病医保怎么办？"
    assert await confirmation.check(story, 0.85, None) is None


# -- the dialogue on a real call ------------------------------------------------------------------------------
async def bot_messages(app, conv_id: str) -> list:
    return [m for m in await app.state.store.transcript(conv_id) if m.role == "bot"]


@needs_whisper
async def test_confirm_then_yes_answers_no_asks_again_and_keys_answer_at_once(hub_settings, knowledge_base):
    async with phone_hub(hub_settings, knowledge_base) as app, placed_call(app) as (peer, call, rtp):
        await until_quiet(rtp)
        phone = app.state.phone
        session = next(iter(phone.bot.sessions.values()))
        live = session.call
        conv_id = live.metadata["conversation"].id

        # misheard: the bot names the question it understood, and does not answer yet
        turn = await phone.reply(live, MISHEARD, source="speech", confidence=0.6)
        assert turn.confirming and turn.spoken.startswith("我确认一下，您是想问") and turn.spoken.endswith("对吗？")
        [asked] = await bot_messages(app, conv_id)
        assert asked.meta["confirming"] and not asked.meta.get("citations")
        question = live.metadata["confirm"].question
        # "不是" -> asked to say it briefly or press 0; no answer given
        turn = await phone.reply(live, "不是", source="speech", confidence=0.9)
        assert turn.spoken == REPHRASE_SPOKEN and not turn.confirming and "confirm" not in live.metadata
        assert all(not m.meta.get("citations") for m in await bot_messages(app, conv_id))
        # asked again, confirmed with "对": the answer to the question confirmed, citing its source
        turn = await phone.reply(live, MISHEARD, source="speech", confidence=0.6)
        assert turn.confirming
        turn = await phone.reply(live, "对", source="speech", confidence=0.9)
        assert not turn.confirming and turn.spoken and "对吗" not in turn.spoken
        last = (await bot_messages(app, conv_id))[-1]
        assert last.meta.get("citations") and last.meta.get("outcome") == "answered", last.meta
        said = [m.text for m in await app.state.store.transcript(conv_id) if m.role == "resident"]
        assert said[:3] == [MISHEARD, "不是", MISHEARD] and "对" in said  # every word kept
        assert question.rstrip("？") in said[-1] or said[-1].startswith(question)

        # the keypad: 1 is yes at once (not a number typed and waited for)
        turn = await phone.reply(live, MISHEARD, source="speech", confidence=0.6)
        session.confirming = turn.confirming
        answers_before = len([m for m in await bot_messages(app, conv_id) if m.meta.get("citations")])
        pressed = asyncio.get_running_loop().time()
        await rtp.key("1")
        assert await wait_until(lambda: "confirm" not in live.metadata, timeout=10)
        assert asyncio.get_running_loop().time() - pressed < 3.0  # not the 5 s inter-digit wait
        await until_heard(rtp, 0.0)
        await until_quiet(rtp)
        answers = [m for m in await bot_messages(app, conv_id) if m.meta.get("citations")]
        assert len(answers) == answers_before + 1
        # and 2 is no
        turn = await phone.reply(live, MISHEARD, source="speech", confidence=0.6)
        session.confirming = turn.confirming
        await rtp.key("2")
        assert await wait_until(lambda: "confirm" not in live.metadata, timeout=10)
        await until_quiet(rtp)
        assert (await bot_messages(app, conv_id))[-1].text == REPHRASE_SPOKEN
        peer.in_dialog("BYE", call)
        await peer.expect(200)


def test_chat_never_confirms(hub) -> None:
    """The same misheard words typed in the web chat get the chat's own reply, never "我确认一下…对吗？"."""
    session = hub.post("/api/sessions", json={}).json()
    auth = {"authorization": f"Bearer {session['token']}"}
    r = hub.post(f"/api/sessions/{session['session_id']}/messages", json={"text": MISHEARD}, headers=auth)
    assert r.status_code == 200, r.text
    replies = r.json()["replies"]
    assert replies and all(not r["meta"].get("confirming") and "我确认一下" not in (r["meta"].get("spoken") or "")
                           for r in replies), replies
