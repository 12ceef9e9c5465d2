"""Single-turn actions of the Rasa action server (rasa_sdk, runs in .venv-rasa on Python 3.10).

The knowledge base lives in the hub (Python 3.11, torch); actions reach it over HTTP at
``XIAOZHI_HUB_URL``. Each reply is sent as one custom payload holding the written text, the
spoken form for the phone, the cited entries and the outcome the hub records. The guided
procedures (forms) live in bot/actions/forms.py.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Text

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.forms import ValidationAction

from .kb import search_knowledge_base
from .messages import domain_message
from .regions import find_place
from .voice import voice_fit

log = logging.getLogger(__name__)

CLARIFY_TEXT = "我不太确定您想问的是哪一个，您可以点选或者说出下面的问题："
CLARIFY_SPOKEN = "我没太听明白。您想问的是{options}，还是别的问题？"
NO_ANSWER_TEXT = "抱歉，这个问题我暂时回答不了。您可以换个说法再问一次，或者说“转人工”由工作人员为您解答。"
NO_ANSWER_SPOKEN = "抱歉，这个问题我暂时回答不了。您可以换个说法，或者说转人工。"
KB_DOWN_TEXT = "抱歉，政策知识库暂时无法访问。您可以稍后再问，或者说“转人工”由工作人员为您解答。"
HUMAN_BUTTON = {"title": "转人工", "payload": "/request_human"}

# A city named in these contexts is where the resident goes, not where they are insured.
DESTINATION_INTENTS = {"ask_cross_region", "ask_cross_region_settlement", "ask_referral"}


def resident_region(tracker: Tracker) -> Optional[str]:
    """The region known for this conversation: a slot once known, else the channel's metadata."""
    region = tracker.get_slot("region")
    if region:
        return str(region)
    metadata = tracker.latest_message.get("metadata") or {}
    return metadata.get("region") or None


class ActionAnswerFromKnowledgeBase(Action):
    """Answer from the best knowledge-base entry, or ask which of the closest entries was meant."""

    def name(self) -> Text:
        return "action_answer_from_kb"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        question = tracker.latest_message.get("text") or ""
        region = resident_region(tracker)
        failed = float(tracker.get_slot("failed_turns") or 0)
        result = await search_knowledge_base(question, region)
        if result is None:
            dispatcher.utter_message(
                json_message={"text": KB_DOWN_TEXT, "spoken": NO_ANSWER_SPOKEN, "outcome": "abstained",
                              "buttons": [HUMAN_BUTTON]}
            )
            return [SlotSet("failed_turns", failed + 1)]
        search_meta = {
            "confidence": result.get("confidence"),
            "abstain": result.get("abstain"),
            "candidates": [r["id"] for r in result.get("results", [])],
        }
        answer = result.get("answer")
        if answer and not result.get("abstain"):
            dispatcher.utter_message(
                json_message={
                    "text": answer["answer"],
                    "spoken": voice_fit(answer["spoken"]),
                    "steps": answer.get("steps") or [],
                    "citations": [answer["citation"]],
                    "outcome": "answered",
                    "search": search_meta,
                    "kb_confidence": result.get("confidence"),
                }
            )
            return [SlotSet("failed_turns", 0.0), SlotSet("last_topic", answer["citation"]["topic"])]

        if failed >= 1:
            # Two failures in a row: a person takes over before the resident gives up.
            message = domain_message(domain, "utter_escalate_after_failures")
            message["search"] = search_meta
            dispatcher.utter_message(json_message=message)
            return [SlotSet("failed_turns", 0.0)]

        options = [r["title"] for r in result.get("results", [])[:3]]
        if options and (result.get("confidence") or 0) > 0.05:
            dispatcher.utter_message(
                json_message={
                    "text": CLARIFY_TEXT,
                    "spoken": voice_fit(CLARIFY_SPOKEN.format(options="、还是".join(options[:2]))),
                    "buttons": [{"title": o, "payload": o} for o in options] + [HUMAN_BUTTON],
                    "outcome": "clarifying",
                    "search": search_meta,
                }
            )
        else:
            dispatcher.utter_message(
                json_message={
                    "text": NO_ANSWER_TEXT,
                    "spoken": NO_ANSWER_SPOKEN,
                    "buttons": [HUMAN_BUTTON],
                    "outcome": "abstained",
                    "search": search_meta,
                }
            )
        return [SlotSet("failed_turns", failed + 1)]


class ActionEscalate(Action):
    """Hand the conversation to a person: the hub queues it for the agent desk."""

    REASONS = {"complain": "utter_escalate_complaint", "urgent": "utter_escalate_urgent"}

    def name(self) -> Text:
        return "action_escalate"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        intent = (tracker.latest_message.get("intent") or {}).get("name")
        message = domain_message(domain, self.REASONS.get(intent, "utter_escalate"))
        message["outcome"] = "escalated"
        dispatcher.utter_message(json_message=message)
        return [SlotSet("failed_turns", 0.0)]


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
