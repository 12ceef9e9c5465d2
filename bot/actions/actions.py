"""Single-turn actions of the Rasa action server (rasa_sdk, runs in .venv-rasa on Python 3.10).

The knowledge base lives in the hub (Python 3.11, torch); actions reach it over HTTP at
``XIAOZHI_HUB_URL``. Each reply is sent as one custom payload holding the written text, the
spoken form for the phone, the cited entries and the outcome the hub records. The guided
procedures (forms) live in bot/actions/forms.py.
"""

from __future__ import annotations

import abc
import logging
import re
from typing import Any, Dict, List, Optional, Text

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.forms import ValidationAction

from yibao_common.places import find_place

from .kb import answer_question, more_about
from .messages import domain_message, numbered
from .voice import voice_fit

log = logging.getLogger(__name__)

NO_ANSWER_SPOKEN = "抱歉，这个问题我暂时回答不了。您可以换个说法，或者说转人工。"
KB_DOWN_TEXT = "抱歉，政策知识库暂时无法访问。您可以稍后再问，或者说“转人工”由工作人员为您解答。"
HUMAN_BUTTON = {"title": "转人工", "payload": "/request_human"}

# A city named in these contexts is where the resident goes, not where they are insured.
DESTINATION_INTENTS = {"ask_cross_region", "ask_cross_region_settlement", "ask_referral"}


def kb_down_message() -> Dict[str, Any]:
    return {"text": KB_DOWN_TEXT, "spoken": NO_ANSWER_SPOKEN, "outcome": "abstained", "buttons": [HUMAN_BUTTON]}


def resident_region(tracker: Tracker) -> Optional[str]:
    """The region known for this conversation: a slot once known, else the channel's metadata."""
    region = tracker.get_slot("region")
    if region:
        return str(region)
    metadata = tracker.latest_message.get("metadata") or {}
    return metadata.get("region") or None


# A guided procedure (form) exists for these topics: an answer offers to walk the resident through.
GUIDED_TOPICS = {"e_voucher": "ev_activation_form", "cross_region": "cross_region_form",
                 "referral": "cross_region_form", "reimbursement": "reimbursement_form",
                 "chronic_disease": "reimbursement_form", "maternity": "reimbursement_form"}
GUIDE_BUTTON = {"title": "一步步带我办", "payload": "/request_guidance"}
# The story's facts, as the answer stage reads them, in the slots the forms use.
INSURANCE_SLOT = {"职工": "职工医保", "居民": "城乡居民医保"}


class ActionAnswerFromKnowledgeBase(Action):
    """Answer the question(s) a message asks from the knowledge base (the hub's answer stage).

    The hub reads the message as the resident wrote it: the question inside a story, the story's
    case (discharged, not filed, 职工...), two questions, a city whose own rules decide. It answers
    with the knowledge point, or asks which of two genuinely different questions was meant (never
    twice in a row), or declines politely. Two failures in a row offer a person.
    ``offer_person``: an answer also offers a person first among its quick replies (a resident in a hurry).
    """

    def __init__(self, offer_person: bool = False) -> None:
        self.offer_person = offer_person

    def name(self) -> Text:
        return "action_answer_from_kb"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        text = tracker.latest_message.get("text") or ""
        region = resident_region(tracker)
        failed = float(tracker.get_slot("failed_turns") or 0)
        result = await answer_question(text, region, tracker.get_slot("last_outcome"))
        if result is None:
            dispatcher.utter_message(json_message=kb_down_message())
            return [SlotSet("failed_turns", failed + 1), SlotSet("last_outcome", "abstained")]
        outcome = result.get("outcome") or "abstained"
        payload = {key: result.get(key) for key in (
            "text", "outcome", "citations", "steps", "buttons", "search", "kb_confidence", "answers", "related",
            "options", "more", "questions", "case")}
        payload["spoken"] = voice_fit(result.get("spoken") or "")
        if outcome == "answered":
            answers = result.get("answers") or []
            topic = answers[0].get("topic") if answers else None
            if topic in GUIDED_TOPICS and tracker.active_loop.get("name") is None:
                payload["buttons"] = list(payload.get("buttons") or []) + [GUIDE_BUTTON]
            if self.offer_person:
                payload["buttons"] = [HUMAN_BUTTON] + [b for b in payload.get("buttons") or [] if b != HUMAN_BUTTON]
            dispatcher.utter_message(json_message=payload)
            more = result.get("more") or {}
            events = [SlotSet("failed_turns", 0.0), SlotSet("last_outcome", "answered"),
                      SlotSet("more_entry", more.get("entry")), SlotSet("last_question", text[:500])]
            if topic:
                events.append(SlotSet("last_topic", topic))
            case = result.get("case") or {}
            if case.get("insurance") in INSURANCE_SLOT:
                events.append(SlotSet("insurance_type", INSURANCE_SLOT[case["insurance"]]))
            if result.get("relation"):
                events.append(SlotSet("relation", result["relation"]))
            return events
        if outcome == "abstained" and failed >= 1:
            # Two failures in a row: a person takes over before the resident gives up.
            message = domain_message(domain, "utter_escalate_after_failures")
            message["search"] = result.get("search")
            dispatcher.utter_message(json_message=message)
            return [SlotSet("failed_turns", 0.0), SlotSet("last_outcome", "escalated")]
        dispatcher.utter_message(json_message=payload)
        return [SlotSet("failed_turns", failed + 1), SlotSet("last_outcome", outcome), SlotSet("more_entry", None)]


class ActionAnswerMore(Action):
    """"详细说说" / "要" after a precise answer: the whole entry with its steps; otherwise ask what else."""

    def name(self) -> Text:
        return "action_answer_more"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        text = tracker.latest_message.get("text") or ""
        intent = (tracker.latest_message.get("intent") or {}).get("name")
        if intent == "affirm" and asks_a_question(text) and not MORE_WORDS.search(text):
            # DIET heard a yes in a question ("是不是……就能参保？"): it is answered as the question it is.
            return await ActionAnswerFromKnowledgeBase().run(dispatcher, tracker, domain)
        entry_id = tracker.get_slot("more_entry")
        if not entry_id:
            dispatcher.utter_message(json_message=domain_message(domain, "utter_anything_else"))
            return []
        result = await more_about(str(entry_id), resident_region(tracker))
        if result is None:
            dispatcher.utter_message(json_message=kb_down_message())
            return [SlotSet("more_entry", None)]
        payload = {key: result.get(key) for key in ("text", "outcome", "citations", "steps", "answers")}
        steps = result.get("steps") or []
        if steps:
            payload["text"] = numbered((result.get("text") or "") + "\n\n办理步骤：", steps)
            payload["checklist"] = {"title": "办理步骤", "items": steps}
        payload["spoken"] = voice_fit(result.get("spoken") or "")
        topic = ((result.get("answers") or [{}])[0]).get("topic")
        payload["buttons"] = [GUIDE_BUTTON] if topic in GUIDED_TOPICS else []
        dispatcher.utter_message(json_message=payload)
        return [SlotSet("more_entry", None), SlotSet("last_outcome", "answered")]


class ActionStartGuidance(Action):
    """"一步步带我办": start the guided procedure (form) of the topic the resident asked about."""

    def name(self) -> Text:
        return "action_start_guidance"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        # The request names the procedure, or the question just before it does ("急诊的费用怎么报" then
        # "一步步带我办"); otherwise the topic of the last answer decides.
        said = [tracker.get_slot("last_question") or "", tracker.latest_message.get("text") or ""]
        form = None
        for text in reversed(said):
            form = next((name for words, name in GUIDANCE_WORDS if any(w in text for w in words)), None)
            if form:
                break
        form = form or GUIDED_TOPICS.get(tracker.get_slot("last_topic") or "")
        if form is None:
            dispatcher.utter_message(json_message=domain_message(domain, "utter_which_guidance"))
            return [SlotSet("guide", "unknown")]
        # The rules start the form the slot names (nlu_data/rules.yml, "guidance on request").
        return [SlotSet("guide", GUIDE_SLOT[form])]


GUIDE_SLOT = {"ev_activation_form": "ev_activation", "cross_region_form": "cross_region",
              "reimbursement_form": "reimbursement"}

# Words that name a procedure in a request to be walked through ("带我办一下异地备案").
GUIDANCE_WORDS = [
    (("医保码", "电子凭证", "医保电子", "亲情账户", "激活"), "ev_activation_form"),
    (("备案", "异地", "外地", "外省"), "cross_region_form"),
    (("报销", "报消", "报账", "手工报", "怎么报", "钱怎么"), "reimbursement_form"),
]


# Words of a real emergency: with one of them an "urgent" message goes to a person at once. A card that
# will not pay (刷不了, 结不了) is not one by itself: "卡被锁了刷不了，要去哪里解锁？" asks where to unlock it,
# and was handed over with "有生命危险请拨打120".
URGENT_WORDS = re.compile(r"抢救|急救|救命|危险|不行了|昏迷|晕倒|大出血|紧急|120|急诊室|手术室|ICU")
# Words of hurry, not of danger: forum posts end questions with "急急急" ("不办转院手续报销多少，求路过的神仙
# 指点，急急急！" was handed over with the 120 advice). With one of them, a question the knowledge base answers is
# answered at once with a person offered first; anything else still goes to a person.
HURRY_WORDS = re.compile(r"急死|急急|十万火急|马上|立刻|赶紧|快点|在线等")
# A complaint that asks where or how to complain (about a hospital's bill, a pharmacy) is a question the
# knowledge base answers; one about this service ("你们这什么态度，我要投诉") goes to a person.
COMPLAINT_CHANNEL_QUESTION = re.compile(
    r"(?:投诉|举报)(?:电话|热线|渠道|方式|途径|部门)|(?:去|到|向|找|跟)(?:哪里?|哪儿|哪个部门|谁)(?:投诉|举报|反映)|"
    r"(?:怎么|怎样|如何|在哪|哪里)(?:投诉|举报)")
# What a complaint about this service names: it goes to a person even when it asks something.
ABOUT_THIS_SERVICE = re.compile(r"你们|客服|小智|机器人|智能|打不通|没人接|人工")
# What a resident who asks for a person, or whether a person is speaking, names. Without one, DIET's
# request_human or bot_challenge guess on a question ("我下了浙里办，找半天找不到医保在哪", "限定支付范围是什么")
# is a misreading: the knowledge base answers it.
ABOUT_A_PERSON = re.compile(r"人工|真人|活人|客服|坐席|接线|工作人员|转接|找人|换人|有人|机器|AI|ai|智能|小智|你是谁|你是人")
# A yes, a no or a "stop" is short. A long message with a question in it ("是不是宝宝当年不用另外交钱，跟着我
# 就能参保？") is a question whatever DIET guessed.
ASKS = re.compile(r"[吗嘛呢？?]|怎么|如何|能不能|可不可以|是不是|多少|哪|什么|几[个天年月次岁]")
SHORT_REPLY = 8
MORE_WORDS = re.compile(r"详细|具体|展开|多说|说说|讲讲|说一下|讲一下|还有呢")


def asks_a_question(text: str) -> bool:
    return len(text.strip()) > SHORT_REPLY and bool(ASKS.search(text))


async def a_question_for_nobody(text: str, tracker: Tracker) -> bool:
    """A question that asks for no person and not about the assistant, and that the answer stage answers:
    what DIET heard as a request for a person or a bot challenge is then a misreading."""
    return asks_a_question(text) and not ABOUT_A_PERSON.search(text) and await knowledge_base_answers(text, tracker)


async def knowledge_base_answers(text: str, tracker: Tracker) -> bool:
    """Whether the hub's answer stage answers this message (the hub computed it as the message arrived,
    and the action's request for it is joined to that: no second computation)."""
    result = await answer_question(text, resident_region(tracker), tracker.get_slot("last_outcome"))
    return result is not None and result.get("outcome") == "answered"


class ActionEscalate(Action):
    """Hand the conversation to a person: the hub queues it for the agent desk."""

    REASONS = {"complain": "utter_escalate_complaint", "urgent": "utter_escalate_urgent"}

    def name(self) -> Text:
        return "action_escalate"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        intent = (tracker.latest_message.get("intent") or {}).get("name")
        text = tracker.latest_message.get("text") or ""
        if intent == "urgent" and not URGENT_WORDS.search(text):
            # DIET hears urgency in stories that only mention a hospital stay ("我妈住院了……钱怎么报"):
            # without a word of an emergency, it is a question, and the knowledge base answers it.
            if not HURRY_WORDS.search(text):
                return await ActionAnswerFromKnowledgeBase().run(dispatcher, tracker, domain)
            if asks_a_question(text) and await knowledge_base_answers(text, tracker):
                return await ActionAnswerFromKnowledgeBase(offer_person=True).run(dispatcher, tracker, domain)
        if intent == "request_human" and await a_question_for_nobody(text, tracker):
            # Asked for nobody: a question DIET heard as a request for a person. It is answered, a person one tap away.
            return await ActionAnswerFromKnowledgeBase(offer_person=True).run(dispatcher, tracker, domain)
        if intent == "complain" and (
            COMPLAINT_CHANNEL_QUESTION.search(text) or (asks_a_question(text) and not ABOUT_THIS_SERVICE.search(text))
        ) and await knowledge_base_answers(text, tracker):
            # "医院乱收费我要投诉，医保的投诉电话是多少？" asks where to complain; "我在休产假，发现单位这两个月没给我交医保，
            # 这对吗" and "医保卡这个月没打钱 是不是停了" are questions DIET hears as complaints. A complaint
            # about this service ("你们客服怎么回事") still goes to a person.
            return await ActionAnswerFromKnowledgeBase().run(dispatcher, tracker, domain)
        message = domain_message(domain, self.REASONS.get(intent, "utter_escalate"))
        message["outcome"] = "escalated"
        dispatcher.utter_message(json_message=message)
        return [SlotSet("failed_turns", 0.0)]


class _QuestionOrReply(Action, abc.ABC):
    """An intent's own reply (``reply``, a domain response), unless the message is a question that DIET
    misread: then the knowledge base answers it. Abstract, so the action server does not register it."""

    reply = ""

    @abc.abstractmethod
    def name(self) -> Text: ...

    @abc.abstractmethod
    async def is_question(self, text: str, tracker: Tracker) -> bool: ...

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        if await self.is_question(tracker.latest_message.get("text") or "", tracker):
            return await ActionAnswerFromKnowledgeBase().run(dispatcher, tracker, domain)
        dispatcher.utter_message(json_message=domain_message(domain, self.reply))
        return []


class _ShortReplyUnlessAsked(_QuestionOrReply, abc.ABC):
    """Intents that are short by nature (a no, a goodbye, a greeting): a long message with a question in it
    is a question whatever DIET guessed."""

    async def is_question(self, text: str, tracker: Tracker) -> bool:
        return asks_a_question(text)


class ActionOutOfScope(_QuestionOrReply):
    """DIET's out-of-scope guess. It is wrong on 医保 questions worded unlike its examples ("老人怎么更换医疗
    卡号", "救护车跨地区转诊收费吗"): the answer stage, which reads every message against the knowledge base,
    decides. Its answer is given when it has one; otherwise the polite decline. On the answer set's dev
    split the answer stage declines every out-of-scope message this guess declined."""

    reply = "utter_out_of_scope"

    def name(self) -> Text:
        return "action_out_of_scope"

    async def is_question(self, text: str, tracker: Tracker) -> bool:
        return await knowledge_base_answers(text, tracker)


class ActionNoOrStop(_ShortReplyUnlessAsked):
    """A no or a stop with nothing pending: "anything else?". A question DIET heard as a no ("我已经交了……
    是不是宝宝当年不用另外交钱？") is answered instead of being told "好的"."""

    reply = "utter_anything_else"

    def name(self) -> Text:
        return "action_no_or_stop"


class ActionGoodbye(_ShortReplyUnlessAsked):
    """A goodbye. DIET hears one in some residents' questions ("俺孙子上大学了，他的医保在哪交" is a goodbye
    to it, 0.71, on the current model), which were told "感谢您的咨询，再见" and left unanswered."""

    reply = "utter_goodbye"

    def name(self) -> Text:
        return "action_goodbye"


class ActionGreet(_ShortReplyUnlessAsked):
    """A greeting; a question DIET heard as one ("不会激活医保码，晚上有人教吗") is answered."""

    reply = "utter_greet"

    def name(self) -> Text:
        return "action_greet"


class ActionBotChallenge(_QuestionOrReply):
    """"Am I talking to a machine?": the assistant says it is one. DIET hears that in some short questions
    ("限定支付范围是什么", 0.49 on the current model), which were told "我是医保小智，一个智能助手" and left
    unanswered: a question that names neither a person nor the assistant and that the knowledge base
    answers is answered."""

    reply = "utter_iamabot"

    def name(self) -> Text:
        return "action_bot_challenge"

    async def is_question(self, text: str, tracker: Tracker) -> bool:
        return await a_question_for_nobody(text, tracker)


class ValidateSlotMappings(ValidationAction):
    """Conversation memory: keeps the resident's insured region as a GB/T 2260 code.

    Runs after every resident message. A city named while asking about cross-region care is the
    destination (the cross-region form takes it), not the insured region, so it is skipped here.
    """

    async def extract_region(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> Dict[Text, Any]:
        message = tracker.latest_message
        intent = (message.get("intent") or {}).get("name")
        in_cross_region = tracker.active_loop.get("name") == "cross_region_form"
        text = message.get("text") or ""
        if intent not in DESTINATION_INTENTS and not in_cross_region:
            place = find_place(text, message.get("entities") or [])
            if place:
                return {"region": place[1]}
        elif "参保" in text:
            # "我是杭州参保的，去上海看病": the place right before 参保 is the insured region
            place = find_place(text[: text.find("参保")][-6:])
            if place:
                return {"region": place[1]}
        if not tracker.get_slot("region"):
            metadata_region = (message.get("metadata") or {}).get("region")
            if metadata_region:
                return {"region": str(metadata_region)}
        return {}
