"""What a resident's message asks, and what its story tells.

Residents rarely send a clean question: "我妈在老家住院了，没办备案，现在出院了，钱怎么报？" tells a story
and then asks. Retrieval on the whole story finds the area; the answer must fit the question and the
sub-case the story describes (discharged, not filed). This module reduces a message to the
question(s) it asks, with the clauses that qualify them, and reads the case slots of the story
(schema.CASE_SLOTS) and the places it names. Standard library only, deterministic, no model.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from yibao_common.places import CODE_NAMES, REGION_CODES, RELATIONS, find_keyword, without_false_places

# A clause asks something when it holds one of these (or ends with a question mark).
QUESTION_MARKERS = re.compile(
    r"吗|呢|怎么|怎样|咋|如何|能否|能不能|可不可以|可否|是否|要不要|用不用|需不需要|会不会|有没有|"
    r"算不算|行不行|对不对|多少|多久|多长|几[个天年月次岁号名人种家类项]|哪些|哪里|哪儿|哪个|哪家|哪|"
    r"什么|啥|为什么|为啥|怎么办|[?？]"
)
# Asking for an amount, a count or a time: the answer must carry the figure.
QUANTITY_MARKERS = re.compile(r"多少|几[个天年月次岁号名人种家类项位]?|多久|多长|多大|比例|起付线|封顶|标准|期限|上限")
_CLAUSE_SPLIT = re.compile(r"(?<=[，,。！!？?；;：:\n])")
SENTENCE_END = "。！!？?；;\n"
_EMOJI_AND_SYMBOLS = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200B-\u200D\u2060\uFEFF]")

# Story facts -> case slots (schema.CASE_SLOTS). First match in each table wins, in table order.
CASE_CUES: dict[str, list[tuple[str, re.Pattern]]] = {
    "stage": [
        ("已出院", re.compile(r"出院了|出院后|出院以后|已经出院|出了院|出院回来|办完出院|已出院|出院结算了")),
        ("住院中", re.compile(r"正在住院|住院中|还在住院|住着院|现在住院|住院了|在住院|要住院|准备住院|住进")),
        ("未就医", re.compile(r"还没看病|准备去看|打算去|要去.{0,6}看病|去之前")),
    ],
    "filed": [
        ("未备案", re.compile(r"没备案|未备案|没有备案|没办备案|没来得及备案|忘了备案|不知道要备案|没去备案|没做备案")),
        ("已备案", re.compile(r"备案了|已备案|办了备案|已经备案|备过案|做了备案|备案好了")),
    ],
    "insurance": [
        ("职工", re.compile(r"职工医保|职工保险|单位[交缴买]|公司[交缴买]|职工|城职")),
        ("居民", re.compile(r"居民医保|城乡居民|新农合|农村合作|农合|居民|农村医[保疗]|城居")),
    ],
    "scope": [
        ("跨省", re.compile(r"跨省|外省|省外|出省")),
        ("省内", re.compile(r"省内|本省")),
    ],
    "person": [
        ("新生儿", re.compile(r"新生儿|刚出生|刚生的|宝宝出生|孩子出生|新生宝宝")),
        ("学生", re.compile(r"大学生|学生|上学|读书|在校")),
        ("灵活就业", re.compile(r"灵活就业|个体户|自由职业|打零工")),
        ("退休", re.compile(r"退休")),
        ("军人", re.compile(r"军人|退役|部队")),
        ("外地户籍", re.compile(r"外地户口|外地户籍|非本地户籍|户口不在")),
        ("儿童", re.compile(r"孩子|小孩|儿童|儿子|女儿")),
        ("老人", re.compile(r"老人|老年|岁数大|上了年纪")),
    ],
    "channel": [
        ("线上", re.compile(r"网上|线上|手机上|APP|app|小程序|微信|支付宝")),
        ("线下", re.compile(r"窗口|线下|柜台|大厅|现场")),
    ],
}

# Where a named place stands in the story: the resident's insurance, or where they go for care.
_INSURED_AFTER = re.compile(
    r"^(?:市|省)?(?:老家)?(?:的)?(?:(?:参加|参|交|缴|买|上|办)[了的]?)?(?:的)?(?:职工|居民|城乡居民)?"
    r"(?:医保|社保|参保|医疗保险|新农合|合作医疗|农合|交的|缴的|买的|上的|退休)")
# "参保在杭州", "医保是温州的", "新农合在河南": the insurance named before the place; not "医保在杭州看病",
# where the place is where care happens.
_INSURED_BEFORE = re.compile(r"(?:参保|医保|社保|新农合|农合|保险|关系)(?:地)?(?:是|在|属于)$")
_CARE_AFTER = re.compile(r"^(?:市|省)?(?:的)?(?:看|住院|就医|就诊|治|买药|开药|报销|刷|能|可以|可不可以|用|使用)")
_DESTINATION_BEFORE = re.compile(r"(?:去|到|在|来|回|赴|往)$")
_CLAUSE_END = re.compile(r"[，,。！!？?；;：:\s]")


# Questions for another agency: declined politely with who answers them. A "strong" domain is
# declined even when the message also names 医保 ("单位不认定工伤，让我走医保"); the others only when
# nothing in the message is about medical insurance.
_MEDICAL_INSURANCE = re.compile(
    r"医保|医疗保险|医疗保障|报销|备案|参保|医保卡|社保卡|医保码|电子凭证|门诊|住院|生育保险|生育津贴|"
    r"慢特病|慢病|定点|统筹|个人账户|家庭共济|大病保险|新农合|合作医疗|12393"
)


@dataclass(frozen=True)
class OtherAgency:
    name: str
    pattern: re.Pattern
    referral: str
    strong: bool = False


OTHER_AGENCIES = (
    OtherAgency("工伤", re.compile(r"工伤"), "工伤认定和工伤保险待遇由人力资源社会保障部门负责，可以拨打12333咨询。", True),
    OtherAgency("公积金", re.compile(r"公积金"), "住房公积金的问题请咨询当地住房公积金管理中心，热线12329。", True),
    OtherAgency("个税", re.compile(r"个人所得税|个税|专项附加扣除|抵税"), "个人所得税的问题请咨询税务部门，热线12366。", True),
    OtherAgency("交通", re.compile(r"驾照|驾驶证|交管|12123|扣分|违章|限行|车牌|科目[一二三四]|科[一二三四]"),
                "交通和驾驶证的问题请咨询公安交管部门，或者使用交管12123。", True),
    OtherAgency("养老失业", re.compile(r"养老金|养老保险|退休金|退休工资|失业金|失业保险|社保基数"),
                "养老保险、失业保险的问题由人力资源社会保障部门负责，可以拨打12333咨询。"),
    OtherAgency("看病问诊", re.compile(r"发烧|发热|咳嗽|嗓子疼|头疼|肚子疼|吃什么药|吃药好|抗生素|退烧药|病情|症状|挂哪个科"),
                "身体不舒服请及时就医、听从医生的意见；紧急情况请拨打120。"),
    OtherAgency("生育补贴", re.compile(r"育儿补贴|二胎补贴|三孩补贴|二孩补贴|生育补贴"),
                "育儿补贴由卫生健康等部门发放，请拨打12345政务服务热线咨询当地办法。"),
    OtherAgency("户籍住房", re.compile(r"落户|户口迁|居住证|公租房|廉租房|人才房"), "户籍、居住证和住房的问题请拨打12345政务服务热线咨询。"),
    OtherAgency("出行天气", re.compile(r"天气|下雨|售票|火车票|高铁|公交卡|老年卡|地铁"), "这类生活服务的问题请拨打12345政务服务热线咨询。"),
)


def other_agency(text: str) -> OtherAgency | None:
    """The agency a message belongs to when it is not about medical insurance."""
    about_us = bool(_MEDICAL_INSURANCE.search(text))
    for agency in OTHER_AGENCIES:
        if agency.pattern.search(text) and (agency.strong or not about_us):
            return agency
    return None


@dataclass
class Place:
    name: str
    code: str
    role: str  # "insured" | "destination" | "mentioned"


@dataclass
class ParsedMessage:
    text: str  # the message, cleaned (emoji and zero-width characters removed)
    questions: list[str]  # what it asks, each with the clauses that qualify it; at least one if text
    case: dict[str, str] = field(default_factory=dict)
    relation: str | None = None  # who the story is about (本人/父母/子女/配偶)
    places: list[Place] = field(default_factory=list)

    @property
    def is_story(self) -> bool:
        """Told before asked: the message says much more than its asking clauses."""
        return len(self.text) > 30 and len(self.text) > sum(len(core_question(q)) for q in self.questions) + 8

    def asks_quantity(self, question: str) -> bool:
        return bool(QUANTITY_MARKERS.search(question))


_OPENERS = re.compile(r"^(?:(?:你好|您好|小智|医保小智|请问一下|请问|我想问一下|我想问问|想问一下|问一下|咨询一下|我想咨询一下|麻烦问一下)[，,。！!：:\s]*)+")


def clean(text: str) -> str:
    """Emoji, zero-width and control characters out; full-width ASCII folded; spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "")
    text = _EMOJI_AND_SYMBOLS.sub("", text)
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C" or c == "\n")
    text = re.sub(r"[ \t\u3000]+", " ", text).strip()
    return _OPENERS.sub("", text) or text


def has_words(text: str) -> bool:
    """Something to answer: at least two Chinese characters, or a Latin word of three letters."""
    return len(re.findall(r"[\u3400-\u9fff]", text)) >= 2 or bool(re.search(r"[A-Za-z]{3,}", text))


def split_clauses(text: str) -> list[str]:
    return [c for c in (part.strip() for part in _CLAUSE_SPLIT.split(text)) if c]


def _asks(clause: str) -> bool:
    return bool(QUESTION_MARKERS.search(clause))


def extract_questions(text: str, *, limit: int = 2) -> list[str]:
    """The question(s) a message asks, each with the non-question clauses of its own sentence before it.

    "我妈在老家住院了，没办备案，现在出院了，钱怎么报？" -> ["我妈在老家住院了，没办备案，现在出院了，钱怎么报？"]
    (one sentence: the story qualifies the question); "补卡要几天？补卡收钱吗？" -> two questions.
    A message without a question clause is one question (a keyword such as "异地备案").
    """
    clauses = split_clauses(text)
    if not clauses:
        return []
    questions: list[str] = []
    context: list[str] = []
    for clause in clauses:
        if _asks(clause):
            # A question clause right after another one in the same sentence is a second question
            # only if it is long enough to stand alone ("补卡要几天，收钱吗" -> one question).
            if questions and not context and len(clause.strip("，,。？?！! ")) < 5:
                questions[-1] += clause
            else:
                questions.append("".join(context) + clause)
            context = []
        else:
            context.append(clause)
        if clause[-1] in SENTENCE_END:
            context = [] if questions else context
    if not questions:
        return [text]
    if context and questions:  # trailing words after the last question ("…怎么办，急用") belong to it
        questions[-1] += "".join(context)
    if len(questions) > limit:
        questions = questions[: limit - 1] + ["".join(questions[limit - 1:])]
    return [q.rstrip("，,、 ") for q in questions]


def core_question(question: str) -> str:
    """The asking clause(s) alone, without the story before them (for the precise-answer ranking)."""
    clauses = split_clauses(question)
    asking = [c for c in clauses if _asks(c)]
    if not asking:
        return question
    first = clauses.index(asking[0])
    # Keep one clause of context when the asking clause is too short to mean anything alone
    # ("钱怎么报？" needs "现在出院了").
    start = first - 1 if first > 0 and len(asking[0]) < 8 else first
    return "".join(clauses[start:])


def read_case(text: str) -> dict[str, str]:
    case: dict[str, str] = {}
    for slot, cues in CASE_CUES.items():
        for value, pattern in cues:
            if pattern.search(text):
                case[slot] = value
                break
    if case.get("stage") == "住院中" and CASE_CUES["stage"][0][1].search(text):
        case["stage"] = "已出院"  # "住院了……现在出院了": the later state is the one that matters
    return case


_PLACE_NAMES = re.compile("|".join(re.escape(n) for n in sorted(REGION_CODES, key=len, reverse=True)))


def read_places(text: str) -> list[Place]:
    """Places the message names, in order, with the role the words around each give it (one
    pattern, longest name first at each position: "吉林市" is the city, "吉林" the province)."""
    found: list[Place] = []
    for match in _PLACE_NAMES.finditer(without_false_places(text)):
        name = match.group()
        start, end = match.span()
        after = _CLAUSE_END.split(text[end : end + 8], maxsplit=1)[0]  # a cue in the next clause is not this place's
        before = text[max(0, start - 4) : start]
        if _INSURED_AFTER.search(after) or "参保" in after[:4]:
            role = "insured"
        elif _INSURED_BEFORE.search(before) and not _CARE_AFTER.search(after):
            role = "insured"
        elif _DESTINATION_BEFORE.search(before[-2:]):
            role = "destination"
        else:
            role = "mentioned"
        found.append(Place(name, REGION_CODES[name], role))
    return found


def parse(message: str) -> ParsedMessage:
    text = clean(message)
    relation = find_keyword(text, RELATIONS)
    return ParsedMessage(
        text=text,
        questions=extract_questions(text) if has_words(text) else [],
        case=read_case(text),
        relation=relation,
        places=read_places(text),
    )


def place_name(code: str) -> str:
    return CODE_NAMES.get(code, code)
