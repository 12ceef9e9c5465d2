"""Custom actions of the Rasa action server (rasa_sdk, runs in .venv-rasa on Python 3.10).

The knowledge base lives in the hub (Python 3.11, torch); actions reach it over HTTP at
``XIAOZHI_HUB_URL``. Each reply is sent as one custom payload holding the written text, the
spoken form for the phone, the cited entries and the outcome the hub records.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Text

import aiohttp
from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

log = logging.getLogger(__name__)

HUB_URL = os.environ.get("XIAOZHI_HUB_URL", "http://127.0.0.1:8000").rstrip("/")
KB_TIMEOUT = aiohttp.ClientTimeout(total=float(os.environ.get("XIAOZHI_ACTIONS_KB_TIMEOUT_S", "5")))

CLARIFY_TEXT = "我不太确定您想问的是哪一个，您可以点选或者说出下面的问题："
CLARIFY_SPOKEN = "我没太听明白。您想问的是{options}，还是别的问题？"
NO_ANSWER_TEXT = "抱歉，这个问题我暂时回答不了。您可以换个说法再问一次，或者说“转人工”由工作人员为您解答。"
NO_ANSWER_SPOKEN = "抱歉，这个问题我暂时回答不了。您可以换个说法，或者说转人工。"
ESCALATE_TEXT = "好的，正在为您转接人工客服，请稍候。您前面说的内容工作人员都能看到，不用再重复。"
ESCALATE_SPOKEN = "好的，正在为您转接人工，请稍候。"
AFTER_FAILURES_TEXT = "抱歉，没能帮您解决问题。我已为您转接人工客服，请稍候，您前面说的内容工作人员都能看到。"
AFTER_FAILURES_SPOKEN = "抱歉没能帮到您，正在为您转接人工，请稍候。"
KB_DOWN_TEXT = "抱歉，政策知识库暂时无法访问。您可以稍后再问，或者说“转人工”由工作人员为您解答。"


def resident_region(tracker: Tracker) -> Optional[str]:
    """The region known for this conversation: a slot once asked, else the channel's metadata."""
    region = tracker.get_slot("region")
    if region:
        return str(region)
    metadata = tracker.latest_message.get("metadata") or {}
    return metadata.get("region") or None


async def search_knowledge_base(question: str, region: Optional[str]) -> Optional[Dict[str, Any]]:
    params = {"q": question[:500], "k": "3"}
    if region:
        params["region"] = region
    try:
        async with aiohttp.ClientSession(timeout=KB_TIMEOUT) as session:
            async with session.get(f"{HUB_URL}/api/kb/search", params=params) as response:
                if response.status != 200:
                    log.error("knowledge-base search answered HTTP %s", response.status)
                    return None
                return await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.error("knowledge-base search failed: %s", exc)
        return None


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
                json_message={"text": KB_DOWN_TEXT, "spoken": NO_ANSWER_SPOKEN, "outcome": "abstained"}
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
                    "spoken": answer["spoken"],
                    "steps": answer.get("steps") or [],
                    "citations": [answer["citation"]],
                    "outcome": "answered",
                    "search": search_meta,
                }
            )
            return [SlotSet("failed_turns", 0.0), SlotSet("last_topic", answer["citation"]["topic"])]

        if failed >= 1:
            # Two failures in a row: a person takes over before the resident gives up.
            dispatcher.utter_message(
                json_message={
                    "text": AFTER_FAILURES_TEXT,
                    "spoken": AFTER_FAILURES_SPOKEN,
                    "outcome": "escalated",
                    "search": search_meta,
                }
            )
            return [SlotSet("failed_turns", 0.0)]

        options = [r["title"] for r in result.get("results", [])[:3]]
        if options and (result.get("confidence") or 0) > 0.05:
            dispatcher.utter_message(
                json_message={
                    "text": CLARIFY_TEXT,
                    "spoken": CLARIFY_SPOKEN.format(options="、".join(options[:2])),
                    "buttons": [{"title": o, "payload": o} for o in options] + [{"title": "转人工", "payload": "转人工"}],
                    "outcome": "clarifying",
                    "search": search_meta,
                }
            )
        else:
            dispatcher.utter_message(
                json_message={
                    "text": NO_ANSWER_TEXT,
                    "spoken": NO_ANSWER_SPOKEN,
                    "buttons": [{"title": "转人工", "payload": "转人工"}],
                    "outcome": "abstained",
                    "search": search_meta,
                }
            )
        return [SlotSet("failed_turns", failed + 1)]


class ActionEscalate(Action):
    """Hand the conversation to a person: the hub queues it for the agent desk."""

    def name(self) -> Text:
        return "action_escalate"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]
    ) -> List[Dict[Text, Any]]:
        dispatcher.utter_message(
            json_message={"text": ESCALATE_TEXT, "spoken": ESCALATE_SPOKEN, "outcome": "escalated"}
        )
        return [SlotSet("failed_turns", 0.0)]
