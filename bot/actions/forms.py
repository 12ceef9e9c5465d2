"""Guided procedures (网办指导): e-voucher activation, cross-region filing, reimbursement.

Each procedure is a Rasa form. Its FormValidationAction fills the form's slots from entities,
falling back to keywords for speech-recognition noise, so answers given early (in the first
message) are accepted and only missing slots are asked. The ask actions add a short
knowledge-base introduction on the procedure's first turn; the summary actions assemble the
steps from knowledge-base entries and send them as text, spoken form and checklist.
Questions and hand-over wording live in domain.yml; policy content comes from the KB.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Text

from rasa_sdk import Action, FormValidationAction, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.types import DomainDict

from yibao_common.places import CODE_NAMES, RELATIONS, find_keyword, find_place, same_province

from .actions import KB_DOWN_TEXT, NO_ANSWER_SPOKEN, resident_region
from .kb import get_entry
from .messages import checklist_payload, domain_message, numbered
from .vocabulary import CHANNELS, INSURANCE_TYPES, LONG_TERM, PERSON_CATEGORIES, TREATMENTS, entity_values, normalise
from .voice import voice_fit

log = logging.getLogger(__name__)

FORM_TRIGGERS = {
    "ev_activation_form": "ask_e_voucher",
    "cross_region_form": "ask_cross_region",
    "reimbursement_form": "ask_reimbursement",
}
# Slots a finished procedure clears so it can be run again; region, insurance type and relation
# are conversation memory and stay.
PROCEDURE_SLOTS = {
    "ev_activation_form": ["ev_for", "ev_channel"],
    "cross_region_form": ["cr_category", "cr_destination"],
    "reimbursement_form": ["reimb_scenario"],
}


def _intent(tracker: Tracker) -> Optional[str]:
    return (tracker.latest_message.get("intent") or {}).get("name")


def _may_read_keywords(tracker: Tracker, slot: str, form: str) -> bool:
    """Keywords count only when the resident is answering this slot or starting the procedure.

    Otherwise a side question ("微信能交医保吗") would silently fill a slot of the form.
    """
    return tracker.get_slot("requested_slot") == slot or _intent(tracker) in (FORM_TRIGGERS[form], "inform", "request_guidance")


# An urgent or angry message is not an answer even if it names a slot value ("正在抢救" is not
# the reimbursement scenario 急诊): the form rejects it and the rules hand over to a person.
HANDOVER_INTENTS = {"urgent", "complain", "request_human", "stop"}


def _guided_text(tracker: Tracker) -> str:
    """The message to read answers from; when the resident has just asked to be walked through, also
    the question before it ("我退休了要去海南长住，怎么备案" then "一步步带我办": nothing is asked again)."""
    text = tracker.latest_message.get("text") or ""
    if _intent(tracker) == "request_guidance" and tracker.get_slot("last_question"):
        text = str(tracker.get_slot("last_question")) + "，" + text
    return text


def _extract(tracker: Tracker, slot: str, form: str, entity: str, table: Dict[str, List[str]],
             keywords_first: bool = False) -> Dict[Text, Any]:
    if _intent(tracker) in HANDOVER_INTENTS:
        return {}
    message = tracker.latest_message
    text = _guided_text(tracker)
    from_entity = next(
        (v for v in (normalise(x, table) for x in entity_values(message.get("entities") or [], entity)) if v), None
    )
    from_keywords = find_keyword(text, table) if _may_read_keywords(tracker, slot, form) else None
    value = (from_keywords or from_entity) if keywords_first else (from_entity or from_keywords)
    return {slot: value} if value else {}


def _choice(slot: str, slot_value: Any, table: Dict[str, List[str]], dispatcher: CollectingDispatcher,
            domain: DomainDict) -> Dict[Text, Any]:
    """The canonical value of a listed choice, or None after telling the resident it was not understood."""
    value = normalise(slot_value, table)
    if value is None:
        dispatcher.utter_message(json_message=domain_message(domain, "utter_prompt_invalid"))
    return {slot: value}


class ValidateEvActivationForm(FormValidationAction):
    def name(self) -> Text:
        return "validate_ev_activation_form"

    async def extract_ev_for(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _extract(tracker, "ev_for", "ev_activation_form", "relation", RELATIONS)

    async def extract_ev_channel(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _extract(tracker, "ev_channel", "ev_activation_form", "channel", CHANNELS)

    def validate_ev_for(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        chosen = _choice("ev_for", slot_value, RELATIONS, dispatcher, domain)
        # the relation is remembered for the rest of the conversation (e.g. a later reimbursement)
        return {**chosen, "relation": chosen["ev_for"]} if chosen["ev_for"] else chosen

    def validate_ev_channel(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _choice("ev_channel", slot_value, CHANNELS, dispatcher, domain)


class ValidateCrossRegionForm(FormValidationAction):
    def name(self) -> Text:
        return "validate_cross_region_form"

    async def extract_cr_category(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _extract(tracker, "cr_category", "cross_region_form", "person_category", PERSON_CATEGORIES)

    async def extract_cr_destination(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        if _intent(tracker) in HANDOVER_INTENTS or not _may_read_keywords(tracker, "cr_destination", "cross_region_form"):
            return {}
        message = tracker.latest_message
        text = _guided_text(tracker)
        place = find_destination(text, message.get("entities") or [])
        if place:
            return {"cr_destination": place}
        if tracker.get_slot("requested_slot") == "cr_destination" and 0 < len(text) <= 12 and _intent(tracker) in ("inform", "nlu_fallback"):
            # a place we have no code for ("老家", "女儿那边") is still an answer
            return {"cr_destination": text.strip("去到在。，. ")}
        return {}

    def validate_cr_category(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _choice("cr_category", slot_value, PERSON_CATEGORIES, dispatcher, domain)

    def validate_cr_destination(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return {"cr_destination": str(slot_value).strip() or None}


def find_destination(text: str, entities: List[dict]) -> Optional[str]:
    """The place the resident goes to: not one followed by 参保 (that is where they are insured)."""
    for offset in range(len(text)):
        place = find_place(text[offset:], entities if offset == 0 else [])
        if place is None:
            return None
        name = place[0]
        at = text.find(name, offset)
        if at < 0:  # came from an entity only
            return name
        if "参保" in text[at + len(name): at + len(name) + 3] or "医保" in text[at + len(name): at + len(name) + 2]:
            offset = at + len(name)
            rest = find_place(text[offset:])
            return rest[0] if rest else None
        return name
    return None


class ValidateReimbursementForm(FormValidationAction):
    def name(self) -> Text:
        return "validate_reimbursement_form"

    async def required_slots(self, domain_slots: List[Text], dispatcher: CollectingDispatcher,
                             tracker: Tracker, domain: DomainDict) -> List[Text]:
        # Outpatient rules differ by insurance type; other scenarios do not need it.
        if tracker.get_slot("reimb_scenario") == "门诊":
            return domain_slots + ["insurance_type"]
        return domain_slots

    async def extract_reimb_scenario(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        # keywords first: "在外地住院" is an out-of-region claim although 住院 is the entity
        return _extract(tracker, "reimb_scenario", "reimbursement_form", "treatment_type", TREATMENTS, keywords_first=True)

    async def extract_insurance_type(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        if tracker.get_slot("requested_slot") != "insurance_type":
            return {}
        value = find_keyword(tracker.latest_message.get("text") or "", INSURANCE_TYPES)
        return {"insurance_type": value} if value else {}

    def validate_reimb_scenario(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return _choice("reimb_scenario", slot_value, TREATMENTS, dispatcher, domain)

    def validate_insurance_type(self, slot_value: Any, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict) -> Dict[Text, Any]:
        return {"insurance_type": normalise(slot_value, INSURANCE_TYPES)}


# --- asking ---------------------------------------------------------------------------------

class AskWithIntroduction(Action, ABC):
    """Ask a form's question; on the procedure's first turn, answer the general question first.

    Residents who ask "医保电子凭证怎么激活" get the overview at once (with its source), and the
    offer to be guided step by step, in one message — one reply per turn on the phone.
    """

    slot = ""
    form = ""
    prompt = ""

    intro: Optional[str] = None  # the KB entry introducing the procedure

    async def intro_entry(self, tracker: Tracker) -> Optional[str]:
        """The KB entry introducing the procedure, or None."""
        return self.intro

    def name(self) -> Text:
        return f"action_ask_{self.slot}"

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]) -> List[Dict[Text, Any]]:
        message = domain_message(domain, self.prompt)
        entry_id = await self.intro_entry(tracker) if _intent(tracker) == FORM_TRIGGERS.get(self.form) else None
        entry = await get_entry(entry_id, resident_region(tracker)) if entry_id else None
        if entry:
            message.update(
                text=entry["answer"].strip() + "\n\n" + message["text"],
                spoken=voice_fit(entry["spoken"]) + message["spoken"],
                citations=[entry["citation"]],
                outcome="answered",
            )
        dispatcher.utter_message(json_message=message)
        return []


class ActionAskEvFor(AskWithIntroduction):
    slot, form, prompt = "ev_for", "ev_activation_form", "utter_prompt_ev_for"
    intro = "ev-activate"


class ActionAskEvChannel(AskWithIntroduction):
    slot, form, prompt = "ev_channel", "ev_activation_form", "utter_prompt_ev_channel"

    async def intro_entry(self, tracker: Tracker) -> Optional[str]:
        return "ev-activate" if tracker.get_slot("ev_for") in (None, "本人") else "ev-family-add"


class ActionAskCrCategory(AskWithIntroduction):
    slot, form, prompt = "cr_category", "cross_region_form", "utter_prompt_cr_category"
    intro = "cr-file-online"


class ActionAskCrDestination(AskWithIntroduction):
    slot, form, prompt = "cr_destination", "cross_region_form", "utter_prompt_cr_destination"
    intro = "cr-file-online"


class ActionAskReimbScenario(AskWithIntroduction):
    slot, form, prompt = "reimb_scenario", "reimbursement_form", "utter_prompt_reimb_scenario"
    intro = "re-manual-when"


class ActionAskInsuranceType(AskWithIntroduction):
    slot, form, prompt = "insurance_type", "reimbursement_form", "utter_prompt_insurance_type"


# --- summarising ----------------------------------------------------------------------------

class SummarizeProcedure(Action, ABC):
    """Assemble a finished procedure's steps from knowledge-base entries and send the checklist."""

    form = ""

    @abstractmethod
    def name(self) -> Text:
        """The action's name."""

    def reset(self) -> List[Dict[Text, Any]]:
        return [SlotSet(s, None) for s in PROCEDURE_SLOTS[self.form]] + [SlotSet("failed_turns", 0.0)]

    async def entries(self, ids: List[str], region: Optional[str]) -> Optional[List[Dict[str, Any]]]:
        found = [await get_entry(i, region) for i in ids]
        return None if any(e is None for e in found) else found

    def kb_down(self, dispatcher: CollectingDispatcher) -> List[Dict[Text, Any]]:
        dispatcher.utter_message(json_message={"text": KB_DOWN_TEXT, "spoken": NO_ANSWER_SPOKEN, "outcome": "abstained",
                                               "buttons": [{"title": "转人工", "payload": "/request_human"}]})
        return self.reset()


class ActionSummarizeEvActivation(SummarizeProcedure):
    form = "ev_activation_form"
    BY_CHANNEL = {"微信": "ev-activate-wechat", "支付宝": "ev-activate-alipay",
                  "银行APP": "ev-activate-bank", "国家医保服务平台APP": "ev-activate"}

    def name(self) -> Text:
        return "action_summarize_ev_activation"

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]) -> List[Dict[Text, Any]]:
        who = tracker.get_slot("ev_for") or "本人"
        channel = tracker.get_slot("ev_channel") or "国家医保服务平台APP"
        region = resident_region(tracker)
        family = who != "本人"
        entry_id = "ev-family-add" if family else self.BY_CHANNEL.get(channel, "ev-activate")
        found = await self.entries([entry_id], region)
        if not found:
            return self.kb_down(dispatcher)
        entry = found[0]
        steps = list(entry.get("steps") or [])
        if entry_id == "ev-activate":
            # the overview lists every channel; keep the one chosen and the closing step
            chosen = [s for s in steps if "国家医保服务平台" in s]
            steps = chosen + [s for s in steps[-1:] if s not in chosen] if chosen else steps
        if family:
            title = f"给{who}添加医保亲情账户"
            header = f"好的，帮您{title}（您选择了{channel}），按下面的步骤办："
            spoken = f"好的，给{who}添加亲情账户的步骤已经发给您了。" + entry["spoken"]
        else:
            title = f"用{channel}激活医保电子凭证"
            header = f"好的，{title}，按下面的步骤办："
            spoken = f"好的，{title}的步骤已经发给您了。" + entry["spoken"]
        text = numbered(header, steps) + "\n如果选错了，直接告诉我重新来。"
        dispatcher.utter_message(json_message=checklist_payload(title, text, spoken, steps, [entry["citation"]], region))
        return self.reset()


class ActionSummarizeCrossRegion(SummarizeProcedure):
    form = "cross_region_form"
    WHO = {"异地安置退休": "cr-long-term-who", "异地长期居住": "cr-long-term-who", "常驻异地工作": "cr-long-term-who",
           "异地转诊": "rf-cross-region", "急诊抢救": "rf-emergency", "其他临时外出": "cr-temporary-who"}

    def name(self) -> Text:
        return "action_summarize_cross_region"

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]) -> List[Dict[Text, Any]]:
        category = tracker.get_slot("cr_category") or "其他临时外出"
        destination = tracker.get_slot("cr_destination") or "外地"
        region = resident_region(tracker)
        dest_place = find_place(destination)
        within_province = bool(dest_place) and same_province(region, dest_place[1])
        how_id = "cr-intra-province" if within_province else "cr-file-online"
        found = await self.entries([self.WHO.get(category, "cr-temporary-who"), how_id, "cr-materials", "cr-validity", "cr-late-filing"], region)
        if not found:
            return self.kb_down(dispatcher)
        who, how, materials, validity, late = found
        kind = "长期" if category in LONG_TERM else "临时"
        steps = [f"您的情况（{category}，属于{kind}外出）：{who['spoken']}"]
        steps += list(how.get("steps") or [how["spoken"]])
        steps += [f"要准备：{materials['spoken']}", f"有效期：{validity['spoken']}", f"已经出院了怎么办：{late['spoken']}"]
        title = f"异地就医备案：{category}，去{destination}"
        home = CODE_NAMES.get(region or "", "")
        header = f"好的，{('您在' + home + '参保，') if home else ''}按{category}去{destination}就医，备案要点如下："
        text = numbered(header, steps) + "\n如果情况不对，直接告诉我重新来。"
        spoken = f"好的，{category}去{destination}的备案清单已经发给您了。{how['spoken']}"
        citations = [e["citation"] for e in (who, how, materials, validity, late)]
        dispatcher.utter_message(json_message=checklist_payload(title, text, spoken, steps, citations, region))
        return self.reset()


class ActionSummarizeReimbursement(SummarizeProcedure):
    form = "reimbursement_form"
    SCENARIO = {"住院": "re-inpatient-process", "异地就医": "cr-paid-in-full", "急诊": "rf-emergency",
                "门诊慢特病": "cd-benefit"}

    def name(self) -> Text:
        return "action_summarize_reimbursement"

    def scenario_entry(self, scenario: str, insurance_type: Optional[str]) -> str:
        if scenario == "门诊":
            return "re-outpatient-resident" if insurance_type == "城乡居民医保" else "re-outpatient-employee"
        return self.SCENARIO.get(scenario, "re-manual-when")

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: Dict[Text, Any]) -> List[Dict[Text, Any]]:
        scenario = tracker.get_slot("reimb_scenario") or "住院"
        insurance_type = tracker.get_slot("insurance_type")
        region = resident_region(tracker)
        ids = [self.scenario_entry(scenario, insurance_type), "re-manual-materials", "re-where-submit", "re-payment-time"]
        found = await self.entries(ids, region)
        if not found:
            return self.kb_down(dispatcher)
        first, materials, where, when = found
        steps = [f"{scenario}费用怎么报：{first['spoken']}"]
        steps += list(materials.get("steps") or [materials["spoken"]])
        steps += [f"交到哪里、怎么交：{where['spoken']}", f"多久到账：{when['spoken']}"]
        label = f"{scenario}（{insurance_type}）" if scenario == "门诊" and insurance_type else scenario
        title = f"{label}费用报销"
        text = numbered(f"好的，{label}费用的报销办法如下：", steps) + "\n如果情况不对，直接告诉我重新来。"
        spoken = f"好的，{scenario}报销的清单已经发给您了。{first['spoken']}材料、交到哪里、多久到账，都在清单里。"
        citations = [e["citation"] for e in found]
        dispatcher.utter_message(json_message=checklist_payload(title, text, spoken, steps, citations, region))
        return self.reset()
